"""Input queue consumers: packets → inputs and process lists → storage queues.

A node's consumer service takes the leases of the input queues it can get
(any number of nodes share them; each queue has one active consumer) and
processes each held queue's elements in the order they were accepted. For
a batch of elements it creates the inputs seen for the first time (within
the node and input limits; beyond them the values are refused and counted),
runs the process lists, and commits — input last values, process state,
storage records and the removal of the elements — in one fenced script.

State Redis does not have (it lost its data) is rebuilt before a pass runs:
feeds' last values from their last points on disk (one read per storage
server), inputs' from the database, where the consumer writes them at most
every ``[input] lastvalue_save_interval`` seconds, off the packet path (rules
in ``emond.runner``). A storage server that cannot be read stops the pass
until it can: a total is never restarted from 0.
"""

from __future__ import annotations

import uuid
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond.api import ApiError
from emond.context import NodeContext
from emond.feeds import Feed
from emond.db import is_duplicate
from emond.engine import FeedError, NoSuchFeed
from emond.inputparse import frame_node, frame_values
from emond.inputs import Input, user_version_key
from emond.loops import Slicer, steady_loop
from emond.process import FEEDID, INPUTID, PROCESSES, parse_lenient
from emond.queue import Commit, Lease, LeaseLost, Scripts, decode_groups, input_stream
from emond.records import ENGINE_PHPFINA, RECORD
from emond.redis import Redis, RedisUnavailable
from emond.refusals import Refused
from emond.runner import ProcessState, StepRun, daily_feeds, references, run_steps
from emond.web import QueueLayout

CONSUMERS = "emond:consumers"
POISON_AFTER = 5  # failed attempts before an element is set aside
# Packets in one pass (one commit). A pass runs on the reactor thread (~4 µs a packet):
# this bounds how long HTTP requests wait behind it; the awaits between passes let them in.
PASS_PACKETS = 4096
SLICE_MASK = 1023  # the slicer's clock is read once per this many values
REASON_NODE_LIMIT = "node_limit"
REASON_INPUT_LIMIT = "input_limit"
REASON_BAD_NAME = "invalid_name"


@dataclass
class UserCache:
    version: bytes | None
    inputs: dict[tuple[str, str], Input]
    steps: dict[int, list]  # input id -> parsed process list
    feeds: dict[int, Feed]
    tz: zoneinfo.ZoneInfo
    nodes: set[str] = field(default_factory=set)
    daily: set[int] = field(default_factory=set)  # feeds a daily step writes (one point per day)


def _feed_arg(process: int) -> bool:
    p = PROCESSES.get(process)
    return p is not None and p.argtype == FEEDID


def _input_arg(process: int) -> bool:
    p = PROCESSES.get(process)
    return p is not None and p.argtype == INPUTID


class StorageUnreadable(Exception):
    """A feed's last point on disk is needed and its storage server cannot be read now."""


