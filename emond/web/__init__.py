"""The input endpoint: ``input/post`` and ``input/bulk`` → the user's input queue.

No processing happens on the request path: a request is authenticated,
rate-limited, decoded, and its packets appended to the user's input queue;
the device gets ``ok`` only once Redis has acknowledged that append. Appends
of the requests that arrive together are coalesced: one queue element per
queue per flush, one Redis round trip per flush, at most one flush in flight;
each request's part is packed when it is appended, so a request that cannot
be packed fails alone. Work per request is bounded: bodies are limited as
they arrive, form bodies are decoded in C with a cap on their fields, and the
decoders run in slices between which the reactor turns (``cooperate``).
"""

from __future__ import annotations

import binascii
import codecs
import json
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, TypeVar

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from emond.api.http import WRITE, Call, Raw, Route
from emond.api.context import NodeContext
from emond.errors import Invalid, TooMany, Unavailable
from emond.loops import cooperate
from emond.inputparse import FrameRefusal, Limits, Steps, TimeRefused, bulk_steps, bulk_text_steps, post_steps, run
from emond.keys import input_stream
from emond.queue import QueueLayout, encode_group, join_groups
from emond.redis import Redis, RedisUnavailable
from emond.meta.refusals import Refused

OK = Raw(b"ok")
FULLJSON_OK = Raw(b'{"success": true}')
T = TypeVar("T")


class Unqueueable(Invalid):
    """What a request carries cannot be packed into a queue element (its values are
    validated where they are parsed, so this is a decoder's miss): that request alone fails."""

    def __init__(self) -> None:
        super().__init__("Format error, a number in the data is out of range")


class InputAppender:
    """Coalesces the appends of concurrent requests into one pipeline per flush.

    One per shard, on the shard's Redis: nothing is shared between shards, so one whose
    Redis is down or frozen holds up only its own users' requests. Each request waits at
    most the Redis timeout (plus ``wait_timeout`` with replicas) for its append, then is
    answered 503: a request that waited behind a hung flush does not wait a second
    timeout for its own (and if its part was never sent, it never will be). With
    ``wait_replicas``, a flush ends with ``WAIT``: ``ok`` only once that many replicas hold
    the append, 503 otherwise (the device sends again; a failover cannot lose an ``ok``).
    """

    log = Logger()

    def __init__(
        self,
        redis: Redis,
        layout: QueueLayout,
        reactor: IReactorTime,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        """``ready``: whether the queue layout has been checked in this Redis (until then, 503)."""
        self.redis = redis
        self.layout = layout
        self.reactor = reactor
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self.ready = ready
        self.longest = redis.timeout + (wait_timeout if wait_replicas else 0.0)  # seconds a request waits
        self._pending: list[tuple[int, bytes, defer.Deferred[None]]] = []  # (queue, packed part, its request)
        self._scheduled = False
        self._flushing = False
        # Each request's deadline, in the order they came, and one timer for the earliest:
        # a DelayedCall per request (Deferred.addTimeout) was ~8% of an input/post.
        self._deadlines: deque[tuple[float, defer.Deferred[None]]] = deque()
        self._timer: Any = None

    def append(self, userid: int, received: float, time_ref: int, frames: list[list[Any]]) -> defer.Deferred[None]:
        """Fires once Redis acknowledged the append (and the replicas, with ``wait_replicas``);
        fails with RedisUnavailable or Unavailable otherwise. Raises Unqueueable, before
        anything is pending, if this request cannot be packed."""
        try:
            packed = encode_group([userid, received, time_ref, frames])
        except (OverflowError, TypeError, ValueError) as e:
            self.log.warn("input of user {userid} cannot be packed: {error}", userid=userid, error=repr(e))
            raise Unqueueable()
        if not self.ready():
            raise Unavailable("Input queues not reachable yet, try again shortly")
        d: defer.Deferred[None] = defer.Deferred()
        self._deadlines.append((self.reactor.seconds() + self.longest, d))
        if self._timer is None:
            self._timer = self.reactor.callLater(self.longest, self._expire)
        self._pending.append((self.layout.queue_for(userid), packed, d))
        if not self._scheduled and not self._flushing:
            self._scheduled = True
            self.reactor.callLater(0, self._flush)
        return d

    def unfinished(self) -> list[str]:
        """What a stop cut short would leave undone (for the log): appends not acknowledged,
        whose requests have not been answered ``ok``."""
        waiting = sum(1 for _queue, _packed, d in self._pending if not d.called)
        parts = [f"{waiting} appends waiting for a flush"] if waiting else []
        if self._flushing:
            parts.append("a flush waiting for Redis")
        return parts

    def _expire(self) -> None:
        """Fail the requests past their deadline (as ``Deferred.addTimeout`` would have)."""
        self._timer = None
        now = self.reactor.seconds()
        deadlines = self._deadlines
        while deadlines and (deadlines[0][1].called or deadlines[0][0] <= now):
            _deadline, d = deadlines.popleft()
            if not d.called:
                d.errback(RedisUnavailable(f"redis append: not acknowledged within {self.longest:g}s"))
        if deadlines:
            self._timer = self.reactor.callLater(max(0.0, deadlines[0][0] - now), self._expire)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        pending = [item for item in pending if not item[2].called]  # those past their time stay out
        if self._flushing or not pending:
            self._pending = pending + self._pending
            return
        groups: dict[int, list[bytes]] = defaultdict(list)
        for queue, packed, _ in pending:
            groups[queue].append(packed)
        commands: list[tuple[Any, ...]] = [("XADD", input_stream(q), "*", "p", join_groups(parts)) for q, parts in groups.items()]
        if self.wait_replicas:
            commands.append(("WAIT", self.wait_replicas, max(1, int(self.wait_timeout * 1000))))
        self._flushing = True
        if len(commands) == 1:  # the usual flush at a moderate rate: one round trip without a pipeline's cost (~25 us)
            d = defer.ensureDeferred(self.redis.call(*commands[0])).addCallback(lambda reply: [reply])
        else:
            d = defer.ensureDeferred(self.redis.pipeline(commands, longer=self.wait_timeout if self.wait_replicas else 0.0))
        d.addBoth(self._flushed, [item[2] for item in pending])

    def _flushed(self, result: Any, waiting: list[defer.Deferred[None]]) -> None:
        self._flushing = False
        error: Exception | None = None
        if isinstance(result, Failure):
            error = RedisUnavailable(str(result.value))
        elif self.wait_replicas and int(result[-1]) < self.wait_replicas:
            replicas = int(result[-1])
            self.log.warn(
                "{replicas} of {wanted} replicas acknowledged an append within {timeout}s: answered 503",
                replicas=replicas, wanted=self.wait_replicas, timeout=self.wait_timeout,
            )
            error = Unavailable("Not stored on enough replicas in time, send again")
        for d in waiting:
            if d.called:
                continue  # answered already, past its time
            if error is not None:
                d.errback(error)
            else:
                d.callback(None)
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].called:  # answered: their deadlines no longer matter
            deadlines.popleft()
        if not deadlines and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:  # requests that came while this flush was in flight
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


