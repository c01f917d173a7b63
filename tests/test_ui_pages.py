"""The web UI's server side over real sockets (issue 15): the security headers of every page,
no inline script, the session cookie, CSRF on session writes, the redirects, the login
form's throttle, logout. A real node in the test's reactor (private Redis, SQLite); the
browser tests are in tests/test_ui_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import treq
from twisted.internet import defer
from twisted.trial import unittest

from tests.support.node import Answer, NodeHarness

PAGES = ("inputs", "feeds", "graph", "account")
# The policy of the contract (notes/ui-contract.md), directive by directive
CSP = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'none'"],
    "frame-ancestors": ["'none'"],
    "form-action": ["'self'"],
}
INVALID_CSRF = {"success": False, "message": "Invalid CSRF token"}
TRUST_LOOPBACK = '[users]\ntrusted_proxies = ["127.0.0.1"]\n'  # X-Forwarded-For names the client (as tests/test_accounts.py)
OWNER, ATTACKER = "198.51.100.2", "203.0.113.7"
TOO_MANY = "Too many attempts, please try again later"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Markup(HTMLParser):
    """What a page's HTML holds that the CSP or the contract forbids, and its CSRF token."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []  # inline script bodies, on*= handlers, style attributes, <style>, javascript: URLs
        self.csrf: str | None = None
        self.stylesheets: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
            self._in = "script"
        elif tag == "style":
            self.inline.append("<style> element")
            self._in = "style"
        if tag == "meta" and a.get("name") == "csrf-token":
            self.csrf = a.get("content")
        if tag == "link" and a.get("rel") == "stylesheet":
            self.stylesheets.append(a.get("href") or "")
        for name, value in attrs:
            if name.startswith("on"):
                self.inline.append(f"<{tag} {name}=...>")
            if name == "style":
                self.inline.append(f"<{tag} style=...>")
            if name in ("href", "src", "action", "formaction") and (value or "").strip().lower().startswith("javascript:"):
                self.inline.append(f"<{tag} {name}=javascript:...>")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script" and data.strip():
            self.inline.append(f"inline script {data.strip()[:60]!r}")


def parse(body: bytes) -> Markup:
    markup = Markup()
    markup.feed(body.decode("utf-8"))
    markup.close()
    return markup


def session_of(answer: Answer) -> str | None:
    """The ``emond_session`` value an answer sets (None if it sets none, "" if it clears it)."""
    for raw in answer.headers.getRawHeaders(b"set-cookie") or []:
        cookie = SimpleCookie()
        cookie.load(raw.decode("latin-1"))
        if "emond_session" in cookie:
            return cookie["emond_session"].value
    return None


class UiPagesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, "sqlite", TRUST_LOOPBACK)
        answer = yield self.node.post("user/register.json", data={"username": "alice", "password": "secret1", "email": "alice@example.org"})
        self.assertEqual(answer.code, 200, answer)
        self.keys = answer.json()

    @defer.inlineCallbacks
    def http(self, method: str, path: str, session: str | None = None, data: dict | None = None,
             headers: dict | None = None, address: str = OWNER):
        """One request, redirects not followed; ``session``: the cookie's value to send."""
        sent = {"X-Forwarded-For": address, **(headers or {})}
        if session is not None:
            sent["Cookie"] = f"emond_session={session}"
        kwargs: dict[str, Any] = {"headers": sent, "persistent": False, "allow_redirects": False}
        if data is not None:
            kwargs["data"] = urlencode(data).encode()
            kwargs["headers"] = {**FORM, **sent}
        response = yield treq.request(method, self.node.base + path.lstrip("/"), **kwargs)
        body = yield response.content()
        return Answer(response.code, response.headers, body)

    def location(self, answer: Answer) -> str:
        return (answer.headers.getRawHeaders(b"location") or [b""])[0].decode()

    @defer.inlineCallbacks
    def login(self, username="alice", password="secret1", address=OWNER, **extra):
        """The login form's POST /; its answer."""
        answer = yield self.http("POST", "/", data={"action": "login", "username": username, "password": password, **extra}, address=address)
        return answer

    @defer.inlineCallbacks
    def logged_in(self) -> Any:
        answer = yield self.login()
        self.assertEqual((answer.code, self.location(answer)), (303, "/inputs"), answer)
        session = session_of(answer)
        self.assertTrue(session, answer.headers)
        return session

    @defer.inlineCallbacks
    def page_token(self, session: str, page: str = "inputs") -> Any:
        answer = yield self.http("GET", page, session)
        self.assertEqual(answer.code, 200, answer)
        token = parse(answer.body).csrf
        self.assertTrue(token, f"/{page} has no csrf-token meta")
        return token

    def assertPolicy(self, answer: Answer, what: str) -> None:
        values = answer.headers.getRawHeaders(b"content-security-policy")
        self.assertIsNotNone(values, f"{what}: no Content-Security-Policy")
        self.assertEqual(len(values), 1, what)
        directives = {}
        for part in values[0].decode().split(";"):
            words = part.split()
            if words:
                directives[words[0].lower()] = words[1:]
        self.assertEqual(directives, CSP, what)

    # -- the pages ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_every_page_has_the_policy_and_no_inline_script(self):
        session = yield self.logged_in()
        answers = {"/ (logged out)": (yield self.http("GET", "/"))}
        for page in PAGES:
            answers[f"/{page}"] = yield self.http("GET", page, session)
        for what, answer in answers.items():
            self.assertEqual(answer.code, 200, (what, answer))
            self.assertEqual(answer.content_type.split(";")[0], "text/html", what)
            self.assertPolicy(answer, what)
            markup = parse(answer.body)
            self.assertEqual(markup.inline, [], what)
            for script in markup.scripts:
                src = script.get("src") or ""
                self.assertTrue(src.startswith("/") and not src.startswith("//"), (what, script))  # this origin's
        # each page loads its own module, and the graph Debian's dygraphs before it
        for page in PAGES:
            scripts = [s.get("src") for s in parse(answers[f"/{page}"].body).scripts]
            self.assertIn(f"/static/{page}.js", scripts, page)
            module = next(s for s in parse(answers[f"/{page}"].body).scripts if s.get("src") == f"/static/{page}.js")
            self.assertEqual(module.get("type"), "module", page)
        graph = [s.get("src") for s in parse(answers["/graph"].body).scripts]
        self.assertLess(graph.index("/lib/dygraphs/dygraph.min.js"), graph.index("/static/graph.js"))
        # the redirects and the files carry it too
        redirect = yield self.http("GET", "inputs")
        self.assertPolicy(redirect, "the redirect of /inputs")
        for path in ("static/common.js", "static/emond.css", "lib/dygraphs/dygraph.min.js"):
            served = yield self.http("GET", path, session)
            self.assertEqual(served.code, 200, path)
            self.assertPolicy(served, path)

    @defer.inlineCallbacks
    def test_every_script_and_stylesheet_a_page_names_is_served(self):
        session = yield self.logged_in()
        for page in ("",) + PAGES:
            answer = yield self.http("GET", page, session if page else None)
            markup = parse(answer.body)
            names = [s.get("src") for s in markup.scripts] + markup.stylesheets
            for name in names:
                served = yield self.http("GET", name, session)
                self.assertEqual(served.code, 200, f"/{page} names {name}: {served}")
                kind = served.content_type.split(";")[0]
                expected = "text/javascript" if name.endswith(".js") else "text/css"
                self.assertEqual(kind, expected, name)

    @defer.inlineCallbacks
    def test_static_files(self):
        js = yield self.http("GET", "static/common.js")  # no session needed: the login page's files too
        self.assertEqual((js.code, js.content_type.split(";")[0]), (200, "text/javascript"))
        self.assertIn(b"export", js.body)
        etag = js.headers.getRawHeaders(b"etag")[0].decode()
        cached = yield self.http("GET", "static/common.js", headers={"If-None-Match": etag})
        self.assertEqual((cached.code, cached.body), (304, b""))
        css = yield self.http("GET", "lib/dygraphs/dygraph.min.css")
        self.assertEqual((css.code, css.content_type.split(";")[0]), (200, "text/css"))
        self.assertEqual(css.headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        with open("/usr/share/javascript/dygraphs/dygraph.min.js", "rb") as f:  # Debian's, not a copy
            self.assertEqual((yield self.http("GET", "lib/dygraphs/dygraph.min.js")).body, f.read())
        for path in ("static/nothing.js", "static/..%2Fpages.py", "static/%2e%2e/pages.py", "lib/dygraphs/dygraph.js",
                     "lib/dygraphs/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "lib/other/x.js", "static/", "templates/layout.html"):
            answer = yield self.http("GET", path)
            self.assertEqual(answer.code, 404, (path, answer))
            self.assertNotIn(b"import ", answer.body, path)
        posted = yield self.http("POST", "static/common.js", data={})
        self.assertEqual(posted.code, 405)

    @defer.inlineCallbacks
    def test_pages_need_a_session(self):
        for page in PAGES:
            for session in (None, "not-a-session-token"):
                answer = yield self.http("GET", page, session)
                self.assertEqual(answer.code, 303, (page, answer))
                where = urlsplit(self.location(answer))
                self.assertEqual(where.path, "/", (page, where))  # the login page ...
                self.assertEqual(parse_qs(where.query).get("next", ["/" + page]), ["/" + page], where)  # ... and back after it
        login_page = yield self.http("GET", "/")
        self.assertEqual(login_page.code, 200)
        forms = login_page.body.decode()
        for field in ('name="username"', 'name="password"', 'name="rememberme"', 'name="email"', 'value="login"', 'value="register"'):
            self.assertIn(field, forms)
        session = yield self.logged_in()
        home = yield self.http("GET", "/", session)
        self.assertEqual((home.code, self.location(home)), (303, "/inputs"))
        asked = yield self.http("GET", "/?next=%2Ffeeds", session)  # the login page of a tab that was logged in meanwhile
        self.assertEqual((asked.code, self.location(asked)), (303, "/feeds"))
        # after the login, the page asked for; never another site
        back = yield self.login(next="/graph?feeds=1&start=0")
        self.assertEqual((back.code, self.location(back)), (303, "/graph?feeds=1&start=0"))
        for elsewhere in ("https://evil.example/", "//evil.example/inputs", "/inputs/../../x", "/user/logout.json"):
            answer = yield self.login(next=elsewhere)
            self.assertEqual((answer.code, self.location(answer)), (303, "/inputs"), elsewhere)

    @defer.inlineCallbacks
    def test_a_link_from_another_site_loads_the_page_again_same_site(self):
        # The browser holds back a SameSite=Strict cookie on a navigation from another site:
        # the answer is the same URL again, asked by this site (a refresh), which sends it.
        session = yield self.logged_in()
        linked = yield self.http("GET", "/graph?feeds=1", headers={"Sec-Fetch-Site": "cross-site"})
        self.assertEqual(linked.code, 200, linked)
        self.assertIsNone(linked.headers.getRawHeaders(b"location"))
        self.assertEqual(re.findall(rb'<meta http-equiv="refresh" content="([^"]*)">', linked.body), [b"0"])  # this URL again
        self.assertEqual(parse(linked.body).scripts, [])
        self.assertPolicy(linked, "the same-site reload")
        again = yield self.http("GET", "/graph?feeds=1", session, headers={"Sec-Fetch-Site": "same-origin"})
        self.assertEqual(again.code, 200, again)
        # no session at all: the refresh comes back same-site and goes to the login page (no loop)
        alone = yield self.http("GET", "/graph?feeds=1", headers={"Sec-Fetch-Site": "same-origin"})
        self.assertEqual(alone.code, 303, alone)
        # a cookie that was sent but is dead: straight to the login page
        dead = yield self.http("GET", "/graph?feeds=1", "not-a-session-token", headers={"Sec-Fetch-Site": "cross-site"})
        self.assertEqual(dead.code, 303, dead)

    @defer.inlineCallbacks
    def test_cross_site_forms_are_refused(self):
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
            forced = yield self.http("POST", "/", data={"action": "login", "username": "alice", "password": "secret1"}, headers=headers)
            self.assertEqual(forced.code, 403, (headers, forced))
            self.assertIsNone(session_of(forced))
            registered = yield self.http("POST", "/", headers=headers,
                                         data={"action": "register", "username": "mallory", "password": "secret2", "email": "m@example.org"})
            self.assertEqual(registered.code, 403, (headers, registered))
        # the browser's own form (as Chromium sends it) is let in
        own = yield self.http("POST", "/", data={"action": "login", "username": "alice", "password": "secret1"},
                              headers={"Sec-Fetch-Site": "same-origin", "Origin": self.node.base.rstrip("/")})
        self.assertEqual(own.code, 303, own)

    # -- the session cookie -------------------------------------------------

    @defer.inlineCallbacks
    def test_session_cookie_is_httponly_and_samesite_strict(self):
        for remember in ({}, {"rememberme": "1"}):
            answer = yield self.login(**remember)
            self.assertEqual(answer.code, 303, answer)
            raw = [c for c in answer.headers.getRawHeaders(b"set-cookie") if c.startswith(b"emond_session=")]
            self.assertEqual(len(raw), 1, answer.headers)
            attributes = [a.strip().lower() for a in raw[0].decode().split(";")[1:]]
            self.assertIn("httponly", attributes, raw)
            self.assertIn("samesite=strict", attributes, raw)
            self.assertNotIn("secure", attributes, raw)  # plain HTTP on loopback, no trusted proxy saying https
            self.assertIn("path=/", attributes, raw)
            persistent = any(a.startswith(("max-age=", "expires=")) for a in attributes)
            self.assertEqual(persistent, bool(remember), raw)  # "remember me" outlives the browser, else not
        over_https = yield self.http("POST", "/", data={"action": "login", "username": "alice", "password": "secret1"},
                                     headers={"X-Forwarded-Proto": "https"})
        raw = [c for c in over_https.headers.getRawHeaders(b"set-cookie") if c.startswith(b"emond_session=")]
        self.assertIn("secure", [a.strip().lower() for a in raw[0].decode().split(";")[1:]], raw)

    @defer.inlineCallbacks
    def test_register_through_the_form_logs_in(self):
        answer = yield self.http("POST", "/", data={"action": "register", "username": "bob", "password": "secret2", "email": "bob@example.org"})
        self.assertEqual((answer.code, self.location(answer)), (303, "/inputs"), answer)
        me = yield self.http("GET", "user/get.json", session_of(answer))
        self.assertEqual(me.json()["username"], "bob")
        taken = yield self.http("POST", "/", data={"action": "register", "username": "bob", "password": "secret2", "email": "bob@example.org"})
        self.assertEqual(taken.code, 400)
        self.assertIn(b"Username already exists", taken.body)
        self.assertIsNone(session_of(taken))
        self.assertEqual(parse(taken.body).inline, [])

    # -- CSRF -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_session_writes_need_the_page_token(self):
        session = yield self.logged_in()
        token = yield self.page_token(session)
        create = {"name": "kitchen", "tag": "house", "engine": "5", "options": '{"interval":10}'}
        missing = yield self.http("POST", "feed/create.json", session, data=create)
        self.assertEqual((missing.code, missing.json()), (403, INVALID_CSRF))
        wrong = yield self.http("POST", "feed/create.json", session, data=create, headers={"X-CSRF-Token": "0" * 64})
        self.assertEqual((wrong.code, wrong.json()), (403, INVALID_CSRF))
        in_query = yield self.http("GET", "feed/create.json?" + urlencode({**create, "csrf": "0" * 64}), session)
        self.assertEqual(in_query.code, 403)
        listed = yield self.http("GET", "feed/list.json", session)  # a read needs no token
        self.assertEqual((listed.code, listed.json()), (200, []))  # and the refused writes made nothing
        made = yield self.http("POST", "feed/create.json", session, data=create, headers={"X-CSRF-Token": token})
        self.assertEqual(made.code, 200, made)
        self.assertTrue(made.json()["success"], made)
        as_param = yield self.http("POST", "feed/create.json", session, data={**create, "name": "hall", "csrf": token})
        self.assertTrue(as_param.json()["success"], as_param)
        listed = yield self.http("GET", "feed/list.json", session)
        self.assertEqual(sorted(f["name"] for f in listed.json()), ["hall", "kitchen"])
        # every page of the session shows the same token
        for page in PAGES:
            self.assertEqual((yield self.page_token(session, page)), token, page)
        # another session's token is not this one's
        other = yield self.logged_in()
        other_token = yield self.page_token(other)
        self.assertNotEqual(other_token, token)
        crossed = yield self.http("POST", "user/set.json", session, data={"data": '{"name":"Mallory"}'}, headers={"X-CSRF-Token": other_token})
        self.assertEqual((crossed.code, crossed.json()), (403, INVALID_CSRF))
        # an API key is no session: emoncms clients send no token
        keyed = yield self.http("POST", "user/set.json", data={"apikey": self.keys["apikey_write"], "data": '{"name":"Alice"}'})
        self.assertTrue(keyed.json()["success"], keyed)
        me = yield self.http("GET", "user/get.json", session)
        self.assertEqual(me.json()["name"], "Alice")

    # -- the login form's throttle --------------------------------------------

    @defer.inlineCallbacks
    def test_login_form_is_throttled_like_user_login(self):
        # 5 failures per (user, address) by default (tests/test_accounts.py): the API's and the form's count together
        for i in range(3):
            api = yield self.http("POST", "user/login.json", data={"username": "alice", "password": f"guess{i}"}, address=ATTACKER)
            self.assertEqual(api.code, 400, api)
        for i in range(2):
            form = yield self.login(password=f"form-guess{i}", address=ATTACKER)
            self.assertEqual(form.code, 400, form)
            self.assertIsNone(session_of(form))
            self.assertIn(b"Incorrect username or password", form.body)
            self.assertEqual(parse(form.body).inline, [])
        blocked = yield self.login(address=ATTACKER)  # the right password, from the guesser's address
        self.assertEqual(blocked.code, 429, blocked)
        self.assertIsNone(session_of(blocked))
        self.assertGreater(int(blocked.headers.getRawHeaders(b"retry-after")[0]), 0)
        self.assertIn(TOO_MANY.encode(), blocked.body)
        self.assertPolicy(blocked, "the throttled form")
        api = yield self.http("POST", "user/login.json", data={"username": "alice", "password": "secret1"}, address=ATTACKER)
        self.assertEqual(api.code, 429)
        owner = yield self.login(address=OWNER)  # the owner is not locked out
        self.assertEqual((owner.code, self.location(owner)), (303, "/inputs"), owner)

    # -- logout -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_logout_needs_the_token(self):
        session = yield self.logged_in()
        token = yield self.page_token(session)
        refused = yield self.http("POST", "logout", session, data={})
        self.assertEqual(refused.code, 403, refused)
        wrong = yield self.http("POST", "logout", session, data={"csrf": "0" * 64})
        self.assertEqual(wrong.code, 403, wrong)
        forced = yield self.http("POST", "logout", session, data={}, headers={"Sec-Fetch-Site": "cross-site"})
        self.assertEqual(forced.code, 403, forced)
        get = yield self.http("GET", "logout", session)
        self.assertEqual(get.code, 405)
        api = yield self.http("GET", "user/logout.json", session)  # the API's logout asks for it too
        self.assertEqual(api.code, 403, api)
        still = yield self.http("GET", "inputs", session)
        self.assertEqual(still.code, 200, "a refused logout ended the session")
        done = yield self.http("POST", "logout", session, data={"csrf": token})
        self.assertEqual((done.code, self.location(done)), (303, "/"), done)
        self.assertEqual(session_of(done), "")  # the cookie is cleared
        after = yield self.http("GET", "inputs", session)
        self.assertEqual((after.code, urlsplit(self.location(after)).path), (303, "/"))
        me = yield self.http("GET", "user/get.json", session)
        self.assertEqual(me.code, 401)

    @defer.inlineCallbacks
    def test_a_stale_page_of_the_site_still_logs_out(self):
        # the page's token is from before a password change in another tab: the browser vouches
        # that the form is the site's own (Sec-Fetch-Site), which a forged form cannot
        session = yield self.logged_in()
        done = yield self.http("POST", "logout", session, data={"csrf": "stale"}, headers={"Sec-Fetch-Site": "same-origin"})
        self.assertEqual((done.code, self.location(done)), (303, "/"), done)
        me = yield self.http("GET", "user/get.json", session)
        self.assertEqual(me.code, 401)
