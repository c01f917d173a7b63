"""emond under systemd: the units in etc/systemd/ pass ``systemd-analyze verify`` (Debian's
``systemd`` package; no systemd need run), the sysusers file makes the user they run as, and
a real ``twistd emond`` speaks sd_notify(3) to a ``$NOTIFY_SOCKET`` the test listens on as
systemd would: READY=1 only once it serves, WATCHDOG=1 every half ``$WATCHDOG_USEC`` from
its reactor, RELOADING=1 and READY=1 around a SIGHUP, STOPPING=1 at SIGTERM, then exit 0."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib

import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from tests.support import free_port, require_program
from tests.support.daemon import ROOT, started, stop_private_redis
from tests.support.poll import until

UNITS = os.path.join(ROOT, "etc", "systemd")
INSTALLED_PREFIX = "/opt/emond/bin/"  # where README's install puts emond's virtualenv


def unit(name: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, by key (a key may repeat)."""
    keys: dict[str, list[str]] = {}
    with open(os.path.join(UNITS, name)) as f:
        for line in f:
            if "=" in line and not line.startswith(("#", "[")):
                key, value = line.rstrip("\n").split("=", 1)
                keys.setdefault(key, []).append(value)
    return keys


class UnitFileTests(unittest.TestCase):
    def test_units_pass_systemd_analyze_verify(self):
        """The units as installed by README, but with ExecStart in this checkout's virtualenv
        (verify requires the program to exist)."""
        analyze = require_program("systemd-analyze")
        here = os.path.dirname(sys.executable) + "/"
        self.assertTrue(os.access(here + "twistd", os.X_OK), here)
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        names = ["emond.service", "emond-storage.service"]
        for name in names:
            with open(os.path.join(UNITS, name)) as f:
                text = f.read()
            self.assertIn(f"ExecStart={INSTALLED_PREFIX}twistd ", text)
            with open(os.path.join(folder, name), "w") as f:
                f.write(text.replace(INSTALLED_PREFIX, here))
        done = subprocess.run([analyze, "verify", "--man=no", *names], cwd=folder, capture_output=True, text=True)
        self.assertEqual((done.returncode, done.stdout + done.stderr), (0, ""))

    def test_units_state_what_emond_needs(self):
        for name, plugin, config in (("emond.service", "emond", "emond.toml"), ("emond-storage.service", "emond-storage", "emond-storage.toml")):
            keys = unit(name)
            self.assertEqual(keys["Type"], ["notify"])
            self.assertEqual(keys["ExecStart"], [f"{INSTALLED_PREFIX}twistd --nodaemon --pidfile= {plugin} --config /etc/emond/{config}"])
            self.assertEqual(keys["ExecReload"], ["/bin/kill -HUP $MAINPID"])
            self.assertEqual(keys["KillMode"], ["mixed"])  # SIGTERM to emond alone: it stops its own redis-server last
            self.assertEqual((keys["User"], keys["NoNewPrivileges"], keys["ProtectSystem"]), (["emond"], ["yes"], ["strict"]))
            self.assertEqual(keys["ReadWritePaths"], ["/var/lib/emond"])
            self.assertEqual(keys["StateDirectory"], ["emond"])
            self.assertGreater(int(keys["WatchdogSec"][0]), 0)
            # The stop budget of the example config fits in the time systemd gives before SIGKILL.
            with open(os.path.join(ROOT, "etc", config), "rb") as f:
                section = tomllib.load(f)["node" if plugin == "emond" else "storage"]
            self.assertGreater(int(keys["TimeoutStopSec"][0]), section["drain_timeout"] + 5)

    def test_sysusers_file_makes_the_user(self):
        sysusers = require_program("systemd-sysusers")
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "etc"))
        subprocess.run([sysusers, f"--root={root}", os.path.join(UNITS, "emond.sysusers")], check=True, capture_output=True)
        with open(os.path.join(root, "etc", "passwd")) as f:
            users = {line.split(":")[0]: line.strip().split(":") for line in f}
        self.assertEqual(users["emond"][5:], ["/var/lib/emond", "/usr/sbin/nologin"])


