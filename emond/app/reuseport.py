"""Several ``twistd emond`` processes on one HTTP port: ``SO_REUSEPORT`` (``[node] reuse_port``).

With the option each process binds its own listening socket to the same address and port;
the kernel spreads new connections over them, so the processes share the input load
without a proxy in front (one per core). The endpoint string stays the source of the
address, port and backlog: Twisted's own ``tcp:``/``tcp6:`` endpoint parses it and calls
``listenTCP`` on the reactor it was given, which here opens the socket with the option set
and hands it to the real reactor (``adoptStreamPort``).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamServerEndpoint



class _ReusePortReactor:
    """The reactor, except that ``listenTCP`` listens on a socket with ``SO_REUSEPORT``."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
            sock.listen(backlog)
            sock.setblocking(False)
            # adoptStreamPort duplicates the descriptor: this one is closed on leaving.
            return self._reactor.adoptStreamPort(sock.fileno(), family, factory)


def server_endpoint(reactor: Any, description: str, reuse_port: bool = False) -> IStreamServerEndpoint:
    """The endpoint ``description`` names; with ``reuse_port`` (a ``tcp:``/``tcp6:`` one, which
    the config checks) its socket is opened with ``SO_REUSEPORT``."""
    if reuse_port:
        reactor = _ReusePortReactor(reactor)
    return endpoints.serverFromString(reactor, description)
