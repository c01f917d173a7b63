"""Moving a user to another shard, online: a resumable state machine recorded in the
database (``emond.meta.moves``), run by ``emond-admin user move NAME SHARD``.

While it runs the user's devices keep getting ``ok``: their packets are *held* (parked
unprocessed, ``emond.process.consumer``) on both shards from the first step, and
processed on the target, in order, once the user's state and files are there. Steps,
each safe to run again after a crash of any process:

1. ``hold``: hold the user on the target and on the source, then point the user at the
   target in the database (fronts drop their cached shard on ``keys.USER_MOVED``).
2. ``drain``: wait until the source's consumer has handled every element its input queue
   held when the hold was set (processed before the hold, or parked), then until the source's
   storage queues have written every batch they held by then: the source changes nothing of
   the user's after this. A queue whose lease nobody has held for two lease periods (its
   shard process is not running) ends the command with an error, to run again once it is.
3. ``state``: copy the user's Redis state (input and feed last values, process state, step
   times, refusals) from the source's Redis to the target's (DUMP/RESTORE, exact). (The hold
   copied it once already, so that reads from the target meanwhile show last values.)
4. ``files``: copy each feed's files to the target's storage server over the stream, checked
   with SHA-256 (``FeedStore.copy``), and point the feed at it.
5. ``transfer``: once a grace period has passed since the hold (a front's request in flight
   when the map changed has ended) and the source's consumer has passed what its input queue
   held then (such a request's packet is parked there), the packets the source parked go in
   front of those parked on the target: they were accepted before them (those the source's
   queue still held at the hold, its consumer slow or down, and a front's that had not heard
   of the move yet), so the target processes the user's packets in the order they were
   accepted (a kWh feed takes no packet older than its last point: processed out of order,
   they would leave a hole).
6. ``release``: lift the hold on the target; its consumer lets the parked packets through
   first, then the new ones.
7. ``cleanup``: packets the source parked after the transfer (only a front that missed the
   announcement for longer than the grace period sends any) go to the target's input queue,
   and the user's Redis state and files on the source are deleted. The source keeps holding
   the user for a day, so a packet that still reaches it is parked, not processed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond import keys
from emond.config import NodeConfig
from emond.errors import Invalid, TimedOut
from emond.meta.feeds import Feed, Feeds
from emond.meta.inputs import Inputs
from emond.meta.moves import MoveRecord, Moves
from emond.process.functions import EXTRA_STATE
from emond.queue import QueueLayout, Scripts, decode_groups, encode_groups, read_head
from emond.redis import Redis
from emond.storage.feedstore import FeedStore

STEPS = ("hold", "drain", "state", "files", "transfer", "release", "cleanup", "done")
SOURCE_HOLD_SECONDS = 86_400  # the source parks what still reaches it for this long after a move
POLL_SECONDS = 0.2  # between looks at a queue being drained
DRAIN_TIMEOUT = 300.0  # seconds a shard's consumer or sender may take to pass a queue position
GRACE_SECONDS = 5.0  # longer than a front's request in flight when the user's shard changed
TRANSFER_CHUNK = 256  # parked elements moved per round trip

# Add a chunk of parked packets to a stream once: a move resumed after a crash between adding
# a chunk at the target and removing it at the source finds the chunk's mark and skips it.
ADD_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], '*', 'p', ARGV[1])
  return 1
end
return 0
"""

# The packets gathered from the source (KEYS[1]), then those the target parked (KEYS[2]),
# become the target's parked stream, in one step its consumer cannot come between. Without
# KEYS[1] (nothing gathered, or done already by a move resumed after a crash) nothing changes.
PUT_FIRST = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local parked = redis.call('XRANGE', KEYS[2], '-', '+')
for _, entry in ipairs(parked) do
  redis.call('XADD', KEYS[1], '*', unpack(entry[2]))
