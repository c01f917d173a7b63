"""The small HTTP surface every emond process has: ``/health`` and ``/metrics``.

``/health`` tells anyone only whether the process is well: ``{"status":
"ok"}`` (200) or ``{"status": "degraded"}`` (503), so a load balancer can use
it. What is unwell and why (errors, paths, versions, queue lengths), and
``/metrics``, are for the operator: requests from this machine's loopback
and requests carrying the ``[health] admin_token``.

Every check has a time limit and at most one run in flight: a frozen Redis or
database makes ``/health`` answer 503 within ``check_timeout``, and repeated
requests do not pile up queries behind the hung one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Awaitable, Callable, Sequence, Union

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from emond import __version__
from emond.meta.auth import client_address
from emond.config import HealthSection

HealthCheck = Callable[[], Union[dict[str, Any], Awaitable[dict[str, Any]]]]

# Where "this machine" is: the loopback addresses a local client connects from, and Unix sockets.
LOCAL_CLIENTS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1", "unix"})


def json_body(request: Request, payload: Any, code: int = 200) -> bytes:
    """Set a JSON answer's status and type; return its body."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(payload, separators=(",", ":")).encode()


class OperatorAccess:
    """Who may see health details and ``/metrics``: a request from this machine (unless
    ``[health] localhost = false``) or one with ``Authorization: Bearer <admin_token>``.

    ``client`` gives the caller's address (a node passes its authenticator's, which
    believes X-Forwarded-For only from ``[users] trusted_proxies``).
    """

    def __init__(self, settings: HealthSection, client: Callable[[Request], str] = client_address) -> None:
        self._localhost = settings.localhost
        # Compared as digests, in constant time: neither content nor length leaks.
        self._token = hashlib.sha256(settings.admin_token.encode()).digest() if settings.admin_token else None
        self._client = client

    def allows(self, request: Request) -> bool:
        if self._localhost and self._client(request) in LOCAL_CLIENTS:
            return True
        return self._token is not None and hmac.compare_digest(_bearer_digest(request), self._token)


def _bearer_digest(request: Request) -> bytes:
    header = request.getHeader(b"authorization") or b""
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return b""
    return hashlib.sha256(token.strip()).digest()


class BoundedCheck:
    """A health check with a time limit and at most one run in flight.

    A caller waits ``timeout`` seconds at most, then sees the check as failed;
    the run itself goes on (a thread stuck in a database call cannot be
    stopped), and later callers wait on that same run instead of starting more.
    """

    log = Logger()

    def __init__(self, name: str, check: HealthCheck, timeout: float, clock: IReactorTime) -> None:
        self._name = name
        self._check = check
        self._timeout = timeout
        self._clock = clock
        self._waiters: list[defer.Deferred[dict[str, Any]]] = []
        self._started: float | None = None  # when the run in flight started

    def __call__(self) -> defer.Deferred[dict[str, Any]]:
        self._waiters = [w for w in self._waiters if not w.called]  # drop those that gave up
        waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiters.append(waiter)
        if self._started is None:
            self._started = self._clock.seconds()
            defer.maybeDeferred(self._check).addCallbacks(self._finished, self._crashed)
        return waiter.addTimeout(self._timeout, self._clock, onTimeoutCancel=self._late)

    def _finished(self, result: dict[str, Any]) -> None:
        self._started = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(result)

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("health check {name} raised", failure, name=self._name)
        self._finished({"ok": False, "error": f"check failed: {failure.getErrorMessage()}"})

    def _late(self, result: Any, timeout: float) -> dict[str, Any]:
        running = self._clock.seconds() - self._started if self._started is not None else timeout
        return {"ok": False, "error": f"no answer within {timeout:g}s (waiting for {running:.0f}s)"}


class HealthResource(Resource):
    """``/health``: 200 when every check says ok, 503 (``degraded``) otherwise.

    Each check returns a dict with at least ``{"ok": bool}``; an operator sees
    them under their names, so which part is unwell and why.
    """

    isLeaf = True

    def __init__(
        self, process: str, checks: dict[str, HealthCheck], access: OperatorAccess, timeout: float, clock: IReactorTime
    ) -> None:
        super().__init__()
        self._process = process
        self._checks = {name: BoundedCheck(name, check, timeout, clock) for name, check in checks.items()}
        self._access = access
        self._clock = clock
        self._started = clock.seconds()

    def render_GET(self, request: Request) -> Any:
        defer.ensureDeferred(self._render(request))
        return NOT_DONE_YET

    @property
    def names(self) -> tuple[str, ...]:
        """The checks' names."""
        return tuple(self._checks)

    async def evaluate(self, names: Sequence[str] | None = None) -> tuple[bool, dict[str, Any]]:
        """(whether every check said ok, each check's answer by name): of ``names`` only, if
        given (a daemon's readiness)."""
        names = list(self._checks) if names is None else [name for name in names if name in self._checks]
        results = await defer.gatherResults([self._checks[name]() for name in names])
        parts = dict(zip(names, results))
        return all(part.get("ok") is True for part in parts.values()), parts

    async def _render(self, request: Request) -> None:
        healthy, parts = await self.evaluate()
        payload: dict[str, Any] = {"status": "ok" if healthy else "degraded"}
        if self._access.allows(request):
            payload.update(
                process=self._process,
                version=__version__,
                uptime=round(self._clock.seconds() - self._started, 3),
                **parts,
            )
        body = json_body(request, payload, 200 if healthy else 503)
        if not request._disconnected:
            request.write(body)
            request.finish()


class MetricsPage(Resource):
    """``/metrics`` in Prometheus's text format, written on the reactor thread (a few ms).

    prometheus_client's own ``MetricsResource`` renders in Twisted's default thread
    pool, which would make ``/metrics`` wait behind whatever else ran there."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)


class OperatorOnly(Resource):
    """A resource (``/metrics``) for the operator only; 403 for anyone else."""

    isLeaf = True

    def __init__(self, inner: Resource, access: OperatorAccess) -> None:
        super().__init__()
        self._inner = inner
        self._access = access

    def render(self, request: Request) -> Any:
        if not self._access.allows(request):
            message = "Forbidden: for requests from this machine or with the admin token"
            return json_body(request, {"success": False, "message": message}, 403)
        return self._inner.render(request)
