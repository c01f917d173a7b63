"""The leased reader (emond.queue.LeasedReader): one suite of its promises, run against
each of its uses — the input consumer, the sender of a storage server hosted in
process, and the link to a remote storage server over real mutual TLS.

Real Redis, real engines on disk, a real storage server; each reader gets a
``task.Clock`` of its own for its lease renewals and retries, so a test decides
when a stalled holder's lease would have been renewed (never) and when a retry
comes. A lease's expiry is what Redis does at the end of its TTL: the key goes
(``DEL``). Readers are named A and B (their lease owners).

What each use delivers (``delivered``): the values of its elements, in the
order they reached the use's destination — the records in the storage queue
the consumer's commits append to, the values in the feed's PHPTimeSeries file
for the senders (applied by the hosted engines or by the remote server).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from emond import keys, queue
from emond.config import EnginesSection, RemoteServer, TLSSection
from emond.process.consumer import InputConsumerService
from emond.processlist import parse_processlist
from emond.queue import APPEND_SEQ, RETRY_SECONDS, LeaseLost, QueueLayout, Scripts, encode_groups
from emond.records import ENGINE_PHPTIMESERIES, RECORD, make_records
from emond.redis import Redis, RedisUnavailable
from emond.meta.refusals import Refusals
from emond.storage.remote import LinkMetrics, RemoteLink
from emond.storage.sender import LocalSenderService, RefusalRecorder, SenderMetrics
from emond.storage.location import StorageLocationService
from tests.support import redis_server
from tests.support.storage import start_storage
from tests.support.node import NodeHarness

T0 = int(time.time()) // 10 * 10 - 86400  # within the engines' time window
LEASE_MS = 60_000  # never lapses by itself within a test: expiry is a DEL
BLOCK_MS = 100
MYD = np.dtype([("m", "u1"), ("t", "<u4"), ("v", "<f4")])


def wait(coroutine: Any) -> defer.Deferred:
    return defer.ensureDeferred(coroutine)


def _reader_name(lease: queue.Lease) -> str:
    """A or B: the senders add a random suffix to their node name."""
    return lease.owner.split("-")[0]


class Reader:
    """One use's service, its reader and its clock."""

    def __init__(self, service: Any, clock: task.Clock, blocking: Redis) -> None:
        self.service = service
        self.clock = clock
        self.blocking = blocking

    @property
    def reader(self) -> queue.LeasedReader:
        return self.service.reader

    @property
    def token(self) -> int:
        return self.reader.holding.held()[0].lease.token if self.reader.holding.held() else 0


