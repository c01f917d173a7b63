"""A node's link to a remote storage server: the storage queue's sender, and reads.

The link keeps one mutual-TLS connection (``ClientService``, reconnecting
with backoff). While it holds the storage queue's lease it sends the
queue's batches in order, each with its sequence number and the lease's
fencing token, keeping at most ``window`` unacknowledged. Consecutive queue
entries go out joined in one batch frame (up to ``FRAME_BYTES``; the frame
carries the last entry's sequence number), so that the server applies, and
syncs, large batches (per point, a batch of 100,000 points costs it three
times what one of 500,000 does); a frame holds what the queue had when it was
read, so none waits for more. Batches stay in Redis until the server
acknowledges them (then they are removed and the feeds' disk values recorded,
in one fenced script); after a reconnect the unacknowledged ones are sent
again, in order, from the head of the queue.
A full window stops the sender taking batches: only this server's queue
grows. Reads are request/response frames with ids on the same connection.
A ``StreamLink`` is the same connection for reads alone: a front reads every
storage server, and only the process of the server's shard drains its queue.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from emond.config import RemoteServer, TLSSection
from emond.queue import ElementHandler, Entry, Lease, LeaseLost, LeasedReader, OneQueue, Scripts, Tenure, Window, storage_queue
from emond.records import RECORD, Refusal
from emond.redis import Redis, RedisUnavailable
from emond.storage.sender import RefusalRecorder, disk_values
from emond.stream import (
    ACK,
    BINARY,
    ERROR,
    FINAL,
    HELLO,
    HELLO_OK,
    NACK,
    RESP_HEAD,
    RESPONSE,
    SEQ,
    VERSION,
    ClientTLS,
    FrameProtocol,
    batch_parts,
    encode_json,
    request_frame,
)


FRAME_BYTES = 8 << 20  # records joined in one batch frame (a single entry may be larger); well under MAX_FRAME
FRAME_ENTRIES = 64  # queue entries joined in one batch frame at most (and read by one XREAD)
CLOSE_TIMEOUT = 5.0  # seconds a stopping link waits for the server's side of the TLS close, then cuts the connection


class RemoteUnavailable(Exception):
    """The storage server cannot be reached now."""


class RemoteTimeout(RemoteUnavailable):
    """The storage server did not answer a read in time."""


class RemoteReadError(Exception):
    """The storage server answered a read with an error."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class StreamClientProtocol(FrameProtocol):
    def __init__(self, link: "StreamLink") -> None:
        self.link = link

    def connectionMade(self) -> None:
        self.send(encode_json(HELLO, {"version": VERSION, "name": self.link.node_name}))

    def stringReceived(self, frame: bytes) -> None:
        kind = frame[:1]
        if kind == HELLO_OK:
            hello = json.loads(frame[1:])
            if hello.get("version") != VERSION or hello.get("server") != self.link.server_id:
                self.link.log.error("storage {id}: unexpected hello {hello}", id=self.link.server_id, hello=hello)
                self.transport.loseConnection()
                return
            token = hello.get("token", 0)
            self.link.connected(self, token if isinstance(token, int) else 0)
        elif kind in (ACK, NACK):
            (seq,) = SEQ.unpack_from(frame, 1)
            self.link.answered(seq, kind == ACK, json.loads(frame[1 + SEQ.size :]))
        elif kind == RESPONSE:
            request_id, flags = RESP_HEAD.unpack_from(frame, 1)
            self.link.response(request_id, flags, frame[1 + RESP_HEAD.size :])
        else:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.link.disconnected(self)


class _Factory(Factory):
    def __init__(self, link: "StreamLink") -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> StreamClientProtocol:
        protocol = StreamClientProtocol(self.link)
        self.link.latest = protocol  # connected or still in its handshake: what a stop may have to cut
        return protocol


