"""The emoncms HTTP API surface: routing, parameters, authentication, answers.

Paths are routed as emoncms does: ``controller/action/sub...`` with the
format suffix on the last segment (``feed/list.json`` and ``feed/list`` are
the same route); parameters are GET merged with POST, POST winning; unknown
parameters are ignored. Handlers are ``async def handler(call) -> answer``.
Errors are answered here, at the edge: a domain error (``emond.errors``) or
an unavailable Redis or full pool becomes the status, body and headers of its
row in ``ERROR_ANSWERS`` (``{"success": false, "message": ...}`` for most),
and nothing else a handler raises reaches the client (500 with a generic
message, the details in the log).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from prometheus_client import Counter
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from emond.meta.auth import Auth
from emond.meta.db import DatabaseUnavailable
from emond.errors import (
    Failed,
    Forbidden,
    Invalid,
    InvalidApiKey,
    LimitReached,
    NotFound,
    TimedOut,
    TooLarge,
    TooMany,
    Unauthenticated,
    Unavailable,
    UnknownFeeds,
)
from emond.numbers import MAX_INTEGER, php_number
from emond.pools import PoolBusy
from emond.redis import RedisUnavailable

PUBLIC, READ, WRITE = "public", "read", "write"
# Longest parameter value a route accepts unless it says otherwise (Router.add max_param):
# process lists, field JSON and feed options are far smaller, and their decoders rely on
# it. The input routes take values as long as the body (emonhub's 1000-frame bulk is
# ~135 KB as a form), bounded by their own frame and value limits instead.
MAX_PARAM = 64 * 1024
BUSY = "Too busy, try again shortly"  # the answer (503) when a pool's queue is full


@dataclass(frozen=True)
class Raw:
    """An answer that is not JSON-encoded (``ok``, a string, a file). Frozen, with no
    headers by default that anyone could add to: one may be shared by every request
    (``emond.web.OK``)."""

    body: bytes
    content_type: bytes = b"application/json"
    code: int = 200
    headers: Mapping[bytes, bytes] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Streamed:
    """An answer written chunk by chunk as it is read (exports), never whole in memory;
    the next chunk is read only once the client has taken the previous one."""

    chunks: Callable[[], AsyncIterator[bytes]]
    content_type: bytes = b"application/octet-stream"
    headers: Mapping[bytes, bytes] = field(default_factory=lambda: MappingProxyType({}))


@implementer(IPushProducer)
class _Pacer:
    """Paused by the transport while its buffer is full; ``ready()`` waits for that to pass."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiting: defer.Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    async def ready(self) -> None:
        if self.paused:
            self._waiting = defer.Deferred()
            await self._waiting


@dataclass
class Call:
    """One API request, as handlers see it."""

    request: Request
    controller: str
    action: str
    subactions: list[str]
    fmt: str
    params: dict[str, str]
    auth: Auth | None

    @property
    def userid(self) -> int:
        assert self.auth is not None  # routes that reach here with auth required
        return self.auth.userid

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name, default)

    def require(self, name: str, message: str | None = None) -> str:
        value = self.params.get(name)
        if value is None or value == "":
            raise Invalid(message or f"missing parameter: {name}")
        return value

    def integer(self, name: str, default: int | None = None, message: str | None = None) -> int:
        """A whole number, as emoncms's ``(int)`` of an ``is_numeric`` value (``1.9`` → 1, ``1e3`` → 1000)."""
        value = self.params.get(name)
        if value is None or value == "":
            if default is not None:
                return default
            raise Invalid(message or f"missing parameter: {name}")
        number = php_number(value)
        if number is None:
            raise Invalid(message or f"{name} must be a number")
        whole = int(value) if PLAIN_INTEGER.fullmatch(value) else int(number)  # digits exactly, else (int)
        if abs(whole) > MAX_INTEGER:
            raise Invalid(message or f"{name} is out of range")
        return whole

    def number(self, name: str, message: str | None = None) -> float:
        """A finite number written as emoncms's ``is_numeric`` accepts it (ASCII digits only)."""
        number = php_number(self.params.get(name) or "")
        if number is None:
            raise Invalid(message or f"{name} must be a number")
        return number

    def flag(self, name: str, default: bool) -> bool:
        """emoncms's ``(int)`` switches: absent or empty is ``default``, a number is on unless it is 0
        (``0.5`` is 0, as PHP's ``(int)``); anything else is refused, never guessed."""
        value = self.params.get(name)
        if value is None or value == "":
            return default
        number = php_number(value)
        if number is None:
            raise Invalid(f"{name} must be 0 or 1")
        return int(number) != 0

    def json_param(self, name: str, message: str) -> Any:
        return decode_json(self.require(name, message), message)


