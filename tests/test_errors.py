"""The edge's one table: each domain error (emond.errors) and each infrastructure error a
route may meet → HTTP status, body, Content-Type and headers.

Expected answers come from the spec: emoncms's bodies (``{"success":false,"message":...}``)
with the statuses of compat spec §B (400 for refusals, 401 ``Invalid API key`` as plain text
with emoncms's WWW-Authenticate header (§A, auth), 403 for a read key on a write route, 413,
429 with Retry-After), the ``feeds`` list of emoncms's feed_controller for a data request
naming missing feeds, and 503/504 of the storage access layer (architecture: a clear 503/504).
"""

from __future__ import annotations

import json

import pymysql
from twisted.internet import defer
from twisted.trial import unittest

from emond import errors
from emond.api.http import ERROR_ANSWERS, error_answer
from emond.meta.db import Database, DatabaseUnavailable
from emond.pools import PoolBusy
from emond.redis import RedisUnavailable
from tests.support.node import NodeHarness
from tests.support.servers import free_port, mariadb_server

JSON = b"application/json"
WWW_AUTHENTICATE = b'Bearer realm="API KEY", error="invalid_apikey", error_description="Invalid API key"'


def refusal(message: str) -> bytes:
    return b'{"success":false,"message":"' + message.encode() + b'"}'


# error -> (status, body, Content-Type, headers)
CASES = [
    (errors.Invalid("Feed does not exist"), (400, refusal("Feed does not exist"), JSON, {})),
    (
        errors.UnknownFeeds("2 feeds do not exist", [998, 999]),
        (400, b'{"success":false,"message":"2 feeds do not exist","feeds":[998,999]}', JSON, {}),
    ),
    (errors.Unauthenticated("Authentication required"), (401, refusal("Authentication required"), JSON, {})),
    (
        errors.InvalidApiKey(),
        (401, b"Invalid API key", b"text/plain; charset=utf-8", {b"WWW-Authenticate": WWW_AUTHENTICATE}),
    ),
    (errors.Forbidden("Permission denied"), (403, refusal("Permission denied"), JSON, {})),
    (
        errors.LimitReached("Feed limit reached: at most 3 feeds per user"),
        (403, refusal("Feed limit reached: at most 3 feeds per user"), JSON, {}),
    ),
    (errors.NotFound("Unknown route"), (404, refusal("Unknown route"), JSON, {})),
    (errors.TooLarge("parameter data is too long"), (413, refusal("parameter data is too long"), JSON, {})),
    (
        errors.TooMany("Too many requests, slow down", 7),
        (429, refusal("Too many requests, slow down"), JSON, {b"Retry-After": b"7"}),
    ),
    (
        errors.Failed("the feed engine could not create the feed"),
        (500, refusal("the feed engine could not create the feed"), JSON, {}),
    ),
    (
        errors.Unavailable("storage server 1 is not available"),
        (503, refusal("storage server 1 is not available"), JSON, {}),
    ),
    (
        errors.TimedOut("storage server 1 did not answer in 30 s"),
        (504, refusal("storage server 1 did not answer in 30 s"), JSON, {}),
    ),
    # infrastructure: their own words are for the log, never the client
    (
        RedisUnavailable("redis XADD: no reply within 5s"),
        (503, refusal("Service temporarily unavailable"), JSON, {}),
    ),
    (
        DatabaseUnavailable("database: OperationalError(2013, 'Lost connection to MySQL server during query')"),
        (503, refusal("Service temporarily unavailable"), JSON, {}),
    ),
    (
        PoolBusy("kdf: 12 jobs already in hand"),
        (503, refusal("Too busy, try again shortly"), JSON, {b"Retry-After": b"1"}),
    ),
]


def answered(error: BaseException) -> tuple[int, bytes, bytes, dict[bytes, bytes]]:
    answer = error_answer(error)
    return answer.code, answer.body, answer.content_type, dict(answer.headers)


