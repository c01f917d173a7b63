"""Reliable queues in Redis streams, each with at most one active reader, and the one
loop that reads them (``LeasedReader``).

An input queue ``emond:in:<n>`` holds elements appended by the web layer (one
element per queue per flush, holding every frame of that flush for that
queue). A storage queue ``emond:st:<server>`` holds packed RECORD batches,
each with a per-queue sequence number. (Key names: ``emond.keys``.)

A reader holds a queue through a lease (``emond:lease:<queue>`` =
``owner:token``, with a TTL) whose token comes from a counter that grows
with every new holder (the fencing token). It reads elements from the head
of the stream and removes them only in ``commit``: one Lua script that first
checks the lease still carries its token and then, atomically, applies the
state changes the reader computed, appends to other queues and deletes the
consumed elements. A stalled former holder therefore cannot commit, and an
element leaves its queue only once its processing is durable in Redis; the
elements of a reader that died are simply read again by the next holder.

Three uses share ``LeasedReader``: the input consumer (a fair share of the
input queues, ``FairShare``), the sender of a storage server hosted in
process and the link to a remote one (one storage queue each,
``OneQueue``; the link with a ``Window`` of batches sent and not yet
acknowledged). What each does with the elements is its ``ElementHandler``.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

import msgpack
from prometheus_client import Gauge
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emond import keys
from emond.config import InputSection
from emond.keys import storage_seq, storage_stream
from emond.loops import steady_loop
from emond.redis import Redis, RedisUnavailable

# Commands a commit may carry (a whitelist: the script runs them verbatim).
COMMIT_COMMANDS = frozenset({"HSET", "HDEL", "DEL", "SET", "INCRBY", "EXPIRE", "XADD", "XDEL"})

LEASE = """
local current = redis.call('GET', KEYS[1])
if current then
  if current == ARGV[1] .. ':' .. ARGV[3] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(ARGV[3])
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
"""

# Raise a fencing counter to at least ARGV[1] (never lowers it).
RAISE_FENCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV: holder, n ids, ids..., then ops: name, nargs, args...
# XADDSEQ stream seqkey payload: XADD with the next sequence number of that stream.
# HSETMAX key time value: set {time, value} only if time is not older than the stored one.
COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local i = 2
local n = tonumber(ARGV[i])
i = i + 1
local j = 0
while j < n do
  local k = math.min(n - j, 1000)
  redis.call('XDEL', KEYS[2], unpack(ARGV, i + j, i + j + k - 1))
  j = j + k
end
i = i + n
while i <= #ARGV do
  local name = ARGV[i]
  local nargs = tonumber(ARGV[i + 1])
  i = i + 2
  if name == 'XADDSEQ' then
    local seq = redis.call('INCR', ARGV[i + 1])
    redis.call('XADD', ARGV[i], '*', 's', seq, 'b', ARGV[i + 2])
  elseif name == 'HSETMAX' then
    local stored = redis.call('HGET', ARGV[i], 'time')
    if (not stored) or tonumber(stored) <= tonumber(ARGV[i + 1]) then
      redis.call('HSET', ARGV[i], 'time', ARGV[i + 1], 'value', ARGV[i + 2])
    end
  else
    redis.call(name, unpack(ARGV, i, i + nargs - 1))
  end
  i = i + nargs
end
return 1
"""

# Append with the stream's next sequence number (storage queues, outside a consumer commit).
APPEND_SEQ = """
local seq = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], '*', 's', seq, 'b', ARGV[1])
"""


class QueueLayoutError(Exception):
    """This process's queue layout disagrees with the one recorded in Redis."""


