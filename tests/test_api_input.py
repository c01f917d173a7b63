"""input/... management routes over real HTTP against a real node (private Redis; SQLite and MariaDB),
and the process table and process-list parser of emond.processlist."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial import unittest

from emond import processlist as process
from emond.engine import FeedError
from emond.errors import Invalid
from emond.processlist import (
    DAILY,
    FEEDID,
    MAX_STEPS,
    NONE,
    PROCESSES,
    REALTIME,
    VALUE,
    Owned,
    ProcessListError,
    Step,
    check_steps,
    format_processlist,
    parse_lenient,
    parse_processlist,
)
from emond.keys import user_version as user_version_key
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES
from emond.meta.refusals import Refused
from tests.support.node import NodeHarness

MSG_FORMAT = "Invalid process list format"
MSG_UNKNOWN = "This process does not exist"
MSG_DELETED = "This process is not supported on this server"
MSG_VALUE = "Argument must be a valid number greater or less than 0."
MSG_FEED = "Feed does not exist!"
MSG_INPUT = "Input does not exist!"
MSG_WRITTEN = "Feed is already being written to, select create new"


def wait(coroutine):
    return defer.ensureDeferred(coroutine)


class ProcessTableTests(unittest.TestCase):
    def test_every_org_id_is_in_the_table(self):
        self.assertEqual(sorted(PROCESSES), list(range(1, 35)))
        deleted = sorted(p.id for p in PROCESSES.values() if p.deleted)
        self.assertEqual(deleted, [7, 8, 9, 10, 13, 15, 16, 17, 18, 19, 20, 21, 23])
        writers = sorted(p.id for p in PROCESSES.values() if p.writes)
        self.assertEqual(writers, [1, 4, 5, 7, 8, 14, 15, 20, 21, 23, 27, 28, 34])
        for p in PROCESSES.values():
            if p.writes:
                self.assertEqual(p.argtype, FEEDID, p)
                self.assertIn(p.datatype, (REALTIME, DAILY), p)
                self.assertTrue(set(p.engines) <= {ENGINE_PHPFINA, ENGINE_PHPTIMESERIES} and p.engines, p)
            self.assertTrue(p.label and p.description and p.group, p)
        self.assertEqual(
            [(PROCESSES[i].function, PROCESSES[i].argtype) for i in (1, 2, 6, 24, 34)],
            [("log_to_feed", FEEDID), ("scale", VALUE), ("times_input", 1), ("allowpositive", NONE), ("wh_accumulator", FEEDID)],
        )
        self.assertEqual(PROCESSES[5].engines, (ENGINE_PHPTIMESERIES,))  # daily: one point per day

    def test_table_is_immutable(self):
        with self.assertRaises(TypeError):
            PROCESSES[99] = PROCESSES[1]  # type: ignore[index]
        with self.assertRaises(AttributeError):
            PROCESSES[1].label = "x"  # type: ignore[misc]


class ParseTests(unittest.TestCase):
    def assertRefused(self, text, message):
        with self.assertRaises(ProcessListError) as caught:
            parse_processlist(text)
        self.assertEqual(caught.exception.message, message, text)
        self.assertIsInstance(caught.exception, Invalid)  # answered 400 at the API's edge

    def test_parse_and_format(self):
        self.assertEqual(parse_processlist(""), [])
        steps = parse_processlist("1:5,2:0.1,24:,3:-2,26,process__offset:1e-3,8:7")
        self.assertEqual(steps, [Step(1, 5), Step(2, 0.1), Step(24, 0), Step(3, -2.0), Step(26, 0), Step(3, 0.001), Step(8, 7)])
        self.assertIsInstance(steps[0].arg, int)
        self.assertIsInstance(steps[1].arg, float)
        self.assertEqual(format_processlist(steps), "1:5,2:0.1,24:0,3:-2,26:0,3:0.001,8:7")
        self.assertEqual(format_processlist(parse_processlist("2:+5.0,3:.5,2:1E3,1:5,")), "2:5,3:0.5,2:1000,1:5")
        text = "1:1,2:0.1,3:-1.5,4:2,6:3,24:0,34:9"
        self.assertEqual(format_processlist(parse_processlist(text)), text)  # canonical text round-trips

    def test_refusals(self):
        for text in ("abc", "1:5:6", "x:1", "1;5"):
            self.assertRefused(text, MSG_FORMAT)
        for text in ("99:1", "0:1", "35:1", "-1:2", "process__nothing:1"):
            self.assertRefused(text, MSG_UNKNOWN)
        for text in ("2:", "2", "2:abc", "2:inf", "2:nan", "2:1e999", "2:0x10", "2:1_000", "3:1,2"):
            self.assertRefused(text, MSG_VALUE)
        for text in ("1:", "1:abc", "1:0", "1:-5", "1:1.5", "1:99999999999"):
            self.assertRefused(text, MSG_FEED)
        self.assertRefused("6:x", MSG_INPUT)

    def test_lenient_parse_keeps_what_parses(self):
        self.assertEqual(parse_lenient("1:5,junk,2:abc,99:1,3:1"), [Step(1, 5), Step(3, 1.0)])
        self.assertEqual(parse_lenient(None), [])


class CheckTests(unittest.TestCase):
    owned = Owned(feeds=frozenset({5, 6, 7}), inputs=frozenset({1, 2}), writers={7: 2})

    def assertRefused(self, steps, message, previous=()):
        with self.assertRaises(ProcessListError) as caught:
            check_steps(steps, self.owned, previous)
        self.assertEqual(caught.exception.message, message)

    def test_rules(self):
        check_steps([Step(1, 5), Step(2, 2.0), Step(6, 2), Step(29, 7), Step(4, 6)], self.owned)
        self.assertRefused([Step(1, 8)], MSG_FEED)  # not the user's feed
        self.assertRefused([Step(29, 8)], MSG_FEED)  # reading a feed needs it too
        self.assertRefused([Step(6, 3)], MSG_INPUT)
        self.assertRefused([Step(8, 5)], MSG_DELETED)
        self.assertRefused([Step(1, 7)], MSG_WRITTEN)  # input 2 writes feed 7
        self.assertRefused([Step(1, 5), Step(4, 5)], MSG_WRITTEN)  # twice in one list
        self.assertRefused([Step(2, 1.0)] * (MAX_STEPS + 1), process.MSG_TOO_MANY)
        check_steps([Step(2, 1.0)] * MAX_STEPS, self.owned)

    def test_kept_steps_are_not_judged_again(self):
        legacy = [Step(8, 9), Step(1, 7), Step(2, 1.0)]  # deleted process, foreign writer, unknown feed
        check_steps([Step(2, 1.0), Step(8, 9), Step(1, 7)], self.owned, legacy)  # moved: fine
        check_steps([Step(8, 9)], self.owned, legacy)  # deleted steps: fine
        self.assertRefused([Step(8, 9), Step(8, 9)], MSG_DELETED, legacy)  # a second copy is new
        long = [Step(2, 1.0)] * 60
        check_steps(long[:-1], self.owned, long)  # shrinking a too long list is allowed
        self.assertRefused(long + [Step(3, 1.0)], process.MSG_TOO_MANY, long)


class InputApiMixin:
    database = "sqlite"

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, self.database)
        self.ctx = self.node.ctx
        self.alice = yield self.register("alice")
        self.bob = yield self.register("bob")
        self.key = self.alice["apikey_write"]
        self.uid = self.alice["userid"]

    @defer.inlineCallbacks
    def register(self, username):
        answer = yield self.node.post(
            "user/register.json", data={"username": username, "password": "secret1", "email": f"{username}@example.org"}
        )
        self.assertEqual(answer.code, 200, answer)
        return answer.json()

    def make_input(self, userid, node, name):
        return wait(self.ctx.inputs.create(userid, node, name))

    @defer.inlineCallbacks
    def make_feed(self, userid, name, engine=ENGINE_PHPFINA):
        feed = yield wait(self.ctx.feeds.create(userid, name, "test", 1, engine, 10, self.ctx.config.feeds.default_server))
        yield wait(self.ctx.store.create(feed))
        return feed.id

    def set_last(self, inputid, when, value):
        return wait(self.ctx.redis.call("HSET", f"input:lastvalue:{inputid}", "time", str(when), "value", str(value)))

    def stored(self, inputid):
        return wait(self.ctx.inputs.get(inputid)).addCallback(lambda i: i.processlist if i else None)

    def version(self):
        return wait(self.ctx.redis.call("GET", user_version_key(self.uid))).addCallback(lambda v: int(v or 0))

    def set_list(self, inputid, text, key=None):
        return self.node.post("input/process/set.json", data={"processlist": text}, apikey=key or self.key, inputid=inputid)

    @defer.inlineCallbacks
    def assertFails(self, answer_d, message, code=400):
        answer = yield answer_d
        self.assertEqual((answer.code, answer.content_type), (code, "application/json"), answer)
        self.assertEqual(answer.json(), {"success": False, "message": message})

    # -- reads --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_list_and_get_forms(self):
        p1 = yield self.make_input(self.uid, "emontx", "power1")
        p2 = yield self.make_input(self.uid, "emontx", "power2")
        t1 = yield self.make_input(self.uid, "10", "1")
        yield self.make_input(self.bob["userid"], "emontx", "power1")  # never shown to alice
        yield self.set_last(p1.id, 1700000000, 12.5)
        yield self.set_last(t1.id, 1700000005, "nan")  # not a number: null
        yield wait(self.ctx.inputs.set_description(p2, "kitchen"))
        answer = yield self.node.get("input/list.json", apikey=self.key)
        self.assertEqual(answer.content_type, "application/json")
        self.assertEqual(answer.json(), [
            {"id": str(p1.id), "nodeid": "emontx", "name": "power1", "description": "", "processList": "", "time": 1700000000, "value": 12.5},
            {"id": str(p2.id), "nodeid": "emontx", "name": "power2", "description": "kitchen", "processList": "", "time": None, "value": None},
            {"id": str(t1.id), "nodeid": "10", "name": "1", "description": "", "processList": "", "time": 1700000005, "value": None},
        ])
        bare = yield self.node.get("input/list", apikey=self.key)
        self.assertEqual(bare.json(), answer.json())

        everything = yield self.node.get("input/get.json", apikey=self.key)
        emontx = {
            "power1": {"time": 1700000000, "value": 12.5, "processList": ""},
            "power2": {"time": None, "value": None, "processList": ""},
        }
        self.assertEqual(everything.json(), {"emontx": emontx, "10": {"1": {"time": 1700000005, "value": None, "processList": ""}}})
        for path, params in (("input/get/emontx", {}), ("input/get.json", {"node": "emontx"}), ("input/get", {"node": "emontx"})):
            answer = yield self.node.get(path, apikey=self.key, **params)
            self.assertEqual((answer.code, answer.json()), (200, emontx), path)
        for path, params in (("input/get/emontx/power1", {}), ("input/get/emontx/power1.json", {}), ("input/get", {"node": "emontx", "name": "power1"})):
            answer = yield self.node.get(path, apikey=self.key, **params)
            self.assertEqual(answer.json(), {"time": 1700000000, "value": 12.5, "processList": ""}, path)
        for path, params, message in (
            ("input/get/nothing", {}, "Node does not exist"),
            ("input/get/nothing/power1", {}, "Node does not exist"),
            ("input/get/emontx/nothing", {}, "Node variable does not exist"),
            ("input/get.json", {"node": "emontx", "name": "power9"}, "Node variable does not exist"),
        ):
            answer = yield self.node.get(path, apikey=self.key, **params)
            self.assertEqual((answer.code, answer.content_type, answer.json()), (400, "application/json", message), path)

        getinputs = yield self.node.get("input/getinputs", apikey=self.key)
        self.assertEqual(getinputs.json(), {
            "emontx": {"power1": {"id": str(p1.id), "processList": ""}, "power2": {"id": str(p2.id), "processList": ""}},
            "10": {"1": {"id": str(t1.id), "processList": ""}},
        })

    @defer.inlineCallbacks
    def test_get_subaction_is_url_decoded(self):
        spaced = yield self.make_input(self.uid, "my node", "a b")
        yield self.set_last(spaced.id, 1700000000, 1)
        answer = yield self.node.get("input/get/my%20node/a%20b", apikey=self.key)
        self.assertEqual(answer.json(), {"time": 1700000000, "value": 1.0, "processList": ""})

    @defer.inlineCallbacks
    def test_getallprocesses(self):
        answer = yield self.node.get("input/getallprocesses.json", apikey=self.alice["apikey_read"])
        table = answer.json()
        self.assertEqual(sorted(table, key=int), [str(i) for i in range(1, 35)])
        self.assertEqual(
            {k: table["1"][k] for k in ("id_num", "name", "function", "argtype", "group", "engines", "writes", "deleted")},
            {"id_num": 1, "name": "Log to feed", "function": "log_to_feed", "argtype": 2, "group": "Main",
             "engines": [ENGINE_PHPFINA, ENGINE_PHPTIMESERIES], "writes": True, "deleted": False},
        )
        self.assertEqual((table["2"]["argtype"], table["2"]["writes"]), (0, False))
        self.assertEqual(sorted(int(k) for k, v in table.items() if v["deleted"]), [7, 8, 9, 10, 13, 15, 16, 17, 18, 19, 20, 21, 23])
        self.assertTrue(all(v["group"] == "Deleted" for v in table.values() if v["deleted"]))
        self.assertTrue(all(isinstance(v["description"], str) and v["description"] for v in table.values()))

    @defer.inlineCallbacks
    def test_rejected(self):
        yield wait(self.ctx.refusals.record(self.uid, [
            Refused(1700000000, "emontx", "power1", "time_too_old"),
            Refused(1700000001, "emontx", "power2", "time_too_old"),
            Refused(1700000002, "99", "x", "node_limit"),
        ]))
        answer = yield self.node.get("input/rejected.json", apikey=self.alice["apikey_read"])
        body = answer.json()
        self.assertEqual(body["counts"], {"time_too_old": 2, "node_limit": 1})
        self.assertEqual(len(body["last"]), 3)
        self.assertIn({"time": 1700000002, "node": "99", "input": "x", "reason": "node_limit"}, body["last"])
        other = yield self.node.get("input/rejected", apikey=self.bob["apikey_write"])
        self.assertEqual(other.json(), {"counts": {}, "last": []})

    # -- description and deletion -------------------------------------------------------

    @defer.inlineCallbacks
    def test_set_description(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        answer = yield self.node.get("input/set.json", apikey=self.key, inputid=inp.id, fields='{"description":"Solar PV"}')
        self.assertEqual(answer.json(), {"success": True, "message": "Field updated"})
        listed = yield self.node.get("input/list.json", apikey=self.key)
        self.assertEqual(listed.json()[0]["description"], "Solar PV")
        bad = [
            ('{"description":"<script>"}', "invalid characters in input description"),
            ('{"description":["x"]}', "invalid characters in input description"),
            ('{"description":"' + "x" * 300 + '"}', "description must be 255 characters or less"),
            ('{"other":1}', "Field could not be updated"),
            ("{not json", "Invalid fields, expected a JSON object"),
            ("[1]", "Invalid fields, expected a JSON object"),
            ("[" * 20000, "Invalid fields, expected a JSON object"),  # too deep to decode: still a 400
        ]
        for fields, message in bad:
            yield self.assertFails(self.node.post("input/set", data={"fields": fields}, apikey=self.key, inputid=inp.id), message)
        listed = yield self.node.get("input/list.json", apikey=self.key)
        self.assertEqual(listed.json()[0]["description"], "Solar PV")
        bobs = yield self.make_input(self.bob["userid"], "n", "x")
        yield self.assertFails(self.node.get("input/set.json", apikey=self.key, inputid=bobs.id, fields='{"description":"mine"}'), "Input does not exist")
        self.assertEqual((yield wait(self.ctx.inputs.get(bobs.id))).description, "")

    @defer.inlineCallbacks
    def test_delete_one_and_many(self):
        a = yield self.make_input(self.uid, "n", "a")
        b = yield self.make_input(self.uid, "n", "b")
        c = yield self.make_input(self.uid, "n", "c")
        bobs = yield self.make_input(self.bob["userid"], "n", "a")
        for inp in (a, b, c, bobs):
            yield self.set_last(inp.id, 1700000000, 1)
        before = yield self.version()
        one = yield self.node.get("input/delete.json", apikey=self.key, inputid=a.id)
        self.assertEqual(one.json(), {"success": True, "message": "Input deleted"})
        self.assertGreater((yield self.version()), before)
        self.assertIsNone((yield wait(self.ctx.inputs.get(a.id))))
        self.assertEqual((yield wait(self.ctx.redis.call("EXISTS", f"input:lastvalue:{a.id}"))), 0)
        yield self.assertFails(self.node.get("input/delete.json", apikey=self.key, inputid=bobs.id), "Input does not exist")
        many = yield self.node.get("input/delete", apikey=self.key, inputids=json.dumps([b.id, str(c.id), bobs.id]))
        self.assertEqual(many.json(), {"success": True, "message": "Inputs deleted", "deleted": 2})
        listed = yield self.node.get("input/list.json", apikey=self.key)
        self.assertEqual(listed.json(), [])
        self.assertIsNotNone((yield wait(self.ctx.inputs.get(bobs.id))))  # not alice's: untouched
        self.assertEqual((yield wait(self.ctx.redis.call("EXISTS", f"input:lastvalue:{bobs.id}"))), 1)
        for inputids in ("[1,", '{"a":1}', '["x"]', "[true]", "[1.5]", "[-1]", "[" * 20000, json.dumps(list(range(1, 1200)))):
            answer = yield self.node.post("input/delete.json", data={"inputids": inputids}, apikey=self.key)
            self.assertEqual((answer.code, answer.json()["success"]), (400, False), inputids[:20])
        missing = yield self.node.get("input/delete.json", apikey=self.key)
        self.assertEqual(missing.code, 400)

    # -- process lists, current form ----------------------------------------------------

    @defer.inlineCallbacks
    def test_process_set_get_reset(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        other = yield self.make_input(self.uid, "emontx", "power2")
        feed = yield self.make_feed(self.uid, "power1")
        kwh = yield self.make_feed(self.uid, "kwh1")
        before = yield self.version()
        answer = yield self.set_list(inp.id, f"1:{feed},2:0.1,24:,process__power_to_kwh:{kwh},11:{other.id},3:+2.50")
        self.assertEqual((answer.code, answer.json()), (200, {"success": True, "message": "Input processlist updated"}))
        self.assertGreater((yield self.version()), before)  # input consumers reload the list
        expected = f"1:{feed},2:0.1,24:0,4:{kwh},11:{other.id},3:2.5"
        got = yield self.node.get("input/process/get.json", apikey=self.alice["apikey_read"], inputid=inp.id)
        self.assertEqual(got.json(), expected)
        bare = yield self.node.get("input/process/get", apikey=self.key, inputid=inp.id)
        self.assertEqual(bare.json(), expected)
        listed = yield self.node.get("input/list.json", apikey=self.key)
        self.assertEqual(listed.json()[0]["processList"], expected)
        # setting the same list again keeps the input's own feeds
        again = yield self.set_list(inp.id, f"1:{feed},4:{kwh}")
        self.assertEqual(again.code, 200, again)
        cleared = yield self.set_list(inp.id, "")
        self.assertEqual(cleared.code, 200)
        self.assertEqual((yield self.stored(inp.id)), "")
        yield self.set_list(inp.id, f"1:{feed}")
        reset = yield self.node.get("input/process/reset.json", apikey=self.key, inputid=inp.id)
        self.assertEqual(reset.json(), {"success": True, "message": "Input processlist updated"})
        self.assertEqual((yield self.stored(inp.id)), "")
        # once free, the feed can be written by another input
        moved = yield self.set_list(other.id, f"1:{feed}")
        self.assertEqual(moved.code, 200, moved)

    @defer.inlineCallbacks
    def test_process_set_refusals(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        writer = yield self.make_input(self.uid, "emontx", "power2")
        feed = yield self.make_feed(self.uid, "power1")
        spare = yield self.make_feed(self.uid, "spare")
        bobs_feed = yield self.make_feed(self.bob["userid"], "bobs")
        bobs_input = yield self.make_input(self.bob["userid"], "n", "x")
        ok = yield self.set_list(writer.id, f"1:{feed}")
        self.assertEqual(ok.code, 200, ok)
        yield self.set_list(inp.id, "2:3")
        cases = [
            ("99:1", MSG_UNKNOWN),
            (f"2:1,8:{spare}", MSG_DELETED),
            (",".join(["2:1"] * 51), process.MSG_TOO_MANY),
            ("2:abc", MSG_VALUE),
            ("2:", MSG_VALUE),
            ("3:1e999", MSG_VALUE),
            (f"1:{bobs_feed}", MSG_FEED),
            ("1:999999", MSG_FEED),
            (f"29:{bobs_feed}", MSG_FEED),
            (f"6:{bobs_input.id}", MSG_INPUT),
            (f"1:{feed}", MSG_WRITTEN),  # written by the other input
            (f"4:{feed}", MSG_WRITTEN),
            (f"1:{spare},14:{spare}", MSG_WRITTEN),  # twice in one list
            ("1:5:6", MSG_FORMAT),
            ("hello", MSG_FORMAT),
        ]
        for text, message in cases:
            yield self.assertFails(self.set_list(inp.id, text), message)
            self.assertEqual((yield self.stored(inp.id)), "2:3", text)  # unchanged
        allowed = yield self.set_list(inp.id, f"29:{feed},1:{spare}")  # reading a written feed is fine
        self.assertEqual(allowed.code, 200, allowed)
        missing = yield self.node.post("input/process/set.json", data={}, apikey=self.key, inputid=inp.id)
        self.assertEqual(missing.code, 400)
        self.assertEqual((yield self.stored(inp.id)), f"29:{feed},1:{spare}")
        yield self.assertFails(self.set_list(bobs_input.id, "2:1"), "Input does not exist")
        self.assertEqual((yield self.stored(bobs_input.id)), "")

    @defer.inlineCallbacks
    def test_legacy_deleted_steps_are_kept(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        kwhd = yield self.make_feed(self.uid, "kwhd", ENGINE_PHPTIMESERIES)
        other = yield self.make_feed(self.uid, "other", ENGINE_PHPTIMESERIES)
        legacy = f"8:{kwhd},2:2"  # written on emoncms.org before id 8 was withdrawn
        yield wait(self.ctx.db.execute("UPDATE inputs SET processList = ? WHERE id = ?", legacy, inp.id))
        kept = yield self.set_list(inp.id, f"2:3,8:{kwhd}")
        self.assertEqual(kept.code, 200, kept)
        yield self.assertFails(self.set_list(inp.id, f"2:3,8:{kwhd},8:{other}"), MSG_DELETED)
        moved = yield self.node.get("input/process/move.json", apikey=self.key, inputid=inp.id, processid=2, moveby=-1)
        self.assertEqual(moved.code, 200, moved)
        self.assertEqual((yield self.stored(inp.id)), f"8:{kwhd},2:3")
        # the feed of a kept deleted writer is still taken
        second = yield self.make_input(self.uid, "emontx", "power2")
        yield self.assertFails(self.set_list(second.id, f"1:{kwhd}"), MSG_WRITTEN)

    @defer.inlineCallbacks
    def test_validate_processlist_on_its_own(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        feed = yield self.make_feed(self.uid, "power1")
        steps = yield wait(self.ctx.inputs.validate_processlist(self.uid, inp.id, f"1:{feed},2:2"))
        self.assertEqual(steps, [Step(1, feed), Step(2, 2.0)])
        self.assertEqual((yield self.stored(inp.id)), "")  # nothing written
        with self.assertRaises(Invalid) as caught:
            yield wait(self.ctx.inputs.validate_processlist(self.bob["userid"], inp.id, "2:2"))
        self.assertEqual(caught.exception.message, "Input does not exist")  # not bob's input
        with self.assertRaises(ProcessListError) as caught:
            yield wait(self.ctx.inputs.validate_processlist(self.uid, inp.id, "8:1"))
        self.assertEqual(caught.exception.message, MSG_DELETED)

    @defer.inlineCallbacks
    def test_forget_feed(self):
        a = yield self.make_input(self.uid, "emontx", "power1")
        b = yield self.make_input(self.uid, "emontx", "power2")
        bobs = yield self.make_input(self.bob["userid"], "n", "x")
        feed = yield self.make_feed(self.uid, "power1")
        kept = yield self.make_feed(self.uid, "kept")
        yield wait(self.ctx.db.execute("UPDATE inputs SET processList = ? WHERE id = ?", f"1:{feed},2:{feed},29:{feed},1:{kept}", a.id))
        yield wait(self.ctx.db.execute("UPDATE inputs SET processList = ? WHERE id = ?", f"6:{feed},junk", b.id))
        yield wait(self.ctx.db.execute("UPDATE inputs SET processList = ? WHERE id = ?", f"1:{feed}", bobs.id))
        before = yield self.version()
        changed = yield wait(self.ctx.inputs.forget_feed(self.uid, feed))
        self.assertEqual(changed, 1)
        self.assertEqual((yield self.stored(a.id)), f"2:{feed},1:{kept}")  # a scale by the same number stays
        self.assertEqual((yield self.stored(b.id)), f"6:{feed},junk")  # an input id, and junk, stay
        self.assertEqual((yield self.stored(bobs.id)), f"1:{feed}")  # another user's lists are not looked at
        self.assertGreater((yield self.version()), before)

    # -- process lists, emoncms.org form -----------------------------------------------

    @defer.inlineCallbacks
    def test_org_add_list_delete_move_reset(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        second = yield self.make_input(self.uid, "emontx", "power2")
        feed = yield self.make_feed(self.uid, "power1")

        def add(processid, arg=None, inputid=inp.id):
            params = {"inputid": inputid, "processid": processid}
            if arg is not None:
                params["arg"] = arg
            return self.node.get("input/process/add.json", apikey=self.key, **params)

        answer = yield add(1, feed)
        self.assertEqual(answer.json(), {"success": True, "message": "Process added"})
        yield add(2, "0.5")
        yield add(24)
        listed = yield self.node.get("input/process/list.json", apikey=self.key, inputid=inp.id)
        self.assertEqual(listed.json(), f"1:{feed},2:0.5,24:0")
        yield self.assertFails(add(4, feed), MSG_WRITTEN)  # this input writes it already
        yield self.assertFails(add(1, feed, second.id), MSG_WRITTEN)  # and no other input may
        yield self.assertFails(add(2, ""), MSG_VALUE)
        yield self.assertFails(add(2), MSG_VALUE)
        yield self.assertFails(add(8, feed), MSG_DELETED)
        yield self.assertFails(add(77, 1), MSG_UNKNOWN)
        yield self.assertFails(add("", 1), MSG_UNKNOWN)
        yield self.assertFails(add(6, 999999), MSG_INPUT)
        self.assertEqual((yield self.stored(inp.id)), f"1:{feed},2:0.5,24:0")

        moved = yield self.node.get("input/process/move.json", apikey=self.key, inputid=inp.id, processid=2, moveby=-1)
        self.assertEqual(moved.json(), {"success": True, "message": "Process moved"})
        self.assertEqual((yield self.stored(inp.id)), f"2:0.5,1:{feed},24:0")
        yield self.node.get("input/process/move", apikey=self.key, inputid=inp.id, processid=3, moveby=1)  # clamped
        self.assertEqual((yield self.stored(inp.id)), f"2:0.5,1:{feed},24:0")
        for params in ({"processid": 4, "moveby": 1}, {"processid": 1, "moveby": 2}, {"processid": 1, "moveby": "x"}, {"processid": 0, "moveby": 1}):
            answer = yield self.node.get("input/process/move.json", apikey=self.key, inputid=inp.id, **params)
            self.assertEqual(answer.code, 400, params)

        deleted = yield self.node.get("input/process/delete.json", apikey=self.key, inputid=inp.id, processid=1)
        self.assertEqual(deleted.json(), {"success": True, "message": "Process deleted"})
        self.assertEqual((yield self.stored(inp.id)), f"1:{feed},24:0")
        for processid in (0, 3, -1, "x", ""):
            answer = yield self.node.get("input/process/delete.json", apikey=self.key, inputid=inp.id, processid=processid)
            self.assertEqual(answer.code, 400, processid)
        self.assertEqual((yield self.stored(inp.id)), f"1:{feed},24:0")

        reset = yield self.node.get("input/process/reset", apikey=self.key, inputid=inp.id)
        self.assertEqual(reset.code, 200)
        self.assertEqual((yield self.stored(inp.id)), "")
        for _ in range(MAX_STEPS):
            yield add(2, 1)
        yield self.assertFails(add(2, 1), process.MSG_TOO_MANY)

    @defer.inlineCallbacks
    def test_org_add_creates_the_feed(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        answer = yield self.node.get("input/process/add.json", apikey=self.key, inputid=inp.id, processid=1, arg=0, newfeedname="power1")
        body = answer.json()
        self.assertEqual((body["success"], body["message"]), (True, "Process added"), answer)
        feed = yield wait(self.ctx.feeds.get(body["feedid"]))
        self.assertEqual((feed.userid, feed.name, feed.tag, feed.engine, feed.interval, feed.datatype), (self.uid, "power1", "emontx", ENGINE_PHPFINA, 10, 1))
        meta = yield wait(self.ctx.store.meta(feed))
        self.assertEqual(meta.interval, 10)  # the file exists on its storage server
        daily = yield self.node.get("input/process/add.json", apikey=self.key, inputid=inp.id, processid=5, newfeedname="kwhd", newfeedinterval=3600)
        kwhd = yield wait(self.ctx.feeds.get(daily.json()["feedid"]))
        self.assertEqual((kwhd.engine, kwhd.datatype), (ENGINE_PHPTIMESERIES, 2))
        slow = yield self.node.get("input/process/add.json", apikey=self.key, inputid=inp.id, processid=4, newfeedname="kwh", newfeedinterval=60, engine=5, newfeedtag="energy")
        kwh = yield wait(self.ctx.feeds.get(slow.json()["feedid"]))
        self.assertEqual((kwh.engine, kwh.interval, kwh.tag), (ENGINE_PHPFINA, 60, "energy"))
        self.assertEqual((yield self.stored(inp.id)), f"1:{feed.id},5:{kwhd.id},4:{kwh.id}")

        before = yield wait(self.ctx.feeds.list(self.uid))
        refusals = [
            ({"processid": 5, "newfeedname": "x", "engine": 5}, "This process cannot write to a feed of this engine"),
            ({"processid": 1, "newfeedname": "x", "engine": 0}, "mysql feed engine is not available"),
            ({"processid": 1, "newfeedname": "x", "engine": "abc"}, "Engine id not valid"),
            ({"processid": 2, "newfeedname": "x"}, "This process does not write to a feed"),
            ({"processid": 8, "newfeedname": "x"}, MSG_DELETED),
            ({"processid": 1, "newfeedname": "x", "newfeedinterval": "ten"}, None),
            ({"processid": 1, "newfeedname": "x", "newfeedinterval": 0}, None),
            ({"processid": 1, "newfeedname": "bad<name>"}, "invalid characters in feed name"),
            ({"processid": 1, "newfeedname": "power1"}, "feed already exists"),
        ]
        for params, message in refusals:
            answer = yield self.node.get("input/process/add.json", apikey=self.key, inputid=inp.id, **params)
            self.assertEqual((answer.code, answer.json()["success"]), (400, False), params)
            if message:
                self.assertEqual(answer.json()["message"], message, params)
        after = yield wait(self.ctx.feeds.list(self.uid))
        self.assertEqual(len(after), len(before))  # no feed left behind by a refusal
        self.assertEqual((yield self.stored(inp.id)), f"1:{feed.id},5:{kwhd.id},4:{kwh.id}")

    @defer.inlineCallbacks
    def test_org_add_leaves_no_feed_behind(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")

        async def broken_engine(feed):
            raise FeedError("disk full")

        self.patch(self.ctx.store, "create", broken_engine)
        answer = yield self.node.get("input/process/add.json", apikey=self.key, inputid=inp.id, processid=1, newfeedname="a")
        self.assertEqual((answer.code, answer.json()), (500, {"success": False, "message": "the feed engine could not create the feed"}))
        self.assertEqual((yield wait(self.ctx.feeds.list(self.uid))), [])
        self.patch(self.ctx.store, "create", type(self.ctx.store).create.__get__(self.ctx.store))
        deleted_files = []
        real_delete = self.ctx.store.delete

        async def delete(feed):
            deleted_files.append(feed.id)
            await real_delete(feed)

        async def refused(userid, inputid, change):
            raise ProcessListError(MSG_WRITTEN)  # as if a concurrent change took the list first

        self.patch(self.ctx.store, "delete", delete)
        self.patch(self.ctx.inputs, "change_processlist", refused)
        answer = yield self.node.get("input/process/add.json", apikey=self.key, inputid=inp.id, processid=1, newfeedname="b")
        self.assertEqual((answer.code, answer.json()["message"]), (400, MSG_WRITTEN))
        self.assertEqual((yield wait(self.ctx.feeds.list(self.uid))), [])
        self.assertEqual(len(deleted_files), 1)  # its file too

    @defer.inlineCallbacks
    def test_concurrent_changes_are_serialised(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        others = []
        for i in range(6):
            other = yield self.make_input(self.uid, "emontx", f"p{i}")
            others.append(other)
        feed = yield self.make_feed(self.uid, "shared")
        adds = [self.node.get("input/process/add.json", apikey=self.key, inputid=inp.id, processid=2, arg=i + 1) for i in range(8)]
        answers = yield defer.gatherResults(adds)
        self.assertEqual([a.code for a in answers], [200] * 8)
        stored = yield self.stored(inp.id)
        self.assertEqual(sorted(stored.split(",")), sorted(f"2:{i + 1}" for i in range(8)))  # none lost
        sets = [self.set_list(other.id, f"1:{feed}") for other in others]
        answers = yield defer.gatherResults(sets)
        self.assertEqual(sorted(a.code for a in answers), [200] + [400] * 5)  # exactly one writer

    # -- access and malformed requests --------------------------------------------------

    @defer.inlineCallbacks
    def test_access(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        bad = yield self.node.get("input/list.json", apikey="0" * 32)
        self.assertEqual((bad.code, bad.body), (401, b"Invalid API key"))
        anonymous = yield self.node.get("input/get.json")
        self.assertEqual(anonymous.code, 401)
        read = self.alice["apikey_read"]
        for path in ("input/list.json", "input/get.json", "input/getinputs.json", "input/process/get.json", "input/process/list.json", "input/rejected.json"):
            answer = yield self.node.get(path, apikey=read, inputid=inp.id)
            self.assertEqual(answer.code, 200, path)
        writes = ("input/process/set.json", "input/process/reset.json", "input/process/add.json", "input/process/delete.json",
                  "input/process/move.json", "input/set.json", "input/delete.json")
        for path in writes:
            answer = yield self.node.post(path, data={"processlist": "2:2"}, apikey=read, inputid=inp.id, processid=2, arg=1, fields='{"description":"x"}')
            self.assertEqual(answer.code, 403, path)
        self.assertEqual((yield self.stored(inp.id)), "")
        self.assertIsNotNone((yield wait(self.ctx.inputs.get(inp.id))))
        bearer = yield self.node.request("GET", f"input/process/get.json?inputid={inp.id}", headers={"Authorization": "Bearer " + self.key})
        self.assertEqual(bearer.code, 200)
        other = yield self.node.get("input/process/get.json", apikey=self.bob["apikey_write"], inputid=inp.id)
        self.assertEqual((other.code, other.json()), (400, {"success": False, "message": "Input does not exist"}))

    @defer.inlineCallbacks
    def test_malformed_parameters(self):
        inp = yield self.make_input(self.uid, "emontx", "power1")
        for inputid in ("abc", "99999999999999999999", "-1", "0", "1.5", "1e3", "9" * 1000):
            for path in ("input/process/get.json", "input/process/set.json", "input/set.json", "input/process/add.json"):
                answer = yield self.node.get(path, apikey=self.key, inputid=inputid, processlist="2:1", processid=2, arg=1)
                self.assertEqual((answer.code, answer.json()), (400, {"success": False, "message": "Input does not exist"}), (path, inputid))
        missing = yield self.node.get("input/process/get.json", apikey=self.key)
        self.assertEqual(missing.code, 400)
        huge = ",".join(["2:1"] * 15000)  # under the parameter limit, far over 50 steps
        yield self.assertFails(self.set_list(inp.id, huge), process.MSG_TOO_MANY)
        oversized = yield self.set_list(inp.id, "2:1," * 20000)
        self.assertEqual(oversized.code, 413)
        for text in ("\x00", "1:\u0665", "\u0661:1", "2:" + "9" * 5000, "2:1e99999", ":", ",,,:"):
            answer = yield self.set_list(inp.id, text)
            self.assertEqual((answer.code, answer.json()["success"]), (400, False), text[:20])
        for arg in ("1e99999", "9" * 400, "\x00"):
            answer = yield self.node.get("input/process/add.json", apikey=self.key, inputid=inp.id, processid=2, arg=arg)
            self.assertEqual(answer.code, 400, arg[:20])
        self.assertEqual((yield self.stored(inp.id)), "")
        unknown = yield self.node.get("input/process/nothing.json", apikey=self.key)
        self.assertEqual(unknown.code, 404)


class InputApiSQLiteTests(InputApiMixin, unittest.TestCase):
    database = "sqlite"


class InputApiMariaDBTests(InputApiMixin, unittest.TestCase):
    database = "mysql"