PLAIN_INTEGER = re.compile(r"[+-]?+[0-9]{1,16}+")
JSON_INT_DIGITS = 18  # a longer JSON integer becomes a float, as PHP's json_decode makes it


def _json_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # "1e400": PHP would decode INF; refused here
        raise ValueError("number out of range")
    return number


def _json_int(text: str) -> int | float:
    if len(text) - text.startswith("-") > JSON_INT_DIGITS:
        return _json_float(text)  # never builds a huge int (no OverflowError further on)
    return int(text)


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json(text: str, message: str) -> Any:
    """A JSON parameter whose every number is finite and every integer fits in 64 bits;
    anything else (bad syntax, NaN/Infinity, 1e400, absurd nesting) is ``Invalid(message)``."""
    try:
        return json.loads(text, parse_float=_json_float, parse_int=_json_int, parse_constant=_json_constant)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise Invalid(message)


Handler = Callable[[Call], Awaitable[Any]]
Authenticator = Callable[[Request, dict[str, str]], Awaitable[Auth | None]]
CsrfCheck = Callable[[Request, str | None], bool]
# State-changing routes anyone may call: with a session they need its CSRF token too
# (every WRITE route does).
SESSION_CHANGES = frozenset({("user", "logout")})
# Routes that start or end a session: refused when a browser says another site's page
# sent them (a forced login into the attacker's account needs no token to forge).
SESSION_ROUTES = frozenset({("user", "login"), ("user", "register"), ("user", "logout")})
CSRF_HEADER = b"x-csrf-token"
CSRF_PARAM = "csrf"
INVALID_CSRF = "Invalid CSRF token"
CROSS_SITE = "Cross-site request refused"


@dataclass(frozen=True)
class Route:
    """One row of an API module's route table: ``controller/action``, who may call it
    (PUBLIC, READ, WRITE), and ``handler(context, call)``, given the context its table is
    registered with (``Router.add_routes``). ``max_param``: the longest parameter value,
    or a function of that context giving it (the input routes: the configured body limit)."""

    controller: str
    action: str
    access: str
    handler: Callable[[Any, Call], Awaitable[Any]]
    max_param: int | Callable[[Any], int] = MAX_PARAM


