"""The storage server's end of the stream cannot be crashed by a peer.

Each malformed frame arrives over real mutual TLS from a client whose
certificate is allowed. For each: the connection is closed with a logged
reason and counted in the storage server's /metrics; nothing of it (nor of a
valid batch sent right behind it) is applied; the fencing token file is
unchanged; a client connected all along, and a new one, still get their
batches applied.

The expected reasons are the protocol's (emond/stream.py): a frame is a kind
byte and a body; a hello is a JSON object with an integer ``version`` and a
``name``; a batch is ``<QQ`` (seq, token) then whole 14-byte RECORDs; a request
is ``<I`` (id) then a JSON object with a string ``op``, integer ``feed`` and
``engine`` and a list ``args``.
"""

from __future__ import annotations

import json
import os
import struct

import treq
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from emond.records import RECORD, make_records
from emond.stream import ACK, BATCH, HELLO, HELLO_OK, REQUEST, batch_frame, encode_json, request_frame
from tests.support.streamclient import StorageServerHarness

NOW = 1_700_000_000
FEED = 7
TOKEN = 5  # the fencing token of the well-behaved sender
GOOD_HELLO = encode_json(HELLO, {"version": 1, "name": "node0"})


class HostileFrameTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.storage = yield StorageServerHarness.start(self)
        self.server = self.storage.server
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        yield defer.ensureDeferred(self.server.read("create", FEED, 5, [10]))
        # a well-behaved sender, connected throughout; its first batch sets the token file
        self.good = yield self.greeted()
        self.seq = 0
        yield self.send_good(self.good, [NOW], [1.0])
        self.before = self.snapshot()

    @defer.inlineCallbacks
    def greeted(self):
        client = yield self.storage.connect()
        client.send(GOOD_HELLO)
        frame = yield client.frame(1)
        self.assertEqual(json.loads(frame[1:]), {"version": 1, "server": 1, "token": self.server.max_token})
        return client

    @defer.inlineCallbacks
    def send_good(self, client, times, values):
        self.seq += 1
        client.send(batch_frame(self.seq, TOKEN, make_records(FEED, times, values).tobytes()))
        ack = yield client.frame(len(client.frames) + 1)
        self.assertEqual((ack[:1], struct.unpack_from("<Q", ack, 1)[0], json.loads(ack[9:])), (ACK, self.seq, []))

    def snapshot(self):
        files = {}
        for name in ("stream.token", f"phpfina/{FEED}.dat", f"phpfina/{FEED}.meta"):
            with open(os.path.join(self.storage.datadir, name), "rb") as f:
                files[name] = f.read()
        return files, self.server.batches._value.get(), self.server.points._value.get()

    @defer.inlineCallbacks
    def refused(self, frames, reason, greet=True):
        """Send ``frames`` (a valid batch with a newer token right behind them) and check
        the connection is closed for ``reason`` with nothing applied, then that the
        server still serves the old connection and a new one."""
        client = yield self.storage.connect()
        if greet:
            client.send(GOOD_HELLO)
            yield client.frame(1)
        received = len(client.frames)
        behind = batch_frame(99, TOKEN + 100, make_records(FEED, [NOW + 10], [2.0]).tobytes())
        for frame in [*frames, behind]:
            client.send(frame)
        yield client.lost
        self.assertEqual(len(client.frames), received)  # no answer to anything after the bad frame
        self.assertEqual(self.snapshot(), self.before)  # token file, feed files, counters
        self.assertEqual(self.server.max_token, TOKEN)
        closing = [e for e in self.events if e.get("reason") and "closing the connection" in e.get("log_format", "")]
        self.assertEqual([(e["reason"], e["peer"]) for e in closing], [(reason, "node0")])
        metrics = yield treq.get(f"http://127.0.0.1:{self.storage.http}/metrics", persistent=False)
        text = (yield metrics.content()).decode()
        self.assertIn(f'emond_stream_frames_refused_total{{reason="{reason}"}} 1.0', text)
        # the server goes on: the connection open all along, and a new one
        yield self.send_good(self.good, [NOW + 20], [3.0])
        fresh = yield self.greeted()
        yield self.send_good(fresh, [NOW + 30], [4.0])
        self.assertEqual(self.server.batches._value.get(), 3)
        return closing[0]

    # -- hello -----------------------------------------------------------------------

    def test_hello_not_json(self):
        return self.refused([HELLO + b"{version: 1"], "hello_malformed", greet=False)

    def test_hello_not_utf8(self):
        return self.refused([HELLO + b"\xff\xfe\x00"], "hello_malformed", greet=False)

    def test_hello_not_an_object(self):
        return self.refused([HELLO + b"[1, 2]"], "hello_malformed", greet=False)

    def test_hello_without_a_name(self):
        return self.refused([encode_json(HELLO, {"version": 1})], "hello_malformed", greet=False)

    def test_hello_without_a_version(self):
        return self.refused([encode_json(HELLO, {"name": "node0"})], "hello_malformed", greet=False)

    def test_hello_version_not_an_integer(self):
        return self.refused([encode_json(HELLO, {"version": "1", "name": "node0"})], "hello_malformed", greet=False)

    def test_hello_nested_too_deep(self):
        return self.refused([HELLO + b"[" * 50_000], "hello_malformed", greet=False)

    def test_hello_too_long(self):
        return self.refused([encode_json(HELLO, {"version": 1, "name": "n" * 70_000})], "hello_malformed", greet=False)

    def test_batch_before_hello(self):
        frame = batch_frame(1, TOKEN + 50, make_records(FEED, [NOW + 10], [2.0]).tobytes())
        return self.refused([frame], "frame_before_hello", greet=False)

    @defer.inlineCallbacks
    def test_other_version_is_answered_then_closed(self):
        client = yield self.storage.connect()
        client.send(encode_json(HELLO, {"version": 2, "name": "node0"}))
        client.send(batch_frame(99, TOKEN + 100, make_records(FEED, [NOW + 10], [2.0]).tobytes()))
        yield client.lost
        self.assertEqual([f[:1] for f in client.frames], [HELLO_OK])
        self.assertEqual(json.loads(client.frames[0][1:]), {"version": 1, "error": "unsupported version"})
        self.assertEqual(self.snapshot(), self.before)
        self.assertEqual(self.server.refused_frames.labels("hello_version")._value.get(), 1)
        yield self.send_good(self.good, [NOW + 20], [3.0])

    # -- batches ---------------------------------------------------------------------

    def test_batch_shorter_than_its_header(self):
        return self.refused([BATCH + struct.pack("<Q", 3)], "batch_short")

    def test_batch_of_only_a_kind(self):
        return self.refused([BATCH], "batch_short")

    def test_batch_with_a_partial_record(self):
        """A newer token with 1.5 records: the token must not be persisted."""
        records = make_records(FEED, [NOW + 10, NOW + 20], [2.0, 3.0]).tobytes()
        frame = batch_frame(2, TOKEN + 50, records[: RECORD.itemsize + 7])
        return self.refused([frame], "batch_record_size")

    def test_batch_with_a_byte_too_many(self):
        records = make_records(FEED, [NOW + 10], [2.0]).tobytes() + b"\x00"
        return self.refused([batch_frame(2, TOKEN + 50, records)], "batch_record_size")

    # -- other frames ----------------------------------------------------------------

    def test_unknown_frame_kind(self):
        return self.refused([b"Z" + b"\x00" * 20], "unknown_kind")

    def test_empty_frame(self):
        return self.refused([b""], "unknown_kind")

    def test_second_hello(self):
        return self.refused([GOOD_HELLO], "unknown_kind")

    def test_request_shorter_than_its_header(self):
        return self.refused([REQUEST + b"\x01\x00"], "request_malformed")

    def test_request_not_json(self):
        return self.refused([REQUEST + struct.pack("<I", 1) + b"{op"], "request_malformed")

    def test_request_not_an_object(self):
        return self.refused([REQUEST + struct.pack("<I", 1) + b'"data"'], "request_malformed")

    def test_request_without_a_feed(self):
        return self.refused([request_frame(1, {"op": "value", "engine": 5})], "request_malformed")

    def test_request_feed_not_an_integer(self):
        return self.refused([request_frame(1, {"op": "value", "feed": "7", "engine": 5, "args": []})], "request_malformed")

    def test_request_args_not_a_list(self):
        return self.refused([request_frame(1, {"op": "value", "feed": FEED, "engine": 5, "args": "x"})], "request_malformed")

    @defer.inlineCallbacks
    def test_a_well_formed_request_still_answers(self):
        """The checks refuse only malformed frames: a valid read on the same server works."""
        self.good.send(request_frame(4, {"op": "value", "feed": FEED, "engine": 5, "args": []}))
        answer = yield self.good.frame(len(self.good.frames) + 1)
        self.assertEqual(struct.unpack_from("<IB", answer, 1), (4, 1))
        self.assertEqual(json.loads(answer[6:]), [NOW, 1.0])  # the point the sender wrote in setUp
