"""The small HTTP surface every emond process has: ``/health``."""

from __future__ import annotations

import inspect
import json
import time
from typing import Any, Awaitable, Callable, Union

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

HealthCheck = Callable[[], Union[dict[str, Any], Awaitable[dict[str, Any]]]]


def json_body(request: Request, payload: Any, code: int = 200) -> bytes:
    """Set a JSON answer's status and type; return its body."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(payload, separators=(",", ":")).encode()


class HealthResource(Resource):
    """``/health``: 200 when every check says ok, 503 otherwise.

    Each check returns a dict with at least ``{"ok": bool}``; they are shown
    under their names so an operator sees which part is unwell.
    """

    isLeaf = True

    def __init__(self, process: str, checks: dict[str, HealthCheck], clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._process = process
        self._checks = checks
        self._clock = clock
        self._started = clock()

    def render_GET(self, request: Request) -> Any:
        defer.ensureDeferred(self._render(request))
        return NOT_DONE_YET

    async def _render(self, request: Request) -> None:
        parts = {}
        for name, check in self._checks.items():
            part = check()
            parts[name] = await part if inspect.isawaitable(part) else part
        healthy = all(part.get("ok", False) for part in parts.values())
        payload = {
            "status": "ok" if healthy else "unhealthy",
            "process": self._process,
            "uptime": round(self._clock() - self._started, 3),
            **parts,
        }
        body = json_body(request, payload, 200 if healthy else 503)
        if not request._disconnected:
            request.write(body)
            request.finish()
