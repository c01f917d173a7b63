"""Input queue consumers: packets → inputs and process lists → storage queues.

A node's consumer service takes the leases of the input queues it can get
(any number of nodes share them; each queue has one active consumer) and
processes each held queue's elements in the order they were accepted. For
a batch of elements it creates the inputs seen for the first time (within
the node and input limits; beyond them the values are refused and counted),
runs the process lists, and commits — input last values, process state,
storage records and the removal of the elements — in one fenced script.
Lists that only log, scale or offset run per input column as arrays
(``emond.process.plans``), a chunk of the pass at a time; anything else, and
everything after a chunk that needs it, value by value (``functions.run_steps``).

A user moving onto this shard (``emond.cluster.move``) is held: while ``keys.user_hold``
is set, its packets are parked in ``keys.user_held`` (in the commit that removes their
element), unprocessed. Once the hold is lifted, the parked packets go through before any
newer one of that user, a chunk per pass; a pass that leaves some parked parks the user's
new packets behind them and appends an empty element so that the next pass comes.

State Redis does not have (it lost its data) is rebuilt before a pass runs:
feeds' last values from their last points on disk (one read per storage
server), inputs' from the database, where the consumer writes them at most
every ``[input] lastvalue_save_interval`` seconds, off the packet path (rules
in ``emond.process.state``). A storage server that cannot be read stops the pass
until it can: a total is never restarted from 0.
"""

from __future__ import annotations

import uuid
import zoneinfo
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond import keys
from emond.config import NodeConfig
from emond.meta.feeds import Feed, Feeds
from emond.meta.db import is_duplicate
from emond.inputparse import frame_node, frame_values
from emond.meta.inputs import Input, Inputs
from emond.loops import Slicer, steady_loop
from emond.processlist import parse_lenient
from emond.queue import (
    Commit,
    ElementHandler,
    Entry,
    FairShare,
    LeasedReader,
    QueueLayout,
    Tenure,
    decode_groups,
    encode_groups,
    input_queue,
    read_head,
)
from emond.redis import Redis
from emond.meta.refusals import Refusals, Refused
from emond.meta.users import Users
from emond.process.state import StateLoader, StorageUnreadable, to_commit
from emond.process.functions import ExtraKey, ProcessState, StepRun, daily_feeds, run_steps
from emond.process.plans import EMPTY_PLAN, Plan, chunks, gather, make_plan, reads, run_columns
from emond.storage.feedstore import FeedStore

POISON_AFTER = 5  # failed attempts before an element is set aside
# Packets in one pass (one commit). A pass runs on the reactor thread (~4 µs a packet):
# this bounds how long HTTP requests wait behind it; the awaits between passes let them in.
PASS_PACKETS = 4096
SLICE_MASK = 1023  # the slicer's clock is read once per this many values
CHUNK_VALUES = 16384  # values a pass runs as arrays between reactor turns (a few ms)
HELD_CHUNK = 256  # parked elements of a released user let through per pass
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
    plans: dict[int, Plan] = field(default_factory=dict)  # input id -> its list, planned (emond.process.plans)


class ConsumerContext(Protocol):
    """What the consumer uses of the node's shared parts (``emond.api.context.NodeContext``
    has them all; named here so processing does not import the API)."""

    config: NodeConfig
    redis: Redis
    users: Users
    feeds: Feeds
    inputs: Inputs
    store: FeedStore
    refusals: Refusals
    registry: CollectorRegistry


@dataclass(frozen=True)
class Hold:
    """A user moving onto this shard: ``holding`` while its packets are parked, ``backlog``
    parked elements not processed yet."""

    holding: bool
    backlog: int


