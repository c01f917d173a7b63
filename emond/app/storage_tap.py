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

    from emond.app.service import make_storage_service

    return make_storage_service(options["loaded"], reactor)
