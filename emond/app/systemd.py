"""systemd's notification protocol (sd_notify(3)), spoken from the reactor with ``sdnotify``.

Under a unit with ``Type=notify`` systemd sets ``$NOTIFY_SOCKET``: the process says
``READY=1`` once it serves, ``RELOADING=1`` / ``READY=1`` around a reload (SIGHUP) and
``STOPPING=1`` when its stop begins. With ``WatchdogSec=`` systemd also sets
``$WATCHDOG_USEC``: ``WATCHDOG=1`` is sent at half that interval by a ``LoopingCall``, so a
reactor that stops turning (a blocking call, a busy loop) stops feeding the watchdog and
systemd restarts the process. Without ``$NOTIFY_SOCKET`` (not under systemd) all of this is
a no-op.
"""

from __future__ import annotations

import os
import time
from typing import Any, Awaitable, Callable, Mapping

import sdnotify
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

READY_POLL = 0.5  # seconds between two looks at whether the process is ready


class SystemdNotify(Service):
    """Tells systemd the process's state. ``ready`` says whether the process serves, and if
    not, why (it is asked every ``READY_POLL`` seconds from the start until it does)."""

    log = Logger()

    def __init__(
        self, ready: Callable[[], Awaitable[tuple[bool, str]]], reactor: Any, environ: Mapping[str, str] = os.environ
    ) -> None:
        self._ready = ready
        self._reactor = reactor
        self._environ = environ
        self._notifier: Any = None
        self._watchdog: task.LoopingCall | None = None
        self._waiting: task.LoopingCall | None = None
        self._failed = False  # a send failed: said once in the log, not at every beat
        self.is_ready = False

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def startService(self) -> None:
        super().startService()
        address = self._environ.get("NOTIFY_SOCKET")
        if not address:
            return  # not under systemd (or a unit without Type=notify / WatchdogSec)
        try:
            self._notifier = sdnotify.SystemdNotifier(debug=True)
            self._notifier.socket.setblocking(False)  # never hold the reactor: a full socket is an error
        except OSError as e:
            self.log.error("systemd: cannot reach $NOTIFY_SOCKET {address}: {error}", address=address, error=str(e))
            self._notifier = None
            return
        interval = self.watchdog_interval()
        if interval is not None:
            self._watchdog = task.LoopingCall(self.send, "WATCHDOG=1")
            self._watchdog.clock = self._reactor
            self._watchdog.start(interval, now=True)
            self.log.info("systemd: feeding the watchdog every {s:g} s", s=interval)
        self._waiting = task.LoopingCall(self._check_ready)
        self._waiting.clock = self._reactor
        self._waiting.start(READY_POLL, now=True).addErrback(lambda f: self.log.failure("systemd: readiness check failed", f))

    def watchdog_interval(self) -> float | None:
        """Half the watchdog timeout systemd gave (seconds), or None without one (or one meant
        for another process: ``$WATCHDOG_PID``)."""
        usec = self._environ.get("WATCHDOG_USEC", "")
        pid = self._environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) <= 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    async def _check(self) -> None:
        ok, why = await self._ready()
        if ok and self.running and not self.is_ready:
            self.is_ready = True
            if self._waiting is not None and self._waiting.running:
                self._waiting.stop()
            self.send("READY=1\nSTATUS=serving")
            self.log.info("systemd: told ready")
        elif not ok:
            self.send(f"STATUS=starting: waiting for {why}")

    def _check_ready(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._check())

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (Type=notify-reload, 253+) match the reload to its signal.
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading")

    def reloaded(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}" if self.is_ready else f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send(f"STOPPING=1\nSTATUS={status}")

    def send(self, state: str) -> None:
        if self._notifier is None:
            return
        try:
            self._notifier.notify(state)
        except OSError as e:
            if not self._failed:
                self._failed = True
                self.log.error("systemd: notification not sent ({state!r}): {error}", state=state.split("\n")[0], error=str(e))
        else:
            self._failed = False

    def stopService(self) -> None:
        super().stopService()
        for loop in (self._waiting, self._watchdog):
            if loop is not None and loop.running:
                loop.stop()
        if self._notifier is not None:
            self._notifier.socket.close()
            self._notifier = None
