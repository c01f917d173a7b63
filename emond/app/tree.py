"""The root of a process's service tree, and what the daemon around it asks of it.

``OrderedMultiService`` stops its children one after another (the order a drain needs);
``ProcessTree`` is the root of a node's or storage server's tree: whether it is ready, how a
reloaded config is applied to its parts, and what a stop cut short leaves undone
(``emond.app.daemon`` asks).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from emond.api.health import HealthResource
from emond.stream import TLSFilesError

log = Logger()


class OrderedMultiService(MultiService):
    """Stops its children one after another, last started first, each finishing
    before the next stops (``MultiService`` stops them all at once): HTTP stops
    taking requests, then the pipeline drains, then the API, storage and Redis
    go away."""

    stopping: str | None = None  # the name of the child being stopped now

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        return defer.ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            self.stopping = child.name
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name)
        self.stopping = None



class ProcessTree(OrderedMultiService):
    """The root of a process's tree, with what the daemon around it (``emond.app.daemon``)
    asks of it: whether it is ready, how to apply a reloaded config, and what a stop cut
    short leaves undone."""

    def __init__(self) -> None:
        super().__init__()
        self.health: HealthResource | None = None  # the process's /health
        # The /health checks that must pass before the process is ready (None: all). A node
        # leaves out its storage links and queue lags: it is there to queue while they are down.
        self.readiness: tuple[str, ...] | None = None
        self.listeners: list[Listening] = []  # every port it serves
        self.reloads: list[Callable[[Any], None]] = []  # each applies a reloaded config to one part

    async def ready(self) -> tuple[bool, str]:
        """(ready, what is not): listening on every port, and the readiness checks pass."""
        if any(listener.port is None for listener in self.listeners):
            return False, "not listening yet"
        if self.health is None:
            return True, ""
        ok, parts = await self.health.evaluate(self.readiness)
        return ok, ", ".join(name for name, part in parts.items() if part.get("ok") is not True)

    def reconfigure(self, config: Any) -> list[str]:
        """Apply ``config`` (a reload) part by part; the errors of the parts that refused it
        (they keep what they had), e.g. a certificate file that does not load."""
        errors = []
        for apply in self.reloads:
            try:
                apply(config)
            except TLSFilesError as e:
                errors.append(str(e))
            except Exception as e:
                errors.append(f"{e.__class__.__name__}: {e}")
        return errors

    def abandon(self) -> defer.Deferred[Any]:
        """A stop cut short: what must not outlive the process (its private Redis) is told to
        end now; fires once it has."""
        return defer.DeferredList([defer.maybeDeferred(s.abandon) for s in self if hasattr(s, "abandon")], consumeErrors=True)

    def unfinished(self) -> list[str]:
        """What a stop still running has not done (for the log of a stop cut short): the
        service being stopped and its work in hand, those not stopped yet."""
        stopping: list[str] = []
        waiting: list[str] = []

        def walk(parent: MultiService, path: str) -> None:
            for child in parent:
                name = f"{path}{child.name}"
                if isinstance(child, MultiService):
                    walk(child, name + "/")
                    continue
                work = child.unfinished() if hasattr(child, "unfinished") else []
                if child.running:
                    waiting.append(name)
                elif work or getattr(parent, "stopping", None) == child.name:
                    stopping.append(f"{name} ({'; '.join(work)})" if work else name)

        walk(self, "")
        parts = [f"stopping {', '.join(stopping)}"] if stopping else []
        if waiting:
            parts.append(f"not stopped: {', '.join(waiting)}")
        return parts


@implementer(IStreamServerEndpoint)
class Listening:
    """A server endpoint that remembers the port it listens on once it does (readiness)."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint
        self.port: Any = None

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return self._endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        return port
