"""The private redis-server a single node starts persists what devices were told ``ok`` for."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.redis import Redis
from emond.app.redisproc import EmbeddedRedis


class EmbeddedRedisTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_append_only_file_synced_every_second(self):
        # a short path (not under _trial_temp): a Unix socket path is limited to 107 bytes
        directory = tempfile.mkdtemp(prefix="emond-redis-")
        self.addCleanup(shutil.rmtree, directory, True)
        redis = EmbeddedRedis(directory, reactor)
        redis.startService()
        self.addCleanup(redis.stopService)
        yield redis.ready
        client = Redis.connect(redis.url, 5.0, reactor, poolsize=1)
        self.addCleanup(client.disconnect)
        appendonly = yield defer.ensureDeferred(client.call("CONFIG", "GET", "appendonly"))
        appendfsync = yield defer.ensureDeferred(client.call("CONFIG", "GET", "appendfsync"))
        self.assertEqual((appendonly, appendfsync), ([b"appendonly", b"yes"], [b"appendfsync", b"everysec"]))
        # the AOF is where redis keeps it: in the node's directory
        yield defer.ensureDeferred(client.call("SET", "k", "v"))
        info = yield defer.ensureDeferred(client.call("INFO", "persistence"))
        self.assertIn(b"aof_enabled:1", info)
        self.assertTrue(any(name.startswith("appendonly") for name in os.listdir(directory)), os.listdir(directory))

    def test_a_socket_path_too_long_is_refused_clearly(self):
        directory = os.path.join(os.path.abspath(self.mktemp()), "x" * 120)
        redis = EmbeddedRedis(directory, reactor)
        with self.assertRaises(RuntimeError) as raised:
            redis.startService()
        self.assertIn("over the 107 a Unix socket allows", str(raised.exception))
        self.assertIn("[redis] url", str(raised.exception))
        self.assertFalse(os.path.exists(directory))  # nothing started, nothing made
