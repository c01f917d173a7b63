"""``twistd emond-storage``: a storage server (stream listener, engines, reads)."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from emond.config import ConfigError, load_storage_config


class Options(usage.Options):
    optParameters = [["config", "c", "etc/emond-storage.toml", "Path of the storage server's TOML config file."]]

    def postOptions(self) -> None:
        try:
            self["loaded"] = load_storage_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from emond.service import make_storage_service

    return make_storage_service(options["loaded"], reactor)