def input_limits(ctx: NodeContext) -> Limits:
    """What one request may carry, and the accepted times: ``[input]`` and ``[engines] window_past``."""
    settings = ctx.config.input
    return Limits(settings.max_frames, settings.max_values, ctx.config.engines.window_past, settings.time_future)


@dataclass
class InputPath:
    """What the ``input/post`` and ``input/bulk`` routes work with (their table's context)."""

    ctx: NodeContext
    appender: InputAppender
    limiter: UserRateLimit
    metrics: InputMetrics
    clock: Callable[[], float] = time.time
    limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = input_limits(self.ctx)

    def reconfigure(self) -> None:
        """Take the limits of ``ctx.config`` again (a reload replaced it)."""
        self.limits = input_limits(self.ctx)
        settings = self.ctx.config.input
        self.limiter.rate, self.limiter.burst = settings.rate_limit, settings.rate_burst


def take(path: InputPath, call: Call) -> None:
    """The rate limit, before anything of the request is decoded."""
    wait = path.limiter.take(call.userid)
    if wait:
        raise RateLimited(wait)


async def accept(path: InputPath, call: Call, time_ref: int, frames: list[list[Any]], refused: list[FrameRefusal]) -> None:
    if refused:
        await path.ctx.refusals.record(call.userid, [Refused(f.time, f.node, f.input, f.reason) for f in refused])
    if frames:
        await path.appender.append(call.userid, path.clock(), time_ref, frames)
        path.metrics.frames.inc(len(frames))


async def input_post(path: InputPath, call: Call) -> Any:
    take(path, call)
    try:
        parsed = await cooperate(post_steps(call.params, call.subactions, int(path.clock()), path.limits), path.appender.reactor)
    except TimeRefused as e:
        await path.ctx.refusals.record(call.userid, [Refused(e.refusal.time, e.refusal.node, "", e.refusal.reason)])
        raise
    packet = parsed.packet
    await accept(path, call, packet.time, [[0, packet.node, packet.values]] if packet.values else [], parsed.refused)
    return FULLJSON_OK if parsed.fulljson else OK


async def input_bulk(path: InputPath, call: Call) -> Any:
    take(path, call)
    reactor = path.appender.reactor
    max_inflated = path.ctx.config.input.max_inflated
    text = await cooperate(bulk_text_steps(call.params, lambda: _body(call.request), max_inflated), reactor)
    parsed = await cooperate(bulk_steps(call.params, text, int(path.clock()), path.limits), reactor)
    await accept(path, call, parsed.time_ref, parsed.frames, parsed.refused)
    return OK