class NotifySocket(DatagramProtocol):
    """systemd's end of $NOTIFY_SOCKET: every datagram, with when it came."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, dict[str, str]]] = []

    def datagramReceived(self, data: bytes, addr: object) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(at, fields) for at, fields in self.messages if key in fields]


class NotifyTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_ready_watchdog_reload_stopping(self):
        require_program("redis-server")
        # A short folder: the private Redis's socket path must fit a Unix socket.
        var = tempfile.mkdtemp(prefix="emond-")
        self.addCleanup(shutil.rmtree, var, True)
        self.addCleanup(stop_private_redis, os.path.join(var, "var"))
        socket_path = os.path.join(var, "notify")
        listener = NotifySocket()
        port = reactor.listenUNIXDatagram(socket_path, listener)
        self.addCleanup(port.stopListening)
        http = free_port()
        config = os.path.join(var, "emond.toml")
        with open(config, "w") as f:
            f.write(f'[node]\nhttp = "tcp:{http}:interface=127.0.0.1"\ndatadir = "var"\n[database]\nurl = "sqlite:///var/emond.db"\n')
        env = {"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "400000"}  # a beat every 0.2 s
        daemon = yield started(self, "emond", config, var, env=env)
        yield until(lambda: bool(listener.with_key("READY")), 30, "READY=1")
        # Ready means serving: its /health answers ok, and it was not said before the API was.
        response = yield treq.get(f"http://127.0.0.1:{http}/health", persistent=False)
        self.assertEqual(response.code, 200)
        self.assertIn(b"node API ready", daemon.output)
        self.assertEqual(listener.with_key("READY")[0][1]["READY"], "1")
        # The watchdog is fed from the reactor at half the interval.
        beats = len(listener.with_key("WATCHDOG"))
        yield until(lambda: len(listener.with_key("WATCHDOG")) >= beats + 5, 10, "five more WATCHDOG=1")
        times = [at for at, _ in listener.with_key("WATCHDOG")][-5:]
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertTrue(all(0.1 < gap < 0.35 for gap in gaps), gaps)
        # SIGHUP: RELOADING=1, then READY=1 again once reloaded.
        offset = len(daemon.output)
        daemon.transport.signalProcess(signal.SIGHUP)
        yield daemon.logged_after("SIGHUP: reloaded", offset)
        yield until(lambda: len(listener.with_key("READY")) >= 2, 10, "READY=1 after the reload")
        reloading = listener.with_key("RELOADING")
        self.assertEqual(len(reloading), 1)
        self.assertLess(reloading[0][0], listener.with_key("READY")[1][0])
        self.assertTrue(re.fullmatch(r"\d+", reloading[0][1]["MONOTONIC_USEC"]))
        # SIGTERM: STOPPING=1 first, then the drain, then exit 0.
        status = yield daemon.signal(signal.SIGTERM)
        self.assertEqual(status, 0)
        self.assertEqual(len(listener.with_key("STOPPING")), 1)
        self.assertIn(b"stopped in", daemon.output)

    @defer.inlineCallbacks
    def test_storage_server_ready_once_listening(self):
        from tests.support.daemon import remote_storage_config

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        stream, http = free_port(), free_port()
        config = remote_storage_config(base, stream, http)
        short = tempfile.mkdtemp(prefix="emond-")  # a Unix socket's path is short
        self.addCleanup(shutil.rmtree, short, True)
        listener = NotifySocket()
        port = reactor.listenUNIXDatagram(os.path.join(short, "notify"), listener)
        self.addCleanup(port.stopListening)
        daemon = yield started(self, "emond-storage", config, base, env={"NOTIFY_SOCKET": os.path.join(short, "notify")})
        yield until(lambda: bool(listener.with_key("READY")), 30, "READY=1")
        self.assertIn(b"storage 1 open on", daemon.output)
        self.assertEqual(listener.with_key("WATCHDOG"), [])  # no WatchdogSec, no beats
        response = yield treq.get(f"http://127.0.0.1:{http}/health", persistent=False)
        self.assertEqual(response.code, 200)
        status = yield daemon.signal(signal.SIGTERM)
        self.assertEqual(status, 0)
        self.assertEqual(len(listener.with_key("STOPPING")), 1)


class NotifySettingsTests(unittest.TestCase):
    """What ``SystemdNotify`` reads of systemd's environment."""

    def notify(self, **environ: str):
        from emond.app.systemd import SystemdNotify

        async def ready() -> tuple[bool, str]:
            return True, ""

        return SystemdNotify(ready, reactor, environ)

    def test_without_notify_socket_nothing_is_sent(self):
        notify = self.notify(WATCHDOG_USEC="1000000")
        notify.startService()
        self.addCleanup(notify.stopService)
        self.assertFalse(notify.enabled)
        notify.send("READY=1")  # a no-op, no error
        notify.stopping("draining")

    def test_watchdog_interval(self):
        self.assertEqual(self.notify(WATCHDOG_USEC="30000000").watchdog_interval(), 15.0)
        self.assertEqual(self.notify(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())).watchdog_interval(), 15.0)
        self.assertIsNone(self.notify(WATCHDOG_USEC="30000000", WATCHDOG_PID="1").watchdog_interval())  # another process's
        self.assertIsNone(self.notify().watchdog_interval())
        self.assertIsNone(self.notify(WATCHDOG_USEC="0").watchdog_interval())
