"""``twistd emond``: a node (HTTP API, input queues, storage senders)."""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import IService
from twisted.python import usage

from emond.config import ConfigError, load_node_config


class ConfigOptions(usage.Options):
    """``--config``: the process's TOML file, loaded and checked before the reactor runs
    (a bad file is a usage error naming every problem, one line each: ``FILE:LINE: [table]
    key: message``, as ``emond-admin check-config`` prints them)."""

    load: Callable[[str], Any]

    def postOptions(self) -> None:
        try:
            self["loaded"] = type(self).load(self["config"])
        except ConfigError as e:
            raise usage.UsageError("refusing to start: the config has errors:\n" + "\n".join(e.located()))


class Options(ConfigOptions):
    optParameters = [["config", "c", "etc/emond.toml", "Path of the node's TOML config file."]]
    load = staticmethod(load_node_config)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from emond.app.daemon import Daemon
    from emond.app.service import make_node_service

    config = options["loaded"]
    return Daemon(make_node_service(config, reactor), config, load_node_config, reactor, getattr(options, "parent", None))
