"""The input endpoint: ``input/post`` and ``input/bulk`` → the user's input queue.

No processing happens on the request path: a request is authenticated,
decoded, and its packets appended to the user's input queue; the device
gets ``ok`` only once Redis has acknowledged that append. Appends of the
requests that arrive together are coalesced: one queue element per queue
per flush, one Redis round trip per flush, at most one flush in flight.
Request bodies are limited as they arrive, not after buffering.
"""

from __future__ import annotations

import codecs
import json
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from emond.api import WRITE, ApiError, Call, Raw, Router
from emond.config import InputSection
from emond.context import NodeContext
from emond.inputparse import FrameRefusal, bulk_text, parse_bulk, parse_post
from emond.queue import encode_groups, input_stream
from emond.redis import Redis, RedisUnavailable
from emond.refusals import Refused

OK = Raw(b"ok")
FULLJSON_OK = Raw(b'{"success": true}')


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
        key = "emond:input:layout"
        await redis.call("SET", key, self.encode(), "NX")
        recorded = await redis.call("GET", key)
        if recorded is None or recorded.decode() != self.encode():
            raise QueueLayoutError(
                f"input queue layout in Redis is {recorded!r}, this config says {self.encode()}; "
                "drain the queues before changing [input] queues/mapping/ranges"
            )


class InputAppender:
    """Coalesces the appends of concurrent requests into one pipeline per flush."""

    log = Logger()

    def __init__(self, redis: Redis, layout: QueueLayout, reactor: IReactorTime) -> None:
        self.redis = redis
        self.layout = layout
        self._reactor = reactor
        self._pending: dict[int, list[list[Any]]] = defaultdict(list)
        self._waiting: list[defer.Deferred[None]] = []
        self._scheduled = False
        self._flushing = False

    def append(self, userid: int, received: float, time_ref: int, frames: list[list[Any]]) -> defer.Deferred[None]:
        """Fires once Redis acknowledged the append; fails with RedisUnavailable otherwise."""
        self._pending[self.layout.queue_for(userid)].append([userid, received, time_ref, frames])
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        if not self._scheduled and not self._flushing:
            self._scheduled = True
            self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._scheduled = False
        if self._flushing or not self._waiting:
            return
        pending, waiting = self._pending, self._waiting
        self._pending, self._waiting = defaultdict(list), []
        commands = [("XADD", input_stream(q), "*", "p", encode_groups(groups)) for q, groups in pending.items()]
        self._flushing = True
        defer.ensureDeferred(self.redis.pipeline(commands)).addBoth(self._flushed, waiting)

    def _flushed(self, result: Any, waiting: list[defer.Deferred[None]]) -> None:
        self._flushing = False
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(RedisUnavailable(str(result.value)))
            else:
                d.callback(None)
        if self._waiting:  # requests that came while this flush was in flight
            self._flush()


class UserRateLimit:
    """A token bucket per user (in process): ``rate`` requests/s, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}

    def take(self, userid: int) -> float:
        """0 if allowed, else the seconds to wait before the next request."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.get(userid, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[userid] = (tokens, now)
            return (1 - tokens) / self.rate
        if len(self._buckets) > 1_000_000:
            self._buckets.clear()
        self._buckets[userid] = (tokens - 1, now)
        return 0.0


class InputMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames = Counter("emond_input_frames_accepted", "Frames (packets) accepted and queued", registry=registry)


def add_input_path_routes(router: Router, ctx: NodeContext, appender: InputAppender, limiter: UserRateLimit, metrics: InputMetrics, clock: Callable[[], float] = time.time) -> None:
    settings = ctx.config.input

    async def accept(call: Call, time_ref: int, frames: list[list[Any]], refused: list[FrameRefusal]) -> None:
        wait = limiter.take(call.userid)
        if wait:
            raise RateLimited(wait)
        if refused:
            await ctx.refusals.record(call.userid, [Refused(f.time, f.node, "", f.reason) for f in refused])
        if frames:
            await appender.append(call.userid, clock(), time_ref, frames)
            metrics.frames.inc(len(frames))

    async def post(call: Call) -> Any:
        packet, full = parse_post(call.params, call.subactions, int(clock()))
        await accept(call, packet.time, [[0, packet.node, packet.values]] if packet.values else [], [])
        return FULLJSON_OK if full else OK

    async def bulk(call: Call) -> Any:
        text = bulk_text(call.params, lambda: _body(call.request), settings.max_inflated)
        parsed = parse_bulk(call.params, text, int(clock()))
        await accept(call, parsed.time_ref, parsed.frames, parsed.refused)
        return OK

    router.add("input", "post", WRITE, post)
    router.add("input", "bulk", WRITE, bulk)


class RateLimited(ApiError):
    def __init__(self, wait: float) -> None:
        seconds = max(1, int(wait + 0.999))
        super().__init__("Too many requests, slow down", 429, {b"Retry-After": str(seconds).encode()})


def _body(request: Request) -> bytes:
    request.content.seek(0)
    return request.content.read()


FORM = b"application/x-www-form-urlencoded"


def unquote_form(value: bytes) -> bytes:
    """``+`` and ``%XX`` decoded as in a form body. ``%XX`` becomes ``\\xXX`` for
    ``codecs.escape_decode`` (C): 8× faster than urllib's Python loop over each
    escape, which was a third of a form-encoded bulk request (its JSON is mostly escapes)."""
    value = value.replace(b"+", b" ")
    if b"%" not in value:
        return value
    try:
        return codecs.escape_decode(value.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))[0]
    except ValueError:  # a "%" without two hex digits after it stays as it is
        return unquote_to_bytes(value)


def form_args(body: bytes) -> dict[bytes, list[bytes]]:
    """A form body as twisted.web's ``parse_qs(body, 1)`` makes it."""
    args: dict[bytes, list[bytes]] = {}
    for item in body.replace(b";", b"&").split(b"&"):
        key, sep, value = item.partition(b"=")
        if sep:
            args.setdefault(unquote_form(key), []).append(unquote_form(value))
    return args


class LimitedRequest(Request):
    """A request whose body stops being stored past ``max_body`` bytes (answered 413),
    and whose form body is decoded by ``form_args`` (twisted still decodes multipart ones)."""

    max_body = 1 << 20
    _form = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        ctype = self.requestHeaders.getRawHeaders(b"Content-Type")
        if command == b"POST" and ctype and ctype[0].split(b";", 1)[0].strip().lower() == FORM:
            self._form = True
            self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)

    def gotLength(self, length: int | None) -> None:
        self.too_large = length is not None and length > self.max_body
        super().gotLength(None if self.too_large else length)
        self._received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
        if not self.too_large:
            super().handleContentChunk(data)

    def process(self) -> None:
        if getattr(self, "too_large", False):
            self.setResponseCode(413)
            self.setHeader(b"Content-Type", b"application/json")
            self.write(b'{"success":false,"message":"Request body too large"}')
            self.finish()
            return
        if self._form:
            self.args.update(form_args(self.content.read()))
            self.content.seek(0)
        super().process()


def limited_request_factory(max_body: int) -> type[LimitedRequest]:
    return type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})