class Router:
    """``(controller, action)`` → (access, handler)."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], tuple[str, Handler]] = {}
        self._param_limits: dict[tuple[str, str], int] = {}

    def add(self, controller: str, action: str, access: str, handler: Handler, max_param: int = MAX_PARAM) -> None:
        self._routes[(controller, action)] = (access, handler)
        self._param_limits[(controller, action)] = max_param

    def add_routes(
        self, routes: Iterable[Route], context: Any, resolve: Callable[[Call], Awaitable[Any]] | None = None
    ) -> None:
        """Every route of a table, its handler called with ``context`` and the call; with
        ``resolve``, with ``await resolve(call)`` instead (a node with shards: the context
        of the caller's shard), ``context`` giving the parameter limits."""
        for route in routes:
            limit = route.max_param(context) if callable(route.max_param) else route.max_param
            handler = partial(route.handler, context) if resolve is None else partial(_resolved, route.handler, resolve)
            self.add(route.controller, route.action, route.access, handler, limit)

    def param_limit(self, controller: str, action: str) -> int:
        """The longest parameter value the route accepts (413 beyond)."""
        return self._param_limits.get((controller, action), MAX_PARAM)

    def find(self, controller: str, action: str) -> tuple[str, Handler] | None:
        return self._routes.get((controller, action))


async def _resolved(handler: Callable[[Any, Call], Awaitable[Any]], resolve: Callable[[Call], Awaitable[Any]], call: Call) -> Any:
    return await handler(await resolve(call), call)


def split_path(path: bytes) -> tuple[list[str], str]:
    """Path segments and the format suffix of the last segment."""
    text = path.decode("utf-8", "replace")
    segments = [s for s in text.split("?", 1)[0].split("/") if s]
    fmt = ""
    if segments and "." in segments[-1]:
        segments[-1], fmt = segments[-1].split(".", 1)
    # Legacy aliases: api/post(.json) and emoncms/input/... → input/...
    if segments[:1] == ["emoncms"]:
        segments = segments[1:]
    if segments[:2] == ["api", "post"]:
        segments = ["input", "post"] + segments[2:]
    return segments, fmt


def request_params(request: Request, max_param: int = MAX_PARAM) -> dict[str, str]:
    """GET merged with POST, POST winning (the form decoder replaces a query value by
    the body's); one value per name, at most ``max_param`` bytes long (413 beyond)."""
    params: dict[str, str] = {}
    for key, values in (request.args or {}).items():
        if not values:
            continue
        name = key.decode("utf-8", "replace")
        if len(values[0]) > max_param:
            raise TooLarge(f"parameter {name[:32]} is too long")
        params[name] = values[0].decode("utf-8", "replace")
    return params


def cross_site(request: Request) -> bool:
    """Whether a browser says another site's page sent this request: ``Sec-Fetch-Site``
    (every current browser), else an ``Origin`` that is not this host. Scripts and devices
    send neither, and are not refused."""
    site = request.getHeader(b"sec-fetch-site")
    if site is not None:
        return site.lower() not in (b"same-origin", b"none")
    origin = request.getHeader(b"origin")
    if origin is None:
        return False
    return urlsplit(origin.decode("latin-1")).netloc.lower() != (request.getHeader(b"host") or b"").decode("latin-1").lower()


def same_origin(request: Request) -> bool:
    """Whether a browser vouches that this page's own origin sent the request."""
    site = request.getHeader(b"sec-fetch-site")
    if site is not None:
        return site.lower() == b"same-origin"
    return request.getHeader(b"origin") is not None and not cross_site(request)


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# -- errors, answered at the edge ------------------------------------------------------------

JSON = b"application/json"
NO_HEADERS: Mapping[bytes, bytes] = MappingProxyType({})
WWW_AUTHENTICATE: Mapping[bytes, bytes] = MappingProxyType(
    {b"WWW-Authenticate": b'Bearer realm="API KEY", error="invalid_apikey", error_description="Invalid API key"'}
)


def message_body(error: BaseException) -> bytes:
    """emoncms's refusal: ``{"success":false,"message":...}``."""
    return json_bytes({"success": False, "message": getattr(error, "message", "")})


def feeds_body(error: BaseException) -> bytes:
    """A refusal that lists the feeds that do not exist, as emoncms's data requests do."""
    assert isinstance(error, UnknownFeeds)
    return json_bytes({"success": False, "message": error.message, "feeds": error.feeds})


def plain_body(error: BaseException) -> bytes:
    """The message alone, as text (emoncms's ``Invalid API key``)."""
    return getattr(error, "message", "").encode()


def fixed_body(message: str) -> Callable[[BaseException], bytes]:
    """A refusal whose message is not the error's (that one is for the log, not the client)."""
    body = json_bytes({"success": False, "message": message})
    return lambda error: body


def retry_after(error: BaseException) -> Mapping[bytes, bytes]:
    assert isinstance(error, TooMany)
    return {b"Retry-After": str(error.retry_after).encode()}


@dataclass(frozen=True)
class ErrorAnswer:
    """How the API answers one kind of error."""

    status: int
    body: Callable[[BaseException], bytes] = message_body
    headers: Callable[[BaseException], Mapping[bytes, bytes]] = lambda error: NO_HEADERS
    content_type: bytes = JSON


# The one table: error class -> status, body and headers. A class not listed is answered
# by its nearest listed base class; an error of no listed class is a 500 (logged).
ERROR_ANSWERS: Mapping[type[BaseException], ErrorAnswer] = MappingProxyType({
    Invalid: ErrorAnswer(400),
    UnknownFeeds: ErrorAnswer(400, feeds_body),
    Unauthenticated: ErrorAnswer(401),
    InvalidApiKey: ErrorAnswer(401, plain_body, lambda error: WWW_AUTHENTICATE, b"text/plain; charset=utf-8"),
    Forbidden: ErrorAnswer(403),
    LimitReached: ErrorAnswer(403),
    NotFound: ErrorAnswer(404),
    TooLarge: ErrorAnswer(413),
    TooMany: ErrorAnswer(429, headers=retry_after),
    Failed: ErrorAnswer(500),
    Unavailable: ErrorAnswer(503),
    TimedOut: ErrorAnswer(504),
    # not domain errors, but what any route may meet: Redis down (its words are for the log),
    # a pool's queue full (a burst of logins, of reads: refused at once, counted in /metrics)
    RedisUnavailable: ErrorAnswer(503, fixed_body("Service temporarily unavailable")),
    DatabaseUnavailable: ErrorAnswer(503, fixed_body("Service temporarily unavailable")),
    PoolBusy: ErrorAnswer(503, fixed_body(BUSY), lambda error: {b"Retry-After": b"1"}),
})
ANSWERED = tuple(ERROR_ANSWERS)


def log_unavailable(log: Logger, error: BaseException) -> None:
    """An infrastructure error's own words go to the log (the client gets the table's)."""
    if isinstance(error, RedisUnavailable):
        log.warn("redis unavailable: {error}", error=str(error))
    elif isinstance(error, DatabaseUnavailable):
        log.warn("{error}", error=str(error))  # "database: ..."


def error_answer(error: BaseException) -> Raw:
    """The answer to an error of a class in ``ERROR_ANSWERS`` (or of a subclass)."""
    for kind in type(error).__mro__:
        row = ERROR_ANSWERS.get(kind)
        if row is not None:
            return Raw(row.body(error), row.content_type, row.status, row.headers(error))
    raise TypeError(f"no answer for {type(error).__name__}")  # only ANSWERED errors come here


class ApiResource(Resource):
    """The root resource: every emoncms route, with or without its format suffix."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        router: Router,
        authenticate: Authenticator,
        extra: dict[bytes, Resource] | None = None,
        ready: Callable[[], bool] = lambda: True,
        registry: Any = None,
        *,
        csrf: CsrfCheck,
        pages: Any = None,
    ) -> None:
        """``csrf(request, supplied)``: whether ``supplied`` is the CSRF token of the caller's
        session. ``pages``: the web UI (``emond.web.pages``), which serves the paths its
        ``serves(postpath)`` claims."""
        super().__init__()
        self._router = router
        self._authenticate = authenticate
        self._csrf = csrf
        self._pages = pages
        self._extra = extra or {}
        self._ready = ready
        self._children: dict[tuple[str, int], Any] = {}
        self._requests = (
            Counter("emond_http_requests", "API requests by route and status", ["route", "code"], registry=registry)
            if registry is not None
            else None
        )

    @property
    def router(self) -> Router:
        """The routes this resource serves."""
        return self._router

    def child(self, name: bytes) -> Resource | None:
        """The resource served at ``/<name>`` from ``extra`` (e.g. ``/health``)."""
        return self._extra.get(name)

    def render(self, request: Request) -> Any:
        first = request.postpath[0] if request.postpath else b""
        if first in self._extra and len(request.postpath) == 1:
            return self._extra[first].render(request)
        if self._pages is not None and self._pages.serves(request.postpath):
            return self._pages.render(request)
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._crashed, request)
        return NOT_DONE_YET

    async def respond(self, request: Any) -> Raw | Streamed:
        """The answer to a request, errors included, counted in the metrics (a Streamed one
        when it is written). Anything raised is a crash (``crashed``). The lean input
        protocol (``emond.web.lean``) calls it too, so both give the same answers."""
        try:
            answer = await self._answer(request)
        except ANSWERED as e:
            log_unavailable(self.log, e)
            answer = error_answer(e)
        if isinstance(answer, Streamed):
            return answer
        if not isinstance(answer, Raw):
            answer = Raw(json_bytes(answer))
        if self._requests is not None:
            self._count(getattr(request, "emond_route", "other"), answer.code)
        return answer

    async def _handle(self, request: Request) -> None:
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))
        answer = await self.respond(request)
        if isinstance(answer, Streamed):
            await self._stream(request, answer, gone)
            return
        if gone:
            return  # the client went away while we worked
        request.setResponseCode(answer.code)
        request.setHeader(b"Content-Type", answer.content_type)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        request.write(answer.body)
        request.finish()

    async def _answer(self, request: Request) -> Any:
        if not self._ready():
            raise Unavailable("Starting, try again shortly")
        segments, fmt = split_path(request.path)
        if len(segments) < 2:
            raise NotFound("Unknown route")
        controller, action = segments[0], segments[1]
        subactions = segments[2:]
        route = self._router.find(controller, action)
        if route is None and len(segments) >= 3:
            # input/process/set.json: a two-word action
            route = self._router.find(controller, f"{action}/{segments[2]}")
            if route is not None:
                action, subactions = f"{action}/{segments[2]}", segments[3:]
        if route is None:
            raise NotFound("Unknown route")
        request.emond_route = f"{controller}/{action}"  # the metrics label: known routes only
        access, handler = route
        params = request_params(request, self._router.param_limit(controller, action))
        auth = await self._authenticate(request, params)
        if access != PUBLIC:
            if auth is None:
                raise Unauthenticated("Authentication required")
            if access == WRITE and not auth.write:
                raise Forbidden("Write access required, this is a read only API key")
        if (controller, action) in SESSION_ROUTES and cross_site(request):
            raise Forbidden(CROSS_SITE)
        if auth is not None and auth.via == "session":
            if access == WRITE or (controller, action) in SESSION_CHANGES:
                supplied = params.get(CSRF_PARAM) or (request.getHeader(CSRF_HEADER) or b"").decode("latin-1") or None
                if not self._csrf(request, supplied):
                    raise Forbidden(INVALID_CSRF)
        call = Call(request, controller, action, subactions, fmt, params, auth)
        return await handler(call)

    async def _stream(self, request: Request, answer: Streamed, gone: list[bool]) -> None:
        if self._requests is not None:
            self._count(getattr(request, "emond_route", "other"), 200)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", answer.content_type)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        pacer = _Pacer()
        request.registerProducer(pacer, True)
        try:
            async for chunk in answer.chunks():
                if gone or pacer.stopped:
                    return
                request.write(chunk)
                await pacer.ready()
        finally:
            if not gone:
                request.unregisterProducer()
                request.finish()

    def _count(self, route: str, code: int) -> None:
        child = self._children.get((route, code))
        if child is None:  # labels() is costly per request: keep each child
            child = self._children[(route, code)] = self._requests.labels(route, str(code))
        child.inc()

    def crashed(self, failure: Failure, path: bytes) -> Raw:
        """Logs a handler's crash; the answer the client gets (no detail)."""
        self.log.failure("API handler failed for {path}", failure, path=path)
        return CRASHED

    def _crashed(self, failure: Failure, request: Request) -> None:
        answer = self.crashed(failure, request.path)
        if not request.finished and not request._disconnected:
            request.setResponseCode(answer.code)
            request.setHeader(b"Content-Type", answer.content_type)
            request.write(answer.body)
            request.finish()


CRASHED = Raw(json_bytes({"success": False, "message": "Internal server error"}), code=500)