end
redis.call('DEL', KEYS[2])
redis.call('RENAME', KEYS[1], KEYS[2])
return #parked
"""


@dataclass
class MoveParts:
    """What a move works with: the cluster's database, each shard's Redis, the central Redis
    (fronts listen there for users that moved) and a feed store reaching every storage server."""

    config: NodeConfig
    moves: Moves
    inputs: Inputs
    feeds: Feeds
    central: Redis
    redis_of: Callable[[str], Redis]
    store: FeedStore
    reactor: IReactorTime
    layout: QueueLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = QueueLayout.from_config(self.config.input)


class Mover:
    log = Logger()

    def __init__(self, parts: MoveParts, clock: Callable[[], float] = time.monotonic) -> None:
        self.parts = parts
        self.clock = clock
        self.timings: dict[str, float] = {}

    async def move(self, username: str, target: str) -> dict[str, Any]:
        """Run (or resume) the user's move to ``target``; fires with the summary."""
        parts = self.parts
        if target not in parts.config.shards:
            raise Invalid(f"no shard {target!r} in this config ({', '.join(sorted(parts.config.shards))})")
        found = await parts.moves.user(username)
        if found is None:
            raise Invalid(f"no user {username!r}")
        userid, shard = found
        if shard == target:
            record = await parts.moves.begin(userid, shard, target, "hold")
            if record.step == "hold":  # nothing in progress: already there
                await parts.moves.advance(record, "done")
                return self.summary(record, username, already=True)
        else:
            record = await parts.moves.begin(userid, shard, target, "hold")
        if record.target != target:
            raise Invalid(f"user {username!r} is moving to {record.target!r}: run that move to its end first")
        for step in STEPS[STEPS.index(record.step) : -1]:
            started = self.clock()
            await getattr(self, f"_{step}")(record)
            await parts.moves.advance(record, STEPS[STEPS.index(step) + 1])
            self.timings[step] = round(self.clock() - started, 3)
            self.log.info("user {userid} move to {target}: {step} done", userid=userid, target=target, step=step)
        return self.summary(record, username)

    def summary(self, record: MoveRecord, username: str, already: bool = False) -> dict[str, Any]:
        return {
            "user": username,
            "id": record.userid,
            "from": record.source,
            "to": record.target,
            "already_there": already,
            "steps": self.timings,
            "feeds": record.marks.get("copied", {}),
            "parked_on_source": record.marks.get("transferred", 0),
        }

    # -- steps ------------------------------------------------------------------------------

    async def _hold(self, record: MoveRecord) -> None:
        source, target = self._shards(record)
        # When the map changed (a resumed hold notes a later time: the grace only grows).
        record.marks["held_at"] = self.parts.reactor.seconds()
        await target.call("SET", keys.user_hold(record.userid), record.source)
        await source.call("SET", keys.user_hold(record.userid), record.target)
        # A first copy of the state: from the flip on, reads (last values) come from the
        # target, and show these (seconds old at most) rather than nothing until the exact copy.
        await self._copy_state(record)
        await self.parts.moves.set_shard(record.userid, record.target)
        await self.parts.central.call("PUBLISH", keys.USER_MOVED, str(record.userid))

    async def _drain(self, record: MoveRecord) -> None:
        source, _ = self._shards(record)
        await self._consumed(record, source, "input", keys.input_queue(self.parts.layout.queue_for(record.userid)))
        servers = {f.server for f in await self._feeds(record)} & set(self.parts.config.shards[record.source].storage)
        for server in sorted(servers):
            await self._consumed(record, source, f"storage{server}", keys.storage_queue(server))

    async def _state(self, record: MoveRecord) -> None:
        await self._copy_state(record, reload=True)

    async def _files(self, record: MoveRecord) -> None:
        config = self.parts.config
        destination = config.default_server(record.target)
        source_servers = set(config.shards[record.source].storage)
        copied: dict[str, Any] = record.marks.setdefault("copied", {})
        for feed in await self._feeds(record):
            if feed.server not in source_servers:
                continue  # created on the target's server during the move, or copied already
            report = await self.parts.store.copy(feed, destination)
            copied[str(feed.id)] = {"from": feed.server, "to": destination, "bytes": report.size, "sha256": report.sha256}
            # Noted before the feed points at its copy: a command killed between the two still
            # finds, at cleanup, the source's files to delete (the other way round it would not).
            await self.parts.moves.advance(record, record.step)
            await self.parts.moves.set_feed_server(feed.id, destination)
        await self._shards(record)[1].call("INCR", keys.user_version(record.userid))

    async def _transfer(self, record: MoveRecord) -> None:
        # A front's request that looked the user up before the hold may append to the source
        # until the grace period has passed; the source's consumer parks it when it gets there.
        held_at = record.marks.get("held_at", self.parts.reactor.seconds())
        wait = held_at + GRACE_SECONDS - self.parts.reactor.seconds()
        if wait > 0:
            await task.deferLater(self.parts.reactor, wait, lambda: None)
        source, _ = self._shards(record)
        await self._consumed(record, source, "input-after-grace", keys.input_queue(self.parts.layout.queue_for(record.userid)))
        first = keys.user_held_first(record.userid)
        moved = await self._move_parked(record, first)
        record.marks["transferred"] = record.marks.get("transferred", 0) + moved
        _, target = self._shards(record)
        await Scripts(target).run(PUT_FIRST, [first, keys.user_held(record.userid)], [])

    async def _release(self, record: MoveRecord) -> None:
        _, target = self._shards(record)
        stream = keys.input_stream(self.parts.layout.queue_for(record.userid))
        await target.pipeline([
            ("DEL", keys.user_hold(record.userid)),
            ("XADD", stream, "*", "p", encode_groups([[record.userid, 0.0, 0, []]])),  # a pass lets the parked through
        ])

    async def _cleanup(self, record: MoveRecord) -> None:
        stream = keys.input_stream(self.parts.layout.queue_for(record.userid))
        record.marks["transferred"] = record.marks.get("transferred", 0) + await self._move_parked(record, stream)
        source, _ = self._shards(record)
        names = await self._state_keys(record)
        await source.pipeline([("DEL", *names), ("EXPIRE", keys.user_hold(record.userid), SOURCE_HOLD_SECONDS)])
        for feedid, where in record.marks.get("copied", {}).items():
            feed = await self.parts.feeds.get(int(feedid))
            if feed is not None and feed.server != where["from"]:
                await self.parts.store.delete(replace(feed, server=where["from"]))

    # -- helpers ----------------------------------------------------------------------------

    async def _copy_state(self, record: MoveRecord, reload: bool = False) -> None:
        """The user's Redis state at the source, copied to the target as it is (DUMP/RESTORE);
        ``reload``: the target's consumer then reloads the user."""
        source, target = self._shards(record)
        names = await self._state_keys(record)
        dumps = await source.pipeline([("DUMP", name) for name in names])
        commands: list[tuple[Any, ...]] = []
        for name, dump in zip(names, dumps):
            # a key the source lacks must not survive at the target from an earlier attempt
            commands.append(("RESTORE", name, 0, dump, "REPLACE") if dump is not None else ("DEL", name))
        if reload:
            commands.append(("INCR", keys.user_version(record.userid)))
        await target.pipeline(commands)

    def _shards(self, record: MoveRecord) -> tuple[Redis, Redis]:
        return self.parts.redis_of(record.source), self.parts.redis_of(record.target)

    async def _feeds(self, record: MoveRecord) -> list[Feed]:
        return await self.parts.feeds.list(record.userid)

    async def _state_keys(self, record: MoveRecord) -> list[str]:
        """Every Redis key of the user's state on its shard."""
        userid = record.userid
        names = [keys.refused_counts(userid), keys.refused_last(userid)]
        for inp in await self.parts.inputs.list(userid):
            names += [keys.input_lastvalue(inp.id), keys.step_times(inp.id)]
        for feed in await self._feeds(record):
            names += [keys.feed_lastvalue(feed.id), keys.feed_disk(feed.id)]
            names += [keys.process_state(name, feed.id) for name in sorted(set(EXTRA_STATE.values()))]
        return names

    async def _consumed(self, record: MoveRecord, redis: Redis, mark: str, queue: str) -> None:
        """Wait until queue ``queue``'s stream holds nothing up to the position it had when
        first looked at (noted in the record, so a resumed move waits for the same position).
        TimedOut if no process has held the queue's lease for two lease periods (its shard
        process is not running: nothing would ever pass it) or the position is not passed
        within DRAIN_TIMEOUT."""
        stream = keys.stream(queue)
        positions: dict[str, Any] = record.marks.setdefault("positions", {})
        if mark not in positions:
            last = await redis.call("XREVRANGE", stream, "+", "-", "COUNT", 1)
            positions[mark] = last[0][0].decode() if last else None
            await self.parts.moves.advance(record, record.step)
        position = positions[mark]
        if position is None:
            return
        orphaned = 2 * self.parts.config.input.lease_ms / 1000
        began = held = self.clock()
        while True:
            left, owner = await redis.pipeline([("XRANGE", stream, "-", position, "COUNT", 1), ("EXISTS", keys.lease(queue))])
            if not left:
                return
            now = self.clock()
            if owner:
                held = now
            elif now - held > orphaned:
                raise TimedOut(f"{stream} on shard {record.source!r}: no process has held its lease for {orphaned:g} s: is the shard's process running?")
            if now - began > DRAIN_TIMEOUT:
                raise TimedOut(f"{stream} on shard {record.source!r} did not pass {position} in {DRAIN_TIMEOUT:g} s: is its shard process running?")
            await task.deferLater(self.parts.reactor, POLL_SECONDS, lambda: None)

    async def _move_parked(self, record: MoveRecord, to_stream: str) -> int:
        """Move what the source parked for the user into ``to_stream`` on the target;
        the number of packets moved. Each chunk is added at the target (once: ``ADD_ONCE``)
        before it is removed at the source, so a crash between the two loses nothing."""
        source, target = self._shards(record)
        scripts = Scripts(target)
        held = keys.user_held(record.userid)
        moved = 0
        while True:
            entries = await read_head(source, held, None, TRANSFER_CHUNK)
            if not entries:
                return moved
            groups = [g for _id, fields in entries for g in decode_groups(fields[b"p"])]
            moved += sum(len(g[3]) for g in groups)
            mark = keys.moved_chunk(record.userid, entries[-1][0].decode())
            await scripts.run(ADD_ONCE, [mark, to_stream], [encode_groups(groups), SOURCE_HOLD_SECONDS])
            await source.call("XDEL", held, *[entry_id for entry_id, _ in entries])

