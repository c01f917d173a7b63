"""A lean HTTP/1.1 protocol for ``input/post`` and ``input/bulk``, on the same port as twisted.web.

Why: twisted.web's per-request machinery (LineReceiver over the head, a Request with
its Headers objects, producers, a Deferred chain per request) costs more than the input
routes' own work. This protocol parses a request head with httptools (C), answers the
input routes itself through the same ``ApiResource.respond`` as twisted.web does (the
same routing, limits, authentication, handlers, errors and metrics), and writes the
answer exactly as twisted.web would: same status line, headers (``Date``,
``Content-Type``, the answer's own, ``Transfer-Encoding: chunked``; ``Connection:
close`` when the request asked to close), and the same chunked body.

The design: **switch at a request boundary, never back.** Requests are taken one at a
time from the connection's bytes; a request is served here only if it is one this
protocol understands completely: HTTP/1.1, GET or POST, an input route (after the same
path splitting and aliases as the API), a head of CRLF lines within 16 KiB that httptools
accepts, a ``Content-Length`` body (or none) within ``max_body``, no ``Transfer-Encoding``,
``Expect``, ``Upgrade`` or ``Cookie`` (a browser's session: twisted.web resolves it), a
form body small enough to decode at once (or any other body, kept raw), and the access log
off. Anything else, *and the rest of that connection with it*, is handed to twisted.web's
own channel (``Site.buildProtocol``) as the untouched bytes from that request's first
byte on: this protocol reconstructs nothing, so every other route, every refusal of a
malformed or unusual request (chunked bodies, 100-continue, oversized heads or bodies,
HTTP/1.0, pipelined mixes) is twisted.web's own. A hand-over happens only when no request
of this protocol is in progress (requests are answered in order, one at a time, as
twisted.web does), so answers never interleave. Under the PROXY protocol
(``haproxy:`` endpoints) this protocol is the wrapped one, as twisted.web's channel would
be: the client address is the transport's.

The site counts this protocol's requests in progress like its own (a SIGTERM drain
waits for them), and its idle timeout is the site's.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import httptools
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import datetimeToString, parse_qs
from twisted.web.http_headers import Headers

from emond.api.http import ApiResource, Raw, split_path
from emond.inputparse import run
from emond.web import FORM, FORM_SLICE, MULTIPART, FormError, form_steps

LEAN_ROUTES = frozenset({("input", "post"), ("input", "bulk")})
MAX_HEAD = 16384  # twisted.web's totalHeadersSize: a longer head is its to refuse
_REFUSED_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"cookie", b"cookie2"})
PAUSE_ABOVE = 64 * 1024  # bytes buffered while a request is handled before reading stops


class _HandOver(Exception):
    """This request is twisted.web's (and so is the rest of the connection)."""


