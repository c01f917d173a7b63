"""The web UI in a real browser (issue 15): Debian's Chromium, headless, driven by Selenium,
against a real node in the test's reactor (private Redis, SQLite).

Log in through the form (back to the page asked for), use /account (keys, timezone,
password) and log out; watch an input appear on /inputs after a post and give it a process
list with a feed made inline; rename, retag, publish and delete feeds on /feeds; see /graph
draw a feed's data (the canvas's pixels in the series' colour, where the data says they
should be), add a second feed, read a value by hovering, zoom by a mouse drag, average, a
preset. No page may log an error to the browser console. The tests take the screenshots of
docs/screenshots/ (login, inputs with the editor open, feeds, graph, account; a 1280x800
viewport).

A fresh browser per test (trial has no class-level tear-down to quit a shared one).
Selenium calls block, so each runs in the browser's thread (tests/support/browser.py); the
tests wait on DOM states, never for a time.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.browser import Browser
from tests.support.node import NodeHarness, drain

# emoncms's process ids (the process list format is the interface): 1 log to feed, 2 scale (x), 3 offset (+)
LOG_TO_FEED, SCALE, OFFSET = 1, 2, 3
PHPFINA = 5

# The series' pixels in every canvas of #graph: those within 40 of the legend swatch's colour
# (RGB) and at least a quarter opaque; their x extent, and their mean height at the left and
# right 30 % of that extent (canvas pixels, y down).
CANVAS_PIXELS = """
const swatch = document.querySelectorAll("#legend .legend-swatch")[arguments[0]];
if (!swatch) return {error: "no legend swatch"};
const colour = getComputedStyle(swatch).backgroundColor.match(/[0-9.]+/g).slice(0, 3).map(Number);
const out = {colour, canvases: []};
for (const canvas of document.querySelectorAll("#graph canvas")) {
  const {width, height} = canvas;
  if (!width || !height) continue;
  const data = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  const hits = [];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 4;
      if (data[i + 3] < 64) continue;
      const d = Math.abs(data[i] - colour[0]) + Math.abs(data[i + 1] - colour[1]) + Math.abs(data[i + 2] - colour[2]);
      if (d <= 40) hits.push([x, y]);
    }
  }
  const rect = canvas.getBoundingClientRect();
  const entry = {width, height, left: rect.left, top: rect.top, count: hits.length};
  if (hits.length) {
    const xs = hits.map((h) => h[0]);
    const minx = Math.min(...xs), maxx = Math.max(...xs);
    const span = maxx - minx;
    const mean = (pts) => pts.length ? pts.reduce((s, p) => s + p[1], 0) / pts.length : null;
    Object.assign(entry, {
      minx, maxx,
      left_y: mean(hits.filter((h) => h[0] <= minx + 0.3 * span)),
      right_y: mean(hits.filter((h) => h[0] >= maxx - 0.3 * span)),
    });
  }
  out.canvases.push(entry);
}
return out;
"""


def path_of(driver: Any) -> str:
    return urlsplit(driver.current_url).path


def query_of(driver: Any) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(driver.current_url).query).items()}


class BrowserTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        # a browser per test (about 1 s to start): trial has no class-level set-up and tear-down
        self.browser = yield Browser.start()
        self.addCleanup(self.browser.quit)
        self.node = yield NodeHarness.start(self, "sqlite")
        self.base = self.node.base.rstrip("/")
        answer = yield self.node.post("user/register.json", data={"username": "alice", "password": "secret1", "email": "alice@example.org"})
        self.assertEqual(answer.code, 200, answer)
        self.key = answer.json()["apikey_write"]
        self.addCleanup(self.browser.run, lambda d: d.get("about:blank"))  # no page polls the node as it stops

    # -- helpers ------------------------------------------------------------------------

    def act(self, action):
        return self.browser.run(action)

    def wait(self, condition, what, timeout=20.0):
        return self.browser.wait(condition, what, timeout)

    def css(self, selector):
        return lambda d: d.find_elements("css selector", selector)

    # read in one script: a page that redraws between two WebDriver calls leaves no stale element
    def visible(self, selector):
        return lambda d: d.execute_script(
            "return [...document.querySelectorAll(arguments[0])].some((e) => e.offsetParent !== null || e.getClientRects().length > 0)", selector)

    def text_of(self, selector, expected):
        return lambda d: expected in (d.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", selector) or "")

    @defer.inlineCallbacks
    def assertConsoleClean(self, page):
        errors = yield self.browser.console_errors()
        self.assertEqual(errors, [], f"the browser console of {page} has errors")

    @defer.inlineCallbacks
    def api(self, path, **params):
        answer = yield self.node.post(path, data={"apikey": self.key, **params})
        self.assertEqual(answer.code, 200, (path, answer))
        return answer.json()

    @defer.inlineCallbacks
    def log_in(self, password="secret1", page="/inputs"):
        """Through the form of /, as a person does; fires on /inputs. ``page``: another page
        asked for first, which sends to the form and, once logged in, back to it."""
        yield self.act(lambda d: d.get(self.base + ("/" if page == "/inputs" else page)))
        yield self.wait(lambda d: path_of(d) == "/" and d.find_elements("id", "login-form"), "the login form")

        def fill(d):
            d.find_element("id", "login-username").send_keys("alice")
            d.find_element("id", "login-password").send_keys(password)
            d.find_element("id", "login").click()

        yield self.act(fill)
        yield self.wait(lambda d: path_of(d) == urlsplit(page).path, f"{page} after logging in")

    def goto(self, page):
        return self.act(lambda d: d.get(self.base + page))

    @defer.inlineCallbacks
    def pixels(self, series=0):
        """The pixels of the ``series``-th feed in the graph's canvases (CANVAS_PIXELS), of the
        canvas that has most."""
        found = yield self.act(lambda d: d.execute_script(CANVAS_PIXELS, series))
        self.assertNotIn("error", found, found)
        colour = found["colour"]
        self.assertGreater(max(colour) - min(colour), 60, f"the series colour {colour} is grey: it would match the axes")
        canvases = [c for c in found["canvases"] if c["count"]]
        self.assertTrue(canvases, f"no pixel of the series colour {colour} in any canvas of #graph: {found['canvases']}")
        return {**max(canvases, key=lambda c: c["count"]), "colour": colour}

    # -- log in, log out ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_log_in_through_the_form_and_log_out(self):
        yield self.goto("/")
        yield self.wait(self.css("#login-form"), "the login form")
        yield self.assertConsoleClean("/")
        yield self.browser.screenshot("login")

        # a wrong password: the form again, with the reason
        yield self.act(lambda d: (d.find_element("id", "login-username").send_keys("alice"),
                                  d.find_element("id", "login-password").send_keys("wrong!1"),
                                  d.find_element("id", "login").click()))
        yield self.wait(self.text_of(".error", "Incorrect username or password"), "the refusal of a wrong password")
        self.assertEqual((yield self.act(path_of)), "/")
        # the page answers 400, as user/login does, and Chromium logs any 4xx page as a console
        # error ("Failed to load resource"): that one, and nothing else
        errors = yield self.browser.console_errors()
        self.assertTrue(all(e.startswith(self.base + "/ ") and "status of 400" in e for e in errors), errors)

        yield self.log_in()
        yield self.wait(self.text_of("#username", "alice"), "the user's name in the bar")
        yield self.wait(lambda d: d.get_cookie("emond_session"), "the session cookie")
        cookie = yield self.act(lambda d: d.get_cookie("emond_session"))
        self.assertTrue(cookie["httpOnly"], cookie)
        self.assertEqual(cookie["sameSite"], "Strict", cookie)
        script_sees = yield self.act(lambda d: d.execute_script("return document.cookie"))
        self.assertNotIn("emond_session", script_sees)
        yield self.assertConsoleClean("/inputs")
        # logged in, / is the inputs page
        yield self.goto("/")
        yield self.wait(lambda d: path_of(d) == "/inputs", "/ redirecting a session to /inputs")
        yield self.assertConsoleClean("/inputs")

        # /account: who, the keys (masked until Show), a new read key, the timezone, the password
        yield self.goto("/account")
        yield self.wait(self.text_of("#account-email", "alice@example.org"), "the account's email on /account")
        self.assertEqual((yield self.act(lambda d: d.find_element("id", "account-username").text)), "alice")
        page_text = yield self.act(lambda d: d.find_element("tag name", "body").text)
        self.assertNotIn(self.key, page_text)  # masked
        yield self.assertConsoleClean("/account")
        yield self.browser.screenshot("account")
        write_box = 'div.apikey[data-key="write"]'
        yield self.act(lambda d: d.find_element("css selector", write_box + " button.show-key").click())
        yield self.wait(self.text_of("#apikey-write", self.key), "the write key shown")
        before = yield self.api("user/get.json")
        read_box = 'div.apikey[data-key="read"]'
        yield self.act(lambda d: d.find_element("css selector", read_box + " button.regenerate-key").click())
        yield self.wait(self.visible(read_box + " button.confirm-regenerate"), "the question before a new read key")
        yield self.act(lambda d: d.find_element("css selector", read_box + " button.confirm-regenerate").click())
        yield self.wait(lambda d: len(d.find_element("id", "apikey-read").text) == 32
                        and d.find_element("id", "apikey-read").text != before["apikey_read"], "the new read key shown")
        shown = yield self.act(lambda d: d.find_element("id", "apikey-read").text)
        after = yield self.api("user/get.json")
        self.assertEqual(after["apikey_read"], shown)
        self.assertEqual(after["apikey_write"], self.key)  # the other key is untouched

        def timezone(d):
            from selenium.webdriver.support.ui import Select
            Select(d.find_element("id", "timezone")).select_by_value("Europe/Paris")
            d.find_element("id", "save-timezone").click()

        yield self.act(timezone)
        yield self.wait(self.text_of("#timezone-message", "Europe/Paris"), "the timezone saved")
        self.assertEqual((yield self.api("user/get.json"))["timezone"], "Europe/Paris")

        def password(d):
            d.find_element("id", "old-password").send_keys("secret1")
            d.find_element("id", "new-password").send_keys("another2")
            d.find_element("id", "repeat-password").send_keys("another2")
            d.find_element("id", "change-password").click()

        yield self.act(password)
        yield self.wait(self.text_of("#password-message", "Password changed"), "the password changed (after the page's reload)")
        self.assertEqual((yield self.act(path_of)), "/account")  # still logged in, with the new session
        yield self.wait(self.text_of("#account-username", "alice"), "the account reloaded")
        yield self.assertConsoleClean("/account")

        yield self.act(lambda d: d.find_element("id", "logout").click())
        yield self.wait(lambda d: path_of(d) == "/" and d.find_elements("id", "login-form"), "the login page after logging out")
        yield self.assertConsoleClean("/ after logout")
        yield self.goto("/inputs")
        yield self.wait(lambda d: path_of(d) == "/" and d.find_elements("id", "login-form"), "/inputs redirecting to / once logged out")
        yield self.assertConsoleClean("/inputs logged out")
        me = yield self.node.get("user/get.json", apikey=self.key)
        self.assertEqual(me.code, 200)  # logging out ends the session, not the account's keys
        # the new password lets in, back to the page asked for
        feedid = (yield self.api("feed/create.json", name="power", tag="house", engine=str(PHPFINA), options='{"interval":10}'))["feedid"]
        asked = {"feeds": str(feedid), "start": str(10**9), "end": str(10**9 + 3600)}
        yield self.log_in("another2", page=f"/graph?feeds={feedid}&start={10**9}&end={10**9 + 3600}")
        self.assertEqual((yield self.act(query_of)), asked)
        yield self.wait(lambda d: d.execute_script("return document.body.dataset.graphState") == "drawn", "the graph asked for")
        yield self.wait(self.visible("#graph-empty"), "the graph saying there is no data in that hour")
        yield self.assertConsoleClean("/graph after logging in")

    # -- inputs and the process-list editor ---------------------------------------------

    @defer.inlineCallbacks
    def test_inputs_appear_and_get_a_process_list_with_a_new_feed(self):
        yield self.log_in()
        yield self.wait(self.visible("#no-inputs"), "the page saying there is no input yet")
        yield self.assertConsoleClean("/inputs")

        # a device posts: the open page shows the input (its live refresh, no reload)
        answer = yield self.node.post("input/post.json", apikey=self.key, node="house", fulljson=json.dumps({"power": 250.5}))
        self.assertEqual(answer.code, 200, answer)
        row = 'div.input[data-node="house"][data-input="power"]'
        yield self.wait(self.text_of(row + " .input-value", "250.5"), "the posted input on /inputs", timeout=30)
        inputid = yield self.act(lambda d: d.find_element("css selector", row).get_attribute("data-inputid"))
        listed = yield self.node.get("input/list.json", apikey=self.key)
        self.assertEqual([(i["id"], i["nodeid"], i["name"]) for i in listed.json()], [(inputid, "house", "power")])
        yield self.assertConsoleClean("/inputs")

        # the editor: log to a feed made inline, then a scale, moved before it; a step added and removed
        editor = f'div.process-editor[data-inputid="{inputid}"]'
        yield self.act(lambda d: d.find_element("css selector", row + " button.open-processes").click())
        yield self.wait(self.css(editor + " select.feed-select"), "the editor's feed choice")

        def new_feed(d):
            from selenium.webdriver.support.ui import Select
            e = d.find_element("css selector", editor)
            Select(e.find_element("css selector", "select.process-select")).select_by_value(str(LOG_TO_FEED))
            Select(e.find_element("css selector", "select.feed-select")).select_by_value("new")
            name = e.find_element("css selector", "input.new-feed-name")
            name.clear()
            name.send_keys("house power")
            tag = e.find_element("css selector", "input.new-feed-tag")
            tag.clear()
            tag.send_keys("house")
            Select(e.find_element("css selector", "select.new-feed-engine")).select_by_value(str(PHPFINA))
            Select(e.find_element("css selector", "select.new-feed-interval")).select_by_value("10")

        yield self.act(new_feed)
        yield self.wait(self.visible(editor + " input.new-feed-name"), "the inline new feed fields")
        yield self.browser.screenshot("inputs")
        yield self.act(lambda d: d.find_element("css selector", editor + " button.add-step").click())
        yield self.wait(self.css(f'{editor} li.step[data-process="{LOG_TO_FEED}"]'), "the log-to-feed step")
        feeds = yield self.api("feed/list.json")
        self.assertEqual([(f["name"], f["tag"], int(f["engine"])) for f in feeds], [("house power", "house", PHPFINA)])
        feedid = str(feeds[0]["id"])
        meta = yield self.api("feed/getmeta.json", id=feedid)
        self.assertEqual(meta["interval"], 10)
        arg = yield self.act(lambda d: d.find_element("css selector", f"{editor} li.step").get_attribute("data-arg"))
        self.assertEqual(arg, feedid)

        def add_value_step(pid, value):
            def adding(d):
                from selenium.webdriver.support.ui import Select
                e = d.find_element("css selector", editor)
                Select(e.find_element("css selector", "select.process-select")).select_by_value(str(pid))
                field = e.find_element("css selector", "input.arg-value")
                field.clear()
                field.send_keys(value)
                e.find_element("css selector", "button.add-step").click()
            return adding

        def steps(d):
            return [(s.get_attribute("data-process"), s.get_attribute("data-arg"))
                    for s in d.find_elements("css selector", f"{editor} li.step")]

        yield self.act(add_value_step(SCALE, "2"))
        yield self.wait(lambda d: len(steps(d)) == 2, "the scale step")
        yield self.act(add_value_step(OFFSET, "7"))
        yield self.wait(lambda d: len(steps(d)) == 3, "the offset step")
        self.assertEqual((yield self.act(steps)), [(str(LOG_TO_FEED), feedid), (str(SCALE), "2"), (str(OFFSET), "7")])
        yield self.act(lambda d: d.find_elements("css selector", f"{editor} li.step")[2].find_element("css selector", "button.remove-step").click())
        yield self.wait(lambda d: len(steps(d)) == 2, "the offset step removed")
        yield self.act(lambda d: d.find_elements("css selector", f"{editor} li.step")[1].find_element("css selector", "button.move-up").click())
        yield self.wait(lambda d: steps(d) == [(str(SCALE), "2"), (str(LOG_TO_FEED), feedid)], "the scale moved first")
        # nothing is stored before Save
        stored = yield self.api("input/process/get.json", inputid=inputid)
        self.assertEqual(stored, "")
        yield self.act(lambda d: d.find_element("css selector", editor + " button.save-processlist").click())
        yield self.wait(self.text_of(editor + " .save-status", "Saved"), "the process list saved")
        stored = yield self.api("input/process/get.json", inputid=inputid)
        self.assertEqual(stored, f"{SCALE}:2,{LOG_TO_FEED}:{feedid}")
        yield self.assertConsoleClean("/inputs with the editor")

        # a refused step says why, beside it: a value step without a number
        yield self.act(add_value_step(SCALE, ""))
        yield self.wait(self.visible(editor + " .add-error"), "the refusal of a step without its value")
        self.assertEqual(len((yield self.act(steps))), 2)

        # the next post is scaled into the new feed, and the row follows it live
        answer = yield self.node.post("input/post.json", apikey=self.key, node="house", fulljson=json.dumps({"power": 300}))
        self.assertEqual(answer.code, 200, answer)
        yield self.wait(self.text_of(row + " .input-value", "300"), "the input's new value on /inputs", timeout=30)
        yield drain(self.node)
        value = yield self.api("feed/value.json", id=feedid)
        self.assertEqual(float(value), 600.0)
        yield self.assertConsoleClean("/inputs")

        # the feed is on /feeds
        yield self.goto("/feeds")
        feed_row = f'tr[data-feedid="{feedid}"]'
        yield self.wait(self.text_of(feed_row, "house power"), "the new feed on /feeds")
        yield self.wait(self.text_of(feed_row, "600"), "the feed's last value on /feeds")
        yield self.assertConsoleClean("/feeds")
        yield self.browser.screenshot("feeds")

    # -- the graph ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_graph_draws_the_data_and_zooms(self):
        # an hour of 10 s data: power 10 (and a little) for the first half, 90 for the second; solar about 50
        created = yield self.api("feed/create.json", name="power", tag="house", engine=str(PHPFINA), options='{"interval":10}')
        feedid = created["feedid"]
        solar = (yield self.api("feed/create.json", name="solar", tag="house", engine=str(PHPFINA), options='{"interval":10}'))["feedid"]
        yield self.node.post("input/post.json", apikey=self.key, node="house", csv="0,0")  # inputs "1" and "2", as bulk frames name them
        yield drain(self.node)
        inputs = {i["name"]: i["id"] for i in (yield self.api("input/list.json"))}
        yield self.api("input/process/set.json", inputid=inputs["1"], processlist=f"{LOG_TO_FEED}:{feedid}")
        yield self.api("input/process/set.json", inputid=inputs["2"], processlist=f"{LOG_TO_FEED}:{solar}")
        start = (int(time.time()) - 3700) // 10 * 10
        end = start + 3600
        middle = start + 1800
        # frames at offsets from time=start (compat spec §1.3)
        frames = [[t - start, "house", 10 + (t // 10) % 3 if t < middle else 90 - (t // 10) % 3, 50 + (t // 10) % 2]
                  for t in range(start, end + 10, 10)]
        answer = yield self.node.post("input/bulk.json", data={"apikey": self.key, "data": json.dumps(frames), "time": str(start)})
        self.assertEqual(answer.body, b"ok")
        yield drain(self.node)
        data = yield self.api("feed/data.json", id=str(feedid), start=str(start), end=str(end), interval="10")
        self.assertEqual(len([v for _, v in data if v is not None]), len(frames))
        data = yield self.api("feed/data.json", id=str(solar), start=str(start), end=str(end), interval="10")
        self.assertEqual(len([v for _, v in data if v is not None]), len(frames))

        yield self.log_in()
        yield self.goto(f"/graph?feeds={feedid}&start={start}&end={end}")
        drawn = lambda d: d.execute_script("return document.body.dataset.graphState") == "drawn"  # noqa: E731
        yield self.wait(drawn, "the graph drawn")
        yield self.wait(self.css("#legend .legend-swatch"), "the legend")
        self.assertGreater(int((yield self.act(lambda d: d.execute_script("return document.body.dataset.points")))), 300)
        canvas = yield self.pixels()
        width, height = canvas["width"], canvas["height"]
        # the line crosses the plot (the data covers the whole range), low on the left, high on the right
        self.assertGreater(canvas["maxx"] - canvas["minx"], 0.7 * width, canvas)
        self.assertGreater(canvas["left_y"] - canvas["right_y"], 0.3 * height, canvas)
        yield self.assertConsoleClean("/graph")

        # a second feed, from the picker: drawn beside the first, in its own colour, flat in between
        draws = lambda d: int(d.execute_script("return document.body.dataset.draws || 0"))  # noqa: E731
        count = yield self.act(draws)

        def add_solar(d):
            from selenium.webdriver.support.ui import Select
            Select(d.find_element("id", "feed-add")).select_by_value(str(solar))

        yield self.act(add_solar)
        yield self.wait(lambda d: draws(d) > count and drawn(d) and query_of(d).get("feeds") == f"{feedid},{solar}", "the second feed drawn")
        yield self.wait(lambda d: len(d.find_elements("css selector", "#legend .legend-swatch")) == 2, "two feeds in the legend")
        canvas = yield self.pixels(0)
        second = yield self.pixels(1)
        self.assertNotEqual(canvas["colour"], second["colour"])
        self.assertGreater(canvas["left_y"] - canvas["right_y"], 0.3 * height, canvas)
        self.assertLess(abs(second["left_y"] - second["right_y"]), 0.1 * height, second)
        self.assertTrue(canvas["right_y"] < second["left_y"] < canvas["left_y"], (canvas, second))
        self.assertGreater(second["maxx"] - second["minx"], 0.7 * width, second)
        yield self.assertConsoleClean("/graph, two feeds")
        yield self.browser.screenshot("graph")

        # hover: the readout shows the value under the pointer
        def hover(d):
            from selenium.webdriver.common.action_chains import ActionChains
            target = d.find_element("id", "graph")
            rect = d.execute_script("return arguments[0].getBoundingClientRect().toJSON()", target)
            x = canvas["left"] - rect["left"] + canvas["minx"] + 0.1 * (canvas["maxx"] - canvas["minx"])
            ActionChains(d).move_to_element_with_offset(target, int(x - rect["width"] / 2), 0).perform()

        yield self.act(hover)
        yield self.wait(lambda d: d.find_elements("css selector", "#legend .legend-value")
                        and d.find_element("css selector", "#legend .legend-value").text in ("10", "11", "12"),
                        "the hover readout of a value of the first half")

        # zoom: drag across the middle fifth of the line
        count = yield self.act(draws)
        before = yield self.act(query_of)
        self.assertEqual((before["start"], before["end"]), (str(start), str(end)))

        def drag(d):
            from selenium.webdriver.common.action_chains import ActionChains
            x0 = canvas["left"] + canvas["minx"]
            span = canvas["maxx"] - canvas["minx"]
            y = int(canvas["top"] + height / 2)
            chain = ActionChains(d, duration=20)
            chain.w3c_actions.pointer_action.move_to_location(int(x0 + 0.4 * span), y)
            chain.w3c_actions.pointer_action.pointer_down()
            for step in range(1, 11):
                chain.w3c_actions.pointer_action.move_to_location(int(x0 + (0.4 + 0.02 * step) * span), y)
            chain.w3c_actions.pointer_action.pointer_up()
            chain.perform()

        yield self.act(drag)
        yield self.wait(lambda d: draws(d) > count and drawn(d) and query_of(d).get("start") != str(start), "the zoomed range drawn")
        after = yield self.act(query_of)
        zoom_start, zoom_end = int(after["start"]), int(after["end"])
        # about [start + 40 %, start + 60 %] of the hour (the plot area is a little wider than the line)
        self.assertGreater(zoom_start, start + 0.3 * 3600, after)
        self.assertLess(zoom_end, end - 0.3 * 3600, after)
        self.assertLess(zoom_start, middle)
        self.assertGreater(zoom_end, middle)
        zoomed = yield self.pixels()
        # the step is in view: low on the left, high on the right, at the new resolution
        self.assertGreater(zoomed["left_y"] - zoomed["right_y"], 0.3 * height, zoomed)
        self.assertGreater(zoomed["maxx"] - zoomed["minx"], 0.7 * width, zoomed)
        yield self.assertConsoleClean("/graph zoomed")

        # averages: the same view, average=1 in the URL, drawn again
        count = yield self.act(draws)
        yield self.act(lambda d: d.find_element("id", "average").click())
        yield self.wait(lambda d: draws(d) > count and drawn(d) and query_of(d).get("average") == "1", "the view drawn with averages")
        self.assertEqual(((yield self.act(query_of))["start"], (yield self.act(query_of))["end"]), (after["start"], after["end"]))
        averaged = yield self.pixels()
        self.assertGreater(averaged["left_y"] - averaged["right_y"], 0.3 * height, averaged)

        # a preset: the last day, ending now
        clicked = int(time.time())
        count = yield self.act(draws)
        yield self.act(lambda d: d.find_element("css selector", 'button[data-range="day"]').click())
        yield self.wait(lambda d: draws(d) > count and drawn(d) and int(query_of(d)["end"]) - int(query_of(d)["start"]) == 86400,
                        "the day preset drawn")
        self.assertGreaterEqual(int((yield self.act(query_of))["end"]), clicked)
        yield self.pixels()  # the hour of data is still drawn, in a day's width
        yield self.assertConsoleClean("/graph, a day")

        # live follow: at once the window ends now, then it moves with the clock (every 10 s)
        count = yield self.act(draws)
        ticked = int(time.time())
        yield self.act(lambda d: d.find_element("id", "follow").click())
        yield self.wait(lambda d: draws(d) > count and drawn(d) and int(query_of(d)["end"]) >= ticked, "the view following now")
        first = yield self.act(query_of)
        count = yield self.act(draws)
        yield self.wait(lambda d: draws(d) > count and drawn(d) and int(query_of(d)["end"]) > int(first["end"]),
                        "the next step of the followed view", timeout=30)
        moved = yield self.act(query_of)
        self.assertEqual(int(moved["end"]) - int(moved["start"]), 86400, moved)  # the same span, moved on
        yield self.assertConsoleClean("/graph, following")

    # -- feeds ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_feeds_rename_retag_public_csv_delete(self):
        kitchen = (yield self.api("feed/create.json", name="kitchen", tag="house", engine=str(PHPFINA), options='{"interval":10}'))["feedid"]
        hall = (yield self.api("feed/create.json", name="hall", tag="house", engine=str(PHPFINA), options='{"interval":10}'))["feedid"]
        when = int(time.time()) // 10 * 10 - 60
        yield self.api("feed/insert.json", id=str(kitchen), time=str(when), value="21.5")
        yield drain(self.node)
        yield self.log_in()
        yield self.goto("/feeds")
        row = lambda feedid: f'tr[data-feedid="{feedid}"]'  # noqa: E731
        yield self.wait(self.text_of(row(kitchen), "21.5"), "the kitchen feed and its value on /feeds")
        yield self.wait(self.text_of(row(hall), "hall"), "the hall feed on /feeds")
        yield self.assertConsoleClean("/feeds")

        def edit(feedid, button, text):
            def editing(d):
                d.find_element("css selector", f"{row(feedid)} button.{button}").click()
                field = d.find_element("css selector", f"{row(feedid)} input.edit")
                field.clear()
                field.send_keys(text)
                d.find_element("css selector", f"{row(feedid)} button.save").click()
            return editing

        feed = lambda feeds, feedid: next(f for f in feeds if int(f["id"]) == feedid)  # noqa: E731
        yield self.act(edit(kitchen, "rename", "cooker"))
        yield self.wait(self.text_of(f"{row(kitchen)} .name", "cooker"), "the feed renamed")
        self.assertEqual(feed((yield self.api("feed/list.json")), kitchen)["name"], "cooker")
        yield self.act(edit(kitchen, "retag", "home"))
        yield self.wait(self.text_of(f"{row(kitchen)} .tag", "home"), "the feed retagged")
        self.assertEqual(feed((yield self.api("feed/list.json")), kitchen)["tag"], "home")
        yield self.act(lambda d: d.find_element("css selector", f"{row(kitchen)} button.public-toggle").click())
        yield self.wait(lambda d: d.find_element("css selector", f"{row(kitchen)} button.public-toggle").get_attribute("aria-pressed") == "true",
                        "the feed made public")
        self.assertEqual(str(feed((yield self.api("feed/list.json")), kitchen)["public"]), "1")
        anonymous = yield self.node.get("feed/value.json", id=str(kitchen))  # public: readable without a key
        self.assertEqual((anonymous.code, float(anonymous.body)), (200, 21.5))

        # the CSV link downloads the feed's data with the session
        href = yield self.act(lambda d: d.find_element("css selector", f"{row(kitchen)} a.csv").get_attribute("href"))
        cookie = yield self.act(lambda d: d.get_cookie("emond_session")["value"])
        csv = yield self.node.request("GET", urlsplit(href).path + "?" + urlsplit(href).query, headers={"Cookie": f"emond_session={cookie}"})
        self.assertEqual(csv.code, 200, csv)
        self.assertIn(f"{when},21.5", csv.body.decode())
        yield self.assertConsoleClean("/feeds")

        # delete asks first; cancel keeps the feed, confirm removes it
        yield self.act(lambda d: d.find_element("css selector", f"{row(hall)} button.delete").click())
        yield self.wait(self.visible(f"{row(hall)} button.cancel-delete"), "the question before deleting")
        yield self.act(lambda d: d.find_element("css selector", f"{row(hall)} button.cancel-delete").click())
        yield self.wait(self.visible(f"{row(hall)} button.delete"), "the row back after cancelling")
        self.assertEqual(len((yield self.api("feed/list.json"))), 2)
        yield self.act(lambda d: d.find_element("css selector", f"{row(hall)} button.delete").click())
        yield self.wait(self.visible(f"{row(hall)} button.confirm-delete"), "the question before deleting")
        yield self.act(lambda d: d.find_element("css selector", f"{row(hall)} button.confirm-delete").click())
        yield self.wait(lambda d: not d.find_elements("css selector", row(hall)), "the deleted feed's row gone")
        self.assertEqual([int(f["id"]) for f in (yield self.api("feed/list.json"))], [kitchen])
        yield self.assertConsoleClean("/feeds")

        # the graph link opens its graph
        yield self.act(lambda d: d.find_element("css selector", f"{row(kitchen)} a.graph-link").click())
        yield self.wait(lambda d: path_of(d) == "/graph" and query_of(d).get("feeds") == str(kitchen)
                        and d.execute_script("return document.body.dataset.graphState") == "drawn", "the feed's graph")
        yield self.assertConsoleClean("/graph from /feeds")
