"""``twistd emond-storage``: a storage server (stream listener, engines, reads)."""

from __future__ import annotations

from twisted.application.service import IService

from emond.app.tap import ConfigOptions
from emond.config import load_storage_config


class Options(ConfigOptions):
    optParameters = [["config", "c", "etc/emond-storage.toml", "Path of the storage server's TOML config file."]]
    load = staticmethod(load_storage_config)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from emond.app.daemon import Daemon
    from emond.app.service import make_storage_service

    config = options["loaded"]
    return Daemon(make_storage_service(config, reactor), config, load_storage_config, reactor, getattr(options, "parent", None))
