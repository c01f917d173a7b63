"""The lean input protocol (emond.web.lean) answers byte for byte as twisted.web does.

The node listens with the lean protocol; beside it, the same API resource is served by
a plain twisted.web site (``DrainingSite`` without ``lean``), the code path every request
took before. The same raw bytes (single requests, keep-alive connections mixing routes,
pipelined requests, refusals, what the lean protocol hands over) go to both, and the
bytes that come back must be equal but for the ``Date`` header's value.
"""

from __future__ import annotations

import json
import re
import zlib
from urllib.parse import quote, urlencode

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from emond.app.service import DrainingSite, anonymous_request_factory
from tests.support.node import NodeHarness
from tests.support.servers import free_port

_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.data)


@defer.inlineCallbacks
def exchange(port: int, chunks: list[bytes]):
    """Send each chunk (a pause between them: separate reads), then read until the
    server closes the connection (the last request says ``Connection: close``)."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    proto = yield endpoints.connectProtocol(endpoint, _Collect())
    for chunk in chunks:
        proto.transport.write(chunk)
        d = defer.Deferred()
        reactor.callLater(0.02, d.callback, None)
        yield d  # not a synchronisation: only splits the bytes into separate reads
    # A request neither side can complete is not answered by either: cut after a while.
    cut = reactor.callLater(3, proto.transport.abortConnection)
    answer = yield proto.done
    if cut.active():
        cut.cancel()
    else:
        answer += b"<no end>"
    return _DATE.sub(b"\r\nDate: -\r\n", answer)


def get(path: str, close: bool = False, headers: str = "", version: str = "HTTP/1.1") -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET /{path} {version}\r\nHost: x\r\n{headers}{extra}\r\n".encode()


def post(path: str, body: bytes, ctype: str = "application/x-www-form-urlencoded", close: bool = False, headers: str = "") -> bytes:
    extra = "Connection: close\r\n" if close else ""
    head = f"POST /{path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{headers}{extra}\r\n"
    return head.encode() + body


class LeanEquivalenceTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, "sqlite", "[engines]\nwindow_past = 2000000000\n[input]\nmax_values = 20\n")
        answer = yield self.node.post("user/register.json", data={"username": "dev", "password": "secret1", "email": "d@example.org"})
        self.keys = answer.json()
        http = self.node.service.getServiceNamed("http")
        self.assertIsNotNone(http.site._lean)  # the node's port speaks the lean protocol
        site = DrainingSite(http.site.resource, anonymous_request_factory(self.node.config.input.max_body), reactor, False)
        site.displayTracebacks = False
        self.plain_port = free_port("127.0.0.1")
        listening = yield endpoints.TCP4ServerEndpoint(reactor, self.plain_port, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)

    @defer.inlineCallbacks
    def same(self, *chunks: bytes, answered: bool = True):
        lean = yield exchange(self.node.port, list(chunks))
        plain = yield exchange(self.plain_port, list(chunks))
        self.assertEqual(lean, plain, chunks)
        if answered:
            self.assertTrue(lean.startswith(b"HTTP/1."), (lean, chunks))
        return lean

    @defer.inlineCallbacks
    def test_single_requests(self):
        key, read = self.keys["apikey_write"], self.keys["apikey_read"]
        frames = json.dumps([[0, "bench", 1, 2, 3], [1, "bench", 4, 5, 6]])
        hub = zlib.compress(frames.encode())
        cases = [
            get(f"input/post.json?apikey={key}&node=emontx&csv=1,2,3", close=True),
            get(f"input/post?apikey={key}&node=emontx&fulljson=" + quote('{"a":1,"b":2.5}'), close=True),
            get("input/post.json?node=emontx&csv=1,2,3", close=True, headers=f"Authorization: Bearer {key}\r\n"),
            get(f"api/post.json?apikey={key}&node=1&data=a:1", close=True),
            get(f"emoncms/input/post.json?apikey={key}&node=1&csv=5", close=True),
            get(f"input/post/house?apikey={key}&csv=10,20", close=True),
            get("input/post.json?apikey=nope&node=1&csv=1", close=True),
            get(f"input/post.json?apikey={read}&node=1&csv=1", close=True),
            get("input/post.json?node=1&csv=1", close=True),
            get(f"input/post.json?apikey={key}&node=1&csv=" + ",".join(["1"] * 21), close=True),
            get(f"input/post.json?apikey={key}&node=bad%20node!&csv=1", close=True),
            get(f"input/post.json?apikey={key}&node=1&csv=x", close=True),
            get(f"input/post.json?apikey={key}&node=1&json=" + quote('{"a":"NaN"}'), close=True),
            get(f"input/post.json?apikey={key}&node=1&csv=1&time=1", close=True),
            get(f"input/bulk.json?apikey={key}&data=" + quote(frames), close=True),
            get(f"input/bulk.json?apikey={key}&data=" + quote("[[0,"), close=True),
            post("input/post.json", urlencode({"apikey": key, "node": "f", "fulljson": '{"x":1}'}).encode(), close=True),
            post("input/post.json?node=q&apikey=nope", urlencode({"apikey": key, "csv": "1"}).encode(), close=True),
            post("input/bulk.json", urlencode({"apikey": key, "data": frames, "time": "1700000000"}).encode(), close=True),
            post("input/bulk.json", b"data=%zz&apikey=" + key.encode(), close=True),
            post("input/bulk.json", b"&".join([b"a=1"] * 1001), close=True),
            post("input/bulk.json?sentat=2&cb=1", hub, ctype="application/octet-stream", close=True,
                 headers=f"Authorization: Bearer {key}\r\n"),
            post(f"input/bulk.json?apikey={key}&c=1", b"not zlib", ctype="application/octet-stream", close=True),
            post(f"input/post.json?apikey={key}", b"--b\r\nContent-Disposition: form-data; name=\"csv\"\r\n\r\n1\r\n--b--\r\n",
                 ctype="multipart/form-data; boundary=b", close=True),
            get("input/list.json?apikey=" + key, close=True),
            get("input/nothing.json?apikey=" + key, close=True),
            get("nothing", close=True),
            get(f"input/post.json?apikey={key}&node=1&csv=1", version="HTTP/1.0"),
            get(f"input/post.json?apikey={key}&node=1&csv=1", close=True, headers="Cookie: emond_session=x\r\n"),
            get(f"input/post.json?apikey={key}&node=1&csv=1", close=True, headers="Connection: keep-alive, close\r\n"),
            b"PUT /input/post.json?apikey=" + key.encode() + b"&node=1&csv=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET /input/post.json HTTP/1.1\r\nBad Header: x\r\nConnection: close\r\n\r\n",
            b"GET /input/post.json HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab",
            b"\r\nGET /input/post.json HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"POST /input/bulk.json?apikey=" + key.encode() + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n5\r\ndata=\r\n" + b"%x\r\n" % len(quote(frames)) + quote(frames).encode() + b"\r\n0\r\n\r\n",
        ]
        for case in cases:
            yield self.same(case)
        # Lines ended by a bare LF: twisted.web waits for a CRLF and never answers; nor does the lean protocol.
        bare_lf = b"GET /input/post.json?apikey=" + key.encode() + b"&node=1&csv=1 HTTP/1.1\nConnection: close\n\n"
        answer = yield self.same(bare_lf, answered=False)
        self.assertEqual(answer, b"<no end>")

    @defer.inlineCallbacks
    def test_keep_alive_mixes_routes_and_pipelines(self):
        key = self.keys["apikey_write"]
        ok = get(f"input/post.json?apikey={key}&node=k&csv=1,2")
        bulk = post("input/bulk.json", urlencode({"apikey": key, "data": "[[0,\"k\",1]]"}).encode())
        other = get(f"feed/list.json?apikey={key}")  # an answer that does not change
        last = get(f"input/post.json?apikey={key}&node=k&csv=3", close=True)
        site = self.node.service.getServiceNamed("http").site
        before = site.lean_served
        answer = yield self.same(ok, bulk, ok, last)
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 4)
        self.assertEqual(site.lean_served - before, 4)  # all four on the lean path
        before = site.lean_served
        yield self.same(ok, other, ok, last)
        self.assertEqual(site.lean_served - before, 1)  # the rest of the connection was twisted.web's
        yield self.same(ok + bulk + ok + last)  # pipelined, in one read
        yield self.same(ok, other, ok, last)  # handed over at the second request
        yield self.same(ok + other + ok + last)
        yield self.same(other, ok, last)  # twisted.web's from the first request
        yield self.same(ok[:10], ok[10:30], ok[30:] + bulk[:50], bulk[50:], last)  # split anywhere
        yield self.same(ok, get("input/post.json?apikey=bad&node=k&csv=1"), last)
        yield self.same(ok + b"GET /input/post.json HTTP/1.0\r\n\r\n")
