"""Steps of a test that acts as one registered user of a real node (``self.node``: a
``NodeHarness``; ``self.keys``: the user's register answer), and readers of the files its
feeds are written to, by their formats."""

from __future__ import annotations

import json
import os

import numpy as np
from twisted.internet import defer

from emond.phpfina import PHPFina
from tests.support.node import drain, pipeline


class UserSteps:
    def call(self, path, **params):
        params.setdefault("apikey", self.keys["apikey_write"])
        return self.node.request("POST", path, params=params)

    @defer.inlineCallbacks
    def feed(self, name, engine=5, interval=10, datatype=1):
        answer = yield self.call("feed/create.json", name=name, tag="t", engine=str(engine), datatype=str(datatype),
                                 options=json.dumps({"interval": interval}))
        self.assertEqual(answer.code, 200, answer)
        return answer.json()["feedid"]

    @defer.inlineCallbacks
    def post(self, when, node="tx", **values):
        answer = yield self.call("input/post.json", node=node, fulljson=json.dumps(values), time=str(when))
        self.assertEqual(answer.code, 200, answer)

    @defer.inlineCallbacks
    def inputs(self):
        answer = yield self.call("input/list.json")
        return {(i["nodeid"], i["name"]): i for i in answer.json()}

    @defer.inlineCallbacks
    def set_list(self, name, processlist, node="tx"):
        inputid = (yield self.inputs())[(node, name)]["id"]
        answer = yield self.node.request("POST", "input/process/set.json", params={"apikey": self.keys["apikey_write"], "inputid": inputid},
                                         data={"processlist": processlist})
        self.assertEqual(answer.code, 200, answer)

    @defer.inlineCallbacks
    def settle(self):
        """Every queue drained and the input last values copied to the database."""
        yield drain(self.node)
        yield pipeline(self.node, "consumer").saved()

    def fina(self, feedid):
        """(start, values rounded to 4 decimals, None for NaN) of a PHPFina feed's files."""
        engine = PHPFina(os.path.join(self.node.config.node.datadir, "phpfina"), sync=False)
        try:
            start, _interval, data = engine.raw(feedid)
        finally:
            engine.close()
        return start, [None if np.isnan(v) else round(float(v), 4) for v in data]

    def series(self, feedid):
        """(time, value rounded to 4 decimals) of a PHPTimeSeries file, read by its format:
        9-byte records, uint8 marker, uint32 LE time, float32 LE value."""
        path = os.path.join(self.node.config.node.datadir, "phptimeseries", f"feed_{feedid}.MYD")
        with open(path, "rb") as f:
            raw = f.read()
        records = np.frombuffer(raw, dtype=np.dtype([("m", "u1"), ("t", "<u4"), ("v", "<f4")]))
        return [(int(t), round(float(v), 4)) for t, v in zip(records["t"], records["v"])]
