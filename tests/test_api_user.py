"""user/... routes over real HTTP against a real node (private Redis; SQLite and MariaDB)."""

from __future__ import annotations

import hashlib

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.node import NodeHarness


class UserApiMixin:
    database = "sqlite"

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self, self.database)

    @defer.inlineCallbacks
    def register(self, username="alice", password="secret1", email="alice@example.org"):
        answer = yield self.node.post("user/register.json", data={"username": username, "password": password, "email": email})
        self.assertEqual(answer.code, 200, answer)
        return answer.json()

    @defer.inlineCallbacks
    def test_register_auth_and_keys(self):
        first = yield self.register()
        self.assertEqual(set(first), {"success", "verifyemail", "userid", "apikey_read", "apikey_write"})
        self.assertTrue(first["success"])
        self.assertRegex(first["apikey_write"], "^[0-9a-f]{32}$")
        second = yield self.register("bob", "secret2", "bob@example.org")
        self.assertGreater(second["userid"], first["userid"])
        user = yield self.node.get("user/get.json", apikey=first["apikey_write"])
        self.assertEqual(user.content_type, "application/json")
        self.assertEqual((user.json()["username"], user.json()["admin"]), ("alice", 1))
        bob = yield self.node.get("user/get.json", apikey=second["apikey_write"])
        self.assertEqual(bob.json()["admin"], 0)  # only the first user is admin
        auth = yield self.node.post("user/auth.json", data={"username": "alice", "password": "secret1"})
        self.assertEqual(auth.json(), {"success": True, "userid": first["userid"], "apikey_write": first["apikey_write"], "apikey_read": first["apikey_read"]})

    @defer.inlineCallbacks
    def test_register_rules(self):
        cases = [
            ({"username": "al", "password": "secret1", "email": "a@example.org"}, "Username length error"),
            ({"username": "al ice", "password": "secret1", "email": "a@example.org"}, "Username must only contain a-z and 0-9 characters"),
            ({"username": "alice", "password": "abc", "email": "a@example.org"}, "Password length error"),
            ({"username": "alice", "password": "secret1", "email": "not-an-email"}, "Email address format error"),
        ]
        for data, message in cases:
            answer = yield self.node.post("user/register.json", data=data)
            self.assertEqual((answer.code, answer.json()), (400, {"success": False, "message": message}))
        yield self.register()
        again = yield self.node.post("user/register", data={"username": "alice", "password": "secret1", "email": "a@example.org"})
        self.assertEqual((again.code, again.json()["message"]), (400, "Username already exists"))

    @defer.inlineCallbacks
    def test_bad_keys(self):
        keys = yield self.register()
        bad = yield self.node.get("user/get.json", apikey="0" * 32)
        self.assertEqual((bad.code, bad.body), (401, b"Invalid API key"))
        self.assertIn(b"invalid_apikey", bad.headers.getRawHeaders(b"www-authenticate")[0])
        nonsense = yield self.node.get("user/get.json", apikey="' OR 1=1 --")
        self.assertEqual(nonsense.code, 401)
        anonymous = yield self.node.get("user/get.json")
        self.assertEqual(anonymous.code, 401)
        bearer = yield self.node.request("GET", "user/get.json", headers={"Authorization": "Bearer " + keys["apikey_read"]})
        self.assertEqual(bearer.code, 200)
        self.assertNotIn("apikey_write", bearer.json())  # a read key never reveals the write key
        posted = yield self.node.post("user/get", data={"apikey": keys["apikey_read"]})
        self.assertEqual(posted.code, 200)
        read_on_write = yield self.node.get("user/newapikeywrite.json", apikey=keys["apikey_read"])
        self.assertEqual(read_on_write.code, 403)

    @defer.inlineCallbacks
    def test_new_keys_take_effect(self):
        keys = yield self.register()
        ok = yield self.node.get("user/get.json", apikey=keys["apikey_write"])  # cached now
        self.assertEqual(ok.code, 200)
        answer = yield self.node.get("user/newapikeywrite.json", apikey=keys["apikey_write"])
        new = answer.json()
        self.assertRegex(new, "^[0-9a-f]{32}$")
        old = yield self.node.get("user/get.json", apikey=keys["apikey_write"])
        self.assertEqual(old.code, 401)
        fresh = yield self.node.get("user/get.json", apikey=new)
        self.assertEqual(fresh.json()["apikey_write"], new)
        # another process's cache entry is in Redis, keyed by the digest: gone too
        stored = yield defer.ensureDeferred(self.node.ctx.redis.call("GET", "emond:apikey:" + hashlib.sha256(keys["apikey_write"].encode()).hexdigest()))
        self.assertIsNone(stored)

    @defer.inlineCallbacks
    def test_login_session_logout(self):
        yield self.register()
        login = yield self.node.post("user/login.json", data={"username": "alice", "password": "secret1"})
        self.assertEqual(login.json(), {"success": True, "message": "Login successful", "startingpage": "feed/list"})
        cookie = login.headers.getRawHeaders(b"set-cookie")[0]
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"SameSite=strict", cookie)
        self.assertNotIn(b"Secure", cookie)  # plain HTTP, no trusted proxy
        cookies = self.node.last_cookies
        me = yield self.node.request("GET", "user/get.json", cookies=cookies)
        self.assertEqual(me.json()["username"], "alice")
        uuid = yield self.node.request("GET", "user/getuuid.json", cookies=cookies)
        self.assertTrue(uuid.json()["success"])
        again = yield self.node.request("GET", "user/getuuid.json", cookies=cookies)
        self.assertEqual(uuid.json(), again.json())  # stable
        refused = yield self.node.request("GET", "user/logout", cookies=cookies)  # state-changing: needs the token
        self.assertEqual((refused.code, refused.json()), (403, {"success": False, "message": "Invalid CSRF token"}))
        self.assertEqual((yield self.node.request("GET", "user/get.json", cookies=cookies)).code, 200)
        token = yield self.node.csrf(cookies)
        yield self.node.request("GET", "user/logout", params={"csrf": token}, cookies=cookies)
        after = yield self.node.request("GET", "user/get.json", cookies=cookies)
        self.assertEqual(after.code, 401)

    @defer.inlineCallbacks
    def test_wrong_password_and_throttle(self):
        yield self.register()
        # one answer for both failures, as current emoncms (no telling who has an account)
        missing = yield self.node.post("user/login.json", data={"username": "nobody", "password": "x" * 8})
        self.assertEqual(missing.json()["message"], "Incorrect username or password")
        for _ in range(5):
            wrong = yield self.node.post("user/login.json", data={"username": "alice", "password": "wrong!"})
            self.assertEqual(wrong.json()["message"], "Incorrect username or password")
        blocked = yield self.node.post("user/login.json", data={"username": "alice", "password": "secret1"})
        self.assertEqual(blocked.code, 429)  # from this address; see tests/test_accounts.py for others

    @defer.inlineCallbacks
    def test_set_and_change_password(self):
        keys = yield self.register()
        answer = yield self.node.post("user/set.json", data={"apikey": keys["apikey_write"], "data": '{"name":"Alice","timezone":"Europe/London","unknown":1}'})
        self.assertTrue(answer.json()["success"], answer)
        me = yield self.node.get("user/get.json", apikey=keys["apikey_write"])
        self.assertEqual((me.json()["name"], me.json()["timezone"]), ("Alice", "Europe/London"))
        bad_tz = yield self.node.post("user/set.json", data={"apikey": keys["apikey_write"], "data": '{"timezone":"Mars/Base"}'})
        self.assertEqual(bad_tz.code, 400)
        malformed = yield self.node.post("user/set.json", data={"apikey": keys["apikey_write"], "data": "{not json"})
        self.assertEqual(malformed.code, 400)
        wrong = yield self.node.get("user/changepassword.json", apikey=keys["apikey_write"], old="nope", new="another1")
        self.assertEqual(wrong.json()["message"], "Old password incorrect")
        changed = yield self.node.get("user/changepassword.json", apikey=keys["apikey_write"], old="secret1", new="another1")
        self.assertTrue(changed.json()["success"])
        login = yield self.node.post("user/login.json", data={"username": "alice", "password": "another1"})
        self.assertTrue(login.json()["success"])

    @defer.inlineCallbacks
    def test_legacy_hash_is_accepted_and_upgraded(self):
        salt = "0123456789abcdef0123456789abcdef"
        legacy = hashlib.sha256((salt + hashlib.sha256(b"oldpass").hexdigest()).encode()).hexdigest()
        yield defer.ensureDeferred(self.node.ctx.db.execute(
            "INSERT INTO users (username, email, password, salt, apikey_write, apikey_read, apikey_write_hash, "
            "apikey_read_hash, uuid, created) VALUES ('legacy', 'l@example.org', ?, ?, 'a', 'b', 'c', 'd', 'u', 0)",
            legacy, salt,
        ))
        login = yield self.node.post("user/login.json", data={"username": "legacy", "password": "oldpass"})
        self.assertTrue(login.json()["success"], login)
        row = yield defer.ensureDeferred(self.node.ctx.db.one("SELECT password, salt FROM users WHERE username = 'legacy'"))
        self.assertTrue(row[0].startswith("scrypt$"))
        self.assertEqual(row[1], "")
        again = yield self.node.post("user/login.json", data={"username": "legacy", "password": "oldpass"})
        self.assertTrue(again.json()["success"])

    @defer.inlineCallbacks
    def test_registration_can_be_switched_off(self):
        node = yield NodeHarness.start(self, self.database, "[users]\nregistration = false\n")
        answer = yield node.post("user/register.json", data={"username": "carol", "password": "secret1", "email": "c@example.org"})
        self.assertEqual(answer.code, 403)

    @defer.inlineCallbacks
    def test_unknown_route_and_oversized_parameter(self):
        unknown = yield self.node.get("nothing/here.json")
        self.assertEqual((unknown.code, unknown.content_type), (404, "application/json"))
        big = yield self.node.post("user/login.json", data={"username": "x" * 70000, "password": "y"})
        self.assertEqual(big.code, 413)


class UserApiSQLiteTests(UserApiMixin, unittest.TestCase):
    database = "sqlite"


class UserApiMariaDBTests(UserApiMixin, unittest.TestCase):
    database = "mysql"