def body_limit(path: InputPath) -> int:
    """A parameter may be as long as the body allows (emoncms: post_max_size); the frame
    and value limits bound the work."""
    return path.ctx.config.input.max_body


INPUT_PATH_ROUTES: tuple[Route, ...] = (
    Route("input", "post", WRITE, input_post, max_param=body_limit),
    Route("input", "bulk", WRITE, input_bulk, max_param=body_limit),
)


class RateLimited(TooMany):
    """Over the user's request rate: try again in ``wait`` seconds (rounded up, at least 1)."""

    def __init__(self, wait: float) -> None:
        super().__init__("Too many requests, slow down", max(1, int(wait + 0.999)))


def _body(request: Request) -> bytes:
    request.content.seek(0)
    return request.content.read()


FORM = b"application/x-www-form-urlencoded"
MULTIPART = b"multipart/form-data"
MAX_FIELDS = 1000  # form fields in one body (PHP's max_input_vars, whose default is the same)
MAX_BAD_ESCAPES = 1000  # "%" not followed by two hex digits, in one form value
FORM_SLICE = 256 * 1024  # bytes of a form value decoded in one slice
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class FormError(Exception):
    """A form body refused before any handler sees it (the message is the answer's)."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def unquote_form(value: bytes) -> bytes:
    """``+`` and ``%XX`` decoded as in a form body. ``%XX`` becomes ``\\xXX`` for
    ``codecs.escape_decode`` (C): 8× faster than urllib's Python loop over each
    escape, which was a third of a form-encoded bulk request (its JSON is mostly escapes).
    A ``%`` without two hex digits after it stays as it is (as urllib leaves it): it is
    made ``%25`` first, when there are at most ``MAX_BAD_ESCAPES`` of them; more refuse
    the body (urllib's loop took 4 s over 8 MiB of them, a regex substitution 2 s)."""
    return _unquote(value, MAX_BAD_ESCAPES)[0]


def _unquote(value: bytes, allowed_bad: int) -> tuple[bytes, int]:
    """``value`` decoded, and how many malformed escapes it held (FormError past ``allowed_bad``)."""
    value = value.replace(b"+", b" ")
    if b"%" not in value:
        return value, 0
    try:
        return _escape_decode(value), 0
    except ValueError:  # a "%" without two hex digits after it
        pass
    bad = sum(1 for _ in islice(_BAD_ESCAPE.finditer(value), allowed_bad + 1))
    if bad > allowed_bad:
        raise FormError(f"Bad form body: more than {MAX_BAD_ESCAPES} malformed % escapes in one value")
    return _escape_decode(_BAD_ESCAPE.sub(b"%25", value)), bad


def _escape_decode(value: bytes) -> bytes:
    return codecs.escape_decode(value.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))[0]


def unquote_steps(value: bytes) -> Steps[bytes]:
    """``unquote_form`` a slice of ``FORM_SLICE`` bytes at a time (a large value's decoding
    is several passes over it in C: ~40 ms for 8 MiB). A slice ends right before a ``%``
    if one is among its last two bytes, so no escape is cut in two (an escape that would
    reach the next ``%`` is not an escape anyway)."""
    parts, start, allowed_bad = [], 0, MAX_BAD_ESCAPES
    while start < len(value):
        stop = start + FORM_SLICE
        if stop < len(value):
            tail = value[stop - 2:stop]
            if tail[:1] == b"%":
                stop -= 2
            elif tail[1:] == b"%":
                stop -= 1
        part, bad = _unquote(value[start:stop], allowed_bad)
        parts.append(part)
        allowed_bad -= bad
        start = stop
        yield
    return b"".join(parts)


def form_steps(body: bytes) -> Steps[dict[bytes, list[bytes]]]:
    """A form body as twisted.web's ``parse_qs(body, 1)`` makes it, a slice at a time;
    FormError (413) past ``MAX_FIELDS`` fields, found in C before any is decoded."""
    items = body.replace(b";", b"&").split(b"&", MAX_FIELDS)  # at most MAX_FIELDS + 1 pieces
    if len(items) > MAX_FIELDS:
        raise FormError(f"Too many form fields (more than {MAX_FIELDS})", 413)
    args: dict[bytes, list[bytes]] = {}
    for item in items:
        key, sep, value = item.partition(b"=")
        if not sep:
            continue
        if len(item) > FORM_SLICE:
            key = yield from unquote_steps(key)
            value = yield from unquote_steps(value)
        else:  # the common case, without a generator per value
            key, value = unquote_form(key), unquote_form(value)
        args.setdefault(key, []).append(value)
    return args


