"""A local cluster for trying and testing (issue 12, architecture §7): ``bin/cluster up DIR``.

On this one machine, each "machine" on its own loopback address (so nothing may assume one
host): MariaDB and the central Redis (sessions, throttles, the key cache), two shards (each its
own ``redis-server``, one shard process ``twistd emond`` with ``[node] front = false`` and one
``twistd emond-storage``), two fronts (``[node] shard = ""``) and HAProxy, configured from
``etc/haproxy.cfg``, in front of them. Everything lives under DIR: configs, certificates
(``etc/make-certs``), data, a log and a pid per process, and ``cluster.json``, the record of
what ``up`` started, which ``down`` stops, exactly that (a pid is signalled only while it is
still the process ``up`` started), and which makes a second ``up`` refuse.

``up`` prints one JSON line: ``{"entry": URL, "fronts": [URL, ...], "admin": [argv...],
"shards": {NAME: {"redis_pid": PID, ...}}, ...}``. The ports are chosen free on the first
``up`` and kept for the next (``layout.json``), so the URLs stay the same after ``down``/``up``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from emond.app import programs

SHARDS = ("a", "b")
FRONTS = ("front1", "front2")
# The "machines": one loopback address each.
DB_HOST = "127.0.0.11"  # MariaDB and the central Redis
SHARD_HOSTS = {"a": "127.0.0.12", "b": "127.0.0.13"}  # a shard's Redis, its process, its storage server
FRONT_HOSTS = {"front1": "127.0.0.14", "front2": "127.0.0.15"}
ENTRY_HOST = "127.0.0.16"  # HAProxy
DATABASE = "emond"
READY_TIMEOUT = 120.0  # seconds for the whole cluster to answer (MariaDB's first start is slow)
STOP_TIMEOUT = 30.0  # seconds between SIGTERM and SIGKILL (emond drains for up to 10 s)
POLL = 0.1  # seconds between two readiness probes of a process that is starting
MAX_SOCKET_PATH = 107  # bytes of a Unix socket path (MariaDB's socket lives under DIR)


class ClusterError(Exception):
    """``bin/cluster`` refused or failed; the message says why and what to do."""


# -- the entry point's config ---------------------------------------------------------


def entry_config(
    template: str,
    bind: str,
    servers: list[tuple[str, str]],
    *,
    proxy_protocol: bool = True,
    source: str | None = None,
    tls_cert: str | None = None,
) -> str:
    """``etc/haproxy.cfg`` (``template``) with its own addresses: the frontend's ``bind``
    (with ``tls_cert``: TLS terminated there), one ``server NAME HOST:PORT`` per front, and
    HAProxy's ``source`` address towards the fronts. ``proxy_protocol=False``: the fronts
    get ``X-Forwarded-For`` (``option forwardfor``) instead of the PROXY header."""
    out: list[str] = []
    seen = {"bind": False, "server": False, "default-server": False}
    for line in template.splitlines():
        words = line.split()
        keyword = words[0] if words else ""
        indent = line[: len(line) - len(line.lstrip())]
        if keyword == "bind":
            if not seen["bind"]:
                out.append(f"{indent}bind {bind}" + (f" ssl crt {tls_cert}" if tls_cert else ""))
            seen["bind"] = True
        elif keyword == "server":
            if not seen["server"]:
                out.extend(f"{indent}server {name} {address}" for name, address in servers)
            seen["server"] = True
        elif keyword == "default-server":
            seen["default-server"] = True
            if not proxy_protocol:
                words = [w for w in words if w != "send-proxy-v2"]
                out.append(f"{indent}option forwardfor")
            if source:
                words += ["source", source]
            out.append(indent + " ".join(words))
        else:
            out.append(line)
    missing = [k for k, found in seen.items() if not found]
    if missing:
        raise ValueError(f"the HAProxy template has no {', '.join(missing)} line")
    return "\n".join(out) + "\n"