class _Head:
    """The callbacks of httptools over one request head."""

    __slots__ = ("url", "headers")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, list[bytes]] = {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.setdefault(name.lower(), []).append(value)


class LeanRequest:
    """What ``ApiResource.respond`` and the input routes read of a request (the same
    attributes as twisted.web's Request, for those parts)."""

    method: bytes
    emond_route = "other"

    def __init__(self, channel: "LeanChannel", method: bytes, uri: bytes, headers: dict[bytes, list[bytes]], body: bytes) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.headers = headers
        self.content = io.BytesIO(body)
        path, sep, query = uri.partition(b"?")
        self.path = path
        self.args: dict[bytes, list[bytes]] = parse_qs(query, 1) if sep else {}

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def getCookie(self, name: bytes) -> bytes | None:
        return None  # requests with cookies are twisted.web's

    def getClientAddress(self) -> Any:
        return self.channel.transport.getPeer()

    def isSecure(self) -> bool:
        return False  # TLS endpoints are served by twisted.web alone (lean_factory)


class LeanChannel(Protocol, TimeoutMixin):
    """One connection: serves the input routes, hands everything else to twisted.web."""

    log = Logger()

    def __init__(self, site: Any, api: ApiResource, dates: "Dates") -> None:
        self.site = site
        self.api = api
        self.dates = dates
        self._paused = False
        self._buffer = bytearray()
        self._busy = False
        self._gone = False
        self._channel: Any = None  # twisted.web's channel, once handed over
        self._head: tuple[int, int, _Head, bytes, bytes] | None = None  # head length, body length, parsed, method, version

    # -- the connection --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.setTimeout(self.site.timeOut)

    def dataReceived(self, data: bytes) -> None:
        if self._channel is not None:
            self._channel.dataReceived(data)
            return
        self.resetTimeout()
        self._buffer += data
        if not self._busy:
            self._next()
        elif len(self._buffer) > PAUSE_ABOVE and not self._paused:
            self._paused = True  # as twisted.web, which reads nothing while it handles a request
            self.transport.pauseProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._gone = True
        self.setTimeout(None)
        if self._channel is not None:
            self._channel.connectionLost(reason)

    def timeoutConnection(self) -> None:
        if self._busy:
            self.resetTimeout()  # twisted.web does not time a request out while it is handled
            return
        self.transport.loseConnection()

    # -- requests, one at a time -----------------------------------------------------------

    def _next(self) -> None:
        while not self._busy and self._channel is None and not self._gone and self._buffer:
            try:
                request = self._take()
            except _HandOver:
                self._hand_over()
                return
            if request is None:
                return  # wait for more bytes
            self._serve(*request)

    def _take(self) -> tuple[LeanRequest, bool] | None:
        """The next whole request of the buffer (removed from it) and whether the
        connection stays open after it; None until it is all here; _HandOver."""
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end < 0:
                if len(self._buffer) >= MAX_HEAD or self._buffer.find(b"\n\n") >= 0:
                    raise _HandOver()
                return None
            self._head = self._parse_head(bytes(self._buffer[:end + 4]))
        head_length, body_length, parsed, method, version = self._head
        if len(self._buffer) < head_length + body_length:
            return None
        body = bytes(self._buffer[head_length:head_length + body_length])
        request = LeanRequest(self, method, parsed.url, parsed.headers, body)
        ctype = parsed.headers.get(b"content-type")
        if method == b"POST" and ctype:
            kind = ctype[0].split(b";", 1)[0].strip().lower()
            if kind == MULTIPART or (kind == FORM and len(body) > FORM_SLICE):
                raise _HandOver()  # decoded in slices by twisted.web's LimitedRequest
            if kind == FORM:
                try:
                    request.args.update(run(form_steps(body)))
                except FormError as e:
                    request.refused = e  # type: ignore[attr-defined]
        if self.site.access_logged():
            raise _HandOver()  # the access log's line is twisted.web's
        del self._buffer[:head_length + body_length]
        self._head = None
        return request, self._persistent(parsed.headers)

    def _parse_head(self, head: bytes) -> tuple[int, int, _Head, bytes, bytes]:
        line_end = head.find(b"\r\n")
        parts = head[:line_end].split(b" ")
        if len(parts) != 3 or parts[0] not in (b"GET", b"POST") or parts[2] != b"HTTP/1.1":
            raise _HandOver()
        if head.count(b"\n") != head.count(b"\r\n"):
            raise _HandOver()  # bare LF line ends: twisted.web's reading of them
        segments, _fmt = split_path(parts[1].split(b"?", 1)[0])
        if tuple(segments[:2]) not in LEAN_ROUTES:
            raise _HandOver()
        parsed = _Head()
        try:
            httptools.HttpRequestParser(parsed).feed_data(head)
        except Exception:
            raise _HandOver()  # twisted.web answers what it makes of it
        headers = parsed.headers
        if parsed.url != parts[1] or not _REFUSED_HEADERS.isdisjoint(headers):
            raise _HandOver()
        lengths = headers.get(b"content-length")
        body_length = 0
        if lengths is not None:
            if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 12:
                raise _HandOver()
            body_length = int(lengths[0])
            if body_length > self.site.max_body():
                raise _HandOver()  # refused (413) by twisted.web's LimitedRequest
        return len(head), body_length, parsed, parts[0], parts[2]

    @staticmethod
    def _persistent(headers: dict[bytes, list[bytes]]) -> bool:
        """twisted.web's ``HTTPChannel.checkPersistence`` for HTTP/1.1: the first Connection
        header's space-separated tokens."""
        connection = headers.get(b"connection")
        return not (connection and b"close" in [t.lower() for t in connection[0].split(b" ")])

    def _serve(self, request: LeanRequest, persistent: bool) -> None:
        self._busy = True
        self.site.request_began(self.transport)
        refused = getattr(request, "refused", None)
        if refused is not None:  # LimitedRequest._refuse's answer
            self._answered(_form_refusal(refused), request, persistent, dated=False)
            return
        d = ensureDeferred(self.api.respond(request))
        d.addErrback(lambda failure: self.api.crashed(failure, request.path))
        d.addCallback(self._answered, request, persistent)

    def _answered(self, answer: Raw, request: LeanRequest, persistent: bool, dated: bool = True) -> None:
        self._busy = False
        self.site.request_ended(self.transport)
        if self._gone:
            return
        self.transport.write(_response(answer, persistent, self.dates.now() if dated else None))
        if not persistent:
            self.transport.loseConnection()
            self._gone = True
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._next()

    def _hand_over(self) -> None:
        """From the first byte of the buffer on, the connection is twisted.web's channel's."""
        self.setTimeout(None)
        channel = self.site.plain_protocol(self.transport.getPeer())
        self._channel = channel
        data, self._buffer = bytes(self._buffer), bytearray()
        self._head = None
        channel.makeConnection(self.transport)
        if data:
            channel.dataReceived(data)


def _form_refusal(error: FormError) -> Raw:
    return Raw(json.dumps({"success": False, "message": error.message}).encode(), code=error.code)


class Dates:
    """twisted.web's ``Date`` value, formatted once a second (one per site)."""

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second, self._text = second, datetimeToString(second)
        return self._text


def _response(answer: Raw, persistent: bool, date: bytes | None) -> bytes:
    """The bytes twisted.web writes for this answer to an HTTP/1.1 request (with
    ``AnonymousRequest``: no Server header). ``date`` None: no Date header, as a form body
    refused by ``LimitedRequest`` is answered (before twisted.web's ``process`` sets it)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (answer.code, http.RESPONSES.get(answer.code, b"Unknown Status"))]
    if not persistent:
        lines.append(b"Connection: close\r\n")
    if date is not None:
        lines.append(b"Date: %s\r\n" % date)
    lines.append(b"Content-Type: %s\r\n" % answer.content_type)
    if answer.headers:
        extra = Headers()
        for name, value in answer.headers.items():
            extra.setRawHeaders(name, [value])
        for name, values in extra.getAllRawHeaders():  # twisted.web's spelling of the names
            lines.extend(b"%s: %s\r\n" % (name, value) for value in values)
    lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
    if answer.body:
        lines.append(b"%x\r\n%s\r\n" % (len(answer.body), answer.body))
    lines.append(b"0\r\n\r\n")
    return b"".join(lines)