class FrameWindow(Window):
    """The sender's window: at most ``size`` batch frames unacknowledged, each joining up to
    ``frame_bytes`` of queue entries.

    ``room`` (what the reader asks before reading) is the number of entries to read: about
    one frame's worth, judged from the largest entry of the last read (XREAD cannot bound
    bytes), at most ``entries`` (which bounds a read at ``entries`` times the largest entry,
    whatever the estimate); one until an entry has been seen."""

    def __init__(self, size: int, frame_bytes: int, entries: int) -> None:
        super().__init__(size)
        self.frame_bytes = frame_bytes
        self.entries = max(1, entries)
        self.entry_bytes = frame_bytes  # the largest entry of the last read
        self.asked = 0  # entries the last read asked for
        self.backlog = False  # the last read got all it asked for: more may be queued

    def frames(self) -> int:
        """Frames that may be sent now: ``size``, or while the queue is drained as fast as it
        fills, two (one applied, one waiting behind it); the entries that come meanwhile go
        out joined, not as one small frame each (each costs the server a pass)."""
        return (self.size if self.backlog else min(self.size, 2)) - len(self.pending)

    def room(self) -> int:
        if self.frames() <= 0:
            return 0
        self.asked = max(1, min(self.entries, self.frame_bytes // max(self.entry_bytes, 1)))
        return self.asked

    def seen(self, sizes: list[int]) -> None:
        """Entries of these sizes were read."""
        self.backlog = len(sizes) >= self.asked
        if sizes:
            self.entry_bytes = max(max(sizes), RECORD.itemsize)


def frames_of(entries: list[Entry], frame_bytes: int) -> list[list[Entry]]:
    """Consecutive entries grouped into frames of at most ``frame_bytes`` of records (an
    entry larger than that alone)."""
    groups: list[list[Entry]] = []
    size = frame_bytes
    for entry in entries:
        n = len(entry[1][b"b"])
        if size + n > frame_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


class LinkMetrics:
    """The remote links' metric families, registered once per process (a link per remote
    storage server labels them with its server id)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge("emond_stream_connected", "1 while the stream to a storage server is up", ["server"], registry=registry)
        self.sent = Counter("emond_stream_batches_sent", "Batches sent", ["server"], registry=registry)
        self.points = Counter("emond_stream_points_sent", "Datapoints sent", ["server"], registry=registry)
        self.acked = Counter("emond_stream_batches_acked", "Batches acknowledged", ["server"], registry=registry)
        self.resent = Counter("emond_stream_batches_resent", "Batches sent again after a reconnect", ["server"], registry=registry)
        self.window = Gauge("emond_stream_window_in_use", "Unacknowledged batches", ["server"], registry=registry)
        self.rtt = Gauge("emond_stream_rtt_seconds", "Last batch round trip", ["server"], registry=registry)
        self.fail = Counter("emond_stream_connect_failures", "Failed connections (TLS included)", ["server"], registry=registry)
        self.reads = Counter("emond_stream_read_requests", "Read requests sent to a storage server", ["server", "op"], registry=registry)
        self.read_timeouts = Counter(
            "emond_stream_read_timeouts", "Read requests a storage server did not answer in time", ["server"], registry=registry
        )


class StreamLink(Service):
    """The stream to one remote storage server, for read requests only: it never takes the
    server's storage queue (a front's link to a server whose queue a shard process drains).
    ``RemoteLink`` adds the sender."""

    log = Logger()

    def __init__(
        self,
        server_id: int,
        remote: RemoteServer,
        tls: TLSSection,
        node_name: str,
        metrics: "LinkMetrics",
        reactor: IReactorTime,
    ) -> None:
        self.server_id = server_id
        self.remote = remote
        self.tls = tls
        self.node_name = node_name
        self.reactor = reactor
        self.protocol: StreamClientProtocol | None = None
        self.latest: StreamClientProtocol | None = None  # the connection made last (``protocol`` once it said hello)
        self.server_token = 0  # the newest fencing token the server has applied (its hello says)
        self._ready: defer.Deferred[None] = defer.Deferred()
        self._requests: dict[int, tuple[defer.Deferred[Any], list[bytes]]] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self._client: ClientService | None = None
        self._tls: ClientTLS | None = None  # what each new connection's handshake uses
        label = str(server_id)
        self.m_connected = metrics.connected.labels(label)
        self.m_fail = metrics.fail.labels(label)
        self.m_reads = metrics.reads
        self.m_read_timeouts = metrics.read_timeouts.labels(label)
        self.error: str | None = None

    # -- connection -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        host = self.remote.endpoint.split(":")[1] if self.remote.endpoint.count(":") >= 2 else ""
        name = self.remote.name or host
        self._tls = ClientTLS(self.tls.ca, self.tls.cert, name)
        endpoint = endpoints.wrapClientTLS(self._tls, endpoints.clientFromString(self.reactor, self.remote.endpoint))
        self._client = ClientService(endpoint, _Factory(self), retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0), clock=self.reactor)
        self._client.startService()

    async def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        self._stopping = True
        if not self._ready.called:
            self._ready.callback(None)
        if self._client is not None:
            # A TLS connection closes once the server answers the close: one that hangs (frozen,
            # or its machine gone without a reset) would hold the stop (a node's shutdown,
            # emond-admin's exit) for ever; cut after CLOSE_TIMEOUT.
            stopped = self._client.stopService()
            cut = self.reactor.callLater(CLOSE_TIMEOUT, self._cut)
            try:
                await stopped
            finally:
                if cut.active():
                    cut.cancel()

    def reload_tls(self) -> None:
        """Read the ``[tls]`` files again (SIGHUP): the next connection presents the new
        certificate; the one open now goes on with the old. Raises if the files are unusable
        (the old ones stay in use)."""
        if self._tls is not None:
            self._tls.load(self.tls.ca, self.tls.cert)

    def unfinished(self) -> list[str]:
        """What a stop cut short would leave undone (for the log)."""
        return []

    def _cut(self) -> None:
        transport = self.latest.transport if self.latest is not None else None
        if transport is not None:
            self.log.warn("stream to storage {id}: no answer to the close in {s:g} s, cut", id=self.server_id, s=CLOSE_TIMEOUT)
            transport.abortConnection()

    def connected(self, protocol: StreamClientProtocol, server_token: int = 0) -> None:
        self.protocol = protocol
        self.server_token = server_token
        self.m_connected.set(1)
        self.error = None
        self.log.info("stream to storage {id} up", id=self.server_id)
        if not self._ready.called:
            self._ready.callback(None)

    def disconnected(self, protocol: StreamClientProtocol) -> None:
        if protocol is not self.protocol:
            self.m_fail.inc()  # never got past TLS and hello
            return
        self.protocol = None
        self.m_connected.set(0)
        # A new one before ``_lost``: the sender it wakes (a full window cleared) must wait
        # for the next connection, not find the last one's fired and loop without yielding.
        self._ready = defer.Deferred()
        self._lost()
        for d, _ in self._requests.values():
            d.errback(RemoteUnavailable(f"storage server {self.server_id}: connection lost"))
        self._requests.clear()

    def _lost(self) -> None:
        self.log.warn("stream to storage {id} down", id=self.server_id)

    def answered(self, seq: int, applied: bool, result: Any) -> None:
        """An acknowledgement; a link that sends no batches expects none."""

    def _oldest_unacked(self) -> float | None:
        """When the oldest batch still waiting for its acknowledgement was sent (None: none)."""
        return None

    # -- reads -------------------------------------------------------------------------

    async def request(self, op: str, feed: int, engine: int, *args: Any, timeout: float | None = None) -> Any:
        """One read request; its answer (JSON, or bytes for a binary one).

        Raises RemoteUnavailable when not connected (or the connection is
        lost meanwhile), RemoteTimeout when no answer comes in ``timeout``
        seconds (a late answer is then ignored), RemoteReadError when the
        server answers with an error.
        """
        protocol = self.protocol
        if protocol is None:
            raise RemoteUnavailable(f"storage server {self.server_id} is not connected")
        request_id = next(self._ids)
        d: defer.Deferred[Any] = defer.Deferred(lambda _: self._requests.pop(request_id, None))
        self._requests[request_id] = (d, [])
        self.m_reads.labels(str(self.server_id), op).inc()
        protocol.send(request_frame(request_id, {"op": op, "feed": feed, "engine": engine, "args": list(args)}))
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            self.m_read_timeouts.inc()
            raise RemoteTimeout(f"storage server {self.server_id} did not answer in {timeout:g} s") from None

    def response(self, request_id: int, flags: int, body: bytes) -> None:
        pending = self._requests.get(request_id)
        if pending is None:
            return
        d, chunks = pending
        chunks.append(body)
        if not flags & FINAL:
            return
        del self._requests[request_id]
        data = b"".join(chunks)
        if flags & ERROR:
            error = json.loads(data)
            d.errback(RemoteReadError(error["error"], error.get("type", "")))
        elif flags & BINARY:
            d.callback(data)
        else:
            d.callback(json.loads(data))

    async def health(self, timeout: float, max_ack_wait: float) -> dict[str, object]:
        """``status()``, and whether the server answers now: a ping within ``timeout``
        (a frozen server keeps its connection open but answers nothing), and no batch
        waiting for its acknowledgement longer than ``max_ack_wait`` seconds (a server
        whose disk hangs answers pings but applies nothing)."""
        status = self.status()
        if self.protocol is None:
            return status
        oldest = self._oldest_unacked()
        if oldest is not None and time.monotonic() - oldest > max_ack_wait:
            return {**status, "ok": False, "error": f"a batch has waited over {max_ack_wait:g} s for its acknowledgement"}
        try:
            server = await self.request("ping", 0, 0, timeout=timeout)
        except (RemoteUnavailable, RemoteReadError) as e:
            return {**status, "ok": False, "error": f"no answer to a ping: {e}"}
        if isinstance(server, dict) and not server.get("ok", False):
            return {**status, "ok": False, "error": f"storage server unwell: {server.get('disk_error') or 'not open'}"}
        return status

    def status(self) -> dict[str, object]:
        return {"ok": self.protocol is not None and self.error is None, "connected": self.protocol is not None, "error": self.error}


class RemoteLink(StreamLink, ElementHandler):
    """The stream to one remote storage server: its storage queue's sender (a
    ``emond.queue.LeasedReader`` with a window) and read requests."""

    doing = "sending a batch"

    def __init__(
        self,
        server_id: int,
        remote: RemoteServer,
        tls: TLSSection,
        node_name: str,
        redis: Redis,
        blocking: Redis,
        recorder: RefusalRecorder,
        metrics: "LinkMetrics",
        reactor: IReactorTime,
        window: int = 8,
        batch: int = FRAME_ENTRIES,
        lease_ms: int = 10_000,
        block_ms: int = 500,
        clock: IReactorTime | None = None,
        frame_bytes: int = FRAME_BYTES,
    ) -> None:
        """``window``: batch frames unacknowledged at most; ``batch``: queue entries joined in one
        frame at most, up to ``frame_bytes`` of records. ``clock``: the lease's and retries' (tests give a ``task.Clock``);
        default ``reactor``."""
        super().__init__(server_id, remote, tls, node_name, metrics, reactor)
        self.recorder = recorder
        clock = clock or reactor
        self.lease = Lease(Scripts(redis), storage_queue(server_id).name, f"{node_name}-{uuid.uuid4().hex[:8]}", lease_ms)
        self.queue = OneQueue(self.lease, storage_queue(server_id), clock, floor=lambda: self.server_token)
        self.window = FrameWindow(window, frame_bytes, batch)  # seq -> (stream ids, batch, sent at)
        self.reader = LeasedReader(
            self.queue, self, blocking, clock, f"storage queue {server_id}", batch=batch, block_ms=block_ms, window=self.window
        )
        label = str(server_id)
        self.m_sent = metrics.sent.labels(label)
        self.m_points = metrics.points.labels(label)
        self.m_acked = metrics.acked.labels(label)
        self.m_resent = metrics.resent.labels(label)
        self.m_window = metrics.window.labels(label)
        self.m_rtt = metrics.rtt.labels(label)
        self._sent_upto = -1  # the highest sequence number sent (a frame starting at or below it is sent again)
        self.last_rtt: float | None = None

    # -- connection -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.reader.start()

    async def stopService(self) -> None:  # type: ignore[override]
        Service.stopService(self)
        self._stopping = True
        stopped = defer.ensureDeferred(self.reader.stop())  # the reader stops taking batches first
        if not self._ready.called:
            self._ready.callback(None)
        await stopped
        await super().stopService()

    @property
    def unacked(self) -> dict[int, tuple[list[bytes], np.ndarray, float]]:
        """Batch frames sent and not acknowledged: the last entry's seq -> (stream ids, records, sent at)."""
        return self.window.pending

    def _lost(self) -> None:
        self.log.warn("stream to storage {id} down; {n} batches to send again", id=self.server_id, n=len(self.unacked))
        self.reader.restart()  # resend from the head of the queue
        self.m_window.set(0)

    def _oldest_unacked(self) -> float | None:
        return min((sent for _entry, _batch, sent in self.unacked.values()), default=None)

    def unfinished(self) -> list[str]:
        parts = self.reader.unfinished()
        if self.unacked:
            seqs = ", ".join(str(seq) for seq in sorted(self.unacked))
            parts.append(f"storage {self.server_id}: batches {seqs} sent and not acknowledged (they stay in its storage queue)")
        return parts

    # -- the sender --------------------------------------------------------------------

    def idle(self) -> defer.Deferred[None]:
        """Fires once the queue has been seen empty with nothing unacknowledged."""
        return self.reader.idle()

    async def ready(self) -> None:
        """The sender waits while the stream is down (its lease lapses meanwhile, so another
        node's link may take the queue over)."""
        while self.protocol is None and not self._stopping:
            await self._ready

    async def handle(self, tenure: Tenure, entries: list[Entry]) -> None:
        """Send the entries, joined in frames, each with its last entry's sequence number and
        the lease's fencing token; they are committed when the server acknowledges the frame
        (``answered``). Entries beyond the window's room are read again later."""
        window = self.window
        window.seen([len(fields[b"b"]) for _id, fields in entries])
        for group in frames_of(entries, window.frame_bytes):
            protocol = self.protocol
            if protocol is None or window.frames() <= 0:
                return  # the connection went (the reader starts again from the head), or no room
            ids = [entry_id for entry_id, _fields in group]
            seq = int(group[-1][1][b"s"])
            data = protocol.send_parts(batch_parts(seq, tenure.lease.token, [fields[b"b"] for _id, fields in group]))
            records = np.frombuffer(data, dtype=RECORD, offset=len(data) - sum(len(fields[b"b"]) for _id, fields in group))
            window.sent(tenure, ids[-1], seq, (ids, records, time.monotonic()))
            self.m_sent.inc()
            self.m_points.inc(records.shape[0])
            if int(group[0][1][b"s"]) <= self._sent_upto:
                self.m_resent.inc()
            self._sent_upto = max(self._sent_upto, seq)
            self.m_window.set(len(self.unacked))

    def answered(self, seq: int, applied: bool, result: Any) -> None:
        if seq not in self.unacked:
            return
        if not applied:
            # Not applied (disk error, stale token): nothing is acknowledged; start again later.
            self.error = f"storage {self.server_id} did not apply batch {seq}: {result}"
            self.log.warn("{error}", error=self.error)
            if self.protocol is not None:
                self.protocol.transport.loseConnection()
            return
        _entry_id, _batch, sent_at = self.unacked[seq]
        self.last_rtt = time.monotonic() - sent_at
        self.m_rtt.set(self.last_rtt)
        self.m_acked.inc()
        refusals = [Refusal(int(f), int(t), str(r)) for f, t, r in result]
        self.window.acknowledged(seq, lambda sent: self._commit(sent[0], sent[1], refusals))
        self.m_window.set(len(self.unacked))

    async def _commit(self, entry_ids: list[bytes], batch: np.ndarray, refusals: list[Refusal]) -> None:
        """Remove an applied frame's entries from the queue and record the feeds' disk values, fenced."""
        try:
            await self.queue.tenure.commit(entry_ids, disk_values(batch, refusals))
            if refusals:
                await self.recorder.record(refusals)
        except (LeaseLost, RedisUnavailable) as e:
            # Applied but still queued: it is sent again, which gives the same files.
            self.log.warn("storage {id}: commit after ack failed: {error}", id=self.server_id, error=str(e))

    def status(self) -> dict[str, object]:
        error = self.error or self.reader.error  # the stream's, else the queue's (Redis)
        return {
            "ok": self.protocol is not None and error is None,
            "connected": self.protocol is not None,
            "holding_queue": bool(self.lease.token),
            "window": self.window.size,  # batch frames that may be sent before one is acknowledged
            "window_in_use": len(self.unacked),
            "rtt": self.last_rtt,
            "error": error,
        }