class InputConsumerService(Service, ElementHandler):
    """Reads a fair share of the input queues (``emond.queue.LeasedReader``) and runs
    each element's packets through the inputs and process lists."""

    log = Logger()
    doing = "processing an element"
    retryable = (StorageUnreadable,)  # its storage server is down: wait, never set the element aside

    def __init__(
        self,
        ctx: ConsumerContext,
        layout: QueueLayout,
        blocking: Redis,
        reactor: IReactorTime,
        batch: int = 64,
        lease_ms: int = 10_000,
        block_ms: int = 500,
        owner: str | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """``clock``: the leases' and retries' (tests give a ``task.Clock``); default ``reactor``."""
        self.ctx = ctx
        self.layout = layout
        self.reactor = reactor
        self.owner = owner or f"{ctx.config.node.name}-{uuid.uuid4().hex[:8]}"
        reachable = set(ctx.config.node.storage) | set(ctx.config.storage_servers)
        self.loader = StateLoader(ctx.redis, ctx.inputs, ctx.store, reachable)
        self.users: dict[int, UserCache] = {}
        # Input last values committed since the last write to the database.
        self._unsaved: dict[int, tuple[int, float | None]] = {}
        self._saver = steady_loop(self.save_lastvalues, reactor, "input last values saver")
        self._saved: list[defer.Deferred[None]] = []
        self.packets = Counter("emond_packets_processed", "Input packets processed", registry=ctx.registry)
        self.dead = Counter("emond_input_elements_set_aside", "Queue elements that kept failing, moved aside", registry=ctx.registry)
        held = Gauge("emond_input_queues_held", "Input queues this process consumes", registry=ctx.registry)
        clock = clock or reactor
        queues = [input_queue(q) for q in range(layout.queues)]
        self.share = FairShare(ctx.redis, queues, self.owner, lease_ms, clock, keys.CONSUMERS, held)
        self.reader = LeasedReader(
            self.share, self, blocking, clock, "input queues", batch=batch, block_ms=block_ms, poison_after=POISON_AFTER
        )

    @property
    def tenures(self) -> dict[int, Tenure]:
        """The input queues held now, by number."""
        return self.share.tenures

    def startService(self) -> None:
        super().startService()
        self._saver.start(self.ctx.config.input.lastvalue_save_interval, now=False)
        self.reader.start()

    async def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        await self.reader.stop()  # the batch in hand commits (or is read again later), the leases go
        await self._saver.stop()  # a save in progress ends first
        await self.save_lastvalues()

    def unfinished(self) -> list[str]:
        """What a stop cut short would leave undone (for the log)."""
        return self.reader.unfinished()

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
        return self.reader.idle()

    def set_aside(self, tenure: Tenure, entry_id: bytes) -> None:
        self.dead.inc()

    async def handle(self, tenure: Tenure, entries: list[Entry]) -> None:
        """``entries`` in order, in passes of about ``PASS_PACKETS`` packets, each one commit."""
        ids: list[bytes] = []
        groups: list[list[Any]] = []
        size = 0
        for entry_id, fields in entries:
            element = decode_groups(fields[b"p"])
            ids.append(entry_id)
            groups.extend(element)
            size += sum(len(group[3]) for group in element)
            if size >= PASS_PACKETS:
                await self._pass(tenure, ids, groups)
                ids, groups, size = [], [], 0
        if ids:
            await self._pass(tenure, ids, groups)

    async def _pass(self, tenure: Tenure, ids: list[bytes], groups: list[list[Any]]) -> None:
        refused: dict[int, list[Refused]] = {}
        commit = Commit()
        users, holds = await self._users({int(g[0]) for g in groups})
        if holds:
            groups = await self._held(tenure, groups, holds, commit)
        if tenure.state is None:
            tenure.state = ProcessState()  # a new tenure, or one whose pass failed: from what Redis has
        state = tenure.state
        # As arrays, a chunk at a time (the reactor gets a turn between them); from the first
        # chunk that needs the general path on, value by value.
        packets = 0
        slicer = Slicer(self.reactor)
        parts = list(chunks(groups, CHUNK_VALUES))
        for n, chunk in enumerate(parts):
            ran = await self._run_columns(state, chunk, users)
            if ran is None:
                packets += await self._run_values(state, [g for part in parts[n:] for g in part], users, refused)
                break
            packets += ran
            await slicer.turn()
        committed_inputs = list(state.dirty_inputs)
        to_commit(state, commit)
        try:
            await tenure.commit(ids, commit)
        finally:
            state.clear_changes()
        for inputid in committed_inputs:
            self._unsaved[inputid] = state.inputs[inputid]
        self.packets.inc(packets)
        for userid, items in refused.items():
            await self.ctx.refusals.record(userid, items)

    async def _run_columns(self, state: ProcessState, groups: list[list[Any]], users: dict[int, UserCache]) -> int | None:
        """The pass as array operations (``emond.process.plans``): its packets, or None when
        some of it needs the general path (nothing changed then)."""
        columns = gather(groups, users)
        if columns is None:
            return None
        inputids, feedids = reads(columns)
        await self.loader.load(state, inputids, feedids, (), {})
        return columns.packets if run_columns(state, columns) else None

    async def _run_values(
        self, state: ProcessState, groups: list[list[Any]], users: dict[int, UserCache], refused: dict[int, list[Refused]]
    ) -> int:
        """The general path: every value through its input's list (``functions.run_steps``)."""
        # One pass: find (or create) each value's input and what its list reads.
        work: list[tuple[UserCache, Input, int, float]] = []
        seen: set[int] = set()
        inputids: set[int] = set()
        feedids: set[int] = set()
        read_feeds: dict[int, UserCache] = {}  # feed -> the user whose list computes with its last value
        extra: set[ExtraKey] = set()
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
                        await slicer.turn()  # the slow path (a new input, or one refused): every time
                        inp = await self._create_input(user, int(userid), when, node, name, refused)
                        if inp is None:
                            continue
                    work.append((user, inp, when, value))
                    if inp.id in seen:
                        continue
                    seen.add(inp.id)
                    inputids.add(inp.id)
                    refs = user.plans.get(inp.id, EMPTY_PLAN).refs
                    feedids |= refs.feeds
                    for feedid in refs.read_feeds:
                        read_feeds.setdefault(feedid, user)
                    inputids |= refs.inputs
                    extra |= refs.extra
        await self.loader.load(state, inputids, feedids, extra, read_feeds)
        for n, (user, inp, when, value) in enumerate(work):
            if n & SLICE_MASK == 0:
                await slicer.turn()
            state.set_input(inp.id, when, value)
            steps = user.steps.get(inp.id)
            if steps:
                run_steps(steps, StepRun(state, user.feeds, user.tz, inp.id, when), value)
        if state.refused:
            self._refused_values(state, work, refused)
        return packets

    def _refused_values(self, state: ProcessState, work: list[tuple[UserCache, Input, int, float]], refused: dict[int, list[Refused]]) -> None:
        """Values the process lists refused (not a finite float32), to the refusals recorder."""
        by_id = {inp.id: inp for _user, inp, _when, _value in work}
        for inputid, when, reason in state.refused:
            inp = by_id[inputid]
            refused.setdefault(inp.userid, []).append(Refused(when, inp.nodeid, inp.name, reason))

    async def _users(self, userids: set[int]) -> tuple[dict[int, UserCache], dict[int, Hold]]:
        """The users of a pass (reloaded when their version changed) and those held, in one
        round trip."""
        ordered = sorted(userids)
        replies = await self.ctx.redis.pipeline(
            [c for u in ordered for c in (("GET", keys.user_version(u)), ("EXISTS", keys.user_hold(u)), ("XLEN", keys.user_held(u)))]
        )
        holds: dict[int, Hold] = {}
        for n, userid in enumerate(ordered):
            version, holding, backlog = replies[3 * n : 3 * n + 3]
            if holding or backlog:
                holds[userid] = Hold(bool(holding), int(backlog))
            cached = self.users.get(userid)
            if cached is None or cached.version != version:
                self.users[userid] = await self._load_user(userid, version)
        return {u: self.users[u] for u in ordered}, holds

    async def _held(self, tenure: Tenure, groups: list[list[Any]], holds: dict[int, Hold], commit: Commit) -> list[list[Any]]:
        """The groups this pass processes: a held user's are parked; a released user's parked
        ones come first (a chunk of them), and its new ones are parked behind any left."""
        out: list[list[Any]] = []
        parked: dict[int, list[list[Any]]] = {}
        released: set[int] = set()
        for group in groups:
            userid = int(group[0])
            hold = holds.get(userid)
            if hold is None:
                out.append(group)
                continue
            if not hold.holding and userid not in released:
                released.add(userid)
                entries = await read_head(self.ctx.redis, keys.user_held(userid), None, HELD_CHUNK)
                for _id, fields in entries:
                    out.extend(decode_groups(fields[b"p"]))
                if entries:
                    commit.command("XDEL", keys.user_held(userid), *[entry_id for entry_id, _ in entries])
                if len(entries) >= hold.backlog:
                    holds[userid] = hold = Hold(False, 0)  # all let through: this pass's go through too
            if hold.holding or hold.backlog:
                if group[3]:  # an empty group only asks for a pass: nothing to keep
                    parked.setdefault(userid, []).append(group)
            else:
                out.append(group)
        for userid, mine in parked.items():
            commit.command("XADD", keys.user_held(userid), "*", "p", encode_groups(mine))
        for userid in released:
            if holds[userid].backlog:  # more parked than one chunk: come back for the rest
                commit.command("XADD", tenure.stream, "*", "p", encode_groups([[userid, 0.0, 0, []]]))
        return out

    async def _load_user(self, userid: int, version: bytes | None) -> UserCache:
        inputs = await self.ctx.inputs.list(userid)
        feeds = await self.ctx.feeds.list(userid)
        try:
            tz = zoneinfo.ZoneInfo(await self.ctx.users.timezone(userid))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            tz = zoneinfo.ZoneInfo("UTC")
        steps = {i.id: parse_lenient(i.processlist) for i in inputs if i.processlist}
        by_id = {f.id: f for f in feeds}
        return UserCache(
            version=version,
            inputs={(i.nodeid, i.name): i for i in inputs},
            steps=steps,
            feeds=by_id,
            tz=tz,
            plans={inputid: make_plan(list_, by_id) for inputid, list_ in steps.items()},
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
