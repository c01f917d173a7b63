"""A real storage server (``make_storage_service``) in the test's reactor, with its own CA and
certificates: mutual TLS on a free port, engines on disk without sync."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor

from emond.app.service import make_storage_service
from emond.config import load_storage_config
from tests.support import free_port
from tests.support.daemon import remote_storage_config


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
    port = free_port()
    path = remote_storage_config(base, port, free_port(), extra="[engines]\nsync = false\n")
    server = make_storage_service(load_storage_config(path), reactor)
    server.startService()
    test.addCleanup(server.stopService)
    engines = yield server.getServiceNamed("storage").opened
    return InProcessStorage(port, os.path.join(base, "tls"), os.path.join(base, "remote"), engines)
