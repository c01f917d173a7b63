"""The storage server's end of the stream: batches applied in order, reads answered.

``StreamServer`` applies the batches that arrive (in order, fenced) to one
storage location and answers read requests from it; ``StorageStreamProtocol``
is one verified connection (hello first, every frame validated before it has
any effect); ``StreamServerFactory`` makes them for the TLS listener. The
location and its engines are in ``emond.storage.location``; the node's end of the
stream is ``emond.storage.remote``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge
from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from emond.engine import DataQuery, FeedError, decode_chunk, disk_summary
from emond.records import ENGINE_PHPFINA
from emond.storage.inspect import inspect_feed
from emond.storage.location import StorageEngines, StorageLocationService
from emond.stream import (
    ACK,
    BATCH,
    BINARY,
    CHUNK,
    ERROR,
    FINAL,
    HELLO,
    HELLO_OK,
    NACK,
    REQUEST,
    VERSION,
    FrameProtocol,
    ProtocolError,
    ReadRequest,
    ack_frame,
    decode_batch,
    decode_hello,
    decode_request,
    encode_json,
    peer_names,
    response_frame,
)

MAX_READ_DATA = 4 << 20  # bytes of one read_data answer (a feed copy's source reads in chunks)


def _offset_length(args: list[Any]) -> tuple[int, int]:
    offset, length = (int(x) for x in args[:2])
    if offset < 0 or not 0 <= length <= MAX_READ_DATA:
        raise ValueError(f"read_data: offset >= 0 and length from 0 to {MAX_READ_DATA}")
    return offset, length


def _summaries(engines: StorageEngines, wanted: list[tuple[int, int]]) -> list[Any]:
    """[size, [time, value]] of each (feed, engine); [null, null] where unknown."""
    out: list[Any] = []
    for feedid, engine_id in wanted:
        try:
            size, last = disk_summary(engines.engine(engine_id), engine_id, feedid)
        except (KeyError, FeedError, OSError):
            out.append([None, None])
            continue
        out.append([size, list(last) if last is not None else None])
    return out



class StreamServer:
    """Applies the batches that arrive over the stream, in order, and answers reads.

    One lock orders every batch (whatever connection it came on); a batch
    carrying an older fencing token than the newest seen is refused, so a
    stalled former sender cannot write after its successor. The newest
    token is kept in ``<datadir>/stream.token`` across restarts.
    """

    log = Logger()

    def __init__(self, location: StorageLocationService, allow: tuple[str, ...], registry: Any) -> None:
        self.location = location
        self.allow = set(allow)
        self.lock = defer.DeferredLock()
        self.disk_error: str | None = None
        self._token_path = os.path.join(location.datadir, "stream.token")
        self.max_token = self._read_token()
        self.stopping = False
        self.settling = 0  # batches received and not yet answered (written ones wait for their sync pass)
        self._settled: list[defer.Deferred[None]] = []  # fired when none is
        self.connections: set[Any] = set()
        self.batches = Counter("emond_stream_batches_applied", "Batches applied from the stream", registry=registry)
        self.points = Counter("emond_stream_points_applied", "Datapoints applied from the stream", registry=registry)
        self.refused_peers = Counter(
            "emond_stream_tls_refused", "Connections refused before any frame: no TLS, another CA, a name not allowed", registry=registry
        )
        self.connected = Gauge("emond_stream_connections", "Stream connections open", registry=registry)
        self.disk_errors = Counter("emond_storage_disk_errors", "Batches not applied because of a disk error", registry=registry)
        self.refused_frames = Counter(
            "emond_stream_frames_refused", "Connections closed for a frame that breaks the protocol, by reason", ["reason"], registry=registry
        )

    def _read_token(self) -> int:
        try:
            with open(self._token_path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _write_token(self, token: int) -> None:
        tmp = self._token_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(token))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._token_path)

    async def apply(self, seq: int, token: int, batch: np.ndarray) -> tuple[bool, Any]:
        """(True, refusals) once applied; (False, reason) when not applied.

        ``batch`` was decoded and checked (``decode_batch``) before this: nothing,
        the token included, is persisted for a frame that is not a whole batch."""
        await self.lock.acquire()
        try:
            if self.stopping:
                return False, "stopping"
            if token < self.max_token:
                return False, f"stale fencing token {token} < {self.max_token}"
            if token > self.max_token:
                await self.location.writes.run(self._write_token, token)
                self.max_token = token
            try:
                refusals, durable = await self.location.write_batch(batch)
            except OSError as e:
                return self._disk_error(seq, e)
        finally:
            self.lock.release()
        # The next batch may be written while this one waits for the sync pass that
        # covers it (a group commit, ``StorageLocationService.apply_batch``); it is
        # acknowledged only after that pass.
        try:
            await durable
        except OSError as e:
            return self._disk_error(seq, e)
        self.disk_error = None
        self.batches.inc()
        self.points.inc(batch.shape[0] - len(refusals))
        return True, [list(r) for r in refusals]

    def _disk_error(self, seq: int, e: OSError) -> tuple[bool, Any]:
        self.disk_error = f"{e.strerror or e} ({e.filename or self.location.datadir})"
        self.disk_errors.inc()
        self.log.error("batch {seq} not applied: {error}", seq=seq, error=self.disk_error)
        return False, "disk error"

    async def read(self, op: str, feed: int, engine: int, args: list[Any]) -> Any:
        """Answer one read request: the whole read runs here, in the location's read
        threads (creating and deleting files in its write thread), and is answered once
        (a data query comes back packed, see ``Series``). ``ping`` answers at once, from
        the reactor, with this server's status (a node's health check)."""
        if op == "ping":
            return self.status()
        engines = self.location.engines
        if engines is None:
            raise RuntimeError("storage not open")
        reads, writes = self.location.reads, self.location.writes
        if op == "summaries":
            wanted = [(int(f), int(e)) for f, e in args[0]]
            return await reads.run(_summaries, engines, wanted)
        if op == "inspect":  # emond-admin feed show|verify: the feed's files, read only
            return await reads.run(inspect_feed, engines.datadir, engine, feed, bool(args[0]) if args else False)
        target = engines.engine(engine)
        if op == "query":
            query = DataQuery.from_wire(args[0])
            series = await reads.run(target.query, feed, query)
            return series.to_bytes()
        if op == "value_at":
            return await reads.run(target.value_at, feed, int(args[0]))
        if op == "create":
            if engine == ENGINE_PHPFINA:
                return await writes.run(target.create, feed, int(args[0]))
            return await writes.run(target.create, feed)
        if op == "delete":
            return await writes.run(target.delete, feed)
        # copying a feed here from another storage server (engine.FeedDirectory)
        if op == "checksum":
            return list(await reads.run(target.checksum, feed))
        if op == "read_data":
            return await reads.run(target.read_data, feed, *_offset_length(args))
        if op == "receive":
            return await writes.run(target.receive, feed, *decode_chunk(*args[:2]))
        if op == "adopt":
            size, sha256, meta = args
            return await writes.run(target.adopt, feed, int(size), str(sha256), [int(x) for x in meta])
        method = {"value": "lastvalue", "meta": "meta", "export": "export"}.get(op)
        if method is None:
            raise ValueError(f"unknown read {op!r}")
        result = await reads.run(getattr(target, method), feed, *args)
        if op == "meta" and result is not None:
            return list(result)
        return result

    def status(self) -> dict[str, object]:
        return {
            "ok": self.disk_error is None and self.location.engines is not None,
            "disk_error": self.disk_error,
            "connections": len(self.connections),
            "fencing_token": self.max_token,
        }

    def reconfigure(self, allow: tuple[str, ...]) -> None:
        """Let in the client names of ``allow`` from the next handshake on (a reload); the
        connections open now stay."""
        self.allow = set(allow)

    def answered(self) -> None:
        """A batch received has been answered (its ack or nack sent)."""
        self.settling -= 1
        if not self.settling:
            waiters, self._settled = self._settled, []
            for waiter in waiters:
                waiter.callback(None)

    def unfinished(self) -> list[str]:
        """What a stop cut short would leave undone (for the log)."""
        if self.lock.locked or self.settling:
            return ["a batch being applied (unacknowledged: its node sends it again)"]
        return []

    async def drain(self) -> None:
        """Finish the batch in hand; acknowledge nothing after it."""
        await self.lock.acquire()
        self.stopping = True
        self.lock.release()
        if self.settling:  # batches written wait for their sync pass, then are acknowledged
            settled: defer.Deferred[None] = defer.Deferred()
            self._settled.append(settled)
            await settled
        for connection in list(self.connections):
            connection.transport.loseConnection()


@implementer(IHandshakeListener)
class StorageStreamProtocol(FrameProtocol):
    """The server end: verify the peer's name, then hello, then batches and reads.

    Every frame is decoded and validated before it has any effect; a frame
    that breaks the protocol closes this connection (logged with its reason,
    counted in ``emond_stream_frames_refused``) and nothing of it is applied.
    Other connections go on.
    """

    log = Logger()

    def __init__(self, server: StreamServer, server_id: int) -> None:
        self.server = server
        self.server_id = server_id
        self.verified = False
        self.greeted = False
        self.refused = False  # a frame broke the protocol: read nothing more
        self.peer = "?"

    def handshakeCompleted(self) -> None:
        names = peer_names(self.transport)
        if not self.server.allow.intersection(names):
            self.log.warn("stream: refused a client certificate for {names}: not on allow", names=names)
            self.transport.abortConnection()
            return
        self.verified = True
        self.peer = names[0]
        self.server.connections.add(self)
        self.server.connected.set(len(self.server.connections))
        # The serial tells which of the peer's certificates it presented (after a renewal).
        serial = self.transport.getPeerCertificate().get_serial_number()
        self.log.info("stream: {peer} connected (certificate serial {serial:x})", peer=self.peer, serial=serial)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.verified:
            self.server.refused_peers.inc()  # no TLS (plain TCP), another CA, or a name not allowed
        self.server.connections.discard(self)
        self.server.connected.set(len(self.server.connections))

    def stringReceived(self, frame: bytes) -> None:
        if self.refused:
            return
        if not self.verified:
            self.transport.abortConnection()
            return
        try:
            self._frame(frame)
        except ProtocolError as e:
            self._refuse(e)

    def _frame(self, frame: bytes) -> None:
        kind = frame[:1]
        if not self.greeted:
            if kind != HELLO:
                raise ProtocolError("frame_before_hello", f"a {kind!r} frame before the hello")
            self._hello(frame)
        elif kind == BATCH:
            seq, token, batch = decode_batch(frame)
            defer.ensureDeferred(self._batch(seq, token, batch))
        elif kind == REQUEST:
            request_id, request = decode_request(frame)
            defer.ensureDeferred(self._request(request_id, request))
        else:
            raise ProtocolError("unknown_kind", f"a {kind!r} frame")

    def _hello(self, frame: bytes) -> None:
        version, name = decode_hello(frame)
        if version != VERSION:
            self.send(encode_json(HELLO_OK, {"version": VERSION, "error": "unsupported version"}))
            raise ProtocolError("hello_version", f"version {version}, this server speaks {VERSION}")
        self.greeted = True
        self.log.info("stream: {peer} says hello as {name}", peer=self.peer, name=name)
        # The newest fencing token applied: a sender whose Redis lost its counter catches up.
        self.send(encode_json(HELLO_OK, {"version": VERSION, "server": self.server_id, "token": self.server.max_token}))

    def _refuse(self, error: ProtocolError) -> None:
        self.refused = True
        self.server.refused_frames.labels(error.reason).inc()
        self.log.warn(
            "stream: closing the connection from {peer}: {reason} ({detail})", peer=self.peer, reason=error.reason, detail=error.detail
        )
        if error.reason == "hello_version":
            self.transport.loseConnection()  # the answer saying why goes out first
        else:
            self.transport.abortConnection()  # a peer breaking the protocol gets nothing more

    async def _batch(self, seq: int, token: int, batch: np.ndarray) -> None:
        self.server.settling += 1
        try:
            try:
                applied, result = await self.server.apply(seq, token, batch)
            except Exception:
                self.log.failure("stream: batch {seq} from {peer} failed", seq=seq, peer=self.peer)
                applied, result = False, "internal error"
            if self.transport.connected:
                self.send(ack_frame(ACK if applied else NACK, seq, result))
        finally:
            self.server.answered()

    async def _request(self, request_id: int, request: ReadRequest) -> None:
        try:
            result = await self.server.read(request.op, request.feed, request.engine, request.args)
        except Exception as e:
            body = json.dumps({"error": str(e), "type": type(e).__name__}).encode()
            if self.transport.connected:
                self.send(response_frame(request_id, FINAL | ERROR, body))
            return
        if not self.transport.connected:
            return
        if isinstance(result, bytes):
            for i in range(0, max(len(result), 1), CHUNK):
                last = i + CHUNK >= len(result)
                self.send(response_frame(request_id, BINARY | (FINAL if last else 0), result[i : i + CHUNK]))
        else:
            self.send(response_frame(request_id, FINAL, json.dumps(result).encode()))


class StreamServerFactory(Factory):
    def __init__(self, server: StreamServer, server_id: int) -> None:
        self.server = server
        self.server_id = server_id

    def buildProtocol(self, addr: Any) -> StorageStreamProtocol:
        return StorageStreamProtocol(self.server, self.server_id)
