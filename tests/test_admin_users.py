"""``emond-admin user list|disable|enable|reset-password`` against a real node (private Redis;
SQLite and MariaDB), each command's effect checked through the node's own API: a disabled
user's keys and password are refused (as emoncms refuses an unknown key and a login without
access), an enabled one's accepted again, a reset password is the one that logs in."""

from __future__ import annotations

import json
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from emond.keys import apikey
from emond.meta.auth import KEY_CACHE_SECONDS
from emond.meta.users import apikey_digest
from emond.redis import Redis
from tests.support.admin import run_admin
from tests.support.node import NodeHarness, drain
from tests.support.poll import until

LOGIN_FAILED = "Incorrect username or password"  # current emoncms, for a wrong password
LOGIN_DISABLED = "Login disabled for this account"  # current emoncms, for an account with access = 0
UNKNOWN_KEY = "0123456789abcdef0123456789abcdef"  # a well-formed key nobody has


class AdminUsersMixin:
    database = "sqlite"

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, self.database)

    def admin(self, *args: str, stdin: str | None = None):
        return run_admin("--config", self.node.config_path, *args, stdin=stdin)

    @defer.inlineCallbacks
    def register(self, name: str, feeds: int = 0, posts: tuple[dict[str, float], ...] = ()):
        answer = yield self.node.post("user/register.json", data={"username": name, "password": "secret1", "email": f"{name}@example.org"})
        self.assertEqual(answer.code, 200, answer)
        keys = answer.json()
        for n in range(feeds):
            created = yield self.node.post("feed/create.json", apikey=keys["apikey_write"], name=f"f{n}", tag="t", engine="5",
                                           datatype="1", options=json.dumps({"interval": 10}))
            self.assertEqual(created.code, 200, created)
        for values in posts:
            posted = yield self.post(keys["apikey_write"], values)
            self.assertEqual(posted.code, 200, posted)
        return keys

    def post(self, key: str, values: dict[str, float]):
        return self.node.post("input/post.json", apikey=key, node="tx", fulljson=json.dumps(values))

    def login(self, name: str, password: str):
        return self.node.post("user/login.json", data={"username": name, "password": password})

    @defer.inlineCallbacks
    def test_user_list(self):
        alice = yield self.register("alice", 2, ({"power1": 1, "power2": 2}, {"temp": 20}))
        bob = yield self.register("bob", 1, ({"power1": 1},))
        carol = yield self.register("carol")
        yield drain(self.node)  # the consumer creates the inputs
        status, _, err = yield self.admin("user", "disable", "bob")
        self.assertEqual((status, err), (0, None))
        status, out, err = yield self.admin("user", "list")
        self.assertEqual((status, err), (0, None))
        self.assertEqual(out, [
            {"id": alice["userid"], "username": "alice", "email": "alice@example.org", "shard": "default", "feeds": 2, "inputs": 3, "disabled": False},
            {"id": bob["userid"], "username": "bob", "email": "bob@example.org", "shard": "default", "feeds": 1, "inputs": 1, "disabled": True},
            {"id": carol["userid"], "username": "carol", "email": "carol@example.org", "shard": "default", "feeds": 0, "inputs": 0, "disabled": False},
        ])

    @defer.inlineCallbacks
    def test_disable_refuses_keys_logins_and_sessions_and_enable_restores_them(self):
        keys = yield self.register("alice")
        other = yield self.register("bob")
        write, read = keys["apikey_write"], keys["apikey_read"]
        self.assertEqual((yield self.post(write, {"p": 1})).code, 200)
        self.assertEqual((yield self.node.get("feed/list.json", apikey=read)).code, 200)  # both keys now cached
        yield self.login("alice", "secret1")
        session = self.node.last_cookies
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=session)).code, 200)
        # the answer to a key that is nobody's (emoncms: "Invalid API key")
        unknown = yield self.post(UNKNOWN_KEY, {"p": 1})
        self.assertEqual(unknown.code, 401, unknown)

        status, out, err = yield self.admin("user", "disable", "alice")
        disabled_at = time.monotonic()
        self.assertEqual((status, err), (0, None))
        self.assertEqual((out["id"], out["username"], out["disabled"]), (keys["userid"], "alice", True))

        async def refused() -> bool:
            answer = await self.post(write, {"p": 2})
            return answer.code != 200

        # every process keeps a key it checked for KEY_CACHE_SECONDS; Redis's copy (an hour) is gone
        yield defer.ensureDeferred(until(refused, KEY_CACHE_SECONDS + 5, "the disabled user's write key refused"))
        self.assertLess(time.monotonic() - disabled_at, KEY_CACHE_SECONDS + 5)
        for answer in ((yield self.post(write, {"p": 3})), (yield self.node.get("feed/list.json", apikey=read))):
            self.assertEqual((answer.code, answer.body, answer.content_type), (unknown.code, unknown.body, unknown.content_type))
        login = yield self.login("alice", "secret1")
        self.assertEqual((login.code, login.json()), (400, {"success": False, "message": LOGIN_DISABLED}))
        wrong = yield self.login("alice", "wrong11")  # a wrong password still says only that
        self.assertEqual(wrong.json(), {"success": False, "message": LOGIN_FAILED})
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=session)).code, 401)  # its session ended
        self.assertEqual((yield self.post(other["apikey_write"], {"p": 1})).code, 200)  # another user is untouched

        status, out, err = yield self.admin("user", "enable", "alice")
        self.assertEqual((status, err, out["disabled"]), (0, None, False))
        self.assertEqual((yield self.post(write, {"p": 4})).code, 200)  # a refusal is not cached: at once
        self.assertEqual((yield self.node.get("feed/list.json", apikey=read)).code, 200)
        login = yield self.login("alice", "secret1")
        self.assertEqual((login.code, login.json()["success"]), (200, True))

    @defer.inlineCallbacks
    def test_a_key_lookup_racing_a_disable_leaves_nothing_cached(self):
        """A process that read the database before the disable and caches the key after it would
        keep accepting the key for an hour (the Redis entry's TTL): it must not cache it."""
        keys = yield self.register("alice")
        users = self.node.ctx.auth.users
        real = users.by_apikey
        read, release = defer.Deferred(), defer.Deferred()

        async def paused(key):
            found = await real(key)  # read before the disable: the account is enabled
            read.callback(None)
            await release
            return found

        self.patch(users, "by_apikey", paused)
        lookup = defer.ensureDeferred(self.node.ctx.auth.key_owner(keys["apikey_write"]))
        yield read
        status, _, err = yield self.admin("user", "disable", "alice")
        self.assertEqual((status, err), (0, None))
        release.callback(None)
        yield lookup  # it answers what it read (it began before the disable) ...
        redis = Redis.connect(self.node.config.redis.url, 5.0, reactor)
        self.addCleanup(redis.disconnect)
        cached = yield defer.ensureDeferred(redis.call("GET", apikey(apikey_digest(keys["apikey_write"]))))
        self.assertIsNone(cached)  # ... but cached nothing for the other processes

    @defer.inlineCallbacks
    def test_reset_password(self):
        yield self.register("alice")
        yield self.login("alice", "secret1")
        session = self.node.last_cookies
        status, out, err = yield self.admin("user", "reset-password", "ALICE")  # the name in any case, as a login
        self.assertEqual((status, err), (0, None))
        self.assertEqual(sorted(out), ["id", "password", "username"])
        self.assertEqual(out["username"], "alice")
        password = out["password"]
        self.assertGreaterEqual(len(password), 16)
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=session)).code, 401)  # sessions ended
        old = yield self.login("alice", "secret1")
        self.assertEqual(old.json(), {"success": False, "message": LOGIN_FAILED})
        new = yield self.login("alice", password)
        self.assertEqual((new.code, new.json()["success"]), (200, True))
        # stored with emond's KDF (scrypt), whatever the password was stored with before
        row = yield defer.ensureDeferred(self.node.ctx.db.one("SELECT password, salt FROM users WHERE username = 'alice'"))
        self.assertTrue(row[0].startswith("scrypt$") and row[1] == "", row)

        status, out, err = yield self.admin("user", "reset-password", "alice", "--password-stdin", stdin="chosen secret 9\n")
        self.assertEqual((status, err), (0, None))
        self.assertEqual(sorted(out), ["id", "username"])  # a password given is not printed back
        self.assertEqual((yield self.login("alice", password)).json()["message"], LOGIN_FAILED)
        self.assertTrue((yield self.login("alice", "chosen secret 9")).json()["success"])

        status, out, err = yield self.admin("user", "reset-password", "alice", "--password-stdin", stdin="abc\n")
        self.assertEqual((status, out), (1, None))
        self.assertEqual(err, {"error": "the password read from stdin: Password length error"})  # emoncms's words: 4 to 250
        self.assertTrue((yield self.login("alice", "chosen secret 9")).json()["success"])  # unchanged

    @defer.inlineCallbacks
    def test_unknown_users(self):
        for action in ("disable", "enable", "reset-password", "show"):
            status, out, err = yield self.admin("user", action, "nobody")
            self.assertEqual((status, out, err), (1, None, {"error": "no user named 'nobody'"}), action)


class AdminUsersSQLiteTests(AdminUsersMixin, unittest.TestCase):
    pass


class AdminUsersMariaDBTests(AdminUsersMixin, unittest.TestCase):
    database = "mysql"
