"""Accounts that are hard to abuse, over real HTTP against a real node (private Redis; SQLite and MariaDB).

Per-address behaviour is tried from one machine by trusting the loopback
address as a proxy (``[users] trusted_proxies = ["127.0.0.1"]``) and sending
``X-Forwarded-For``: the node sees each test "client" at its own address.
"""

from __future__ import annotations

import statistics
import threading
import time

from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from emond.meta import schema
from emond.meta import users as users_module
from emond.meta.db import Database, Transaction
from emond.meta.schema import migrate
from tests.support.node import NodeHarness

TRUST_LOOPBACK = '[users]\ntrusted_proxies = ["127.0.0.1"]\n'
# current emoncms (Modules/user/user_model.php): one answer for an unknown user and a wrong password
LOGIN_FAILED = "Incorrect username or password"
AUTH_FAILED = "Incorrect authentication"
TOO_MANY = "Too many attempts, please try again later"
OWNER, ATTACKER, OTHER = "198.51.100.2", "203.0.113.7", "192.0.2.33"


def wait(coroutine):
    return defer.ensureDeferred(coroutine)


class AccountsMixin:
    database = "sqlite"
    extra = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, self.database, TRUST_LOOPBACK + self.extra)

    def start(self, users_config: str = ""):
        """Another node with more ``[users]`` keys (after trusted_proxies)."""
        return NodeHarness.start(self, self.database, TRUST_LOOPBACK + users_config)

    @defer.inlineCallbacks
    def register(self, node=None, username="alice", password="secret1", address=OWNER):
        answer = yield self.send(node, "user/register.json", address, {"username": username, "password": password, "email": f"{username}@example.org"})
        self.assertEqual(answer.code, 200, answer)
        return answer.json()

    def send(self, node, route, address, data, cookies=None):
        node = node or self.node
        return node.request("POST", route, data=data, headers={"X-Forwarded-For": address}, cookies=cookies)

    def login(self, username, password, address=OWNER, node=None, route="user/login.json"):
        return self.send(node, route, address, {"username": username, "password": password})

    def count_kdf_runs(self) -> list[int]:
        """Count every password check (each runs the KDF, in a thread)."""
        runs: list[int] = []
        real = users_module.check_password

        def counted(*args):
            runs.append(1)
            return real(*args)

        self.patch(users_module, "check_password", counted)
        return runs

    def assertThrottled(self, answer, message=TOO_MANY):
        self.assertEqual((answer.code, answer.json()), (429, {"success": False, "message": message}), answer)
        retry = int(answer.headers.getRawHeaders(b"retry-after")[0])
        self.assertGreater(retry, 0)
        return retry

    # -- 1. the login throttle is atomic ------------------------------------

    @defer.inlineCallbacks
    def test_concurrent_guesses_are_throttled_atomically(self):
        yield self.register()
        runs = self.count_kdf_runs()
        for route in ("user/login.json", "user/auth.json"):
            del runs[:]
            yield wait(self.node.ctx.redis.call("FLUSHDB"))  # a fresh window for each route
            guesses = yield defer.gatherResults([self.login("alice", f"guess{i}", ATTACKER, route=route) for i in range(20)])
            codes = sorted(a.code for a in guesses)
            # 5 failures per (user, address) by default: the 6th and later are refused unchecked
            self.assertEqual(codes, [400] * 5 + [429] * 15, (route, guesses))
            self.assertEqual(len(runs), 5, route)
            for answer in guesses:
                if answer.code == 429:
                    self.assertThrottled(answer)

    @defer.inlineCallbacks
    def test_change_password_is_throttled(self):
        keys = yield self.register()
        runs = self.count_kdf_runs()
        guesses = yield defer.gatherResults([
            self.send(None, "user/changepassword.json", ATTACKER, {"apikey": keys["apikey_write"], "old": f"guess{i}", "new": "another1"})
            for i in range(12)
        ])
        self.assertEqual(sorted(a.code for a in guesses), [400] * 5 + [429] * 7, guesses)
        self.assertEqual(len(runs), 5)

    # -- 2. failures from one address do not lock the owner out -------------

    @defer.inlineCallbacks
    def test_anonymous_failures_do_not_lock_out_the_owner(self):
        keys = yield self.register()
        for i in range(10):
            yield self.login("alice", f"guess{i}", ATTACKER)
        blocked = yield self.login("alice", "secret1", ATTACKER)
        self.assertThrottled(blocked)  # the guesser's own address is stopped, even with the right password
        owner = yield self.login("alice", "secret1", OWNER)
        self.assertEqual((owner.code, owner.json()["success"]), (200, True), owner)
        auth = yield self.login("alice", "secret1", OTHER, route="user/auth.json")
        self.assertEqual(auth.json()["userid"], keys["userid"])

    @defer.inlineCallbacks
    def test_one_address_guessing_many_users_is_stopped(self):
        node = yield self.start("login_failures_per_address = 4\n")
        yield self.register(node, "alice", "secret1")
        answers = []
        for i in range(6):
            answers.append((yield self.login(f"user{i}", "guess", ATTACKER, node=node)))
        self.assertEqual([a.code for a in answers], [400] * 4 + [429] * 2)
        # ... alice's own login from that address too (the address is the suspect), not from hers
        self.assertThrottled((yield self.login("alice", "secret1", ATTACKER, node=node)))
        self.assertEqual((yield self.login("alice", "secret1", OWNER, node=node)).code, 200)

    @defer.inlineCallbacks
    def test_many_addresses_slow_a_user_down_but_never_lock_them_out(self):
        node = yield self.start("login_failures_per_user = 6\nlogin_slow_seconds = 300\n")
        yield self.register(node)
        for n in range(3):
            for i in range(2):
                answer = yield self.login("alice", f"guess{i}", f"203.0.113.{n + 10}", node=node)
                self.assertEqual(answer.code, 400)
        # the cap is reached: one attempt per login_slow_seconds for alice, from anywhere
        owner = yield self.login("alice", "secret1", OWNER, node=node)
        self.assertEqual(owner.code, 200, owner)
        next_guess = yield self.login("alice", "guess9", "203.0.113.99", node=node)
        self.assertLessEqual(self.assertThrottled(next_guess), 300)
        bob = yield self.login("bob", "guess", "203.0.113.99", node=node)
        self.assertEqual(bob.code, 400)  # other users are not slowed

    @defer.inlineCallbacks
    def test_clients_behind_a_chain_of_trusted_proxies_are_told_apart(self):
        node = yield NodeHarness.start(self, self.database, '[users]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n')
        yield self.register(node)
        for i in range(5):  # an attacker who also writes a fake address of their own, on the left
            yield self.login("alice", "guess", f"192.0.2.{i}, {ATTACKER}, 10.1.2.3", node=node)
        spoofing = yield self.login("alice", "secret1", f"{OWNER}, {ATTACKER}, 10.1.2.3", node=node)
        self.assertThrottled(spoofing)
        owner = yield self.login("alice", "secret1", f"{OWNER}, 10.1.2.3", node=node)
        self.assertEqual(owner.code, 200, owner)

    @defer.inlineCallbacks
    def test_ipv6_clients_are_counted_per_64_prefix(self):
        yield self.register()
        for i in range(5):
            yield self.login("alice", "guess", f"2001:db8:1:2::{i + 1}")
        rotated = yield self.login("alice", "secret1", "2001:db8:1:2:ffff::9")  # same /64, new address
        self.assertThrottled(rotated)
        elsewhere = yield self.login("alice", "secret1", "2001:db8:1:3::1")
        self.assertEqual(elsewhere.code, 200)

    # -- 3. unknown user and wrong password answer alike --------------------

    @defer.inlineCallbacks
    def test_unknown_user_and_wrong_password_look_the_same(self):
        yield self.register()
        for route, message in (("user/login.json", LOGIN_FAILED), ("user/auth.json", AUTH_FAILED)):
            wrong = yield self.login("alice", "wrong!", OWNER, route=route)
            unknown = yield self.login("nobody", "wrong!", OWNER, route=route)
            self.assertEqual((wrong.code, wrong.json()), (400, {"success": False, "message": message}))
            self.assertEqual((unknown.code, unknown.json()), (wrong.code, wrong.json()))
        runs = self.count_kdf_runs()
        yield self.login("nobody", "wrong!", OTHER)
        self.assertEqual(len(runs), 1)  # the KDF ran for a user that does not exist

    @defer.inlineCallbacks
    def test_unknown_user_takes_about_as_long_as_a_wrong_password(self):
        yield self.register()

        @defer.inlineCallbacks
        def timed(username, address):
            started = time.perf_counter()
            answer = yield self.login(username, "wrong!", address)
            self.assertEqual(answer.code, 400)
            return time.perf_counter() - started

        wrong, unknown = [], []
        for i in range(3):
            wrong.append((yield timed("alice", f"192.0.2.{i + 1}")))
            unknown.append((yield timed(f"nobody{i}", f"192.0.2.{i + 1}")))
        # robust on a loaded box: only a sizeable fraction is asked (without the KDF it is ~5%)
        self.assertGreater(statistics.median(unknown), 0.4 * statistics.median(wrong), (unknown, wrong))

    # -- 4. usernames are unique whatever their case ------------------------

    @defer.inlineCallbacks
    def test_usernames_differing_only_in_case_cannot_both_register(self):
        alice = yield self.register(username="Alice")
        for twin in ("alice", "ALICE", "aLiCe"):
            again = yield self.send(None, "user/register.json", OTHER, {"username": twin, "password": "secret2", "email": "b@example.org"})
            self.assertEqual((again.code, again.json()), (400, {"success": False, "message": "Username already exists"}), twin)
        # login matches case-insensitively (as emoncms on MySQL's default case-insensitive collation)
        login = yield self.login("ALICE", "secret1")
        self.assertEqual(login.json()["success"], True, login)
        auth = yield self.login("alice", "secret1", route="user/auth.json")
        self.assertEqual(auth.json()["userid"], alice["userid"])
        me = yield self.node.get("user/get.json", apikey=alice["apikey_read"])
        self.assertEqual(me.json()["username"], "Alice")  # kept as typed

    @defer.inlineCallbacks
    def test_concurrent_case_twins_make_one_account(self):
        names = ["carol", "Carol", "CAROL", "caRol", "CaRoL", "cARol"]
        answers = yield defer.gatherResults([
            self.send(None, "user/register.json", f"192.0.2.{i + 1}", {"username": n, "password": "secret1", "email": "c@example.org"})
            for i, n in enumerate(names)
        ])
        self.assertEqual(sorted(a.code for a in answers), [200] + [400] * 5, answers)
        rows = yield wait(self.node.ctx.db.query("SELECT username FROM users"))
        self.assertEqual(len(rows), 1)

    @defer.inlineCallbacks
    def test_migration_keeps_existing_twins_and_reports_them(self):
        node = NodeHarness(self, self.database, TRUST_LOOPBACK)
        db = Database.connect(node.config.database.url, node.config.sqlite_path)
        # a database from before case-insensitive usernames, holding twins
        before = self.patch(schema, "MIGRATIONS", schema.MIGRATIONS[: schema.MIGRATIONS.index(schema.CASE_INSENSITIVE_USERNAMES)])
        yield wait(migrate(db))
        for n, (name, password) in enumerate((("Dave", "first1"), ("dave", "second2"), ("DAVE", "third3"), ("erin", "erin11"))):
            hashed = yield threads.deferToThread(users_module.hash_password, password)
            yield wait(db.execute(
                "INSERT INTO users (username, email, password, salt, apikey_write, apikey_read, apikey_write_hash, "
                "apikey_read_hash, uuid, created) VALUES (?, 'd@example.org', ?, '', ?, ?, ?, ?, 'u', 0)",
                name, hashed, f"w{n}", f"r{n}", f"wh{n}", f"rh{n}",
            ))
        yield db.close()
        before.restore()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        node.service.startService()
        self.addCleanup(node.service.stopService)
        yield node.app.prepared

        rows = yield wait(node.ctx.db.query("SELECT id, username FROM users ORDER BY id"))
        self.assertEqual([r[1] for r in rows], ["Dave", "dave", "DAVE", "erin"])  # every row kept
        ids = {r[1]: r[0] for r in rows}
        reported = [e for e in events if e.get("log_format", "").startswith("username twins")]
        self.assertEqual(len(reported), 1, events)
        self.assertEqual((reported[0]["kept"], sorted(reported[0]["twins"])), ("Dave", ["DAVE", "dave"]))
        # the older one answers to any case; each twin still logs in by its exact name
        for typed, password, owner in (("DaVe", "first1", "Dave"), ("Dave", "first1", "Dave"),
                                       ("dave", "second2", "dave"), ("DAVE", "third3", "DAVE"), ("ERIN", "erin11", "erin")):
            auth = yield self.login(typed, password, f"192.0.2.{ids[owner]}", node=node, route="user/auth.json")
            self.assertEqual(auth.json().get("userid"), ids[owner], (typed, auth))
        again = yield self.send(node, "user/register.json", OTHER, {"username": "dAVE", "password": "secret2", "email": "x@example.org"})
        self.assertEqual(again.json()["message"], "Username already exists")

    # -- 5. a password change ends the other sessions -----------------------

    @defer.inlineCallbacks
    def test_password_change_ends_every_other_session(self):
        yield self.register()
        yield self.login("alice", "secret1", OWNER)
        laptop = self.node.last_cookies
        yield self.login("alice", "secret1", ATTACKER)
        stolen = self.node.last_cookies
        for jar in (laptop, stolen):
            self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=jar)).code, 200)
        token = yield self.node.csrf(laptop)
        changed = yield self.send(None, "user/changepassword.json", OWNER, {"old": "secret1", "new": "another1", "csrf": token}, cookies=laptop)
        self.assertEqual(changed.json(), {"success": True, "message": "Password updated"})
        fresh = self.node.last_cookies  # the caller gets a new session and stays logged in
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=fresh)).code, 200)
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=laptop)).code, 401)
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=stolen)).code, 401)

    @defer.inlineCallbacks
    def test_password_change_with_a_key_ends_every_session(self):
        keys = yield self.register()
        yield self.login("alice", "secret1", OWNER)
        browser = self.node.last_cookies
        # a new API key leaves sessions alone (a key never yields a session); see api_user.py
        write_key = (yield self.node.get("user/newapikeywrite.json", apikey=keys["apikey_write"])).json()
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=browser)).code, 200)
        changed = yield self.node.get("user/changepassword.json", apikey=write_key, old="secret1", new="another1")
        self.assertTrue(changed.json()["success"], changed)
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=browser)).code, 401)

    @defer.inlineCallbacks
    def test_login_racing_a_password_change_gets_no_session(self):
        keys = yield self.register()
        entered: defer.Deferred[None] = defer.Deferred()
        release = threading.Event()
        self.addCleanup(release.set)
        real = users_module.check_password
        gated = []

        def slow_check(password, stored, salt):
            if password == "secret1" and not gated:  # the login with the old password, not the change
                gated.append(1)
                reactor.callFromThread(entered.callback, None)
                release.wait(30)
            return real(password, stored, salt)

        self.patch(users_module, "check_password", slow_check)
        racing = self.login("alice", "secret1", ATTACKER)  # read the old hash, now checking it
        yield entered
        changed = yield self.node.get("user/changepassword.json", apikey=keys["apikey_write"], old="secret1", new="another1")
        self.assertTrue(changed.json()["success"], changed)
        release.set()
        answer = yield racing
        if answer.code == 200:
            me = yield self.node.request("GET", "user/get.json", cookies=self.node.last_cookies)
            self.assertEqual(me.code, 401, "a login with the old password outlived the change")
        else:
            self.assertEqual(answer.json()["message"], LOGIN_FAILED)

    # -- 5b. the password KDF has a small pool and a bounded queue ----------

    @defer.inlineCallbacks
    def test_logins_beyond_the_kdf_queue_are_refused_at_once_and_not_counted(self):
        node = yield self.start("kdf_threads = 1\nkdf_queue = 1\nlogin_failures_per_client = 1\n")
        yield self.register(node)
        entered: defer.Deferred[None] = defer.Deferred()
        release = threading.Event()
        self.addCleanup(release.set)
        real = users_module.check_password
        first: list[int] = []

        def gated(*args):
            if not first:
                first.append(1)
                reactor.callFromThread(entered.callback, None)
            release.wait(30)
            return real(*args)

        self.patch(users_module, "check_password", gated)
        pool = node.ctx.users.kdf
        submitted: list[int] = []
        second_in: defer.Deferred[None] = defer.Deferred()
        pool_run = pool.run

        def noting(*args):
            submitted.append(1)
            if len(submitted) == 2:
                second_in.callback(None)
            return pool_run(*args)

        self.patch(pool, "run", noting)
        running = self.login("alice", "secret1", OWNER, node=node)  # in the KDF's one thread, held
        yield entered
        waiting = self.login("alice", "secret1", OTHER, node=node)  # in its queue of one
        yield second_in
        began = time.monotonic()
        refused = yield self.login("alice", "secret1", ATTACKER, node=node)
        self.assertLess(time.monotonic() - began, 1.0)
        self.assertEqual((refused.code, refused.json()), (503, {"success": False, "message": "Too busy, try again shortly"}))
        self.assertEqual(refused.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertFalse(running.called or waiting.called)
        release.set()
        self.assertEqual([(yield running).code, (yield waiting).code], [200, 200])
        # The refused attempt checked no password: it does not count toward the one failure allowed.
        again = yield self.login("alice", "secret1", ATTACKER, node=node)
        self.assertEqual(again.code, 200, again)
        metrics = (yield node.get("metrics")).body.decode().splitlines()
        self.assertIn('emond_pool_refused_total{pool="kdf"} 1.0', metrics)
        self.assertIn('emond_pool_threads{pool="kdf"} 1.0', metrics)

    # -- 6. registrations per address ---------------------------------------

    @defer.inlineCallbacks
    def test_registrations_are_throttled_per_address(self):
        answers = yield defer.gatherResults([
            self.send(None, "user/register.json", ATTACKER, {"username": f"bot{i}", "password": "secret1", "email": f"b{i}@example.org"})
            for i in range(20)
        ])
        codes = sorted(a.code for a in answers)
        self.assertEqual(codes, [200] * 10 + [429] * 10, answers)  # 10 an hour by default
        for answer in answers:
            if answer.code == 429:
                self.assertLessEqual(self.assertThrottled(answer, "Too many registrations from this address, please try again later"), 3600)
        rows = yield wait(self.node.ctx.db.query("SELECT COUNT(*) FROM users"))
        self.assertEqual(rows[0][0], 10)
        human = yield self.send(None, "user/register.json", OWNER, {"username": "human", "password": "secret1", "email": "h@example.org"})
        self.assertEqual(human.code, 200)

    # -- 7. feeds per user ------------------------------------------------

    @defer.inlineCallbacks
    def test_feeds_per_user_are_limited(self):
        node = yield self.start("max_feeds = 3\n")
        keys = yield self.register(node)
        key = keys["apikey_write"]

        def create(name):
            return node.get("feed/create.json", apikey=key, name=name, tag="t", datatype=1, engine=5, options='{"interval":10}')

        answers = yield defer.gatherResults([create(f"f{i}") for i in range(8)])
        self.assertEqual(sorted(a.code for a in answers), [200] * 3 + [403] * 5, answers)
        refused = [a.json() for a in answers if a.code == 403]
        self.assertEqual(refused[0], {"success": False, "message": "Feed limit reached: at most 3 feeds per user"})
        self.assertEqual(len((yield node.get("feed/list.json", apikey=key)).json()), 3)
        # a process list that would create a feed is refused the same way
        inp = yield wait(node.ctx.inputs.create(keys["userid"], "emontx", "power1"))
        add = yield node.get("input/process/add.json", apikey=key, inputid=inp.id, processid=1, arg=0, newfeedname="more")
        self.assertEqual((add.code, add.json()["message"]), (403, "Feed limit reached: at most 3 feeds per user"))
        # another user has their own allowance; a deleted feed frees a place
        bob = yield self.register(node, "bob", "secret1", OTHER)
        self.assertEqual((yield node.get("feed/create.json", apikey=bob["apikey_write"], name="b", tag="t", datatype=1, engine=5, options='{"interval":10}')).code, 200)
        feedid = [a.json()["feedid"] for a in answers if a.code == 200][0]
        yield node.get("feed/delete.json", apikey=key, id=feedid)
        self.assertEqual((yield create("again")).code, 200)

    @defer.inlineCallbacks
    def test_concurrent_creates_cannot_pass_the_limit_together(self):
        node = yield self.start("max_feeds = 1\n")
        keys = yield self.register(node)
        # The first create to reach its INSERT holds there until a second one reaches its own
        # (if the limit lets two through at once) or for at most 3 s (if it rightly does not:
        # the outcome then does not depend on that time, only the test's length does).
        arrived: list[int] = []
        second = threading.Event()
        real = Transaction.insert

        def insert(txn, statement, *args):
            if statement.startswith("INSERT INTO feeds"):
                arrived.append(1)
                if len(arrived) == 1:
                    second.wait(3.0)
                else:
                    second.set()
            return real(txn, statement, *args)

        self.patch(Transaction, "insert", insert)
        creates = [wait(node.ctx.feeds.create(keys["userid"], f"f{i}", "t", 1, 5, 10, 0)) for i in range(2)]
        results = yield defer.DeferredList(creates, consumeErrors=True)
        made = [r for ok, r in results if ok]
        refused = [r.value.message for ok, r in results if not ok]
        self.assertEqual((len(made), refused), (1, ["Feed limit reached: at most 1 feeds per user"]))


class AccountsSQLiteTests(AccountsMixin, unittest.TestCase):
    database = "sqlite"


class AccountsMariaDBTests(AccountsMixin, unittest.TestCase):
    database = "mysql"


class UsersConfigTests(unittest.TestCase):
    def load(self, users: str):
        from emond.config import load_node_config

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[users]\n" + users)
        return load_node_config(path)

    def test_limits_are_read_and_checked(self):
        from emond.config import ConfigError

        users = self.load("max_feeds = 7\nlogin_failures_per_client = 3\nregistrations_per_address = 2\n").users
        self.assertEqual((users.max_feeds, users.login_failures_per_client, users.registrations_per_address), (7, 3, 2))
        with self.assertRaises(ConfigError) as refused:
            self.load("max_feeds = 0\n")
        self.assertEqual(str(refused.exception), "[users] max_feeds: must be at least 1, got 0")
        with self.assertRaises(ConfigError) as refused:
            self.load('trusted_proxies = ["localhost"]\n')
        self.assertEqual(str(refused.exception), "[users] trusted_proxies: not an address or network: 'localhost'")
