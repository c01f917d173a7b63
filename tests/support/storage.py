"""A real storage server (``make_storage_service``) in the test's reactor, with its own CA and
certificates: mutual TLS on a free port, engines on disk without sync."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor

from emond.app.service import make_storage_service
from emond.config import load_storage_config
from tests.support import free_port
from tests.support.daemon import ROOT


@dataclass
class InProcessStorage:
    port: int  # the TLS stream's
    tls: str  # the folder of ca.pem, node0.pem, storage1.pem
    datadir: str
    engines: Any  # the location's StorageEngines, once opened


@defer.inlineCallbacks
def start_storage(test: Any):
    """Storage server 1, allowing ``node0``; stopped at the test's cleanup."""
    base = os.path.abspath(test.mktemp())
    os.makedirs(base)
    tls = os.path.join(base, "tls")
    subprocess.run([os.path.join(ROOT, "etc", "make-certs"), tls, "node0", "storage1"], check=True, capture_output=True)
    port = free_port()
    path = os.path.join(base, "storage.toml")
    with open(path, "w") as f:
        f.write(
            f'[storage]\nid = 1\nlisten = "tcp:{port}:interface=127.0.0.1"\nhttp = "tcp:{free_port()}:interface=127.0.0.1"\n'
            f'datadir = "data"\nallow = ["node0"]\n[engines]\nsync = false\n'
            f'[tls]\nca = "tls/ca.pem"\ncert = "tls/storage1.pem"\n'
        )
    server = make_storage_service(load_storage_config(path), reactor)
    server.startService()
    test.addCleanup(server.stopService)
    engines = yield server.getServiceNamed("storage").opened
    return InProcessStorage(port, tls, os.path.join(base, "data"), engines)
