"""feed/export.json streams files of any size chunk by chunk, byte-exact."""

from __future__ import annotations

import os

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from emond.api.feeds import EXPORT_CHUNK
from tests.support.node import NodeHarness

NOW = 1_700_000_000


class ExportTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_large_exports_are_streamed_exactly(self):
        node = yield NodeHarness.start(self, "sqlite", "[engines]\nwindow_past = 2000000000\n")
        keys = (yield node.post("user/register.json", data={"username": "exporter", "password": "secret1", "email": "e@example.org"})).json()
        key = keys["apikey_read"]
        engines = node.service.getServiceNamed("storage").getServiceNamed("0").engines
        files = {}
        for engine, name, count in ((5, "fina", EXPORT_CHUNK // 4 * 2 + 1234), (2, "series", EXPORT_CHUNK // 9 + 777)):
            created = yield node.request("POST", "feed/create.json", params={"apikey": keys["apikey_write"], "name": name, "engine": str(engine), "options": '{"interval":10}'})
            feedid = created.json()["feedid"]
            times = NOW - 10 * count + np.arange(count) * 10
            target = engines.phpfina if engine == 5 else engines.phptimeseries
            target.write(feedid, times, np.arange(count, dtype=np.float64))
            path = os.path.join(node.config.node.datadir, *(("phpfina", f"{feedid}.dat") if engine == 5 else ("phptimeseries", f"feed_{feedid}.MYD")))
            with open(path, "rb") as f:
                files[feedid] = (engine, f.read())
        for feedid, (engine, whole) in files.items():
            self.assertGreater(len(whole), EXPORT_CHUNK)  # more than one chunk
            answer = yield node.request("GET", "feed/export.json", params={"apikey": key, "id": str(feedid), "start": "0"})
            self.assertEqual((answer.code, answer.content_type), (200, "application/octet-stream"))
            self.assertEqual(answer.body, whole)
            start = EXPORT_CHUNK + 42
            answer = yield node.request("GET", "feed/export.json", params={"apikey": key, "id": str(feedid), "start": str(start)})
            first = (start // 4 * 4 - 4) if engine == 5 else start // 9 * 9  # emoncms: one PHPFina slot early
            self.assertEqual(answer.body, whole[first:])