@dataclass(frozen=True)
class QueueLayout:
    """How users map to input queues: by a hash of the id, or by emoncms.org-style id ranges."""

    queues: int
    mapping: str
    ranges: tuple[int, ...]

    @classmethod
    def from_config(cls, section: InputSection) -> "QueueLayout":
        if section.mapping == "ranges" and len(section.ranges) + 1 != section.queues:
            raise QueueLayoutError(f"[input] ranges: {len(section.ranges)} bounds make {len(section.ranges) + 1} queues, not {section.queues}")
        return cls(section.queues, section.mapping, tuple(section.ranges))

    def queue_for(self, userid: int) -> int:
        if self.mapping == "ranges":
            for i, bound in enumerate(self.ranges):
                if userid < bound:
                    return i
            return len(self.ranges)
        return zlib.crc32(str(userid).encode()) % self.queues

    def encode(self) -> str:
        return json.dumps({"queues": self.queues, "mapping": self.mapping, "ranges": list(self.ranges)}, sort_keys=True)

    async def check(self, redis: Redis) -> None:
        """Record the layout at first start; refuse to run with a different one."""
        await redis.call("SET", keys.INPUT_LAYOUT, self.encode(), "NX")
        recorded = await redis.call("GET", keys.INPUT_LAYOUT)
        if recorded is None or recorded.decode() != self.encode():
            raise QueueLayoutError(
                f"input queue layout in Redis is {recorded!r}, this config says {self.encode()}; "
                "drain the queues before changing [input] queues/mapping/ranges"
            )


class LeaseLost(Exception):
    """The lease was taken by another holder: stop consuming this queue."""


@dataclass
class Commit:
    """What a consumer commits with an acknowledgement, built up then sent as one script call."""

    ops: list[Any] = field(default_factory=list)

    def command(self, name: str, *args: Any) -> None:
        assert name in COMMIT_COMMANDS, name
        self.ops += [name, len(args), *args]

    def append_storage(self, server: int, payload: bytes) -> None:
        self.ops += ["XADDSEQ", 3, storage_stream(server), storage_seq(server), payload]

    def set_if_newer(self, key: str, when: int, value: str) -> None:
        self.ops += ["HSETMAX", 3, key, when, value]


class Scripts:
    """The Lua scripts, loaded once per Redis connection set and called by digest."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._sha: dict[str, str] = {}

    async def run(self, script: str, keys: list[Any], args: list[Any]) -> Any:
        sha = self._sha.get(script) or hashlib.sha1(script.encode()).hexdigest()
        try:
            return await self.redis.call("EVALSHA", sha, len(keys), *keys, *args)
        except RedisUnavailable:
            raise
        except Exception as e:
            if "NOSCRIPT" not in str(e):
                raise
        self._sha[script] = sha
        return await self.redis.call("EVAL", script, len(keys), *keys, *args)


class Lease:
    """One queue's lease for one holder; ``token`` is 0 while not held."""

    def __init__(self, scripts: Scripts, queue: str, owner: str, ttl_ms: int) -> None:
        self.scripts = scripts
        self.queue = queue
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.token = 0

    @property
    def key(self) -> str:
        return keys.lease(self.queue)

    @property
    def holder(self) -> str:
        return f"{self.owner}:{self.token}"

    @property
    def fence_key(self) -> str:
        return keys.fence(self.queue)

    async def acquire_or_renew(self) -> bool:
        """True while we hold the lease (a new token means a new tenure)."""
        token = await self.scripts.run(LEASE, [self.key, self.fence_key], [self.owner, self.ttl_ms, self.token])
        self.token = int(token)
        return self.token > 0

    async def catch_up(self, seen: int) -> None:
        """The queue's reader has seen tokens up to ``seen`` (kept on its disk) while Redis's
        counter is behind it: Redis lost its data, or was restored from an older copy. Lift the
        counter past ``seen`` and give the lease up, so the next tenure's token is newer than any
        the reader has seen. A holder whose Redis is intact never gets here: its token is the
        newest ever handed out."""
        await self.scripts.run(RAISE_FENCE, [self.fence_key], [seen])
        await self.release()

    async def release(self) -> None:
        if self.token:
            await self.scripts.run(RELEASE, [self.key], [self.holder])
            self.token = 0

    async def commit(self, stream: str, ids: list[bytes], commit: Commit) -> None:
        """Atomically apply ``commit`` and delete ``ids`` from ``stream``, if we still hold the lease."""
        done = await self.scripts.run(COMMIT, [self.key, stream], [self.holder, len(ids), *ids, *commit.ops])
        if int(done) != 1:
            self.token = 0
            raise LeaseLost(self.queue)


# -- the leased reader ---------------------------------------------------------------

Entry = tuple[bytes, dict[bytes, bytes]]  # a stream element: its id and its fields
RETRY_SECONDS = 1.0  # the pause after a failed read or handling, before the elements are read again


@dataclass(frozen=True)
class QueueRef:
    """A queue: its name (``in:3``; its stream, lease and fence keys derive from it) and how logs call it."""

    name: str
    label: str

    @property
    def stream(self) -> str:
        return keys.stream(self.name)