class LeasedReaderContract:
    """The promises; a subclass provides the use (``setUpUse``, ``make``, ``append``, ``delivered``)."""

    timeout = 60
    queue_name: str  # the queue the use reads (its lease is named after it)

    @defer.inlineCallbacks
    def setUp(self):
        redis_server().flushall()
        self.redis = Redis.connect(redis_server().url, 5.0, reactor)
        self.addCleanup(self.redis.disconnect)
        self.commits: list[tuple[str, int, list[bytes], bool]] = []  # (owner, token, ids, committed)
        self.refusals: list[tuple[str, int]] = []  # (owner, token) of lease attempts refused
        self.waiting: dict[tuple[str, str], defer.Deferred] = {}  # (event, reader) -> fired on its next such event
        real_commit, real_acquire, real_release = queue.Lease.commit, queue.Lease.acquire_or_renew, queue.Lease.release

        async def commit(lease, stream, ids, what):
            holder = (_reader_name(lease), lease.token)
            try:
                await real_commit(lease, stream, ids, what)
            except LeaseLost:
                self.commits.append((*holder, list(ids), False))
                raise
            self.commits.append((*holder, list(ids), True))
            self.event("commit", holder[0])

        async def acquire(lease):
            held = await real_acquire(lease)
            if not held:
                self.refusals.append((_reader_name(lease), lease.token))
                self.event("refused", _reader_name(lease))
            return held

        async def release(lease):
            await real_release(lease)
            self.event("release", _reader_name(lease))

        self.patch(queue.Lease, "commit", commit)
        self.patch(queue.Lease, "acquire_or_renew", acquire)
        self.patch(queue.Lease, "release", release)
        self.appended: list[bytes] = []
        yield self.setUpUse()

    @defer.inlineCallbacks
    def start(self, owner: str):
        clock = task.Clock()
        blocking = Redis.connect(redis_server().url, 5.0, reactor, poolsize=1)
        yield wait(blocking.call("PING"))  # its one connection is open: CLIENT ID names it
        use = Reader((yield self.make(owner, clock, blocking)), clock, blocking)
        use.service.startService()
        self.addCleanup(lambda: use.service.stopService() if use.service.running else None)
        return use

    def event(self, name: str, owner: str) -> None:
        d = self.waiting.pop((name, owner), None)
        if d is not None:
            d.callback(None)

    def next(self, name: str, owner: str) -> defer.Deferred:
        """Fires on ``owner``'s next lease event ``name``: "refused" (an attempt to take or
        renew a lease), "release" (a lease given up), "commit" (a commit done)."""
        d = self.waiting[(name, owner)] = defer.Deferred()
        return d

    def lease_refused(self, owner: str) -> defer.Deferred:
        return self.next("refused", owner)

    def stall(self, use: Reader) -> tuple[defer.Deferred, defer.Deferred, defer.Deferred]:
        """Hold ``use``'s handler when it next gets elements: (entered, release, finished)."""
        entered, release, finished = defer.Deferred(), defer.Deferred(), defer.Deferred()
        real = use.service.handle

        async def stalled(tenure, entries):
            use.service.handle = real  # once
            entered.callback(None)
            await release
            try:
                await real(tenure, entries)
            finally:
                finished.callback(None)

        use.service.handle = stalled
        self.addCleanup(lambda: release.callback(None) if not release.called else None)
        return entered, release, finished

    def stale_attempt_over(self, use: Reader, finished: defer.Deferred) -> defer.Deferred:
        """Fires once the stalled ``use`` has done all it will with what it held (override)."""
        return finished

    def expire(self) -> defer.Deferred:
        """The lease reaches the end of its TTL: Redis drops it."""
        return wait(self.redis.call("DEL", keys.lease(self.queue_name)))

    @defer.inlineCallbacks
    def append_values(self, values: list[float]):
        ids = yield self.append(values)
        self.appended += ids

    def committed(self, owner: str | None = None) -> list[bytes]:
        """The element ids committed (by ``owner``), in commit order."""
        return [i for who, _token, ids, ok in self.commits if ok and owner in (None, who) for i in ids]

    @defer.inlineCallbacks
    def assertQueueEmpty(self):
        length = yield wait(self.redis.call("XLEN", keys.stream(self.queue_name)))
        self.assertEqual(int(length), 0)

    # -- the promises ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_elements_go_through_in_queue_order_once_each(self):
        yield self.append_values([1.0, 2.0, 3.0])
        a = yield self.start("A")
        for burst in ([4.0], [5.0, 6.0, 7.0], [8.0, 9.0]):
            idle = a.reader.idle()
            yield self.append_values(burst)
            yield idle
        idle = a.reader.idle()
        yield idle
        self.assertEqual((yield self.delivered()), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
        self.assertEqual(self.committed(), self.appended)  # removed in order, each once
        yield self.assertQueueEmpty()

    @defer.inlineCallbacks
    def test_a_stale_holder_cannot_commit(self):
        a = yield self.start("A")
        yield self.append_values([1.0])
        yield a.reader.idle()
        old = a.token
        entered, release, finished = self.stall(a)
        yield self.append_values([2.0])
        yield entered  # A has read 2 and stalls; its lease runs out meanwhile
        yield self.expire()
        b = yield self.start("B")
        yield b.reader.idle()
        self.assertGreater(b.token, old)  # a newer fencing token
        self.assertEqual((yield self.delivered()), [1.0, 2.0])
        # A wakes up and finishes its work on 2 with the token it had: nothing of it lands
        release.callback(None)
        yield self.stale_attempt_over(a, finished)
        self.assertEqual((yield self.delivered()), [1.0, 2.0])
        self.assertEqual(self.committed("A"), self.appended[:1])
        self.assertEqual(self.committed("B"), self.appended[1:])
        self.assertFalse([c for c in self.commits if c[0] == "A" and c[1] == old and self.appended[1] in c[2] and c[3]])
        yield self.assertQueueEmpty()

    @defer.inlineCallbacks
    def test_the_queue_passes_to_a_waiting_reader_when_the_lease_expires(self):
        a = yield self.start("A")
        yield self.append_values([1.0])
        yield a.reader.idle()
        entered, _release, _finished = self.stall(a)
        yield self.append_values([2.0])
        yield entered  # A hangs with 2 read, not committed
        refused = self.lease_refused("B")
        b = yield self.start("B")
        b_idle = b.reader.idle()
        yield refused  # A holds the lease: B waits
        yield self.append_values([3.0])
        self.assertFalse(b_idle.called)  # not holding the queue, B has not seen it empty
        yield self.expire()
        b.clock.advance(LEASE_MS / 3000.0)  # B asks again, a third of the TTL later
        yield b_idle
        yield b.reader.idle()
        # B read from the head: 2, which A had read but not committed, then 3, in order
        self.assertEqual((yield self.delivered()), [1.0, 2.0, 3.0])
        self.assertEqual(self.committed("B"), self.appended[1:])
        yield self.assertQueueEmpty()

    @defer.inlineCallbacks
    def test_a_redis_error_pauses_the_reader_then_it_goes_on(self):
        a = yield self.start("A")
        client = yield wait(a.blocking.call("CLIENT", "ID"))
        yield self.append_values([1.0])
        yield a.reader.idle()
        failed = a.reader.next_error()
        yield wait(self.redis.call("CLIENT", "KILL", "ID", client))  # its XREAD's connection goes
        error = yield failed
        self.assertIsInstance(error, RedisUnavailable)
        self.assertTrue(a.reader.error.startswith("redis: "), a.reader.error)
        yield self.append_values([2.0, 3.0])
        self.assertIn(RETRY_SECONDS, [call.getTime() for call in a.clock.getDelayedCalls()])  # its pause
        a.clock.advance(RETRY_SECONDS - 0.01)
        self.assertEqual((yield self.delivered()), [1.0])  # still pausing: nothing read
        a.clock.advance(0.01)
        while True:  # the pool reconnects in the background: a retry before that fails again
            idle, failed = a.reader.idle(), a.reader.next_error()
            _result, which = yield defer.DeferredList([idle, failed], fireOnOneCallback=True)
            if which == 0:
                break
            a.clock.advance(RETRY_SECONDS)
        self.assertEqual((yield self.delivered()), [1.0, 2.0, 3.0])
        self.assertEqual(self.committed(), self.appended)
        self.assertIsNone(a.reader.error)

    @defer.inlineCallbacks
    def test_idle_waits_for_the_whole_queue_and_for_holding_it(self):
        yield self.append_values([1.0, 2.0, 3.0, 4.0, 5.0])
        a = yield self.start("A")
        yield a.reader.idle()
        # everything queued before idle() was asked is through when it fires
        self.assertEqual((yield self.delivered()), [1.0, 2.0, 3.0, 4.0, 5.0])
        yield self.assertQueueEmpty()
        refused = self.lease_refused("B")
        b = yield self.start("B")
        b_idle = b.reader.idle()
        yield refused
        yield self.append_values([6.0])
        yield a.reader.idle()
        self.assertFalse(b_idle.called)  # B holds nothing: the queue is not B's to call empty
        yield a.service.stopService()  # A gives the lease up
        b.clock.advance(LEASE_MS / 3000.0)
        yield self.append_values([7.0])
        yield b_idle
        yield b.reader.idle()
        self.assertEqual((yield self.delivered()), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
        self.assertEqual(self.committed("B"), self.appended[6:])


class InputConsumerReaderTests(LeasedReaderContract, unittest.TestCase):
    """The input consumer: a fair share of the input queues (here one), elements of packets."""

    queue_name = keys.input_queue(0)

    @defer.inlineCallbacks
    def setUpUse(self):
        self.node = yield NodeHarness.start(self, extra_config="[input]\nqueues = 1\nconsume = false\n")
        ctx = self.node.ctx
        keys_ = (yield self.node.post("user/register.json", data={"username": "reader", "password": "secret1", "email": "r@example.org"})).json()
        self.userid = keys_["userid"]
        # records go to storage server 9, which nothing sends: the storage queue keeps them in order
        self.feed = yield wait(ctx.feeds.create(self.userid, "log", "", 1, ENGINE_PHPTIMESERIES, 0, 9))
        inp = yield wait(ctx.inputs.create(self.userid, "n", "a"))
        steps = parse_processlist(f"1:{self.feed.id}")
        yield wait(ctx.inputs.change_processlist(self.userid, inp.id, lambda _current: (steps, f"1:{self.feed.id}")))
        self.layout = QueueLayout(1, "hash", ())

    def make(self, owner: str, clock: task.Clock, blocking: Redis):
        ctx = dataclasses.replace(self.node.ctx, registry=CollectorRegistry())  # its own metrics
        return InputConsumerService(ctx, self.layout, blocking, reactor, lease_ms=LEASE_MS, block_ms=BLOCK_MS, owner=owner, clock=clock)

    @defer.inlineCallbacks
    def append(self, values: list[float]):
        ids = []
        for value in values:
            n = len(self.appended) + len(ids)
            element = encode_groups([[self.userid, 0.0, T0 + 10 * n, [[0, "n", {"a": value}]]]])
            ids.append((yield wait(self.redis.call("XADD", keys.input_stream(0), "*", "p", element))))
        return ids

    @defer.inlineCallbacks
    def delivered(self):
        entries = yield wait(self.redis.call("XRANGE", keys.storage_stream(9), "-", "+"))
        records = [np.frombuffer(dict(zip(f[::2], f[1::2]))[b"b"], dtype=RECORD) for _id, f in entries]
        return [float(r["value"]) for batch in records for r in batch if r["feed"] == self.feed.id]


    @defer.inlineCallbacks
    def test_idle_waits_for_queues_beyond_the_share_it_holds(self):
        """A drain (``idle``) must not end while a queue this reader should hold is held by a
        reader that stopped announcing itself: nobody reads that queue."""
        self.layout = QueueLayout(2, "hash", ())
        a = yield self.start("A")  # alone: its share is both queues
        yield a.reader.idle()
        refused, released = self.lease_refused("B"), self.next("release", "A")
        b = yield self.start("B")
        yield refused  # two live readers: B's share is one, but A holds both
        a.clock.advance(LEASE_MS / 3000.0)
        yield released  # A gives queue 1 up
        b.clock.advance(LEASE_MS / 3000.0)  # and B takes it
        yield b.reader.idle()
        self.assertEqual((sorted(a.service.tenures), sorted(b.service.tenures)), ([0], [1]))
        entered, _release, _finished = self.stall(b)
        yield self.append_to(1, [10.0])
        yield entered  # B hangs with it and announces itself no more
        refused = self.lease_refused("A")
        a.clock.advance(5 * LEASE_MS / 3000.0)  # past B's last announcement: A's share is both queues
        yield refused  # but B's lease on queue 1 runs on
        self.assertEqual(a.service.share.fair, 2)
        idle, committed = a.reader.idle(), self.next("commit", "A")
        yield self.append_to(0, [1.0])
        yield committed
        yield self.reads_issued(a, 2)  # the read after the commit came back empty and was seen
        self.assertEqual((yield self.delivered()), [1.0])
        self.assertFalse(idle.called)  # queue 1 still holds an element nobody reads
        yield self.expire_queue(1)
        a.clock.advance(LEASE_MS / 3000.0)  # A takes queue 1 and reads it from its head
        yield idle
        self.assertEqual((yield self.delivered()), [1.0, 10.0])

    def reads_issued(self, use: Reader, n: int) -> defer.Deferred:
        """Fires when ``use``'s reader has issued ``n`` more XREADs (each after the last one's reply
        was handled)."""
        d = defer.Deferred()
        real = use.blocking.call
        count = [0]

        def call(command, *args):
            if command == "XREAD":
                count[0] += 1
                if count[0] == n:
                    use.blocking.call = real
                    d.callback(None)
            return real(command, *args)

        use.blocking.call = call
        return d

    def expire_queue(self, queue_number: int) -> defer.Deferred:
        return wait(self.redis.call("DEL", keys.lease(keys.input_queue(queue_number))))

    @defer.inlineCallbacks
    def append_to(self, queue_number: int, values: list[float]):
        ids = []
        for value in values:
            element = encode_groups([[self.userid, 0.0, T0 + int(value), [[0, "n", {"a": value}]]]])
            ids.append((yield wait(self.redis.call("XADD", keys.input_stream(queue_number), "*", "p", element))))
        return ids


class SenderUse:
    """What the two storage-queue senders share: batches of one PHPTimeSeries record."""

    feedid = 7
    queue_name = keys.storage_queue(1)

    @defer.inlineCallbacks
    def append(self, values: list[float]):
        scripts = Scripts(self.redis)
        ids = []
        for value in values:
            n = len(self.appended) + len(ids)
            batch = make_records(self.feedid, [T0 + 10 * n], [value], ENGINE_PHPTIMESERIES)
            ids.append((yield wait(scripts.run(APPEND_SEQ, [keys.storage_stream(1), keys.storage_seq(1)], [batch.tobytes()]))))
        return ids

    def delivered(self):
        path = os.path.join(self.datadir, "phptimeseries", f"feed_{self.feedid}.MYD")
        with open(path, "rb") as f:
            return defer.succeed([float(v) for v in np.frombuffer(f.read(), dtype=MYD)["v"]])

    def recorder(self) -> RefusalRecorder:
        return RefusalRecorder(Refusals(self.redis, CollectorRegistry()), lambda feeds: defer.succeed({}))


class LocalSenderReaderTests(SenderUse, LeasedReaderContract, unittest.TestCase):
    """The sender of storage server 1 hosted in process: applies batches to the engines, then commits."""

    @defer.inlineCallbacks
    def setUpUse(self):
        self.datadir = os.path.abspath(self.mktemp())
        self.location = StorageLocationService(1, self.datadir, EnginesSection(sync=False), reactor)
        self.location.startService()
        self.addCleanup(self.location.stopService)
        engines = yield self.location.opened
        engines.phptimeseries.create(self.feedid)

    def make(self, owner: str, clock: task.Clock, blocking: Redis):
        return LocalSenderService(
            1, self.location, self.redis, blocking, self.recorder(), reactor, owner, SenderMetrics(CollectorRegistry()),
            lease_ms=LEASE_MS, block_ms=BLOCK_MS, clock=clock,
        )


class RemoteLinkReaderTests(SenderUse, LeasedReaderContract, unittest.TestCase):
    """The link to remote storage server 1 (real mutual TLS): sends batches in a window, commits
    each when the server acknowledges it. A stale holder's batch is refused by the server too."""

    @defer.inlineCallbacks
    def setUpUse(self):
        storage = yield start_storage(self)
        self.tls, self.port, self.datadir, engines = storage.tls, storage.port, storage.datadir, storage.engines
        engines.phptimeseries.create(self.feedid)

    def make(self, owner: str, clock: task.Clock, blocking: Redis):
        link = RemoteLink(
            1, RemoteServer(endpoint=f"tcp:127.0.0.1:{self.port}", name="storage1"),
            TLSSection(ca=os.path.join(self.tls, "ca.pem"), cert=os.path.join(self.tls, "node0.pem")),
            owner, self.redis, blocking, self.recorder(), LinkMetrics(CollectorRegistry()), reactor,
            lease_ms=LEASE_MS, block_ms=BLOCK_MS, clock=clock,
        )
        return link

    def stale_attempt_over(self, use: Reader, finished: defer.Deferred) -> defer.Deferred:
        """The stale holder's batch goes out with its old token: the server refuses it."""
        refused = defer.Deferred()
        real = use.service.answered

        def answered(seq, applied, result):
            real(seq, applied, result)
            if not applied and not refused.called:
                refused.callback(None)

        use.service.answered = answered
        return defer.gatherResults([finished, refused])