class QueueTenure:
    """A held input queue: its lease and the state cached while it is held."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.state = ProcessState()
        self.failures = 0  # consecutive failed attempts at the head of the queue


class InputConsumerService(Service):
    log = Logger()

    def __init__(
        self,
        ctx: NodeContext,
        layout: QueueLayout,
        blocking: Redis,
        reactor: IReactorTime,
        batch: int = 64,
        lease_ms: int = 10_000,
        block_ms: int = 500,
        owner: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.layout = layout
        self.blocking = blocking  # its own connection: XREAD BLOCK must not hold up other calls
        self.reactor = reactor
        self.batch = batch
        self.lease_ms = lease_ms
        self.block_ms = block_ms
        self.owner = owner or f"{ctx.config.node.name}-{uuid.uuid4().hex[:8]}"
        self.scripts = Scripts(ctx.redis)
        self.tenures: dict[int, QueueTenure] = {}
        self.users: dict[int, UserCache] = {}
        self._leases = steady_loop(self._renew, reactor, "input lease loop")
        self._loop: defer.Deferred[None] | None = None
        self._stopping = False
        self._idle: list[defer.Deferred[None]] = []
        self._busy = False
        self.fair = layout.queues
        # Input last values committed since the last write to the database.
        self._unsaved: dict[int, tuple[int, float | None]] = {}
        self._saver = steady_loop(self.save_lastvalues, reactor, "input last values saver")
        self._saved: list[defer.Deferred[None]] = []
        self.packets = Counter("emond_packets_processed", "Input packets processed", registry=ctx.registry)
        self.dead = Counter("emond_input_elements_set_aside", "Queue elements that kept failing, moved aside", registry=ctx.registry)
        self.held = Gauge("emond_input_queues_held", "Input queues this process consumes", registry=ctx.registry)

    def startService(self) -> None:
        super().startService()
        self.blocking.open()  # closed again at the end of stopService
        self._stopping = False
        self._leases.start(self.lease_ms / 3000.0, now=True)
        self._saver.start(self.ctx.config.input.lastvalue_save_interval, now=False)
        self._loop = defer.ensureDeferred(self._run())

    async def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        self._stopping = True
        if self._leases.running:
            self._leases.stop()
        if self._loop is not None:
            await self._loop  # finish the batch in hand (it commits or is read again later)
        if self._saver.running:
            self._saver.stop()
        await self.save_lastvalues()
        try:
            await self.ctx.redis.call("ZREM", CONSUMERS, self.owner)
            for tenure in self.tenures.values():
                await tenure.lease.release()
        except RedisUnavailable:
            pass  # the leases expire by themselves
        self.tenures.clear()
        await self.blocking.disconnect()

    def saved(self) -> defer.Deferred[None]:
        """Fires after the next write of input last values to the database has ended (tests)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._saved.append(d)
        return d

    async def save_lastvalues(self) -> None:
        """Write the input last values committed since the last call to the database, in one
        batch; on failure they are kept for the next call. Never raises (a LoopingCall runs it)."""
        batch, self._unsaved = self._unsaved, {}
        try:
            if batch:
                await self.ctx.inputs.save_lastvalues(batch)
        except Exception as e:
            for inputid, last in batch.items():
                self._unsaved.setdefault(inputid, last)  # a value committed meanwhile is newer
            self.log.warn("input last values not saved to the database ({n}): {error}; will retry", n=len(batch), error=str(e))
        finally:
            waiting, self._saved = self._saved, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> defer.Deferred[None]:
        """Fires once every input queue has been seen empty after this call (tests, drains)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    async def _renew(self) -> None:
        """Renew held leases and take or give queues towards a fair share.

        Live consumers announce themselves in ``emond:consumers`` (score: when
        the announcement expires). A consumer holding more than its share
        releases the excess; one holding less takes free queues. A released
        queue's batch in flight fails its fenced commit and is simply read
        again by the next holder, so order is kept.
        """
        now_ms = int(self.reactor.seconds() * 1000)
        try:
            _, _, live = await self.ctx.redis.pipeline([
                ("ZADD", CONSUMERS, now_ms + self.lease_ms, self.owner),
                ("ZREMRANGEBYSCORE", CONSUMERS, "-inf", now_ms),
                ("ZCARD", CONSUMERS),
            ])
            self.fair = -(-self.layout.queues // max(1, int(live)))
            for queue in sorted(self.tenures):
                lease = self.tenures[queue].lease
                before = lease.token
                if not await lease.acquire_or_renew():
                    del self.tenures[queue]
                elif lease.token != before:  # it lapsed and is ours again: others may have held it
                    self.tenures[queue] = QueueTenure(lease)
            for queue in sorted(self.tenures, reverse=True)[: max(0, len(self.tenures) - self.fair)]:
                await self.tenures.pop(queue).lease.release()
                self.log.info("gave input queue {queue} to another consumer", queue=queue)
            for queue in range(self.layout.queues):
                if len(self.tenures) >= self.fair:
                    break
                if queue in self.tenures:
                    continue
                lease = Lease(self.scripts, f"in:{queue}", self.owner, self.lease_ms)
                if await lease.acquire_or_renew():
                    self.tenures[queue] = QueueTenure(lease)  # a new tenure: fresh state
                    self.log.info("consuming input queue {queue} (token {token})", queue=queue, token=lease.token)
        except RedisUnavailable:
            return
        finally:
            self.held.set(len(self.tenures))

    async def _run(self) -> None:
        while not self._stopping:
            queues = sorted(self.tenures)
            if not queues:
                await task.deferLater(self.reactor, self.block_ms / 1000.0, lambda: None)
                continue
            waiting, self._idle = self._idle, []
            try:
                reply = await self.blocking.call(
                    "XREAD", "COUNT", self.batch, "BLOCK", self.block_ms, "STREAMS",
                    *[input_stream(q) for q in queues], *["0"] * len(queues),
                )
            except RedisUnavailable as e:
                self._idle += waiting
                self.log.warn("input queues: {error}", error=str(e))
                await task.deferLater(self.reactor, 1.0, lambda: None)
                continue
            if not reply and len(queues) >= self.fair:
                if self._busy:
                    self._busy = False
                    self.log.info("input queues drained")
                for d in waiting:  # every queue was empty after they asked
                    d.callback(None)
            else:
                self._idle += waiting
                self._busy = self._busy or bool(reply)
            for stream, entries in reply or []:
                queue = int(stream.decode().rsplit(":", 1)[1])
                tenure = self.tenures.get(queue)
                if tenure is None or not entries:
                    continue
                try:
                    await self.process(queue, tenure, entries)
                except LeaseLost:
                    self.tenures.pop(queue, None)
                    self.log.warn("lost input queue {queue} to another consumer", queue=queue)
                except (RedisUnavailable, StorageUnreadable) as e:
                    self.log.warn("input queue {queue}: {error}; will retry", queue=queue, error=str(e))
                    tenure.state = ProcessState()  # nothing was committed: start from Redis again
                    await task.deferLater(self.reactor, 1.0, lambda: None)
                except Exception as e:
                    self.log.failure("processing input queue {queue} failed; will retry", queue=queue)
                    tenure.state = ProcessState()
                    tenure.failures += 1
                    if tenure.failures >= POISON_AFTER:
                        await self._set_aside(queue, tenure, entries[0], e)
                    else:
                        await task.deferLater(self.reactor, 1.0, lambda: None)

    async def _set_aside(self, queue: int, tenure: QueueTenure, entry: Any, error: Exception) -> None:
        """An element that keeps failing would stop its queue for good: move it, whole,
        to ``emond:dead:in:<queue>`` for an operator (nothing is dropped), and go on."""
        entry_id, fields = entry
        fields = dict(zip(fields[::2], fields[1::2])) if isinstance(fields, list) else fields
        commit = Commit()
        commit.command("XADD", f"emond:dead:{input_stream(queue)}", "*", "p", fields.get(b"p", b""), "error", str(error)[:500])
        await tenure.lease.commit(input_stream(queue), [entry_id], commit)
        tenure.failures = 0
        self.dead.inc()
        self.log.error(
            "input queue {queue}: element {id} failed {n} times; set aside in emond:dead:{stream}",
            queue=queue, id=entry_id, n=POISON_AFTER, stream=input_stream(queue),
        )

    async def process(self, queue: int, tenure: QueueTenure, entries: list[Any]) -> None:
        """``entries`` in order, in passes of about ``PASS_PACKETS`` packets, each one commit.
        After a failure, one element per pass: the element set aside is the one that fails."""
        if tenure.failures:
            entries = entries[:1]
        ids: list[bytes] = []
        groups: list[list[Any]] = []
        size = 0
        for entry_id, fields in entries:
            fields = dict(zip(fields[::2], fields[1::2])) if isinstance(fields, list) else fields
            element = decode_groups(fields[b"p"])
            ids.append(entry_id)
            groups.extend(element)
            size += sum(len(group[3]) for group in element)
            if size >= PASS_PACKETS:
                await self._pass(queue, tenure, ids, groups)
                ids, groups, size = [], [], 0
        if ids:
            await self._pass(queue, tenure, ids, groups)

    async def _pass(self, queue: int, tenure: QueueTenure, ids: list[bytes], groups: list[list[Any]]) -> None:
        refused: dict[int, list[Refused]] = {}
        users = await self._users({int(g[0]) for g in groups})
        state = tenure.state
        # One pass: find (or create) each value's input and what its list reads.
        work: list[tuple[UserCache, Input, int, float]] = []
        seen: set[int] = set()
        inputids: set[int] = set()
        feedids: set[int] = set()
        read_feeds: dict[int, UserCache] = {}  # feed -> the user whose list computes with its last value
        extra: set[str] = set()
        packets = 0
        # A pass is bounded by packets, but one packet may carry 100,000 values: the reactor
        # gets a turn every SLICE_SECONDS (the tenure is ours alone, the commit stays one).
        slicer = Slicer(self.reactor)
        for userid, _received, time_ref, frames in groups:
            user = users[int(userid)]
            inputs = user.inputs
            packets += len(frames)
            for frame in frames:
                when = time_ref + frame[0]
                node = frame_node(frame)
                for name, value in frame_values(frame):
                    if len(work) & SLICE_MASK == 0:
                        await slicer.turn()
                    inp = inputs.get((node, name))
                    if inp is None:
                        inp = await self._create_input(user, int(userid), when, node, name, refused)
                        if inp is None:
                            continue
                    work.append((user, inp, when, value))
                    if inp.id in seen:
                        continue
                    seen.add(inp.id)
                    inputids.add(inp.id)
                    steps = user.steps.get(inp.id)
                    if steps:
                        refs = references(steps, _feed_arg, _input_arg)
                        feedids |= refs.feeds
                        for feedid in refs.read_feeds:
                            read_feeds.setdefault(feedid, user)
                        inputids |= refs.inputs
                        extra |= refs.extra
        wanted = state.missing(inputids, feedids, extra)
        if wanted:
            absent_inputs, absent_feeds = state.loaded(wanted, await self.ctx.redis.pipeline(ProcessState.load_commands(wanted)))
            if absent_inputs:
                state.rebuild_inputs(absent_inputs, await self.ctx.inputs.stored_lastvalues(absent_inputs))
            # A feed only written (log_to_feed) needs no last value: its first write sets it.
            rebuild = {f: read_feeds[f] for f in absent_feeds if f in read_feeds}
            if rebuild:
                await self._rebuild_feeds(state, rebuild)
        for n, (user, inp, when, value) in enumerate(work):
            if n & SLICE_MASK == 0:
                await slicer.turn()
            state.set_input(inp.id, when, value)
            steps = user.steps.get(inp.id)
            if steps:
                run_steps(steps, StepRun(state, user.feeds, user.tz, inp.id, when), value)
        if state.refused:
            self._refused_values(state, work, refused)
        committed_inputs = list(state.dirty_inputs)
        commit = Commit()
        state.to_commit(commit)
        for server, records in state.records.items():
            batch = np.array(records, dtype=RECORD)
            commit.append_storage(server, batch.tobytes())
        try:
            await tenure.lease.commit(input_stream(queue), ids, commit)
        finally:
            state.clear_changes()
        for inputid in committed_inputs:
            self._unsaved[inputid] = state.inputs[inputid]
        tenure.failures = 0
        self.packets.inc(packets)
        for userid, items in refused.items():
            await self.ctx.refusals.record(userid, items)

    async def _rebuild_feeds(self, state: ProcessState, absent: dict[int, UserCache]) -> None:
        """Feeds Redis has no last value for go on from their last point on disk: one
        ``summaries`` read per storage server for all of them (rules in ``emond.runner``)."""
        found = {f: user.feeds[f] for f, user in absent.items() if f in user.feeds}
        reachable = set(self.ctx.config.node.storage) | set(self.ctx.config.storage_servers)
        readable = [feed for feed in found.values() if feed.server in reachable]
        summaries = await self.ctx.store.summaries(readable) if readable else {}
        for feedid, user in absent.items():
            feed = found.get(feedid)
            if feed is None:
                state.rebuild_feed(feedid, None)  # not the user's (deleted): its steps do nothing
                continue
            if feed.server not in reachable:
                # Nothing on this process reads that server: a new feed, or state it cannot rebuild.
                self.log.warn(
                    "feed {feed}: no last value in Redis and storage server {server} is not reachable from "
                    "this process to read its last point; it starts empty (give this process "
                    "[storage.servers] {server} to rebuild such state from disk)", feed=feedid, server=feed.server,
                )
                state.rebuild_feed(feedid, None)
                continue
            summary = summaries[feedid]
            point = summary.last if summary.size is not None else await self._disk_last(feed)
            slot = feed.interval if feed.engine == ENGINE_PHPFINA else 1
            state.rebuild_feed(feedid, point, slot, user.tz if feedid in user.daily else None)
        if readable:
            self.log.info("{n} feeds had no last value in Redis: rebuilt from their last points on disk", n=len(readable))

    async def _disk_last(self, feed: Feed) -> tuple[int, float | None] | None:
        """The last point of a feed whose summary failed: None if its files are gone, else
        ``StorageUnreadable`` (its server is down or failing): never a restart from 0."""
        try:
            return await self.ctx.store.lastvalue(feed)
        except (NoSuchFeed, KeyError):
            return None
        except (FeedError, ApiError, OSError) as e:
            raise StorageUnreadable(f"feed {feed.id}: last point on storage server {feed.server} unreadable ({e})") from e

    def _refused_values(self, state: ProcessState, work: list[tuple[UserCache, Input, int, float]], refused: dict[int, list[Refused]]) -> None:
        """Values the process lists refused (not a finite float32), to the refusals recorder."""
        by_id = {inp.id: inp for _user, inp, _when, _value in work}
        for inputid, when, reason in state.refused:
            inp = by_id[inputid]
            refused.setdefault(inp.userid, []).append(Refused(when, inp.nodeid, inp.name, reason))

    async def _users(self, userids: set[int]) -> dict[int, UserCache]:
        ordered = sorted(userids)
        versions = await self.ctx.redis.pipeline([("GET", user_version_key(u)) for u in ordered])
        for userid, version in zip(ordered, versions):
            cached = self.users.get(userid)
            if cached is None or cached.version != version:
                self.users[userid] = await self._load_user(userid, version)
        return {u: self.users[u] for u in ordered}

    async def _load_user(self, userid: int, version: bytes | None) -> UserCache:
        inputs = await self.ctx.inputs.list(userid)
        feeds = await self.ctx.feeds.list(userid)
        try:
            tz = zoneinfo.ZoneInfo(await self.ctx.users.timezone(userid))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            tz = zoneinfo.ZoneInfo("UTC")
        steps = {i.id: parse_lenient(i.processlist) for i in inputs if i.processlist}
        return UserCache(
            version=version,
            inputs={(i.nodeid, i.name): i for i in inputs},
            steps=steps,
            feeds={f.id: f for f in feeds},
            tz=tz,
            nodes={i.nodeid for i in inputs},
            daily=daily_feeds(steps.values()),
        )

    async def _create_input(
        self, user: UserCache, userid: int, when: int, node: str, name: str, refused: dict[int, list[Refused]]
    ) -> Input | None:
        """A new input, within the node and input limits; None (refused and counted) beyond them."""
        limits = self.ctx.config.input
        reason = None
        if node not in user.nodes and len(user.nodes) >= limits.max_nodes:
            reason = REASON_NODE_LIMIT
        elif len(user.inputs) >= limits.max_inputs:
            reason = REASON_INPUT_LIMIT
        if reason is not None:
            refused.setdefault(userid, []).append(Refused(when, node, name, reason))
            return None
        try:
            inp = await self.ctx.inputs.create(userid, node, name)
        except Exception as e:
            if not is_duplicate(e):
                raise
            # created by an earlier run that did not commit: use it
            inp = [i for i in await self.ctx.inputs.list(userid) if (i.nodeid, i.name) == (node, name)][0]
        user.inputs[(node, name)] = inp
        user.nodes.add(node)
        return inp