def input_queue(queue: int) -> QueueRef:
    return QueueRef(keys.input_queue(queue), f"input queue {queue}")


def storage_queue(server: int) -> QueueRef:
    return QueueRef(keys.storage_queue(server), f"storage queue {server}")


@dataclass(eq=False)
class Tenure:
    """A held queue: its lease, and what the reader keeps while it holds it."""

    lease: Lease
    queue: QueueRef
    failures: int = 0  # consecutive failed attempts at the head of the queue
    after: bytes | None = None  # with a window: the last element handed out (None: from the head)
    state: Any = None  # the handler's cache for this tenure (the consumer's process state); dropped on a failure

    @property
    def stream(self) -> str:
        return self.queue.stream

    async def commit(self, ids: list[bytes], commit: Commit) -> None:
        """Apply ``commit`` and delete ``ids``, fenced: LeaseLost if the lease is no longer ours."""
        await self.lease.commit(self.stream, ids, commit)


class ElementHandler:
    """What a ``LeasedReader`` does with the elements it reads (one subclass per use).

    ``handle`` gets a held queue's elements in queue order and commits them
    through ``tenure.commit`` (or, with a window, hands them out and commits
    them when they are acknowledged). If it raises, nothing of it may have
    been committed: the elements are read again after a pause.
    """

    doing = "handling an element"  # in the log line of a failure
    retryable: tuple[type[Exception], ...] = ()  # failures that are not the element's fault (never set aside)

    async def ready(self) -> None:
        """Returns once elements can be handled (storage open, stream connected)."""

    async def handle(self, tenure: Tenure, entries: list[Entry]) -> None:
        raise NotImplementedError

    def failed(self, tenure: Tenure | None, error: Exception) -> None:
        """A read (``tenure`` None) or a handling failed; it is tried again after a pause."""

    def set_aside(self, tenure: Tenure, entry_id: bytes) -> None:
        """An element that kept failing was moved to its queue's dead letters."""


class Holding(Protocol):
    """Which queues a reader holds: ``OneQueue`` or ``FairShare``."""

    def start(self) -> None: ...
    def stop(self) -> defer.Deferred[None]: ...  # fires once nothing of it runs any more
    async def take(self) -> list[Tenure]: ...  # the tenures to read now (leases renewed or taken as due)
    def wait(self) -> defer.Deferred[None]: ...  # after ``take`` gave none: fires when trying again is worth it
    def held(self) -> list[Tenure]: ...
    def current(self, tenure: Tenure) -> Tenure | None: ...  # the tenure of that queue now, if still held
    def complete(self) -> bool: ...  # holds every queue it should (else some may go unread)
    def lost(self, tenure: Tenure) -> None: ...
    async def release(self) -> None: ...


def _fire(d: defer.Deferred[None] | None) -> None:
    if d is not None and not d.called:
        d.callback(None)


class OneQueue:
    """One queue (a storage queue), its lease renewed between reads every third of its TTL
    and taken when free. ``floor``: the newest fencing token the queue's destination has
    seen (the remote storage server's hello); a lease whose token is older catches up
    (``Lease.catch_up``) and takes a newer one."""

    log = Logger()

    def __init__(self, lease: Lease, queue: QueueRef, clock: IReactorTime, floor: Callable[[], int] = lambda: 0) -> None:
        self.tenure = Tenure(lease, queue)
        self.clock = clock
        self.floor = floor
        self.interval = lease.ttl_ms / 3000.0
        self._renewed: float | None = None

    def start(self) -> None:
        self._renewed = None

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)  # renews between reads, on the reader's loop

    async def take(self) -> list[Tenure]:
        lease = self.tenure.lease
        due = self._renewed is None or self.clock.seconds() - self._renewed > self.interval
        if (not lease.token or due) and not await self._renew():
            return []
        seen = self.floor()
        if lease.token < seen:
            # Its batches would all be refused as stale: Redis lost the fence counter.
            self.log.warn(
                "{queue}: fencing token {token} is behind the {seen} its destination has seen; "
                "Redis lost its counter: taking a newer one",
                queue=self.tenure.queue.label, token=lease.token, seen=seen,
            )
            await lease.catch_up(seen)
            if not await self._renew():
                return []
        return [self.tenure]

    async def _renew(self) -> bool:
        lease = self.tenure.lease
        before = lease.token
        if not await lease.acquire_or_renew():
            return False
        self._renewed = self.clock.seconds()
        if lease.token != before:  # a new tenure: others may have held the queue meanwhile
            self.tenure.failures, self.tenure.state = 0, None
        return True

    def wait(self) -> defer.Deferred[None]:
        return task.deferLater(self.clock, self.interval, lambda: None)  # another holds it: ask again later

    def held(self) -> list[Tenure]:
        return [self.tenure]

    def current(self, tenure: Tenure) -> Tenure | None:
        return tenure if tenure.lease.token else None

    def complete(self) -> bool:
        return True

    def lost(self, tenure: Tenure) -> None:
        pass  # the lease's token is 0 already: the next ``take`` tries to take it again

    async def release(self) -> None:
        await self.tenure.lease.release()


