"""[input] max_inputs holds when another consumer created some of the user's inputs
(a queue that moved between consumers and came back): its cached count must not be stale."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.node import NodeHarness, drain

T0 = 1_700_000_000


class InputLimitAcrossConsumersTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_inputs_made_elsewhere_count_against_the_limit(self):
        node = yield NodeHarness.start(self, "sqlite", "[input]\nmax_inputs = 3\nrate_limit = 0.0\n")
        keys = (yield node.post("user/register.json", data={"username": "lim2", "password": "secret1", "email": "l@example.org"})).json()
        key, userid = keys["apikey_write"], keys["userid"]
        answer = yield node.request("POST", "input/post.json", params={"apikey": key, "node": "a", "csv": "1", "time": str(T0)})
        self.assertEqual(answer.body, b"ok")
        yield drain(node)  # this node's consumer now has the user cached: one input
        # Another consumer (the queue had moved to it) creates two more inputs of the user.
        for name in ("x", "y"):
            yield defer.ensureDeferred(node.ctx.inputs.create(userid, "b", name))
        answer = yield node.request("POST", "input/post.json", params={"apikey": key, "node": "a", "csv": "1,2", "time": str(T0 + 10)})
        self.assertEqual(answer.body, b"ok")
        yield drain(node)
        inputs = yield defer.ensureDeferred(node.ctx.inputs.list(userid))
        self.assertEqual(sorted((i.nodeid, i.name) for i in inputs), [("a", "1"), ("b", "x"), ("b", "y")])
        rejected = yield defer.ensureDeferred(node.ctx.refusals.for_user(userid))
        self.assertEqual(rejected["counts"], {"input_limit": 1})
