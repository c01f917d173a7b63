"""A node may host several storage locations ([node] storage = [0, 2]): each has its own
sender, and every one of them writes its feeds' files."""

from __future__ import annotations

import os

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from tests.support.node import NodeHarness, drain

T0 = 1_700_000_000


class TwoLocationsTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_node_hosting_two_locations_writes_both(self):
        node = yield NodeHarness.start(
            self, "sqlite", "[input]\nrate_limit = 0.0\n", node_config="storage = [0, 2]\n"
        )
        keys = (yield node.post("user/register.json", data={"username": "two", "password": "secret1", "email": "t@example.org"})).json()
        key = keys["apikey_write"]
        feeds = {}
        for server in ("0", "2"):
            answer = yield node.request("POST", "feed/create.json", params={"apikey": key, "name": f"f{server}", "engine": "2", "server": server})
            feeds[server] = answer.json()["feedid"]
        yield node.request("POST", "input/post.json", params={"apikey": key, "node": "n", "csv": "0,0", "time": str(T0)})
        yield drain(node)
        inputs = {i["name"]: i["id"] for i in (yield node.get("input/list.json", apikey=key)).json()}
        for name, server in (("1", "0"), ("2", "2")):
            yield node.request("POST", "input/process/set.json", params={"apikey": key, "inputid": inputs[name], "processlist": f"1:{feeds[server]}"})
        answer = yield node.request("POST", "input/post.json", params={"apikey": key, "node": "n", "csv": "5,7", "time": str(T0 + 10)})
        self.assertEqual(answer.body, b"ok")
        yield drain(node)
        var = os.path.join(node.dir, "var")
        stored = {}
        for server, directory in (("0", var), ("2", os.path.join(var, "storage2"))):
            with open(os.path.join(directory, "phptimeseries", f"feed_{feeds[server]}.MYD"), "rb") as f:
                records = np.frombuffer(f.read(), dtype=np.dtype([("m", "u1"), ("t", "<u4"), ("v", "<f4")]))
            stored[server] = [(int(r["t"]), float(r["v"])) for r in records]
        self.assertEqual(stored, {"0": [(T0 + 10, 5.0)], "2": [(T0 + 10, 7.0)]})
