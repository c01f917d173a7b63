"""What ``twistd emond`` and ``twistd emond-storage`` run around a process's service tree, so
that it behaves as operators expect of a daemon (and as ``etc/systemd/`` units expect):

- SIGTERM stops it gracefully within ``drain_timeout`` ([node] or [storage]) and it exits
  with status 0: the listening ports close, requests in progress are answered, the pipeline
  finishes its work in hand, leases are given up and links closed (``ProcessTree``'s ordered
  stop). A stop still running when the budget is spent is abandoned with a log line saying
  what it leaves (requests cut, batches unacknowledged ...); nothing acknowledged is lost:
  it stays in Redis. (twistd's own handler would end the process by the signal instead.)
- SIGHUP reads the config file again with the same loader: the reloadable settings take
  effect, a changed setting that needs a restart is refused with a line naming it, the TLS
  certificates and keys are read again for the connections made from then on; a file that
  does not load is refused whole (logged) and the process runs on as it was.
- systemd's notifications (``emond.app.systemd``), and the log level (``log_level``): a
  filter in front of the log destination twistd's options choose (unless ``--logger``
  names another observer).

Signal handlers only hand the signal to the reactor (``callFromThread``); the work is done
in the reactor's turn. They are installed once the reactor runs (after its own), by the
twistd plugins only: a test's reactor keeps its handlers.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Callable

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import FilteringLogObserver, ILogObserver, LegacyLogObserverWrapper, LogLevel, LogLevelFilterPredicate, Logger
from twisted.python.components import Componentized

from emond.app.reload import plan, reloadable_of
from emond.app.tree import ProcessTree
from emond.app.gcfreeze import FreezeWhenReady
from emond.app.systemd import SystemdNotify
from emond.config import ConfigError, NodeConfig, StorageConfig

Config = NodeConfig | StorageConfig
ABANDON_WAIT = 3.0  # seconds a stop cut short waits for the private Redis to end


def _exit_now(status: int) -> None:
    """End the process at once (a stop cut short), its log written out."""
    sys.stdout.flush()  # the log (twistd -n logs to stdout)
    sys.stderr.flush()
    os._exit(status)


def _process_section(config: Config) -> Any:
    """The section holding ``drain_timeout`` and ``log_level``: [node] or [storage]."""
    return config.node if isinstance(config, NodeConfig) else config.storage


class Daemon(MultiService):
    """A process's tree under a daemon's signals and systemd; ``load`` is the loader the
    config came from (a reload uses it again on ``config.path``)."""

    log = Logger()

    def __init__(self, tree: ProcessTree, config: Config, load: Callable[[str], Config], reactor: Any, twistd: Any = None) -> None:
        """``twistd``: the twistd command line's options, whose log destination the level
        filter is put in front of (None: no filter, e.g. in a test)."""
        super().__init__()
        self.tree = tree
        self.config = config
        self.load = load
        self.reactor = reactor
        self.twistd = twistd
        self.levels = LogLevelFilterPredicate()
        self._set_level(_process_section(config).log_level)
        self.systemd = SystemdNotify(tree.ready, reactor)
        FreezeWhenReady(tree.ready, reactor).setServiceParent(self)
        tree.setServiceParent(self)
        self.stopping = False
        self.terminated = False  # the stop is SIGTERM's (else something failed: a refusal to start)

    # -- twistd --------------------------------------------------------------------------

    def setServiceParent(self, parent: Any) -> None:
        """twistd makes the application and adds this service to it before it starts
        logging: give it the log observer to use (twistd's own, behind the level filter)."""
        if self.twistd is not None and isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, FilteringLogObserver(self._twistd_observer(), [self.levels]))
        super().setServiceParent(parent)

    def _twistd_observer(self) -> Any:
        """The log observer twistd would have made from its options (stdout with -n, a
        --logfile, syslog)."""
        from twisted.scripts._twistd_unix import UnixAppLogger

        observer = UnixAppLogger(self.twistd)._getLogObserver()
        return observer if ILogObserver.providedBy(observer) else LegacyLogObserverWrapper(observer)

    def _set_level(self, name: str) -> None:
        self.levels.setLogLevelForNamespace("", LogLevel.levelWithName(name))

    # -- start -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.systemd.startService()
        self.reactor.callWhenRunning(self._install_handlers)  # after the reactor's own handlers

    def _install_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._signalled)

    def _signalled(self, number: int, frame: Any) -> None:
        # In signal context: hand it to the reactor, do nothing here.
        self.reactor.callFromThread(self._handle, number)

    def _handle(self, number: int) -> None:
        if number == signal.SIGTERM:
            self.terminate()
        elif number == signal.SIGHUP:
            self.reload()

    # -- SIGTERM ---------------------------------------------------------------------------

    def terminate(self) -> None:
        if self.stopping:
            self.log.info("SIGTERM: already stopping")
            return
        budget = _process_section(self.config).drain_timeout
        self.log.info("SIGTERM: stopping (a drain of at most {budget:g} s)", budget=budget)
        self.terminated = True
        self.reactor.stop()  # twistd stops the services (stopService below), then exits with 0

    def stopService(self) -> defer.Deferred[None]:
        self.stopping = True
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        budget = _process_section(self.config).drain_timeout
        started = time.monotonic()
        self.systemd.stopping(f"draining (at most {budget:g} s)")
        stopped = defer.maybeDeferred(super().stopService)
        spent: defer.Deferred[None] = defer.Deferred()
        timer = self.reactor.callLater(budget, spent.callback, None)
        first = await defer.DeferredList([stopped, spent], fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True)
        if timer.active():
            timer.cancel()
        if first[1] == 0:  # the stop ended
            self.log.info("stopped in {s:.2f} s", s=time.monotonic() - started)
        else:
            left = self.tree.unfinished() or ["nothing known"]
            self.log.warn(
                "the stop did not end within its drain_timeout of {budget:g} s; abandoned: {left}; "
                "nothing acknowledged is lost (it stays in Redis)",
                budget=budget, left="; ".join(left),
            )
            stopped.addErrback(lambda _: None)
            # What is still stopping may hold threads (a write pool) that would keep the
            # process from ending: end it here, once the private Redis (if any) has ended.
            await self.tree.abandon().addTimeout(ABANDON_WAIT, self.reactor).addErrback(lambda _: None)
            self.systemd.stopService()
            _exit_now(0 if self.terminated else 1)
        self.systemd.stopService()  # fed the watchdog until now

    # -- SIGHUP ----------------------------------------------------------------------------

    def reload(self) -> None:
        if self.stopping:
            self.log.info("SIGHUP: stopping, not reloading")
            return
        self.systemd.reloading()
        path = self.config.path
        try:
            new = self.load(path)
        except ConfigError as e:
            self.log.error("SIGHUP: {path} not reloaded: {error}; running on as before", path=path, error=str(e))
            self.systemd.reloaded("serving (reload refused: see the log)")
            return
        done = plan(self.config, new, reloadable_of(self.config))
        for change in done.refused:
            self.log.warn("SIGHUP: {key} changed: needs a restart; refused, the running value stays", key=change.where)
        errors = self.tree.reconfigure(done.config)  # the settings and the TLS files
        for error in errors:
            self.log.error("SIGHUP: {error}", error=error)
        self.config = done.config
        self._set_level(_process_section(done.config).log_level)
        self.log.info(
            "SIGHUP: reloaded {path}: changed {applied}{refused}",
            path=path,
            applied=", ".join(change.where for change in done.applied) or "nothing",
            refused=f"; refused {len(done.refused)} (restart needed)" if done.refused else "",
        )
        self.systemd.reloaded("serving")