class FairShare:
    """A fair share of many queues (the input queues) among the live readers of a group.

    Live readers announce themselves in a sorted set (score: when the
    announcement expires), every third of the lease TTL, in a loop of their
    own (a long handling never lets a lease lapse). A reader holding more than
    its share releases the excess; one holding less takes free queues. A
    released queue's batch in flight fails its fenced commit and is simply
    read again by the next holder, so order is kept.
    """

    log = Logger()

    def __init__(
        self, redis: Redis, queues: Sequence[QueueRef], owner: str, lease_ms: int, clock: IReactorTime,
        members: str, gauge: Gauge | None = None,
    ) -> None:
        self.redis = redis
        self.scripts = Scripts(redis)
        self.queues = list(queues)
        self.owner = owner
        self.lease_ms = lease_ms
        self.clock = clock
        self.members = members
        self.gauge = gauge
        self.tenures: dict[int, Tenure] = {}  # by index in ``queues``
        self.fair = len(self.queues)
        self._index = {q.name: i for i, q in enumerate(self.queues)}
        self._loop = steady_loop(self.renew, clock, f"{members} lease loop")
        self._taken: defer.Deferred[None] | None = None

    def start(self) -> None:
        self._loop.start(self.lease_ms / 3000.0, now=True)

    def stop(self) -> defer.Deferred[None]:
        _fire(self._taken)
        return self._loop.stop()  # a renewal in progress ends first

    async def renew(self) -> None:
        """Renew held leases and take or give queues towards a fair share."""
        now_ms = int(self.clock.seconds() * 1000)
        try:
            _, _, live = await self.redis.pipeline([
                ("ZADD", self.members, now_ms + self.lease_ms, self.owner),
                ("ZREMRANGEBYSCORE", self.members, "-inf", now_ms),
                ("ZCARD", self.members),
            ])
            self.fair = -(-len(self.queues) // max(1, int(live)))
            for i in sorted(self.tenures):
                held = self.tenures.get(i)
                if held is None:
                    continue  # lost meanwhile (``lost``, while this loop awaited Redis)
                lease = held.lease
                before = lease.token
                if not await lease.acquire_or_renew():
                    self.tenures.pop(i, None)
                elif lease.token != before:  # it lapsed and is ours again: others may have held it
                    self.tenures[i] = Tenure(lease, self.queues[i])
            for i in sorted(self.tenures, reverse=True)[: max(0, len(self.tenures) - self.fair)]:
                await self.tenures.pop(i).lease.release()
                self.log.info("gave {queue} to another reader", queue=self.queues[i].label)
            for i, queue in enumerate(self.queues):
                if len(self.tenures) >= self.fair:
                    break
                if i in self.tenures:
                    continue
                lease = Lease(self.scripts, queue.name, self.owner, self.lease_ms)
                if await lease.acquire_or_renew():
                    self.tenures[i] = Tenure(lease, queue)  # a new tenure: fresh state
                    self.log.info("consuming {queue} (token {token})", queue=queue.label, token=lease.token)
        except RedisUnavailable:
            return
        finally:
            if self.gauge is not None:
                self.gauge.set(len(self.tenures))
        if self.tenures:
            _fire(self._taken)

    async def take(self) -> list[Tenure]:
        return [self.tenures[i] for i in sorted(self.tenures)]

    def wait(self) -> defer.Deferred[None]:
        self._taken = defer.Deferred()  # fired when a renewal holds queues
        return self._taken

    def held(self) -> list[Tenure]:
        return list(self.tenures.values())

    def current(self, tenure: Tenure) -> Tenure | None:
        return self.tenures.get(self._index[tenure.queue.name])

    def complete(self) -> bool:
        return len(self.tenures) >= self.fair

    def lost(self, tenure: Tenure) -> None:
        index = self._index[tenure.queue.name]
        if self.tenures.get(index) is tenure:
            del self.tenures[index]

    async def release(self) -> None:
        try:
            await self.redis.call("ZREM", self.members, self.owner)
            for tenure in self.tenures.values():
                await tenure.lease.release()
        finally:
            self.tenures.clear()  # the leases expire by themselves if Redis did not answer
            if self.gauge is not None:
                self.gauge.set(0)


class Window:
    """Elements handed out (sent) and not yet acknowledged, at most ``size``.

    A reader with a window reads on after the last element it handed out
    instead of from the head (the elements stay in the queue until they are
    acknowledged and committed), stops taking elements while the window is
    full, and after ``LeasedReader.restart`` reads again from the head: the
    unacknowledged ones are handed out again, in order.
    """

    log = Logger()

    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: dict[int, Any] = {}  # key (a batch's sequence number) -> what the handler keeps
        self.committing = 0  # acknowledged, commit waiting or in flight
        self._room: defer.Deferred[None] | None = None
        self._commits: defer.Deferred[None] = defer.succeed(None)  # the last commit, in acknowledgement order

    def room(self) -> int:
        return self.size - len(self.pending)

    def empty(self) -> bool:
        return not self.pending and not self.committing

    def wait(self) -> defer.Deferred[None]:
        self._room = defer.Deferred()  # fired when an acknowledgement makes room, or on a restart
        return self._room

    def sent(self, tenure: Tenure, entry_id: bytes, key: int, item: Any) -> None:
        self.pending[key] = item
        tenure.after = entry_id

    def acknowledged(self, key: int, commit: Callable[[Any], Awaitable[None]]) -> None:
        """``key`` was acknowledged: make room, and ``commit(what was kept for it)`` after the
        commits of the elements acknowledged before it (the commits run on a pool of
        connections: in parallel, an element could leave the queue before an earlier one, and
        after a crash the earlier one, resent alone, would overwrite the later one's values)."""
        item = self.pending.pop(key, None)
        if item is None:
            return  # acknowledged already, or sent before a restart
        self.committing += 1
        _fire(self._room)
        self._commits.addCallback(lambda _: defer.ensureDeferred(commit(item)))
        self._commits.addErrback(lambda failure: self.log.failure("committing an acknowledged element failed", failure))
        self._commits.addBoth(self._committed)

    def _committed(self, _: Any) -> None:
        self.committing -= 1

    def clear(self) -> None:
        self.pending.clear()
        _fire(self._room)


class LeasedReader:
    """The loop of a queue's reader: hold a lease (``Holding``), read the head of each held
    queue with XREAD BLOCK on a connection of its own, hand the elements to a handler that
    commits them through the fenced script, pause ``retry_delay`` after a Redis error or a
    failed handling (the elements are read again), notice a lost lease, and with
    ``poison_after`` set aside an element that failed that many times in a row (whole, in
    ``emond:dead:<stream>``, for an operator: nothing is dropped)."""

    log = Logger()

    def __init__(
        self,
        holding: Holding,
        handler: ElementHandler,
        blocking: Redis,
        clock: IReactorTime,
        what: str,
        batch: int = 64,
        block_ms: int = 500,
        window: Window | None = None,
        poison_after: int | None = None,
        retry_delay: float = RETRY_SECONDS,
    ) -> None:
        self.holding = holding
        self.handler = handler
        self.blocking = blocking  # its own connection: XREAD BLOCK must not hold up other calls
        self.clock = clock
        self.what = what  # for logs: "input queues", "storage queue 0"
        self.batch = batch
        self.block_ms = block_ms
        self.window = window
        self.poison_after = poison_after
        self.retry_delay = retry_delay
        self.error: str | None = None  # the last failure, until a read or handling succeeds
        self._stopping = False
        self._stopped = False  # stop() has ended: leases given up, connection closed
        self._loop: defer.Deferred[None] | None = None
        self._paused: defer.Deferred[Any] | None = None
        self._idle: list[defer.Deferred[None]] = []
        self._errors: list[defer.Deferred[Exception]] = []
        self._busy = False
        self._restarts = 0

    def start(self) -> None:
        self._stopping = self._stopped = False
        self.blocking.open()  # its own connection, closed again at the end of stop()
        self.holding.start()
        self._loop = defer.ensureDeferred(self._run())

    async def stop(self) -> None:
        """Finish the element in hand (it commits, or is read again later), give the leases up."""
        self._stopping = True
        holding_stopped = self.holding.stop()
        if self._paused is not None and not self._paused.called:
            self._paused.cancel()
        if self._loop is not None:
            await self._loop
        await holding_stopped
        try:
            await self.holding.release()
        except RedisUnavailable:
            pass  # the leases expire by themselves
        await self.blocking.disconnect()
        self._stopped = True

    def unfinished(self) -> list[str]:
        """What a stop cut short would leave undone (for the log)."""
        if self._stopping and not self._stopped:
            return [f"{self.what}: the elements in hand (not committed: read again by the next holder) and the leases (they lapse)"]
        return []

    def idle(self) -> defer.Deferred[None]:
        """Fires once every queue it should hold has been seen empty after this call, with
        nothing handed out and unacknowledged (tests, drains)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def next_error(self) -> defer.Deferred[Exception]:
        """Fires with the next failure the reader pauses after (tests)."""
        d: defer.Deferred[Exception] = defer.Deferred()
        self._errors.append(d)
        return d

    def restart(self) -> None:
        """Forget what was handed out and not acknowledged: read again from the head of each
        queue (after a reconnect the unacknowledged elements go out again, in order)."""
        self._restarts += 1
        if self.window is not None:
            self.window.clear()
        for tenure in self.holding.held():
            tenure.after = None

    async def _run(self) -> None:
        while not self._stopping:
            await self.handler.ready()
            if self._stopping:
                break
            try:
                if await self._step():
                    self.error = None
            except RedisUnavailable as e:
                self._failed(None, e, f"redis: {e}")
                self.log.warn("{what}: {error}; will retry", what=self.what, error=str(e))
                await self._backoff(e)
            except Exception as e:
                self._failed(None, e, str(e))
                self.log.failure("{what}: reading failed; will retry", what=self.what)
                await self._backoff(e)

    async def _step(self) -> bool:
        """One read and the handling of what it got; False if something failed."""
        tenures = await self.holding.take()
        if not tenures:
            await self._pause(self.holding.wait())
            return True
        count = self.batch
        if self.window is not None:
            room = self.window.room()
            if room <= 0:
                await self._pause(self.window.wait())
                return True
            count = min(room, count)
        restarts = self._restarts
        reply = await self._read(tenures, count)
        if restarts != self._restarts:
            return True  # restarted meanwhile: what was read is read again from the head
        by_stream = {t.stream.encode(): t for t in tenures}
        ok = True
        for stream, entries in reply:
            tenure = self.holding.current(by_stream[stream])
            if tenure is not None and entries:
                ok = await self._handle(tenure, [_entry(e) for e in entries]) and ok
        return ok

    async def _read(self, tenures: list[Tenure], count: int) -> list[Any]:
        after = [(t.after or b"0") if self.window is not None else b"0" for t in tenures]
        complete = self.holding.complete()  # of the queues read here: one taken meanwhile is not read yet
        waiting, self._idle = self._idle, []
        try:
            reply = await self.blocking.call(
                "XREAD", "COUNT", count, "BLOCK", self.block_ms, "STREAMS", *[t.stream for t in tenures], *after
            )
        except Exception:
            self._idle = waiting + self._idle
            raise
        if not reply and complete and self.holding.complete() and (self.window is None or self.window.empty()):
            if self._busy:
                self._busy = False
                self.log.info("{what} drained", what=self.what)
            for d in waiting:  # every queue was empty after they asked
                d.callback(None)
        else:
            self._idle = waiting + self._idle
            self._busy = self._busy or bool(reply)
        return reply or []

    async def _handle(self, tenure: Tenure, entries: list[Entry]) -> bool:
        if tenure.failures:
            entries = entries[:1]  # after a failure, one element at a time: the one set aside is the one failing
        try:
            await self.handler.handle(tenure, entries)
        except LeaseLost:
            self.holding.lost(tenure)
            self.log.warn("{queue}: taken over by another reader", queue=tenure.queue.label)
            return True
        except (RedisUnavailable, *self.handler.retryable) as e:
            self._failed(tenure, e, f"redis: {e}" if isinstance(e, RedisUnavailable) else str(e))
            self.log.warn("{queue}: {error}; will retry", queue=tenure.queue.label, error=str(e))
            await self._backoff(e)
            return False
        except Exception as e:
            self._failed(tenure, e, str(e))
            self.log.failure("{queue}: {doing} failed; will retry", queue=tenure.queue.label, doing=self.handler.doing)
            tenure.failures += 1
            if self.poison_after is not None and tenure.failures >= self.poison_after:
                await self._set_aside(tenure, entries[0], e)
            else:
                await self._backoff(e)
            return False
        tenure.failures = 0
        return True

    def _failed(self, tenure: Tenure | None, error: Exception, message: str) -> None:
        self.error = message
        if tenure is not None:
            tenure.state = None  # nothing was committed: start again from what Redis has
        self.handler.failed(tenure, error)

    async def _set_aside(self, tenure: Tenure, entry: Entry, error: Exception) -> None:
        """An element that keeps failing would stop its queue for good: move it, whole, to the
        queue's dead letters, and go on."""
        entry_id, fields = entry
        dead = keys.dead_letters(tenure.stream)
        commit = Commit()
        commit.command("XADD", dead, "*", *[x for item in fields.items() for x in item], "error", str(error)[:500])
        try:
            await tenure.commit([entry_id], commit)
        except LeaseLost:
            self.holding.lost(tenure)
            return
        except RedisUnavailable as e:
            await self._backoff(e)
            return
        tenure.failures = 0
        self.handler.set_aside(tenure, entry_id)
        self.log.error(
            "{queue}: element {id} failed {n} times; set aside in {dead}",
            queue=tenure.queue.label, id=entry_id, n=self.poison_after, dead=dead,
        )

    async def _backoff(self, error: Exception) -> None:
        waiting, self._errors = self._errors, []
        for d in waiting:
            d.callback(error)
        await self._pause(task.deferLater(self.clock, self.retry_delay, lambda: None))

    async def _pause(self, d: defer.Deferred[Any]) -> None:
        """Wait for ``d``; ``stop`` cuts the wait short."""
        if self._stopping:
            return
        self._paused = d
        try:
            await d
        except defer.CancelledError:
            pass
        finally:
            self._paused = None


def _entry(entry: Any) -> Entry:
    entry_id, fields = entry
    return entry_id, dict(zip(fields[::2], fields[1::2])) if isinstance(fields, list) else fields


async def read_head(redis: Redis, stream: str, after: bytes | None, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Up to ``count`` elements of ``stream`` after id ``after`` (from the head when None)."""
    start = b"(" + after if after else b"-"
    reply = await redis.call("XRANGE", stream, start, b"+", b"COUNT", count)
    return [(entry[0], dict(zip(entry[1][::2], entry[1][1::2]))) for entry in reply or []]


def encode_group(group: list[Any]) -> bytes:
    """One request's part of an input queue element: ``[userid, received, time_ref, frames]``
    (frames as ``inputparse.Bulk`` has them), in msgpack: floats stay binary (six times
    cheaper to write than JSON) and a bulk's frames go in as decoded. Packed when the
    request is appended, so a value msgpack refuses (OverflowError) fails that request only."""
    return msgpack.packb(group)


def join_groups(packed: list[bytes]) -> bytes:
    """An input queue element from packed groups: the msgpack array of them, as
    ``msgpack.packb(groups)`` writes it (a header, then the items as they are)."""
    n = len(packed)
    if n < 16:
        header = bytes((0x90 | n,))
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return b"g" + header + b"".join(packed)


def encode_groups(groups: list[Any]) -> bytes:
    """An input queue element: the requests of one flush (see ``encode_group``)."""
    return join_groups([encode_group(g) for g in groups])


def decode_groups(payload: bytes) -> list[Any]:
    kind = payload[:1]
    if kind == b"g":
        return msgpack.unpackb(payload[1:])
    # Elements written by earlier versions: packets [userid, time, node, values, received].
    if kind == b"m":
        packets = msgpack.unpackb(payload[1:])
    elif kind == b"z":
        packets = json.loads(zlib.decompress(payload[1:]))
    else:
        packets = json.loads(payload[1:])
    return [[userid, received, when, [[0, node, values]]] for userid, when, node, values, received in packets]
