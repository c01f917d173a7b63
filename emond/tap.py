"""``twistd emond``: a node (HTTP API, input queues, storage senders)."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from emond.config import ConfigError, load_node_config


class Options(usage.Options):
    optParameters = [["config", "c", "etc/emond.toml", "Path of the node's TOML config file."]]

    def postOptions(self) -> None:
        try:
            self["loaded"] = load_node_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from emond.service import make_node_service

    return make_node_service(options["loaded"], reactor)
