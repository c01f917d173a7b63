"""The programs emond runs beside itself: where they are, how they are started, how they say
they are ready.

One place for what the embedded Redis (``redisproc``), the local cluster (``localcluster``)
and the tests' private servers (``tests/support``) all need: finding ``redis-server``,
``mariadbd``, ``haproxy`` (or naming the Debian package that is missing), their arguments,
the line each prints once it serves, a free port on a given address, and the command line
of a ``twistd`` process running this checkout's code.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from types import MappingProxyType

# mariadbd and haproxy live in sbin, which is not on every user's PATH
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
# The Debian package that provides each program (bin/setup installs them).
PACKAGES = MappingProxyType({
    "redis-server": "redis-server",
    "mariadbd": "mariadb-server",
    "mysqld": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mysql_install_db": "mariadb-server",
    "openssl": "openssl",
    "haproxy": "haproxy",
    "systemd-analyze": "systemd",
    "systemd-sysusers": "systemd",
})

# What each server prints once it serves.
REDIS_READY = b"Ready to accept connections"
MARIADB_READY = b"ready for connections"
HAPROXY_READY = b"Loading success."  # the master of `haproxy -W`, once its worker runs

# The checkout this code runs from: its twistd plugins must be the ones found.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class MissingProgram(RuntimeError):
    """A program emond needs is not installed (a test that needs it errors, never skips)."""


def require_program(*names: str) -> str:
    """The path of the first of ``names`` found on PATH or in sbin; else MissingProgram
    naming the Debian package to install."""
    for name in names:
        path = shutil.which(name) or shutil.which(name, path=SBIN)
        if path:
            return path
    package = PACKAGES.get(names[0], names[0])
    raise MissingProgram(
        f"{names[0]} is not installed, and this needs it: "
        f"install the Debian package {package} (bin/setup does: apt-get install {package})"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` now (it may be taken before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_args(
    directory: str,
    *,
    port: int = 0,
    bind: str | None = None,
    unixsocket: str | None = None,
    durable: bool = True,
    pidfile: str | None = None,
) -> list[str]:
    """Arguments of a ``redis-server`` in the foreground logging to stdout, its files in
    ``directory``. ``durable``: an append-only file synced every second (a device's `ok`
    survives a crash of the machine); else nothing is written (tests)."""
    args = ["--port", str(port), "--dir", directory, "--save", "", "--daemonize", "no", "--logfile", ""]
    if bind is not None:
        args += ["--bind", bind]
    if unixsocket is not None:
        args += ["--unixsocket", unixsocket, "--unixsocketperm", "700"]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"] if durable else ["--appendonly", "no"]
    if pidfile is not None:
        args += ["--pidfile", pidfile]
    return args


def _as_root() -> list[str]:
    return ["--user=root"] if os.geteuid() == 0 else []  # mariadbd refuses root otherwise


def mariadb_install(datadir: str, cwd: str, timeout: float) -> None:
    """Make a new MariaDB data directory (root without a password); RuntimeError with
    the tool's output if it fails."""
    install = require_program("mariadb-install-db", "mysql_install_db")
    argv = [install, "--no-defaults", "--auth-root-authentication-method=normal",
            "--skip-test-db", f"--datadir={datadir}", *_as_root()]
    done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"mariadb-install-db failed ({done.returncode}):\n" + tail(done.stdout))


def mariadb_argv(datadir: str, socket_path: str, port: int, bind: str) -> list[str]:
    """A ``mariadbd`` in the foreground logging to stderr, reached over TCP without
    passwords (``--skip-grant-tables``: private servers for tests and local clusters only)."""
    exe = require_program("mariadbd", "mysqld")
    return [exe, "--no-defaults", f"--datadir={datadir}", f"--socket={socket_path}",
            f"--port={port}", f"--bind-address={bind}", "--skip-grant-tables",
            "--skip-log-bin", *_as_root()]


def haproxy_argv(config: str) -> list[str]:
    """HAProxy in the foreground (``-db``) as master and worker (``-W``): the master prints
    ``HAPROXY_READY`` once the worker serves, and SIGTERM to it stops both."""
    return [require_program("haproxy"), "-W", "-db", "-f", config]


def twistd_argv(plugin: str, config: str, python: str = sys.executable) -> list[str]:
    """``twistd -n <plugin> --config <config>`` (logging to stdout, no pid file of its own)
    with the checkout's code: run it with ``checkout_env()``."""
    return [python, "-c", TWISTD, "-n", "--pidfile=", plugin, "--config", config]


def checkout_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a child Python find this checkout first."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tail(output: bytes, lines: int = 30) -> str:
    """The last lines of a program's output, for an error message."""
    return "\n".join(output.decode("utf-8", "replace").splitlines()[-lines:])
