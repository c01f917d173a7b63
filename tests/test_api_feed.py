"""feed/... routes over real HTTP against a real node (private Redis; SQLite and MariaDB)."""

from __future__ import annotations

import json
import os
import struct
import time
import zoneinfo
from datetime import datetime, timedelta

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support.node import NodeHarness, drain, pipeline

LIST_KEYS = {
    "id", "userid", "name", "datatype", "tag", "public", "size", "engine", "server", "unit", "interval",
    "time", "value", "disk_time", "disk_value",
}


class FeedApiMixin:
    database = "sqlite"

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, self.database)
        self.alice = yield self.register("alice")
        self.write, self.read = self.alice["apikey_write"], self.alice["apikey_read"]
        # an hour ago, on a 10 s slot: inside the storage window
        self.t0 = (int(time.time()) - 3600) // 60 * 60

    # -- helpers -------------------------------------------------------------

    @defer.inlineCallbacks
    def register(self, username, timezone="UTC"):
        answer = yield self.node.post(
            "user/register.json",
            data={"username": username, "password": "secret1", "email": f"{username}@example.org", "timezone": timezone},
        )
        self.assertEqual(answer.code, 200, answer)
        return answer.json()

    @defer.inlineCallbacks
    def create(self, apikey=None, **params):
        params.setdefault("name", "power")
        params.setdefault("engine", "5")
        if params["engine"] == "5":
            params.setdefault("options", '{"interval":10}')
        answer = yield self.node.get("feed/create.json", apikey=apikey or self.write, **params)
        self.assertEqual(answer.code, 200, answer)
        self.assertEqual(set(answer.json()), {"success", "feedid", "result"})
        return answer.json()["feedid"]

    @defer.inlineCallbacks
    def insert(self, feedid, t, value, apikey=None, route="feed/insert.json", **extra):
        answer = yield self.node.get(route, apikey=apikey or self.write, id=feedid, time=t, value=value, **extra)
        self.assertEqual(answer.code, 200, answer)
        return answer.json()

    def fina_path(self, feedid, suffix):
        return os.path.join(self.node.config.node.datadir, "phpfina", f"{feedid}{suffix}")

    def series_path(self, feedid):
        return os.path.join(self.node.config.node.datadir, "phptimeseries", f"feed_{feedid}.MYD")

    def assertError(self, answer, code, message=None):
        self.assertEqual(answer.code, code, answer)
        self.assertEqual(answer.content_type, "application/json")
        body = answer.json()
        self.assertIs(body["success"], False, answer)
        if message is not None:
            self.assertEqual(body["message"], message)

    # -- create and list -------------------------------------------------------

    @defer.inlineCallbacks
    def test_create_and_list(self):
        fina = yield self.create(name="power", tag="house", unit="W")
        series = yield self.create(name="kwhd", engine="2", datatype="2")
        slow = yield self.create(name="slow", options='{"interval":"3"}')  # a string, and below the minimum
        self.assertEqual(len({fina, series, slow}), 3)
        with open(self.fina_path(fina, ".meta"), "rb") as f:
            self.assertEqual(f.read(), struct.pack("<IIII", 0, 0, 10, 0))
        with open(self.fina_path(slow, ".meta"), "rb") as f:
            self.assertEqual(struct.unpack("<IIII", f.read())[2], 5)
        self.assertTrue(os.path.exists(self.series_path(series)))

        answer = yield self.node.get("feed/list.json", apikey=self.read)
        self.assertEqual((answer.code, answer.content_type), (200, "application/json"))
        listed = {item["id"]: item for item in answer.json()}
        self.assertEqual(set(listed), {str(fina), str(series), str(slow)})
        for item in listed.values():
            self.assertEqual(set(item), LIST_KEYS)
            for key in ("time", "value", "disk_time", "disk_value"):
                self.assertIsNone(item[key])
        self.assertEqual(
            {k: v for k, v in listed[str(fina)].items() if k not in ("time", "value", "disk_time", "disk_value")},
            {"id": str(fina), "userid": str(self.alice["userid"]), "name": "power", "datatype": "1", "tag": "house",
             "public": "0", "size": "16", "engine": "5", "server": "0", "unit": "W", "interval": "10"},
        )
        self.assertEqual(
            (listed[str(series)]["engine"], listed[str(series)]["datatype"], listed[str(series)]["size"], listed[str(series)]["interval"]),
            ("2", "2", "0", "0"),
        )
        self.assertEqual(listed[str(slow)]["interval"], "5")  # the effective interval is stored
        bare = yield self.node.get("feed/list", apikey=self.read)
        self.assertEqual(bare.json(), answer.json())
        own = yield self.node.get("feed/list.json", apikey=self.read, userid=self.alice["userid"])
        self.assertEqual(len(own.json()), 3)  # your own userid: every feed

        again = yield self.node.get("feed/create.json", apikey=self.write, name="power", tag="house", engine="5", options='{"interval":10}')
        self.assertError(again, 400, "feed already exists")

    @defer.inlineCallbacks
    def test_create_errors(self):
        cases = [
            ({"name": "bad/name"}, "invalid characters in feed name"),
            ({"name": "x" * 65}, "feed name must be 64 characters or less"),
            ({"tag": "bad;tag"}, "invalid characters in feed tag"),
            ({"engine": "0"}, "mysql feed engine is not available"),
            ({"engine": "6"}, "PHPFiwa feed engine is not available"),
            ({"engine": "9"}, "Engine id not valid"),
            ({"engine": "five"}, "Engine id not valid"),
            ({"datatype": "3"}, "missing datatype: 1: realtime, 2: daily"),
            ({"datatype": "x"}, "missing datatype: 1: realtime, 2: daily"),
            ({"options": "{not json"}, 'options must be a JSON object such as {"interval":10}'),
            ({"options": "{}"}, "interval must be an integer"),
            ({"options": '{"interval":"ten"}'}, "interval must be an integer"),
            ({"options": '{"interval":10.5}'}, "interval must be an integer"),
            ({"options": '{"interval":1e12}'}, "interval must be at most 31622400 seconds"),
            ({"server": "1"}, "server must be 0"),
            ({"server": "x"}, "server must be a number"),
            ({"unit": "u" * 17}, "unit must be 16 characters or less"),
        ]
        for extra, message in cases:
            params = {"name": "power", "engine": "5", "options": '{"interval":10}', **extra}
            answer = yield self.node.get("feed/create.json", apikey=self.write, **params)
            self.assertError(answer, 400, message)
        # deeply nested JSON (in a POST body: too long for a URL) is a 400, not a crash
        deep = yield self.node.post("feed/create.json", data={"apikey": self.write, "name": "p", "engine": "5", "options": "[" * 50000})
        self.assertError(deep, 400, 'options must be a JSON object such as {"interval":10}')
        missing = yield self.node.get("feed/create.json", apikey=self.write, name="power")
        self.assertError(missing, 400, "missing parameter: engine")
        huge = yield self.node.post("feed/create.json", data={"apikey": self.write, "name": "n" * 70000, "engine": "2"})
        self.assertEqual(huge.code, 413)
        listed = yield self.node.get("feed/list.json", apikey=self.write)
        self.assertEqual(listed.json(), [])  # nothing was created by any of these

    @defer.inlineCallbacks
    def test_engine_failure_removes_the_row(self):
        def fail(feed):
            return defer.fail(OSError("disk full"))

        self.patch(self.node.ctx.store, "create", fail)
        answer = yield self.node.get("feed/create.json", apikey=self.write, name="power", engine="5", options='{"interval":10}')
        self.assertError(answer, 500, "the feed engine could not create the feed")
        self.flushLoggedErrors(OSError)
        listed = yield self.node.get("feed/list.json", apikey=self.write)
        self.assertEqual(listed.json(), [])

    # -- PHPFina: write and read -------------------------------------------------

    @defer.inlineCallbacks
    def test_phpfina_insert_and_read(self):
        feed = yield self.create()
        t0 = self.t0
        for offset, value in ((0, 1.5), (10, 2.5), (20, 3.5), (40, 5.5)):
            answer = yield self.insert(feed, t0 + offset, value)
            self.assertEqual(answer, value)  # a JSON number
        yield drain(self.node)  # queued writes reach the files
        base = {"apikey": self.read, "id": feed, "start": t0 * 1000, "end": (t0 + 40) * 1000, "interval": 10}

        data = yield self.node.get("feed/data.json", **base)
        self.assertEqual(data.content_type, "application/json")
        # current emoncms: rows while t <= end, none past it; skipmissing is 0 by default
        self.assertEqual(
            data.json(),
            [[t0 * 1000, 1.5], [(t0 + 10) * 1000, 2.5], [(t0 + 20) * 1000, 3.5], [(t0 + 30) * 1000, None], [(t0 + 40) * 1000, 5.5]],
        )
        skipped = yield self.node.get("feed/data.json", skipmissing=1, **base)
        self.assertEqual([v for _, v in skipped.json()], [1.5, 2.5, 3.5, 5.5])
        alias = yield self.node.get("feed/datanew", **base)
        self.assertEqual(alias.json(), data.json())
        # limitinterval=1 raises a 5 s request to the feed's 10 s
        limited = yield self.node.get("feed/data.json", **{**base, "interval": 5, "end": (t0 + 10) * 1000, "limitinterval": 1})
        self.assertEqual(limited.json(), [[t0 * 1000, 1.5], [(t0 + 10) * 1000, 2.5]])
        unlimited = yield self.node.get("feed/data.json", **{**base, "interval": 5, "end": (t0 + 10) * 1000})
        # limitinterval 0 (the default): the slot each time falls in (floor): t0+5 → slot 0
        self.assertEqual([v for _, v in unlimited.json()], [1.5, 1.5, 2.5])

        average = yield self.node.get("feed/average.json", **{**base, "interval": 20})
        self.assertEqual(average.json(), [[t0 * 1000, 2.0], [(t0 + 20) * 1000, 3.5], [(t0 + 40) * 1000, 5.5]])

        value = yield self.node.get("feed/value.json", apikey=self.read, id=feed)
        self.assertEqual(value.body, b"5.5")  # a JSON number, as current emoncms
        timevalue = yield self.node.get("feed/timevalue.json", apikey=self.read, id=feed)
        self.assertEqual(timevalue.json(), {"time": t0 + 40, "value": 5.5, "disk_time": t0 + 40, "disk_value": 5.5})
        meta = yield self.node.get("feed/getmeta.json", apikey=self.read, id=feed)
        self.assertEqual(meta.json(), {"interval": 10, "start_time": t0, "npoints": 5, "end_time": t0 + 40})

        # a back-filled point is stored but does not replace the newer last value
        yield self.insert(feed, t0 + 30, 4.5)
        value = yield self.node.get("feed/value.json", apikey=self.read, id=feed)
        self.assertEqual(value.json(), 5.5)
        yield drain(self.node)
        full = yield self.node.get("feed/data.json", **base)
        self.assertEqual([v for _, v in full.json()], [1.5, 2.5, 3.5, 4.5, 5.5])

        listed = yield self.node.get("feed/list.json", apikey=self.read)
        (item,) = listed.json()
        self.assertEqual(
            (item["size"], item["time"], item["value"], item["disk_time"], item["disk_value"]),
            ("36", t0 + 40, 5.5, t0 + 40, 5.5),
        )
        aget = yield self.node.get("feed/aget.json", apikey=self.read, id=feed)
        self.assertEqual(aget.json(), item)
        field = yield self.node.get("feed/get.json", apikey=self.read, id=feed, field="name")
        self.assertEqual(field.json(), "power")
        field = yield self.node.get("feed/get.json", apikey=self.read, id=feed, field="interval")
        self.assertEqual(field.json(), "10")
        bad_field = yield self.node.get("feed/get.json", apikey=self.read, id=feed, field="password")
        self.assertError(bad_field, 400, "Invalid field")

        # export: the engine's file, byte for byte; from an offset, one slot early
        with open(self.fina_path(feed, ".dat"), "rb") as f:
            on_disk = f.read()
        self.assertEqual(len(on_disk), 20)
        export = yield self.node.get("feed/export.json", apikey=self.read, id=feed)
        self.assertEqual((export.code, export.body), (200, on_disk))
        self.assertEqual(export.content_type, "application/octet-stream")
        self.assertIn(b"attachment", export.headers.getRawHeaders(b"content-disposition")[0])
        tail = yield self.node.get("feed/export.json", apikey=self.read, id=feed, start=12)
        self.assertEqual(tail.body, on_disk[8:])

        # csvexport is data.json with csv=1 (current emoncms): every row, unix seconds, 2 decimals,
        # null where missing; t0-5 is before the first slot, t0+45 .. t0+95 after the last
        csv = yield self.node.get("feed/csvexport.json", apikey=self.read, id=feed, start=t0 - 5, end=t0 + 95, interval=10)
        self.assertEqual(csv.code, 200, csv)
        self.assertTrue(csv.content_type.startswith("text/csv"))
        values = ["null", "1.50", "2.50", "3.50", "4.50"] + ["null"] * 6
        self.assertEqual(csv.body.decode(), "".join(f"{t0 - 5 + 10 * i},{v}\n" for i, v in enumerate(values)))
        sparse = yield self.node.get("feed/csvexport.json", apikey=self.read, id=feed, start=t0 * 1000, end=(t0 + 40) * 1000, interval=20)
        self.assertEqual(sparse.body.decode(), f"{t0},1.50\n{t0 + 20},3.50\n{t0 + 40},5.50\n")  # ms accepted too

    @defer.inlineCallbacks
    def test_insert_join_update_and_defaults(self):
        feed = yield self.create()
        t0 = self.t0
        yield self.insert(feed, t0, 0)
        yield self.insert(feed, t0 + 40, 4, join=1)
        yield drain(self.node)
        data = yield self.node.get("feed/data.json", apikey=self.read, id=feed, start=t0 * 1000, end=(t0 + 40) * 1000, interval=10)
        self.assertEqual([v for _, v in data.json()], [0.0, 1.0, 2.0, 3.0, 4.0])  # the gap joined
        yield self.insert(feed, t0 + 20, 7.25, route="feed/update.json")
        yield drain(self.node)
        data = yield self.node.get("feed/data.json", apikey=self.read, id=feed, start=t0 * 1000, end=(t0 + 40) * 1000, interval=10)
        self.assertEqual([v for _, v in data.json()], [0.0, 1.0, 7.25, 3.0, 4.0])
        # no time: now
        before = int(time.time())
        answer = yield self.node.get("feed/insert.json", apikey=self.write, id=feed, value="12")
        self.assertEqual(answer.json(), 12.0)
        yield drain(self.node)
        timevalue = yield self.node.get("feed/timevalue.json", apikey=self.read, id=feed)
        self.assertGreaterEqual(timevalue.json()["time"], before)
        self.assertEqual(timevalue.json()["value"], 12.0)
        self.assertEqual(timevalue.json()["disk_value"], 12.0)

    # -- PHPTimeSeries -------------------------------------------------------

    @defer.inlineCallbacks
    def test_phptimeseries_insert_and_read(self):
        feed = yield self.create(name="meter", engine="2")
        t0 = self.t0
        for offset, value in ((5, 10), (65, 20), (125, 30)):
            yield self.insert(feed, t0 + offset, value)
        yield drain(self.node)
        data = yield self.node.get("feed/data.json", apikey=self.read, id=feed, start=t0 * 1000, end=(t0 + 120) * 1000, interval=60)
        # current emoncms: the first record at or after each row's time, before the next row's
        self.assertEqual(data.json(), [[t0 * 1000, 10.0], [(t0 + 60) * 1000, 20.0], [(t0 + 120) * 1000, 30.0]])
        meta = yield self.node.get("feed/getmeta.json", apikey=self.read, id=feed)
        self.assertEqual(meta.json(), {"start_time": t0 + 5, "end_time": t0 + 125, "npoints": 3})
        # average.json serves PHPTimeSeries too (current emoncms), with its rule: [t0, t0+60) stops one
        # before the first record past its end (#1 at t0+65) -> none; [t0+60, t0+120) -> #0; then #1, #2
        average = yield self.node.get("feed/average.json", apikey=self.read, id=feed, start=t0 * 1000, end=(t0 + 120) * 1000, interval=60)
        self.assertEqual(average.json(), [[t0 * 1000, None], [(t0 + 60) * 1000, 10.0], [(t0 + 120) * 1000, 25.0]])
        with open(self.series_path(feed), "rb") as f:
            on_disk = f.read()
        self.assertEqual(len(on_disk), 27)
        export = yield self.node.get("feed/export.json", apikey=self.read, id=feed)
        self.assertEqual(export.body, on_disk)
        tail = yield self.node.get("feed/export.json", apikey=self.read, id=feed, start=10)
        self.assertEqual(tail.body, on_disk[9:])
        csv = yield self.node.get("feed/csvexport.json", apikey=self.read, id=feed, start=t0, end=t0 + 120, interval=60)
        self.assertEqual(csv.body.decode(), f"{t0},10.00\n{t0 + 60},20.00\n{t0 + 120},30.00\n")
        listed = yield self.node.get("feed/list.json", apikey=self.read)
        (item,) = listed.json()
        self.assertEqual((item["size"], item["time"], item["value"], item["disk_time"], item["disk_value"]), ("27", t0 + 125, 30.0, t0 + 125, 30.0))

    @defer.inlineCallbacks
    def test_fetch(self):
        fina = yield self.create()
        empty = yield self.create(name="kwhd", engine="2")
        yield self.insert(fina, self.t0, 231.5)
        bob = yield self.register("bob")
        bobs = yield self.create(apikey=bob["apikey_write"])
        yield self.insert(bobs, self.t0, 1, apikey=bob["apikey_write"])
        answer = yield self.node.get("feed/fetch.json", apikey=self.read, ids=f"{fina},{empty},{bobs},999,abc")
        self.assertEqual(answer.json(), [231.5, None, False, False, False])
        anonymous = yield self.node.get("feed/fetch.json", ids=f"{fina}")
        self.assertEqual(anonymous.json(), [False])
        too_many = yield self.node.get("feed/fetch.json", apikey=self.read, ids=",".join(["1"] * 1001))
        self.assertError(too_many, 400)

    @defer.inlineCallbacks
    def test_value_falls_back_to_disk(self):
        feed = yield self.create()
        yield self.insert(feed, self.t0, 2.5)
        yield drain(self.node)
        yield defer.ensureDeferred(self.node.ctx.redis.call("DEL", f"feed:lastvalue:{feed}"))  # e.g. Redis emptied
        value = yield self.node.get("feed/value.json", apikey=self.read, id=feed)
        self.assertEqual(value.json(), 2.5)
        fetched = yield self.node.get("feed/fetch.json", apikey=self.read, ids=str(feed))
        self.assertEqual(fetched.json(), [2.5])
        timevalue = yield self.node.get("feed/timevalue.json", apikey=self.read, id=feed)
        self.assertEqual(timevalue.json(), {"time": self.t0, "value": 2.5, "disk_time": self.t0, "disk_value": 2.5})

    @defer.inlineCallbacks
    def test_stalled_writer_is_visible(self):
        """time/value say what was accepted, disk_time/disk_value what reached the files (emoncms #175)."""
        feed = yield self.create()
        yield self.insert(feed, self.t0, 1.25)
        yield drain(self.node)
        location = pipeline(self.node, "sender0").location
        apply_batch, gate, held = location.apply_batch, defer.Deferred(), []

        def stalled(batch):  # the storage sender's next batch waits for the gate
            held.append(batch)
            return gate.addCallback(lambda _: apply_batch(batch))

        self.patch(location, "apply_batch", stalled)
        yield self.insert(feed, self.t0 + 60, 2.5)  # accepted and queued; not applied
        for _ in range(500):  # until the sender holds it
            if held:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        timevalue = yield self.node.get("feed/timevalue.json", apikey=self.read, id=feed)
        self.assertEqual(timevalue.json(), {"time": self.t0 + 60, "value": 2.5, "disk_time": self.t0, "disk_value": 1.25})
        location.apply_batch = apply_batch
        gate.callback(None)
        yield drain(self.node)
        self.assertEqual(len(held), 1)
        listed = yield self.node.get("feed/list.json", apikey=self.read)
        (item,) = listed.json()
        self.assertEqual((item["time"], item["value"], item["disk_time"], item["disk_value"]), (self.t0 + 60, 2.5, self.t0 + 60, 2.5))

    # -- daily, weekly, monthly --------------------------------------------------

    @defer.inlineCallbacks
    def test_dmy_in_the_users_timezone(self):
        tokyo = zoneinfo.ZoneInfo("Asia/Tokyo")
        carol = yield self.register("carol", timezone="Asia/Tokyo")
        key = carol["apikey_write"]
        feed = yield self.create(apikey=key, options='{"interval":3600}')
        today = datetime.now(tokyo).date()
        days = [today - timedelta(days=n) for n in (3, 2, 1)]
        midnights = [int(datetime(d.year, d.month, d.day, tzinfo=tokyo).timestamp()) for d in days]
        for i, t in enumerate(midnights):
            yield self.insert(feed, t, i + 1, apikey=key)
            yield self.insert(feed, t + 3600, i + 11, apikey=key)
        yield drain(self.node)
        request = {"apikey": key, "id": feed, "start": (midnights[0] - 7200) * 1000, "end": (midnights[2] + 1) * 1000}
        daily = yield self.node.get("feed/data.json", mode="daily", **request)
        # Tokyo midnights (15:00 UTC), not UTC ones; from the midnight of start's day (the day before
        # the first, nothing stored yet) while <= end
        before = midnights[0] - 86400
        self.assertEqual(daily.json(), [[before * 1000, None]] + [[t * 1000, float(i + 1)] for i, t in enumerate(midnights)])
        averaged = yield self.node.get("feed/average.json", mode="daily", **request)
        self.assertEqual(
            averaged.json(), [[before * 1000, None]] + [[t * 1000, float(i + 1 + i + 11) / 2] for i, t in enumerate(midnights)]
        )
        monthly = yield self.node.get(
            "feed/data.json", apikey=key, id=feed, mode="monthly", start=(midnights[0] - 86400 * 70) * 1000, end=(midnights[2] + 86400 * 40) * 1000
        )
        firsts = [datetime.fromtimestamp(t / 1000, tokyo) for t, _ in monthly.json()]
        self.assertGreaterEqual(len(firsts), 2)
        self.assertTrue(all((d.day, d.hour, d.minute) == (1, 0, 0) for d in firsts), firsts)
        weekly = yield self.node.get(
            "feed/data.json", apikey=key, id=feed, mode="weekly", start=(midnights[0] - 86400 * 30) * 1000, end=(midnights[2] + 86400 * 30) * 1000
        )
        mondays = [datetime.fromtimestamp(t / 1000, tokyo) for t, _ in weekly.json()]
        self.assertGreaterEqual(len(mondays), 8)
        self.assertTrue(all((d.weekday(), d.hour) == (0, 0) for d in mondays), mondays)
        bad_mode = yield self.node.get("feed/data.json", mode="yearly", **request)
        self.assertError(bad_mode, 400, "Invalid interval")
        backwards = yield self.node.get("feed/data.json", apikey=key, id=feed, mode="daily", start=2000, end=1000)
        self.assertError(backwards, 400, "Request end time before start time")

    # -- set and delete ----------------------------------------------------------

    @defer.inlineCallbacks
    def test_set_and_delete(self):
        feed = yield self.create()
        other = yield self.create(name="other")
        yield self.insert(feed, self.t0, 1)
        yield drain(self.node)
        self.assertTrue(os.path.exists(self.fina_path(feed, ".dat")))
        fields = json.dumps({"name": "renamed", "tag": "t2", "public": 1, "unit": "kWh", "ignored": 5})
        answer = yield self.node.get("feed/set.json", apikey=self.write, id=feed, fields=fields)
        self.assertEqual(answer.json(), {"success": True, "message": "Field updated"})
        aget = yield self.node.get("feed/aget.json", apikey=self.read, id=feed)
        self.assertEqual(
            {k: aget.json()[k] for k in ("name", "tag", "public", "unit")}, {"name": "renamed", "tag": "t2", "public": "1", "unit": "kWh"}
        )
        for bad in ("{not json", "[1]", '{"unknown":1}', "[" * 50000):
            answer = yield self.node.post("feed/set.json", data={"apikey": self.write, "id": feed, "fields": bad})
            self.assertError(answer, 400, "Field could not be updated")
        answer = yield self.node.get("feed/set.json", apikey=self.write, id=feed, fields='{"name":"a/b"}')
        self.assertError(answer, 400, "invalid characters in feed name")
        answer = yield self.node.get("feed/set.json", apikey=self.write, id=other, fields='{"name":"renamed","tag":"t2"}')
        self.assertError(answer, 400, "fields tag:name must be unique")

        deleted = yield self.node.get("feed/delete.json", apikey=self.write, id=feed)
        self.assertEqual(deleted.json(), {"success": True, "message": "Feed removed successfully."})
        self.assertFalse(os.path.exists(self.fina_path(feed, ".dat")))
        self.assertFalse(os.path.exists(self.fina_path(feed, ".meta")))
        keys = yield defer.ensureDeferred(self.node.ctx.redis.call("EXISTS", f"feed:lastvalue:{feed}", f"feed:disk:{feed}"))
        self.assertEqual(int(keys), 0)
        listed = yield self.node.get("feed/list.json", apikey=self.read)
        self.assertEqual([item["id"] for item in listed.json()], [str(other)])
        gone = yield self.node.get("feed/aget.json", apikey=self.read, id=feed)
        self.assertError(gone, 400, "Feed does not exist")
        again = yield self.node.get("feed/delete.json", apikey=self.write, id=feed)
        self.assertError(again, 400, "Feed does not exist")
        late = yield self.node.get("feed/insert.json", apikey=self.write, id=feed, time=self.t0, value=1)
        self.assertError(late, 400, "Feed does not exist")

    # -- access --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_keys_and_write_access(self):
        feed = yield self.create()
        wrong = yield self.node.get("feed/list.json", apikey="0" * 32)
        self.assertEqual((wrong.code, wrong.body), (401, b"Invalid API key"))
        wrong_read = yield self.node.get("feed/data.json", apikey="f" * 32, id=feed, start=0, end=1000, interval=10)
        self.assertEqual(wrong_read.code, 401)
        anonymous = yield self.node.get("feed/list.json")
        self.assertError(anonymous, 401)
        for route, params in (
            ("feed/insert.json", {"id": feed, "time": self.t0, "value": 1}),
            ("feed/update.json", {"id": feed, "time": self.t0, "value": 1}),
            ("feed/create.json", {"name": "x", "engine": "2"}),
            ("feed/set.json", {"id": feed, "fields": '{"name":"x"}'}),
            ("feed/delete.json", {"id": feed}),
        ):
            answer = yield self.node.get(route, apikey=self.read, **params)
            self.assertError(answer, 403)
            nobody = yield self.node.get(route, **params)
            self.assertError(nobody, 401)
        value = yield self.node.get("feed/value.json", apikey=self.read, id=feed)
        self.assertIsNone(value.json())  # nothing was written by any of these
        bearer = yield self.node.request("GET", f"feed/aget.json?id={feed}", headers={"Authorization": "Bearer " + self.read})
        self.assertEqual(bearer.json()["id"], str(feed))

    @defer.inlineCallbacks
    def test_another_users_private_feed(self):
        feed = yield self.create()
        yield self.insert(feed, self.t0, 31337)
        bob = yield self.register("bob")
        reads = [
            ("feed/data.json", {"id": feed, "start": self.t0 * 1000, "end": (self.t0 + 60) * 1000, "interval": 10}),
            ("feed/average.json", {"id": feed, "start": self.t0 * 1000, "end": (self.t0 + 60) * 1000, "interval": 10}),
            ("feed/value.json", {"id": feed}),
            ("feed/timevalue.json", {"id": feed}),
            ("feed/get.json", {"id": feed, "field": "name"}),
            ("feed/aget.json", {"id": feed}),
            ("feed/getmeta.json", {"id": feed}),
            ("feed/export.json", {"id": feed}),
            ("feed/csvexport.json", {"id": feed, "start": self.t0, "end": self.t0 + 60, "interval": 10}),
        ]
        for route, params in reads:
            answer = yield self.node.get(route, apikey=bob["apikey_write"], **params)
            self.assertError(answer, 403, "Permission denied")
            self.assertNotIn(b"31337", answer.body)
            self.assertNotIn(b"power", answer.body)
            anonymous = yield self.node.get(route, **params)
            self.assertError(anonymous, 401)
        for route, params in (
            ("feed/insert.json", {"id": feed, "time": self.t0, "value": 1}),
            ("feed/set.json", {"id": feed, "fields": '{"public":1}'}),
            ("feed/delete.json", {"id": feed}),
        ):
            answer = yield self.node.get(route, apikey=bob["apikey_write"], **params)
            self.assertError(answer, 403, "Permission denied")
        fetched = yield self.node.get("feed/fetch.json", apikey=bob["apikey_write"], ids=str(feed))
        self.assertEqual(fetched.json(), [False])
        listed = yield self.node.get("feed/list.json", apikey=bob["apikey_write"], userid=self.alice["userid"])
        self.assertEqual(listed.json(), [])
        value = yield self.node.get("feed/value.json", apikey=self.read, id=feed)
        self.assertEqual(value.json(), 31337.0)  # still there, unchanged

    @defer.inlineCallbacks
    def test_public_feed_is_readable_without_key(self):
        public = yield self.create(name="shared")
        private = yield self.create(name="hidden")
        yield self.insert(public, self.t0, 42)
        yield self.node.get("feed/set.json", apikey=self.write, id=public, fields='{"public":true}')
        yield drain(self.node)
        data = yield self.node.get("feed/data.json", id=public, start=self.t0 * 1000, end=(self.t0 + 10) * 1000, interval=10)
        self.assertEqual(data.json(), [[self.t0 * 1000, 42.0], [(self.t0 + 10) * 1000, None]])
        value = yield self.node.get("feed/value.json", id=public)
        self.assertEqual(value.json(), 42.0)
        export = yield self.node.get("feed/export.json", id=public)
        self.assertEqual(export.code, 200)
        listed = yield self.node.get("feed/list.json", userid=self.alice["userid"])
        self.assertEqual([item["name"] for item in listed.json()], ["shared"])
        bob = yield self.register("bob")
        as_bob = yield self.node.get("feed/list.json", apikey=bob["apikey_read"], userid=self.alice["userid"])
        self.assertEqual([item["name"] for item in as_bob.json()], ["shared"])
        fetched = yield self.node.get("feed/fetch.json", ids=f"{public},{private}")
        self.assertEqual(fetched.json(), [42.0, False])
        write = yield self.node.get("feed/insert.json", apikey=bob["apikey_write"], id=public, time=self.t0, value=1)
        self.assertError(write, 403)  # public means readable, not writable

    # -- malformed and refused requests ----------------------------------------

    @defer.inlineCallbacks
    def test_malformed_parameters(self):
        feed = yield self.create()
        for bad_id in ("abc", "1.5", "-1", "1;DROP TABLE feeds", "", "٣"):
            answer = yield self.node.get("feed/value.json", apikey=self.read, id=bad_id)
            self.assertError(answer, 400)
        for unknown in ("999", "99999999999"):
            answer = yield self.node.get("feed/aget.json", apikey=self.read, id=unknown)
            self.assertError(answer, 400, "Feed does not exist")
        missing = yield self.node.get("feed/data.json", apikey=self.read, start=0, end=1000, interval=10)
        self.assertError(missing, 400, "no ids given")
        base = {"apikey": self.read, "id": feed}
        date_message = "must be a unix time (seconds or milliseconds) or a date such as 2021-12-01 10:00 or -1 week"
        cases = [
            ({"start": "abc", "end": 1000, "interval": 10}, "start " + date_message),
            ({"end": 1000, "interval": 10}, "missing start parameter"),
            ({"start": "1e400", "end": 1000, "interval": 10}, "start is out of range"),
            ({"start": 0, "end": "1e30", "interval": 10}, "end is out of range"),
            ({"start": 0, "end": 1000, "interval": "x"}, "Invalid interval"),
            ({"start": 0, "end": 1000, "interval": "inf"}, "Invalid interval"),
            ({"start": 0, "end": 300}, "Invalid interval"),  # round(300 / 800) = 0
            ({"start": 5000, "end": 1000, "interval": 10}, "Request end time before start time"),
            ({"start": 0, "end": 1000, "interval": 10, "timeformat": "1"}, "Invalid time format"),
            ({"start": 0, "end": 1000, "interval": 10, "timezone": "Mars/Olympus"}, "Invalid timezone"),
            ({"start": 0, "end": 20001, "interval": 1},
             "request datapoint limit reached (20000), increase request interval or reduce time range, requested datapoints = 20001"),
        ]
        for params, message in cases:
            answer = yield self.node.get("feed/data.json", **base, **params)
            self.assertError(answer, 400, message)
        for value in ("abc", "nan", "inf", "", "1e39"):
            answer = yield self.node.get("feed/insert.json", apikey=self.write, id=feed, time=self.t0, value=value)
            self.assertError(answer, 400)
        answer = yield self.node.get("feed/insert.json", apikey=self.write, id=feed, time="yesterday", value=1)
        self.assertError(answer, 400, "time must be a unix time in seconds")
        big = yield self.node.get("feed/csvexport.json", apikey=self.read, id=feed, start=1, end=2**31, interval=1)
        self.assertError(big, 400)
        self.assertIn("CSV download limit exceeded", big.json()["message"])
        export = yield self.node.get("feed/export.json", apikey=self.read, id=feed, start="x")
        self.assertError(export, 400)
        field = yield self.node.get("feed/get.json", apikey=self.read, id=feed)
        self.assertError(field, 400, "Missing field parameter")
        userid = yield self.node.get("feed/list.json", apikey=self.read, userid="me")
        self.assertError(userid, 400)

    @defer.inlineCallbacks
    def test_refused_datapoints_are_recorded(self):
        feed = yield self.create()
        old = int(time.time()) - 6 * 365 * 86400
        answer = yield self.node.get("feed/insert.json", apikey=self.write, id=feed, time=old, value=1)
        self.assertError(answer, 400, "time is older than the storage window (1825 days)")
        future = int(time.time()) + 3 * 86400
        answer = yield self.node.get("feed/insert.json", apikey=self.write, id=feed, time=future, value=1)
        self.assertError(answer, 400, "time is too far in the future (more than 48 hours ahead)")
        answer = yield self.node.get("feed/insert.json", apikey=self.write, id=feed, time=-5, value=1)
        self.assertError(answer, 400)
        refused = yield defer.ensureDeferred(self.node.ctx.refusals.for_user(self.alice["userid"]))
        self.assertEqual(refused["counts"], {"time_too_old": 2, "time_too_new": 1})
        self.assertEqual(refused["last"][1], {"time": future, "node": "", "input": f"feed:{feed}", "reason": "time_too_new"})
        value = yield self.node.get("feed/value.json", apikey=self.read, id=feed)
        self.assertIsNone(value.json())  # nothing accepted, no last value
        yield drain(self.node)
        meta = yield self.node.get("feed/getmeta.json", apikey=self.read, id=feed)
        self.assertEqual(meta.json()["npoints"], 0)


class FeedApiSQLiteTests(FeedApiMixin, unittest.TestCase):
    database = "sqlite"


class FeedApiMariaDBTests(FeedApiMixin, unittest.TestCase):
    database = "mysql"


class NoStorageNodeTests(unittest.TestCase):
    """A node hosting no storage and knowing no remote server (one that only accepts and
    consumes beside others) refuses a new feed with a clear message, not an error."""

    @defer.inlineCallbacks
    def test_create_refused(self):
        node = yield NodeHarness.start(self, "sqlite", node_config="storage = []\n")
        answer = yield node.post(
            "user/register.json", data={"username": "alice", "password": "secret1", "email": "alice@example.org"}
        )
        answer = yield node.get("feed/create.json", apikey=answer.json()["apikey_write"], name="power", engine="5",
                                options='{"interval":10}')
        self.assertEqual(answer.code, 400, answer)
        self.assertEqual(answer.json(), {"success": False, "message": "No storage server is configured for new feeds on this node"})