def form_args(body: bytes) -> dict[bytes, list[bytes]]:
    return run(form_steps(body))


_BOUNDARY = re.compile(rb'boundary=(?:"([^"]{1,200})"|([^;\s]{1,200}))', re.IGNORECASE)
_DISPOSITION_NAME = re.compile(rb'(?:^|;)\s*name=(?:"([^"]*)"|([^;\s]*))', re.IGNORECASE)


def multipart_steps(body: bytes, ctype: bytes) -> Steps[dict[bytes, list[bytes]]]:
    """A multipart/form-data body's fields (files are fields too), as twisted.web's email-based
    decoder gives them, but split in C: that one walks the body line by line in Python (1.5 s
    for 8 MiB of short lines). FormError (400) for a body that is not multipart, 413 past
    ``MAX_FIELDS`` parts."""
    found = _BOUNDARY.search(ctype)
    if found is None:
        raise FormError("Bad multipart body: no boundary")
    delimiter = b"--" + (found.group(1) or found.group(2))
    if body.count(delimiter) > MAX_FIELDS + 1:
        raise FormError(f"Too many form fields (more than {MAX_FIELDS})", 413)
    parts = body.split(delimiter)
    if len(parts) < 3:
        raise FormError("Bad multipart body")
    args: dict[bytes, list[bytes]] = {}
    for part in parts[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = part.partition(b"\n\n")
        if not sep:
            raise FormError("Bad multipart body")
        name, encoding = _part_headers(head)
        if name is None:
            continue
        content = content[:-2] if content.endswith(b"\r\n") else content[:-1] if content.endswith(b"\n") else content
        try:
            if encoding == b"base64":
                content = binascii.a2b_base64(content)
            elif encoding == b"quoted-printable":
                content = binascii.a2b_qp(content)
        except binascii.Error:
            raise FormError("Bad multipart body: a part's content encoding is not valid")
        args.setdefault(name, []).append(content)
        yield
    return args


def multipart_args(body: bytes, ctype: bytes) -> dict[bytes, list[bytes]]:
    return run(multipart_steps(body, ctype))


def _part_headers(head: bytes) -> tuple[bytes | None, bytes]:
    """A part's field name (None without one) and its Content-Transfer-Encoding."""
    name, encoding = None, b""
    for line in head.splitlines():
        key, _, value = line.partition(b":")
        key = key.strip().lower()
        if key == b"content-disposition":
            found = _DISPOSITION_NAME.search(value.split(b";", 1)[1] if b";" in value else b"")
            if found is not None:
                name = found.group(1) if found.group(1) is not None else found.group(2)
        elif key == b"content-transfer-encoding":
            encoding = value.strip().lower()
    return (name or None), encoding


class LimitedRequest(Request):
    """A request whose body stops being stored past ``max_body`` bytes (answered 413),
    and whose form bodies (urlencoded or multipart) are decoded by ``form_steps`` and
    ``multipart_steps`` instead of by twisted.web: in C, with a cap on the fields, and
    for a large body in slices between which the reactor turns."""

    max_body = 8 << 20
    _form: bytes | None = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        ctype = self.requestHeaders.getRawHeaders(b"Content-Type")
        if command == b"POST" and ctype:
            kind = ctype[0].split(b";", 1)[0].strip().lower()
            if kind in (FORM, MULTIPART):
                self._form = ctype[0]
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
            self._refuse(413, "Request body too large")
            return
        if self._form is None:
            super().process()
            return
        body = self.content.read()
        self.content.seek(0)
        steps = self._form_steps(body)
        if len(body) <= FORM_SLICE:  # the common case: decoded at once
            try:
                fields = run(steps)
            except FormError as e:
                self._refuse(e.code, e.message)
                return
            self._decoded(fields)
            return
        d = defer.ensureDeferred(cooperate(steps, self.channel.site.reactor))
        d.addCallbacks(self._decoded, self._form_refused)

    def _decoded(self, fields: dict[bytes, list[bytes]]) -> None:
        if self._disconnected:
            return
        self.args.update(fields)
        super().process()

    def _form_refused(self, failure: Failure) -> None:
        failure.trap(FormError)
        if not self._disconnected:
            self._refuse(failure.value.code, failure.value.message)

    def _form_steps(self, body: bytes) -> Steps[dict[bytes, list[bytes]]]:
        assert self._form is not None
        if self._form.split(b";", 1)[0].strip().lower() == MULTIPART:
            return multipart_steps(body, self._form)
        return form_steps(body)

    def _refuse(self, code: int, message: str) -> None:
        self.setResponseCode(code)
        self.setHeader(b"Content-Type", b"application/json")
        self.write(json.dumps({"success": False, "message": message}).encode())
        self.finish()


def limited_request_factory(max_body: int) -> type[LimitedRequest]:
    return type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})
