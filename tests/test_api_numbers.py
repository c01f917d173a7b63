"""Numbers, flags, JSON parameters and process lists over real HTTP: each hostile form found
answering 500 (or read as a number emoncms would not take) now gets a clear 400, and nothing
is changed by the refused request.

emoncms reads API numbers with PHP's ``is_numeric`` (ASCII digits, an optional point and
exponent) and ``(int)``; JSON with ``json_decode`` (NaN and Infinity are not JSON; a number
beyond a double is INF, which no field can hold). Python's ``int()``/``float()`` also take
``"١٢"``, ``"１２"``, ``"1_000"``, ``"inf"`` and huge integers: those are refused here.
"""

from __future__ import annotations

import json
import time

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.node import NodeHarness, drain

HUGE = "9" * 400  # beyond a double: OverflowError when Python made a float or an int of it
DEEP = "[" * 20000 + "]" * 20000  # RecursionError in a recursive decoder


class ApiNumberTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, "sqlite")
        answer = yield self.node.post("user/register.json", data={"username": "dev", "password": "secret1", "email": "d@example.org"})
        self.key = answer.json()["apikey_write"]
        created = yield self.node.get("feed/create.json", apikey=self.key, name="power", engine="5", options='{"interval":10}')
        self.feed = created.json()["feedid"]
        self.t0 = (int(time.time()) - 3600) // 10 * 10

    def call(self, path, **params):
        """POST with every parameter in a form body (long values do not fit a URL)."""
        return self.node.request("POST", path, params={"apikey": self.key}, data={k: str(v) for k, v in params.items()})

    @defer.inlineCallbacks
    def assertRefused(self, answer_d, message):
        answer = yield answer_d
        self.assertEqual((answer.code, answer.content_type), (400, "application/json"), answer)
        self.assertEqual(answer.json(), {"success": False, "message": message})

    @defer.inlineCallbacks
    def public(self):
        answer = yield self.node.get("feed/aget.json", apikey=self.key, id=self.feed)
        return str(answer.json()["public"])  # "0"/"1" or 0/1, as emoncms types it

    # -- flags -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_infinite_flags_are_refused(self):
        window = dict(id=self.feed, start=self.t0 * 1000, end=(self.t0 + 100) * 1000, interval=10)
        # feed/data.json reads its switches as current emoncms does, PHP's (int) cast (reads
        # follow current emoncms): "inf", "Infinity", "1e999" are 0, i.e. off; never a 500.
        off = yield self.call("feed/data.json", **window, skipmissing="0", limitinterval="0")
        self.assertEqual(off.code, 200, off)
        for name, value in (("skipmissing", "inf"), ("limitinterval", "Infinity"), ("skipmissing", "-inf"), ("skipmissing", "1e999")):
            answer = yield self.call("feed/data.json", **window, **{name: value})
            self.assertEqual((answer.code, answer.json()), (200, off.json()), (name, value))
        answer = yield self.call("feed/average.json", **window, skipmissing="-Infinity")
        self.assertEqual(answer.code, 200, answer)
        yield self.assertRefused(self.call("feed/insert.json", id=self.feed, time=self.t0, value=1, join="Infinity"), "join must be 0 or 1")
        # nothing was inserted by the refused request
        timevalue = yield self.node.get("feed/timevalue.json", apikey=self.key, id=self.feed)
        self.assertIsNone(timevalue.json()["time"])
        # the numbers emoncms's (int) reads still work: 0 is off, 1 and 0.5 (→ 0) as PHP
        answer = yield self.call("feed/data.json", **window, skipmissing="0", limitinterval="1")
        self.assertEqual(answer.code, 200, answer)

    @defer.inlineCallbacks
    def test_rememberme_inf_after_the_password_is_refused_without_a_session(self):
        answer = yield self.node.post("user/login.json", data={"username": "dev", "password": "secret1", "rememberme": "inf"})
        self.assertEqual(answer.code, 400, answer)
        self.assertEqual(answer.json(), {"success": False, "message": "rememberme must be 0 or 1"})
        self.assertEqual(answer.headers.getRawHeaders(b"set-cookie"), None)
        answer = yield self.node.post("user/login.json", data={"username": "dev", "password": "secret1", "rememberme": "1"})
        self.assertEqual(answer.code, 200, answer)

    # -- JSON fields and options -------------------------------------------------------

    @defer.inlineCallbacks
    def test_feed_set_public_must_be_a_finite_number(self):
        for fields in ('{"public": Infinity}', '{"public": -Infinity}', '{"public": NaN}', '{"public": 1e400}', '{"public": ' + HUGE + "}"):
            yield self.assertRefused(self.call("feed/set.json", id=self.feed, fields=fields), "Field could not be updated")
        for fields in ('{"public": "inf"}', '{"public": "١"}', '{"public": "1_0"}', '{"public": [1]}'):
            yield self.assertRefused(self.call("feed/set.json", id=self.feed, fields=fields), "public must be 0 or 1")
        self.assertEqual((yield self.public()), "0")  # unchanged
        # emoncms: (int) of the value, any nonzero is public; a numeric string as well
        for fields, public in (('{"public": 2}', "1"), ('{"public": 0.5}', "0"), ('{"public": "1"}', "1"), ('{"public": false}', "0")):
            answer = yield self.call("feed/set.json", id=self.feed, fields=fields)
            self.assertEqual(answer.code, 200, answer)
            self.assertEqual((yield self.public()), public, fields)

    @defer.inlineCallbacks
    def test_feed_create_interval_must_be_a_plain_number(self):
        message = 'options must be a JSON object such as {"interval":10}'
        yield self.assertRefused(self.call("feed/create.json", name="a", engine="5", options='{"interval": ' + HUGE + "}"), message)
        yield self.assertRefused(self.call("feed/create.json", name="b", engine="5", options='{"interval": Infinity}'), message)
        for interval in ('"١٠"', '"１０"', '"1_0"', '"inf"'):
            yield self.assertRefused(
                self.call("feed/create.json", name="c", engine="5", options='{"interval": %s}' % interval), "interval must be an integer"
            )
        listed = yield self.node.get("feed/list.json", apikey=self.key)
        self.assertEqual([f["name"] for f in listed.json()], ["power"])  # no feed was made
        answer = yield self.call("feed/create.json", name="d", engine="5", options='{"interval": " 60 "}')
        self.assertEqual(answer.code, 200, answer)  # is_numeric takes surrounding whitespace

    @defer.inlineCallbacks
    def test_deeply_nested_json_parameters_are_refused(self):
        inputs = yield self.make_input()
        cases = [
            ("feed/set.json", dict(id=self.feed, fields=DEEP), "Field could not be updated"),
            ("feed/create.json", dict(name="x", engine="5", options=DEEP), 'options must be a JSON object such as {"interval":10}'),
            ("input/set.json", dict(inputid=inputs, fields=DEEP), "Invalid fields, expected a JSON object"),
            ("input/delete.json", dict(inputids=DEEP), "inputids must be a JSON array of input ids"),
            ("user/set.json", dict(data=DEEP), "Invalid data, expected a JSON object"),
            ("input/process/set.json", dict(inputid=inputs, processlist=DEEP), "Invalid process list format"),
            ("input/process/set.json", dict(inputid=inputs, processlist='[{"fn": "1", "args": ' + DEEP + "}]"), "Invalid process list format"),
        ]
        for path, params, message in cases:
            yield self.assertRefused(self.call(path, **params), message)

    @defer.inlineCallbacks
    def test_input_json_parameters_refuse_numbers_beyond_a_double(self):
        inputs = yield self.make_input()
        yield self.assertRefused(self.call("input/set.json", inputid=inputs, fields='{"description": ' + HUGE + "}"), "Invalid fields, expected a JSON object")
        yield self.assertRefused(self.call("input/delete.json", inputids="[" + HUGE + "]"), "inputids must be a JSON array of input ids")
        yield self.assertRefused(self.call("input/delete.json", inputids="[1e400]"), "inputids must be a JSON array of input ids")
        listed = yield self.node.get("input/list.json", apikey=self.key)
        self.assertEqual([(i["id"], i["description"]) for i in listed.json()], [(str(inputs), "")])

    # -- numbers -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_non_ascii_digits_and_underscores_are_not_numbers(self):
        window = dict(id=self.feed, start=self.t0 * 1000, end=(self.t0 + 100) * 1000, interval=10)
        for name, value in (("interval", "١٢"), ("interval", "１２"), ("end", "1_000_000"), ("start", "٣")):
            answer = yield self.call("feed/data.json", **{**window, name: value})
            self.assertEqual(answer.code, 400, (name, value, answer))
        yield self.assertRefused(self.call("feed/insert.json", id=self.feed, time=self.t0, value="٣"), "Value must be numeric")
        yield self.assertRefused(self.call("feed/insert.json", id=self.feed, time=self.t0, value="1_0"), "Value must be numeric")
        yield self.assertRefused(
            self.call("feed/insert.json", id=self.feed, time="١٧٠٠٠٠٠٠٠٠", value=1), "time must be a unix time in seconds"
        )
        timevalue = yield self.node.get("feed/timevalue.json", apikey=self.key, id=self.feed)
        self.assertIsNone(timevalue.json()["time"])  # nothing was stored
        inputs = yield self.make_input()
        value = "Argument must be a valid number greater or less than 0."
        for processlist in ("2:٣", "2:１２", "2:1_000", "2:inf", "2:" + HUGE, "2:1e400"):
            yield self.assertRefused(self.call("input/process/set.json", inputid=inputs, processlist=processlist), value)
        yield self.assertRefused(self.call("input/process/add.json", inputid=inputs, processid="2", arg="1_000"), value)
        got = yield self.node.get("input/process/get.json", apikey=self.key, inputid=inputs)
        self.assertEqual(got.json(), "")

    @defer.inlineCallbacks
    def test_huge_whole_numbers_are_refused(self):
        for start in ("9" * 30, "1e300", HUGE):
            yield self.assertRefused(self.call("feed/export.json", id=self.feed, start=start), "start must be a byte offset")

    # -- process lists in current emoncms's JSON form ----------------------------------------

    @defer.inlineCallbacks
    def test_json_process_list(self):
        inputs = yield self.make_input()
        text = json.dumps([{"fn": "process__log_to_feed", "args": [self.feed]}, {"fn": "process__scale", "args": ["0.1"]},
                           {"fn": "24", "args": []}, {"fn": 3, "args": [-2.5]}])
        answer = yield self.call("input/process/set.json", inputid=inputs, processlist=text)
        self.assertEqual(answer.json(), {"success": True, "message": "Input processlist updated"})
        got = yield self.node.get("input/process/get.json", apikey=self.key, inputid=inputs)
        self.assertEqual(got.json(), f"1:{self.feed},2:0.1,24:0,3:-2.5")
        # emoncms's messages for the JSON form
        for processlist, message in (
            ("[1]", "Missing process key in process list at index 0"),
            ('[{"fn": "process__scale"}]', "Invalid or missing args in process list at index 0"),
            ('[{"fn": "process__scale", "args": [1, 2]}]', "Invalid number of arguments for process: process__scale"),
            ('[{"fn": "process__nothing", "args": [1]}]', "This process does not exist"),
            ('[{"fn": "process__scale", "args": [Infinity]}]', "Invalid process list format"),
            ('[{"fn": "process__scale", "args": [true]}]', "Argument must be a valid number greater or less than 0."),
            ('[{"fn": "process__log_to_feed", "args": [' + HUGE + "]}]", "Invalid process list format"),
        ):
            yield self.assertRefused(self.call("input/process/set.json", inputid=inputs, processlist=processlist), message)
        got = yield self.node.get("input/process/get.json", apikey=self.key, inputid=inputs)
        self.assertEqual(got.json(), f"1:{self.feed},2:0.1,24:0,3:-2.5")  # unchanged by the refusals

    @defer.inlineCallbacks
    def make_input(self):
        answer = yield self.node.post("input/post.json", apikey=self.key, node="n", csv="1")
        self.assertEqual(answer.body, b"ok")
        yield drain(self.node)
        listed = yield self.node.get("input/list.json", apikey=self.key)
        return int(listed.json()[0]["id"])
