"""``[node] reuse_port``: several processes' listening sockets on one HTTP port (SO_REUSEPORT)."""

from __future__ import annotations

import socket

import treq
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from emond.app.reuseport import server_endpoint
from emond.config import ConfigError, load_node_config


class Named(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request):
        request.setHeader(b"connection", b"close")  # each request a new connection
        return self.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReusePortTests(unittest.TestCase):
    async def _listen(self, description: str, name: bytes, reuse: bool):
        port = await server_endpoint(reactor, description, reuse).listen(Site(Named(name)))
        self.addCleanup(port.stopListening)
        return port

    async def test_two_listeners_share_the_port(self) -> None:
        """Both sockets listen on the one port and the kernel hands connections to each."""
        number = free_port()
        description = f"tcp:{number}:interface=127.0.0.1"
        first = await self._listen(description, b"first", True)
        second = await self._listen(description, b"second", True)
        self.assertEqual(first.getHost().port, number)
        self.assertEqual(second.getHost().port, number)
        seen = set()
        for _ in range(64):  # new connections from new source ports: both answer (2**-63 that one never does)
            response = await treq.get(f"http://127.0.0.1:{number}/", persistent=False)
            seen.add(await response.content())
            if len(seen) == 2:
                break
        self.assertEqual(seen, {b"first", b"second"})

    async def test_without_the_option_the_second_is_refused(self) -> None:
        description = f"tcp:{free_port()}:interface=127.0.0.1"
        await self._listen(description, b"first", False)
        with self.assertRaises(CannotListenError):
            await self._listen(description, b"second", False)

    async def test_ipv6(self) -> None:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            number = s.getsockname()[1]
        port = await self._listen(f"tcp6:{number}:interface=\\:\\:1", b"six", True)
        self.assertEqual(port.getHost().port, number)
        response = await Agent(reactor).request(b"GET", f"http://[::1]:{number}/".encode())
        self.assertEqual(await readBody(response), b"six")


class ReusePortConfigTests(unittest.TestCase):
    def _load(self, text: str):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return load_node_config(path)

    def test_only_for_tcp(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self._load('[node]\nhttp = "unix:/tmp/emond.sock"\nreuse_port = true\n')
        self.assertIn("[node] reuse_port: only for a tcp: or tcp6: http endpoint", "\n".join(caught.exception.located()))

    def test_tcp_accepted(self) -> None:
        self.assertTrue(self._load('[node]\nhttp = "tcp:8080"\nreuse_port = true\n').node.reuse_port)