class ErrorTableTests(unittest.TestCase):
    def test_each_error_is_answered_by_its_row(self) -> None:
        for error, expected in CASES:
            self.assertEqual(answered(error), expected, type(error).__name__)

    def test_every_domain_error_has_an_answer(self) -> None:
        """A new domain error cannot be forgotten: each class in emond.errors has a row."""
        domain = [getattr(errors, name) for name in errors.__all__ if name != "EmondError"]
        self.assertEqual(sorted(c.__name__ for c in domain if c not in ERROR_ANSWERS), [])
        self.assertEqual(sorted(type(e).__name__ for e, _ in CASES if type(e) in domain), sorted(c.__name__ for c in domain))

    def test_a_subclass_is_answered_as_its_base(self) -> None:
        class NameTooLong(errors.Invalid):
            pass

        self.assertEqual(answered(NameTooLong("node name must be 64 characters or less"))[:2], (400, refusal("node name must be 64 characters or less")))

    def test_messages_are_json_encoded(self) -> None:
        code, body, _, _ = answered(errors.Invalid('a "quoted" ü\n'))
        self.assertEqual((code, json.loads(body)), (400, {"success": False, "message": 'a "quoted" ü\n'}))

    def test_domain_errors_carry_no_http(self) -> None:
        """No status, no header: the domain says what happened, the edge how it is answered."""
        for error, _ in CASES:
            if isinstance(error, errors.EmondError):
                self.assertFalse({"code", "status", "headers"} & set(vars(error)), type(error).__name__)


class EdgeTests(unittest.TestCase):
    """Through a real node: an error raised below the API (here by the users model a route
    calls) reaches the client as its row of the table says, whatever its kind."""

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield NodeHarness.start(self)
        answer = yield self.node.post("user/register.json", data={"username": "alice", "password": "secret1", "email": "a@example.org"})
        self.key = answer.json()["apikey_read"]

    @defer.inlineCallbacks
    def check(self, error: BaseException, expected: tuple[int, bytes, bytes, dict[bytes, bytes]]):
        async def refuse(userid: int) -> str:
            raise error

        self.patch(self.node.ctx.users, "timezone", refuse)
        answer = yield self.node.get("user/timezone.json", apikey=self.key)
        code, body, content_type, headers = expected
        self.assertEqual((answer.code, answer.body, answer.content_type.encode()), (code, body, content_type))
        for name in (b"Retry-After", b"WWW-Authenticate"):
            self.assertEqual(answer.headers.getRawHeaders(name), [headers[name]] if name in headers else None, name)


def _edge_test(error: BaseException, expected: tuple[int, bytes, bytes, dict[bytes, bytes]]):
    def test(self: EdgeTests):
        return self.check(error, expected)

    return test


for _error, _expected in CASES:
    setattr(EdgeTests, f"test_{type(_error).__name__}", _edge_test(_error, _expected))


class DatabaseFailureTests(unittest.TestCase):
    """``emond.meta.db``: a database server that does not answer is DatabaseUnavailable (503 at
    the edge: try again); a statement the server refuses stays the driver's error (a fault,
    answered 500 and logged as a crash)."""

    @defer.inlineCallbacks
    def test_no_server_is_unavailable(self):
        db = Database.connect(f"mysql://root@127.0.0.1:{free_port()}/nothing")  # nothing listens there
        self.addCleanup(db.close)
        failure = yield self.assertFailure(db.query("SELECT 1"), DatabaseUnavailable)
        self.assertIn("2003", str(failure))  # MariaDB's "can't connect"

    @defer.inlineCallbacks
    def test_a_refused_statement_stays_the_drivers_error(self):
        maria = mariadb_server()
        db = Database.connect(f"{maria.url}{maria.create_database()}")
        self.addCleanup(db.close)
        self.assertEqual((yield db.query("SELECT 1")), ((1,),))
        failure = yield self.assertFailure(db.query("SELECT id FROM no_such_table"), pymysql.err.ProgrammingError)
        self.assertEqual(failure.args[0], 1146)
