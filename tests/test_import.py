"""``emond-admin import``: an emoncms server moved onto emond, end to end.

Each test builds an emoncms server of its own: a database in the run's private mariadbd with
the tables of ``tests/fixtures/emoncms`` (SQL from emoncms's schema arrays), users with legacy
password hashes made by emoncms's rule, inputs with process lists in both forms, feeds whose
files are emoncms-written PHPFina fixtures and PHPTimeSeries records written by their format,
plus what emond cannot take (an engine it lacks, missing and corrupt files, a process it does not
run). It imports them with ``bin/emond-admin`` as an operator would, then starts a node on the
imported database and storage and checks that the JSON API answers with the emoncms server's
data: logins with the old passwords, the old keys posting through the imported process lists,
lists, process lists, ``feed/data.json`` equal to the fixture's slots. Expected values come from
the fixtures and emoncms's rules, not from emond.

Also: a dry run writes nothing, a second run changes nothing, an import stopped by an error or
killed finishes when run again; emoncms.org's 2018 schema with its files adopted in place and its
Redis state carried over (into MariaDB as emond's database); files sent to a storage server over
the stream; ``--shard`` on a two-shard config; the state written to a single node's private Redis.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass

import pymysql
from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from emond.app.importer import files
from emond.app.redisproc import EmbeddedRedis, embedded_redis_dir
from emond.app.importer.plan import translate_processlist, unix_time
from emond.meta.db import Database
from emond.processlist import Step, parse_lenient
from emond.redis import Redis
from tests.support import free_port, mariadb_server, redis_server, require_program
from tests.support.daemon import ROOT, remote_storage_config, start_program, started
from tests.support.node import NodeHarness, drain

ADMIN = os.path.join(ROOT, "bin", "emond-admin")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
T = 1_700_001_500  # posts: after the last point of every fixture feed
MYD = struct.Struct("<BIf")  # a PHPTimeSeries record: marker 249, time, value


def wait(coroutine):
    return defer.ensureDeferred(coroutine)


def legacy_hash(password: str, salt: str) -> str:
    """emoncms's password hash: sha256_hex(salt + sha256_hex(password))."""
    return hashlib.sha256((salt + hashlib.sha256(password.encode()).hexdigest()).encode()).hexdigest()


def fixture_feed(fixture: int) -> dict:
    """What emoncms's own PHPFina engine wrote as fixture feed ``fixture``: its ``meta`` and
    the ``slots`` it reads back."""
    with open(os.path.join(FIXTURES, "phpfina", "writes.json")) as f:
        feeds = json.load(f)["feeds"]
    return next(feed for feed in feeds if feed["feedid"] == fixture)


def fixture_slots(fixture: int) -> list[list]:
    return fixture_feed(fixture)["slots"]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass(frozen=True)
class Account:
    id: int
    username: str
    password: str
    write: str
    read: str


ALICE = Account(1, "alice", "correct horse", "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")
BOB = Account(2, "bob", "bobs-secret", "11112222333344445555666677778888", "88887777666655554444333322221111")
TEMPS = [(1_700_000_040 + 60 * k, 10.0 + 0.5 * k) for k in range(20)]  # alice's PHPTimeSeries feed


class EmoncmsSite:
    """An emoncms server's database (current or 2018 schema) and its two data directories."""

    def __init__(self, test: unittest.TestCase, schema: str = "schema.sql") -> None:
        server = mariadb_server()
        self.name = server.create_database()
        self.url = f"mysql://root@127.0.0.1:{server.port}/{self.name}"
        self.connection = pymysql.connect(host="127.0.0.1", port=server.port, user="root", database=self.name, autocommit=True)
        test.addCleanup(self.connection.close)
        with open(os.path.join(FIXTURES, "emoncms", schema)) as f:
            text = "\n".join(line for line in f if not line.lstrip().startswith("--"))
        for statement in text.split(";"):
            if statement.strip():
                self.sql(statement)
        self.dir = os.path.abspath(test.mktemp())
        self.phpfina = os.path.join(self.dir, "phpfina")
        self.phptimeseries = os.path.join(self.dir, "phptimeseries")
        os.makedirs(self.phpfina)
        os.makedirs(self.phptimeseries)

    def sql(self, statement: str, *args) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(statement, args)

    def insert(self, table: str, **row) -> None:
        names = ", ".join(row)
        self.sql(f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(row))})", *row.values())

    def user(self, account: Account, salt: str, **more) -> None:
        more.setdefault("admin", 0)
        self.insert("users", id=account.id, username=account.username, email=f"{account.username}@example.org",
                    password=legacy_hash(account.password, salt), salt=salt, apikey_write=account.write,
                    apikey_read=account.read, **more)

    def fina(self, feedid: int, fixture: int) -> None:
        """Feed ``feedid``'s files: fixture feed ``fixture``'s, as emoncms wrote them."""
        for suffix in (".dat", ".meta"):
            shutil.copyfile(os.path.join(FIXTURES, "phpfina", f"{fixture}{suffix}"), os.path.join(self.phpfina, f"{feedid}{suffix}"))

    def series(self, feedid: int, records: list[tuple[int, float]], marker: int = 249) -> None:
        with open(os.path.join(self.phptimeseries, f"feed_{feedid}.MYD"), "wb") as f:
            for when, value in records:
                f.write(MYD.pack(marker, when, value))

    def args(self, *more: str) -> list[str]:
        return ["import", "--mysql", self.url, "--phpfina", self.phpfina, "--phptimeseries", self.phptimeseries, *more]


def current_site(test: unittest.TestCase) -> EmoncmsSite:
    """alice (PHPFina and PHPTimeSeries feeds, lists in both forms), bob (one good feed and
    what emond cannot take), carol (a timezone and a key emond cannot use, nothing else)."""
    site = EmoncmsSite(test)
    site.user(ALICE, "5e0fa6c4c5e0f7bd3f1d0ee58d2d8c7a", timezone="Europe/London", lastlogin="2023-11-14 10:00:00",
              uuid="0b7f7a3c-6a5e-4d47-9c38-2f1f0a6b9e11", admin=1)
    site.user(BOB, "9d8a5b6c1e2f3a4b5c6d7e8f9a0b1c2d", timezone="America/New_York")
    site.insert("users", id=3, username="carol", email="carol@example.org", password=legacy_hash("x", "y"), salt="y",
                apikey_write="not-a-key", apikey_read="22223333444455556666777788889999", admin=0, timezone="Mars/Olympus")
    feeds = [
        (1, 1, "power", "house", 5, "W"), (2, 1, "use_kwh", "house", 5, "kWh"), (3, 1, "temp", "outside", 2, "°C"),
        (4, 1, "legacy", "house", 0, ""), (5, 2, "missing", "x", 5, ""), (6, 2, "torn", "x", 5, ""),
        (7, 2, "solar", "pv", 5, "W"), (8, 2, "pulses", "x", 2, ""),
    ]
    for feedid, userid, name, tag, engine, unit in feeds:
        site.insert("feeds", id=feedid, userid=userid, name=name, tag=tag, engine=engine, unit=unit, datatype=1, public=int(feedid == 1))
    site.fina(1, 1)
    site.fina(2, 2)
    site.series(3, TEMPS)
    site.fina(6, 1)
    with open(os.path.join(site.phpfina, "6.dat"), "ab") as f:
        f.write(b"\x00\x00")  # a torn write: 402 bytes
    site.fina(7, 4)
    site.series(8, [(1_700_000_000, 1.0), (1_700_000_060, 2.0)], marker=0)
    inputs = [
        (1, 1, "house", "power", "main", "1:1,4:2", 1_700_000_990, 148.5),
        (2, 1, "house", "temp", "", "process__scale:0.5,process__log_to_feed:3", 1_700_001_460, 21.0),
        (3, 1, "house", "old", "", "1:4", None, None),
        (4, 2, "solar", "gen", "", "process__log_to_feed:7,process__publish_to_mqtt:solar/gen", 1_700_001_995, 234.849),
        (6, 2, "solar", "bad/name", "", "", None, None),
    ]
    for inputid, userid, node, name, description, processlist, when, value in inputs:
        site.insert("input", id=inputid, userid=userid, nodeid=node, name=name, description=description,
                    processList=processlist, time=when, value=value)
    return site


@defer.inlineCallbacks
def admin(config_path: str, *args: str):
    """``bin/emond-admin --config config_path args``: (exit status, stdout JSON, stderr text)."""
    out, err, status = yield utils.getProcessOutputAndValue(ADMIN, ["--config", config_path, *args], env=dict(os.environ), path=ROOT)
    return status, json.loads(out) if out.strip() else None, err.decode()


def unmapped(report: dict) -> dict[tuple[str, object], str]:
    return {(item["kind"], item["id"]): item["reason"] for item in report["unmapped"]}


def rows(path: str, statement: str):
    """The rows of a query of an SQLite database, read through emond's own layer."""
    db = Database.connect("sqlite:///x", path)

    async def read():
        try:
            return await db.query(statement)
        finally:
            await db.close()

    return wait(read())


class CurrentSiteTests(unittest.TestCase):
    """A current emoncms server, copied (``--copy``, the default), its state rebuilt from the files."""

    @defer.inlineCallbacks
    def test_dry_run_writes_nothing_then_the_import_serves_the_old_data(self):
        site = current_site(self)
        node = NodeHarness(self, "sqlite")
        datadir = node.config.node.datadir
        status, dry, err = yield admin(node.config_path, *site.args("--dry-run"))
        self.assertEqual(status, 0, err)
        self.assertTrue(dry["dry_run"])
        self.assertFalse(os.path.exists(os.path.join(node.dir, "emond.db")))
        self.assertFalse(os.path.exists(datadir) and os.listdir(datadir), "a dry run wrote files")
        self.assertEqual({f["status"] for f in dry["files"]}, {"would copy"})

        status, report, err = yield admin(node.config_path, *site.args())
        self.assertEqual(status, 0, err)
        self.assertIn("import: [", err)  # plain progress lines: stderr is not a terminal
        self.check_report(site, report, datadir)
        self.assertEqual(dry["counts"], report["counts"])
        self.assertEqual(unmapped(dry), unmapped(report))

        # again: nothing duplicated, everything found imported already
        status, again, err = yield admin(node.config_path, *site.args())
        self.assertEqual(status, 0, err)
        self.assertEqual(again["counts"], report["counts"])
        self.assertEqual(again["imported"], {"users": 0, "inputs": 0, "feeds": 0, "files": 0, "bytes": 0})
        self.assertEqual(again["already"], report["counts"])
        self.assertEqual(unmapped(again), unmapped(report))
        self.assertEqual({(f["status"], f["verified"], f["unchanged"]) for f in again["files"]}, {("already imported", None, True)})
        self.assertTrue(again["verified"])
        db = os.path.join(node.dir, "emond.db")
        self.assertEqual((yield rows(db, "SELECT id, username FROM users ORDER BY id")), [(1, "alice"), (2, "bob"), (3, "carol")])
        self.assertEqual([r[0] for r in (yield rows(db, "SELECT id FROM feeds ORDER BY id"))], [1, 2, 3, 7])
        self.assertEqual([r[0] for r in (yield rows(db, "SELECT id FROM inputs ORDER BY id"))], [1, 2, 3, 4])

        yield node.begin(self)
        yield self.check_api(node)

    def check_report(self, site: EmoncmsSite, report: dict, datadir: str) -> None:
        names = ["1.dat", "1.meta", "2.dat", "2.meta", "7.dat", "7.meta"]
        sources = [os.path.join(site.phpfina, n) for n in names] + [os.path.join(site.phptimeseries, "feed_3.MYD")]
        self.assertFalse(report["dry_run"])
        self.assertEqual(report["counts"], {
            "users": 3, "inputs": 4, "feeds": 4, "files": 7, "bytes": sum(os.path.getsize(p) for p in sources),
        })
        self.assertEqual(report["imported"], report["counts"])
        by_source = {f["source"]: f for f in report["files"]}
        self.assertEqual(sorted(by_source), sorted(sources))
        for path in sources:
            entry = by_source[path]
            self.assertEqual((entry["sha256_source"], entry["sha256_target"], entry["verified"], entry["status"]),
                             (sha256(path), sha256(path), True, "copied"), entry)
            self.assertEqual(sha256(entry["target"]), sha256(path))
            self.assertTrue(entry["target"].startswith(datadir + os.sep), entry)
        self.assertTrue(report["verified"])
        found = unmapped(report)
        self.assertEqual(set(found), {("feed", 4), ("feed", 5), ("feed", 6), ("feed", 8), ("process", 4), ("input", 6)})
        self.assertIn("engine 0 (MYSQL)", found[("feed", 4)])
        self.assertIn("missing files", found[("feed", 5)])
        self.assertIn("402 bytes, not a whole number of 4-byte points", found[("feed", 6)])
        self.assertIn("record 0 has no record marker", found[("feed", 8)])
        self.assertIn("'process__publish_to_mqtt' is not one emond runs", found[("process", 4)])
        self.assertIn("invalid character", found[("input", 6)])
        notes = {(n["kind"], n["id"], n["note"]) for n in report["notes"]}
        self.assertIn(("input", 3, "1:4: feed 4 is not imported, the step does nothing"), notes)
        self.assertIn(("user", 3, "timezone 'Mars/Olympus' is not one emond knows: UTC"), notes)
        self.assertEqual(report["state"]["from"], "files")

    @defer.inlineCallbacks
    def check_api(self, node: NodeHarness):
        # the old passwords log in (legacy hashes), and answer the old keys
        for account in (ALICE, BOB):
            answer = yield node.post("user/auth.json", data={"username": account.username, "password": account.password})
            self.assertEqual(answer.json(), {"success": True, "userid": account.id, "apikey_write": account.write,
                                             "apikey_read": account.read})
        answer = yield node.post("user/login.json", data={"username": "alice", "password": ALICE.password})
        self.assertEqual(answer.json()["success"], True)
        answer = yield node.post("user/auth.json", data={"username": "alice", "password": "wrong"})
        self.assertEqual(answer.json()["success"], False)

        feeds = (yield node.get("feed/list.json", apikey=ALICE.read)).json()
        fields = ("id", "userid", "name", "tag", "engine", "interval", "public", "unit", "time", "value")
        self.assertEqual([{k: f[k] for k in fields} for f in feeds], [
            {"id": "1", "userid": "1", "name": "power", "tag": "house", "engine": "5", "interval": "10", "public": "1",
             "unit": "W", "time": 1_700_000_990, "value": 148.5},
            {"id": "2", "userid": "1", "name": "use_kwh", "tag": "house", "engine": "5", "interval": "10", "public": "0",
             "unit": "kWh", "time": 1_700_001_460, "value": 1495.0},
            {"id": "3", "userid": "1", "name": "temp", "tag": "outside", "engine": "2", "interval": "0", "public": "0",
             "unit": "°C", "time": TEMPS[-1][0], "value": TEMPS[-1][1]},
        ])
        inputs = (yield node.get("input/list.json", apikey=ALICE.write)).json()
        self.assertEqual(inputs, [
            {"id": "1", "nodeid": "house", "name": "power", "description": "main", "processList": "1:1,4:2",
             "time": 1_700_000_990, "value": 148.5},
            {"id": "2", "nodeid": "house", "name": "temp", "description": "",
             "processList": "process__scale:0.5,process__log_to_feed:3", "time": 1_700_001_460, "value": 21.0},
            {"id": "3", "nodeid": "house", "name": "old", "description": "", "processList": "1:4", "time": None, "value": None},
        ])
        answer = yield node.get("input/process/get.json", apikey=BOB.write, inputid="4")
        self.assertEqual(answer.json(), "process__log_to_feed:7")  # the item emond does not run is gone

        # feed/data.json over the fixture's range: its slots, as emoncms's engine reads them
        for feedid, fixture in ((1, 1), (2, 2)):
            slots = fixture_slots(fixture)
            data = yield node.get("feed/data.json", apikey=ALICE.read, id=str(feedid), start=str(slots[0][0]),
                                  end=str(slots[-1][0]), interval="10", timeformat="unix")
            self.assertEqual(data.json(), slots)
        bobs = yield node.get("feed/data.json", apikey=BOB.read, id="7", start=str(fixture_slots(4)[0][0]),
                              end=str(fixture_slots(4)[-1][0]), interval="5", timeformat="unix")
        self.assertEqual(bobs.json(), fixture_slots(4))
        temps = yield node.get("feed/data.json", apikey=ALICE.read, id="3", start=str(TEMPS[0][0]), end=str(TEMPS[-1][0]),
                               interval="60", timeformat="unix")
        self.assertEqual(temps.json(), [list(r) for r in TEMPS])

        # the old write keys post, through the imported lists (numeric and named forms)
        answer = yield node.post("input/post.json", apikey=ALICE.write, node="house", time=str(T),
                                 fulljson=json.dumps({"power": 1000, "temp": 21, "old": 5}))  # old: a step on feed 4, not imported
        self.assertEqual(answer.code, 200, answer)
        answer = yield node.post("input/post.json", apikey=BOB.write, node="solar", time=str(T), fulljson=json.dumps({"gen": 500}))
        self.assertEqual(answer.code, 200, answer)
        yield drain(node)
        values = {f["id"]: (f["time"], f["value"]) for f in (yield node.get("feed/list.json", apikey=ALICE.read)).json()}
        self.assertEqual(values["1"], (T, 1000))
        self.assertEqual(values["3"], (T, 10.5))  # scale 0.5, logged
        # power_to_kwh goes on from the last point on disk (no Redis state imported): emond's
        # rebuild counts from the end of that slot, 1700001460 + 10 - 1
        self.assertEqual(values["2"][0], T)
        self.assertAlmostEqual(values["2"][1], 1495.0 + (T - 1_700_001_469) * 1000 / 3.6e6, places=3)
        inputs = {i["name"]: (i["time"], i["value"]) for i in (yield node.get("input/list.json", apikey=ALICE.write)).json()}
        self.assertEqual(inputs, {"power": (T, 1000), "temp": (T, 21), "old": (T, 5)})
        solar = yield node.get("feed/value.json", apikey=BOB.read, id="7")
        self.assertEqual(solar.json(), 500)
        answer = yield node.post("input/post.json", apikey="not-a-key", node="solar", fulljson=json.dumps({"gen": 1}))
        self.assertEqual(answer.code, 401)

        # new items take ids after every emoncms id, imported or not (feed 8, input 6 were not):
        # a step kept in a list that names a feed not imported never writes a new feed
        created = yield node.post("feed/create.json", apikey=ALICE.write, name="new", tag="t", engine="5", datatype="1",
                                  options=json.dumps({"interval": 10}))
        self.assertEqual(created.json()["feedid"], 9)
        answer = yield node.post("input/post.json", apikey=BOB.write, node="solar", time=str(T), fulljson=json.dumps({"spare": 1}))
        self.assertEqual(answer.code, 200, answer)
        yield drain(node)
        inputs = (yield node.get("input/list.json", apikey=BOB.write)).json()
        self.assertEqual([(i["id"], i["name"]) for i in inputs], [("4", "gen"), ("7", "spare")])

    @defer.inlineCallbacks
    def test_an_interrupted_import_resumes(self):
        site = current_site(self)
        node = NodeHarness(self, "sqlite")
        datadir = node.config.node.datadir
        # bob's feed 7 cannot be put in place: the import stops there, after all of alice
        obstacle = os.path.join(datadir, "phpfina", "7.dat")
        os.makedirs(obstacle)
        status, report, err = yield admin(node.config_path, *site.args())
        self.assertEqual((status, report), (1, None), err)
        self.assertIn('{"error": "import: feed 7: ', err)
        self.assertIn("run the command again to go on", err)
        db = os.path.join(node.dir, "emond.db")
        self.assertEqual((yield rows(db, "SELECT id FROM users")), [(1,)])  # bob's row comes after his feeds
        self.assertEqual([r[0] for r in (yield rows(db, "SELECT id FROM feeds ORDER BY id"))], [1, 2, 3])

        os.rmdir(obstacle)
        status, resumed, err = yield admin(node.config_path, *site.args())
        self.assertEqual(status, 0, err)
        self.assertEqual(resumed["already"], {"users": 1, "inputs": 3, "feeds": 3, "files": 5,
                                              "bytes": resumed["already"]["bytes"]})
        self.assertEqual(resumed["imported"]["users"], 2)
        self.assertEqual(resumed["imported"]["feeds"], 1)
        self.assertEqual(resumed["counts"]["feeds"], 4)
        self.check_report_totals(site, resumed)
        self.assertEqual((yield rows(db, "SELECT id, username FROM users ORDER BY id")), [(1, "alice"), (2, "bob"), (3, "carol")])
        self.assertEqual([r[0] for r in (yield rows(db, "SELECT id FROM feeds ORDER BY id"))], [1, 2, 3, 7])
        self.assertEqual(sha256(os.path.join(datadir, "phpfina", "7.dat")), sha256(os.path.join(site.phpfina, "7.dat")))

    def check_report_totals(self, site: EmoncmsSite, report: dict) -> None:
        self.assertEqual(report["counts"]["files"], 7)
        self.assertTrue(report["verified"])
        self.assertEqual(len(unmapped(report)), 6)


def org_site(test: unittest.TestCase) -> EmoncmsSite:
    """emoncms.org's 2018 tables: dave, a Wh meter accumulated (wh_accumulator) and a power
    integrated (power_to_kwh), both PHPFina, and a PHPFiwa feed."""
    site = EmoncmsSite(test, "schema-2018.sql")
    site.user(DAVE, "0a1b2c3d4e5f60718293a4b5c6d7e8f9", timezone="Europe/Paris")
    site.insert("feeds", id=11, userid=DAVE.id, name="wh_total", tag="meter", engine=5, datatype=1, time="2023-11-14 22:29:50", value=148.5)
    site.insert("feeds", id=13, userid=DAVE.id, name="kwh", tag="meter", engine=5, datatype=1)
    site.insert("feeds", id=15, userid=DAVE.id, name="fiwa", tag="meter", engine=6, datatype=1)
    site.fina(11, 1)
    site.fina(13, 2)
    site.insert("input", id=21, userid=DAVE.id, nodeid="meter", name="wh", description="", processList="34:11", time=1_700_001_400, value=4900)
    site.insert("input", id=22, userid=DAVE.id, nodeid="meter", name="power", description="", processList="4:13", time=None, value=None)
    return site


DAVE = Account(7, "dave", "daves pass", "abcdefabcdefabcdefabcdefabcdef12", "12abcdefabcdefabcdefabcdefabcdef")


class OrgSiteTests(unittest.TestCase):
    """emoncms.org's 2018 schema, its files adopted in place, its Redis state carried over."""

    @defer.inlineCallbacks
    def test_adopted_with_the_old_redis_state(self):
        site = org_site(self)
        node = NodeHarness(self, "mysql")  # (it empties the shared redis-server: the old Redis is put there after)
        old = Redis.connect(redis_server().url[:-1] + "1", 5.0, reactor)
        self.addCleanup(old.disconnect)
        # emoncms.org's keys, under current emoncms's default prefix (phpredis prepends it as it is)
        yield wait(old.pipeline([
            ("HSET", "emoncmsinput:lastvalue:21", "time", "1700001460", "value", "5000"),
            ("HSET", "emoncmsfeed:lastvalue:11", "time", "2023-11-14 22:29:50", "value", "148.5"),  # a local date (TZ: UTC here)
            ("HSET", "emoncmsfeed:lastvalue:13", "time", "1700001463", "value", "1495"),
            ("HSET", "emoncmsprocess:whaccumulator:11", "time", "1700001460", "value", "5000"),
        ]))
        status, report, err = yield admin(node.config_path, *site.args("--adopt", "--shard", "default", "--redis", old.url))
        self.assertEqual(status, 0, err)
        self.assertEqual(report["mode"], "adopt")
        self.assertEqual(report["counts"]["users"], 1)
        self.assertEqual(report["counts"]["feeds"], 2)
        self.assertEqual([(u["kind"], u["id"], u["reason"]) for u in report["unmapped"]], [
            ("feed", 15, "engine 6 (PHPFIWA): emond stores only PHPFina (5) and PHPTimeSeries (2)"),
        ])
        self.assertEqual(report["state"], {"from": "redis", "prefix": "emoncms", "input_lastvalues": 1, "feed_lastvalues": 2,
                                           "process_state": 1, "written": 4, "kept": 0})
        datadir = node.config.node.datadir
        for name in ("11.dat", "11.meta", "13.dat", "13.meta"):
            here, there = os.stat(os.path.join(site.phpfina, name)), os.stat(os.path.join(datadir, "phpfina", name))
            self.assertEqual((here.st_dev, here.st_ino), (there.st_dev, there.st_ino), name)  # the same file, not a copy
        self.assertEqual({(f["status"], f["verified"]) for f in report["files"]}, {("linked", True)})
        self.assertEqual({f["sha256_source"] for f in report["files"] if f["file"] == "phpfina/11.dat"},
                         {sha256(os.path.join(site.phpfina, "11.dat"))})

        yield node.begin(self)
        answer = yield node.post("user/auth.json", data={"username": "dave", "password": DAVE.password})
        self.assertEqual(answer.json()["apikey_write"], DAVE.write)
        answer = yield node.get("user/get.json", apikey=DAVE.read)
        self.assertEqual((answer.json()["timezone"], answer.json()["email"]), ("Europe/Paris", "dave@example.org"))
        inputs = {i["id"]: (i["time"], i["value"]) for i in (yield node.get("input/list.json", apikey=DAVE.read)).json()}
        self.assertEqual(inputs, {"21": (1_700_001_460, 5000), "22": (None, None)})  # Redis's, then the table's
        feeds = {f["id"]: (f["time"], f["value"], f["unit"]) for f in (yield node.get("feed/list.json", apikey=DAVE.read)).json()}
        self.assertEqual(feeds, {"11": (1_700_000_990, 148.5, ""), "13": (1_700_001_463, 1495, "")})

        answer = yield node.post("input/post.json", apikey=DAVE.write, node="meter", time=str(T),
                                 fulljson=json.dumps({"wh": 5100, "power": 1000}))
        self.assertEqual(answer.code, 200, answer)
        yield drain(node)
        feeds = {f["id"]: (f["time"], f["value"]) for f in (yield node.get("feed/list.json", apikey=DAVE.read)).json()}
        # wh_accumulator goes on from the old reference reading (5000 Wh at 1700001460): +100 Wh
        self.assertEqual(feeds["11"], (T, 248.5))
        # power_to_kwh from the old Redis's last time (1700001463), not the disk's slot
        self.assertEqual(feeds["13"][0], T)
        self.assertAlmostEqual(feeds["13"][1], 1495.0 + (T - 1_700_001_463) * 1000 / 3.6e6, places=3)
        # the adopted file is emond's now: the point went into the emoncms file itself
        self.assertEqual(os.stat(os.path.join(site.phpfina, "11.dat")).st_ino, os.stat(os.path.join(datadir, "phpfina", "11.dat")).st_ino)
        created = yield node.post("feed/create.json", apikey=DAVE.write, name="new", tag="t", engine="5", datatype="1",
                                  options=json.dumps({"interval": 10}))
        self.assertEqual(created.json()["feedid"], 16)  # after emoncms's ids, 15 not imported (MariaDB's counter moved on)


class KilledImportTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_an_import_killed_midway_finishes_when_run_again(self):
        site = current_site(self)
        node = NodeHarness(self, "sqlite")
        importing = start_program([ADMIN, "--config", node.config_path, *site.args()], ROOT)
        self.addCleanup(importing.signal, signal.SIGKILL)
        yield importing.logged("feed 1 house:power: copied")
        yield importing.signal(signal.SIGKILL)  # wherever it is by now: copying, writing rows
        status, report, err = yield admin(node.config_path, *site.args())
        self.assertEqual(status, 0, err)
        self.assertEqual(report["counts"]["users"], 3)
        self.assertEqual(report["counts"]["feeds"], 4)
        self.assertEqual(report["counts"]["inputs"], 4)
        self.assertEqual(report["imported"]["users"] + report["already"]["users"], 3)
        self.assertGreaterEqual(report["already"]["feeds"], 1)  # its row was written before its line
        self.assertTrue(report["verified"])
        db = os.path.join(node.dir, "emond.db")
        self.assertEqual((yield rows(db, "SELECT id, username FROM users ORDER BY id")), [(1, "alice"), (2, "bob"), (3, "carol")])
        self.assertEqual([r[0] for r in (yield rows(db, "SELECT id FROM feeds ORDER BY id"))], [1, 2, 3, 7])
        for name in ("1.dat", "1.meta", "2.dat", "2.meta", "7.dat", "7.meta"):
            self.assertEqual(sha256(os.path.join(node.config.node.datadir, "phpfina", name)), sha256(os.path.join(site.phpfina, name)))


class RulesTests(unittest.TestCase):
    """What an emoncms item becomes (plan) and how its files are judged (files), without servers."""

    def test_process_lists_keep_their_form_and_lose_only_what_emond_does_not_run(self):
        feeds, inputs = frozenset({5, 6}), frozenset({1})
        for text in ("1:5,2:0.1,4:6", "process__log_to_feed:5,process__scale:2,process__times_input:1", "", "24:,1:5,",
                     "process__whinc_to_kwhd:6"):
            self.assertEqual(translate_processlist(text, feeds, inputs), (text, (), ()))
        # current emoncms's name for emoncms.org's kwhinc_to_kwhd (8): the list runs it as it is stored
        self.assertEqual(parse_lenient("process__whinc_to_kwhd:6"), [Step(8, 6)])
        listed = translate_processlist("process__if_zero_skip:,1:5,99:3,1:5:6,2:abc,process__log_to_feed:9,11:2", feeds, inputs)
        self.assertEqual(listed.text, "1:5,process__log_to_feed:9,11:2")
        self.assertEqual([d.item for d in listed.dropped], ["process__if_zero_skip:", "99:3", "1:5:6", "2:abc"])
        self.assertIn("'process__if_zero_skip' is not one emond runs", listed.dropped[0].reason)
        self.assertIn("'99' is not one emond runs", listed.dropped[1].reason)
        self.assertEqual(listed.dropped[3].reason, "scale: Argument must be a valid number greater or less than 0.")
        self.assertEqual(listed.notes, ("process__log_to_feed:9: feed 9 is not imported, the step does nothing",
                                        "11:2: input 2 is not imported, it reads as no value"))

    def test_times_as_emoncms_stored_them(self):
        self.assertEqual(unix_time(1_700_000_000), 1_700_000_000)
        self.assertEqual(unix_time("1700000000"), 1_700_000_000)
        self.assertEqual(unix_time(b"1700000000"), 1_700_000_000)
        # emoncms.org's feed times: 'Y-n-j H:i:s' in the server's local time, read as strtotime did
        self.assertEqual(unix_time("2018-2-6 14:03:05"), int(time.mktime((2018, 2, 6, 14, 3, 5, 0, 0, -1))))
        self.assertEqual(unix_time(datetime.datetime(2018, 2, 6, 14, 3, 5)), int(time.mktime((2018, 2, 6, 14, 3, 5, 0, 0, -1))))
        for nothing in (None, "", 0, "0000-00-00 00:00:00", "soon", float("nan")):
            self.assertIsNone(unix_time(nothing), nothing)

    def write(self, name: str, data: bytes) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
        return directory

    def test_phpfina_files_judged(self):
        def problem(meta: tuple[int, int, int, int], points: int) -> str | None:
            directory = self.write("5.meta", struct.pack("<IIII", *meta))
            with open(os.path.join(directory, "5.dat"), "wb") as f:
                f.write(b"\0" * 4 * points)
            return files.inspect(5, directory, 5).problem

        self.assertIsNone(problem((0, 0, 10, 1_700_000_000), 3))
        self.assertIsNone(problem((0, 0, 10, 0), 0))  # created, never written
        self.assertIsNone(problem((0, 2, 10, 1_700_000_000), 3))  # an older emoncms's point count, since grown
        self.assertIn("counts 4 points", problem((0, 4, 10, 1_700_000_000), 3))
        self.assertIn("not a multiple of the interval 10", problem((0, 0, 10, 1_700_000_005), 3))
        self.assertIn("holds interval 0", problem((0, 0, 0, 1_700_000_000), 3))
        self.assertIn("no start_time for the 3 points", problem((0, 0, 10, 0), 3))
        short = self.write("5.meta", b"\0" * 12)
        with open(os.path.join(short, "5.dat"), "wb"):
            pass
        self.assertIn("is 12 bytes, a PHPFina meta is 16", files.inspect(5, short, 5).problem)

    def test_phptimeseries_files_judged(self):
        def problem(records: list[tuple[int, int, float]], tail: bytes = b"") -> str | None:
            data = b"".join(MYD.pack(*r) for r in records) + tail
            return files.inspect(2, self.write("feed_3.MYD", data), 3).problem

        self.assertIsNone(problem([(249, 10, 1.0), (249, 20, 2.0)]))
        self.assertIsNone(problem([]))
        self.assertIn("record 1 goes back in time", problem([(249, 20, 1.0), (249, 10, 2.0)]))
        self.assertIn("record 1 has no record marker", problem([(249, 10, 1.0), (0, 20, 2.0)]))
        self.assertIn("is 22 bytes, not a whole number of 9-byte records", problem([(249, 10, 1.0), (249, 20, 2.0)], b"\1\2\3\4"))

    def test_adopting_files_already_in_emonds_directory_changes_nothing(self):
        directory = self.write("feed_3.MYD", MYD.pack(249, 10, 1.0))
        checked = files.inspect(2, directory, 3)
        before = os.stat(os.path.join(directory, "feed_3.MYD"))
        [result] = files.adopt_feed(checked, directory, directory, sync=False)
        self.assertEqual((result.status, result.verified, result.bytes), ("in place", True, 9))
        after = os.stat(os.path.join(directory, "feed_3.MYD"))
        self.assertEqual((before.st_ino, before.st_mtime_ns), (after.st_ino, after.st_mtime_ns))


class RemoteStorageTests(unittest.TestCase):
    """A node whose users' feeds go to a storage server it reaches over the mutual-TLS stream:
    the files are sent there and installed by the storage server, verified by SHA-256."""

    @defer.inlineCallbacks
    def test_files_sent_over_the_stream(self):
        site = current_site(self)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        stream_port = free_port()
        storage_config = remote_storage_config(base, stream_port, free_port())
        yield started(self, "emond-storage", storage_config, base, "storage 1 open on", "Site starting on")
        node = NodeHarness(self, "sqlite", extra_config=(
            f'[feeds]\ndefault_server = 1\n[storage.servers]\n1 = {{ endpoint = "tcp:127.0.0.1:{stream_port}", name = "storage1" }}\n'
            f'[tls]\nca = "{base}/tls/ca.pem"\ncert = "{base}/tls/node0.pem"\n'
        ))
        status, _, err = yield admin(node.config_path, *site.args("--adopt"))
        self.assertEqual(status, 1, err)
        self.assertIn("--adopt: shard default's storage server 1 is not hosted by this config", err)

        status, report, err = yield admin(node.config_path, *site.args())
        self.assertEqual(status, 0, err)
        self.assertEqual(report["counts"]["feeds"], 4)
        self.assertTrue(report["verified"])
        remote = os.path.join(base, "remote")
        for entry in report["files"]:
            name = entry["file"]
            self.assertEqual(entry["target"], f"storage1:{name}")
            self.assertEqual(entry["sha256_source"], sha256(entry["source"]))
            if name.endswith(".meta"):  # written by the storage server from the interval and start_time sent
                fixture = {"phpfina/1.meta": 1, "phpfina/2.meta": 2, "phpfina/7.meta": 4}[name]
                meta = fixture_feed(fixture)["meta"]
                written = struct.pack("<IIII", 0, 0, meta["interval"], meta["start_time"])
                with open(os.path.join(remote, name), "rb") as f:
                    self.assertEqual(f.read(), written)
                self.assertEqual(entry["sha256_target"], hashlib.sha256(written).hexdigest())
                self.assertEqual((entry["status"], entry["verified"]), ("written over the stream from interval and start_time", True))
            else:
                self.assertEqual(sha256(os.path.join(remote, name)), entry["sha256_source"])
                self.assertEqual((entry["sha256_target"], entry["status"], entry["verified"]),
                                 (entry["sha256_source"], "copied over the stream", True))

        status, again, err = yield admin(node.config_path, *site.args())
        self.assertEqual(status, 0, err)
        self.assertEqual(again["already"], report["counts"])
        self.assertEqual({(f["file"].endswith(".meta"), f["unchanged"]) for f in again["files"]}, {(True, None), (False, True)})

        yield node.begin(self)
        slots = fixture_slots(1)
        data = yield node.get("feed/data.json", apikey=ALICE.read, id="1", start=str(slots[0][0]), end=str(slots[-1][0]),
                              interval="10", timeformat="unix")
        self.assertEqual(data.json(), slots)
        feeds = {f["id"]: (f["server"], f["time"], f["value"]) for f in (yield node.get("feed/list.json", apikey=ALICE.read)).json()}
        self.assertEqual(feeds["3"], ("1", TEMPS[-1][0], TEMPS[-1][1]))


class PrivateRedisTests(unittest.TestCase):
    """A single node without [redis] url: the old Redis's state goes to its private redis-server,
    started for the import when the node is not running, and stopped after."""

    @defer.inlineCallbacks
    def test_state_written_to_the_private_redis(self):
        require_program("redis-server")
        site = org_site(self)
        datadir = tempfile.mkdtemp(prefix="emond-")  # short: a Unix socket path must fit
        self.addCleanup(shutil.rmtree, datadir, True)
        path = os.path.join(datadir, "emond.toml")
        with open(path, "w") as f:
            f.write(f'[node]\ndatadir = "{datadir}"\n[database]\nurl = "sqlite:///{datadir}/emond.db"\n')
        old = Redis.connect(redis_server().url[:-1] + "2", 5.0, reactor)
        self.addCleanup(old.disconnect)
        yield wait(old.call("FLUSHDB"))
        yield wait(old.pipeline([
            ("HSET", "feed:11", "time", "1700000990", "value", "148.5", "engine", "5"),  # current emoncms's feed hash
            ("HSET", "input:lastvalue:21", "time", "1700001460", "value", "5000"),
        ]))
        status, report, err = yield admin(path, *site.args("--redis", old.url))
        self.assertEqual(status, 0, err)
        self.assertEqual(report["state"], {"from": "redis", "prefix": "", "input_lastvalues": 1, "feed_lastvalues": 1,
                                           "process_state": 0, "written": 2, "kept": 0})
        directory = embedded_redis_dir(datadir)
        self.assertFalse(os.path.exists(os.path.join(directory, "redis.sock")), "the import left its redis-server running")
        server = EmbeddedRedis(directory, reactor)  # as the node will start it: the state is in its AOF
        server.startService()
        self.addCleanup(server.stopService)
        yield server.ready
        private = Redis.connect(server.url, 5.0, reactor)
        self.addCleanup(private.disconnect)
        found = yield wait(private.pipeline([("HGETALL", "feed:lastvalue:11"), ("HGETALL", "input:lastvalue:21")]))
        self.assertEqual([sorted(_pairs(r)) for r in found], [
            [(b"time", b"1700000990"), (b"value", b"148.5")], [(b"time", b"1700001460"), (b"value", b"5000")],
        ])


def _pairs(reply):
    return dict(reply).items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2])


class ShardTests(unittest.TestCase):
    """Two shards (a MariaDB central database, as several shards need): ``--shard`` places the
    users, and their feeds' files go to that shard's storage server."""

    @defer.inlineCallbacks
    def test_users_placed_on_the_shard_named(self):
        site = current_site(self)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        server = mariadb_server()
        redis = redis_server()
        path = os.path.join(base, "emond.toml")
        with open(path, "w") as f:
            f.write(
                f'[node]\ndatadir = "var"\nstorage = [0, 1]\nshard = "a"\n'
                f'[database]\nurl = "mysql://root@127.0.0.1:{server.port}/{server.create_database()}"\n'
                f'[shards.a]\nredis = "redis://127.0.0.1:{redis.port}/5"\nstorage = [0]\n'
                f'[shards.b]\nredis = "redis://127.0.0.1:{redis.port}/6"\nstorage = [1]\n'
            )
        status, _, err = yield admin(path, *site.args("--shard", "c"))
        self.assertEqual(status, 1, err)
        self.assertIn("--shard: no shard 'c' in this config (a, b)", err)
        status, report, err = yield admin(path, *site.args("--shard", "b"))
        self.assertEqual(status, 0, err)
        self.assertEqual(report["counts"]["feeds"], 4)
        for entry in report["files"]:
            self.assertEqual(entry["target"], os.path.join(base, "var", "storage1", entry["file"]))  # storage server 1's location
        status, shown, err = yield admin(path, "user", "show", "alice")
        placed = {k: shown[k] for k in ("id", "username", "shard", "feeds", "inputs")} if shown else shown  # user show says more
        self.assertEqual((status, placed), (0, {"id": 1, "username": "alice", "shard": "b", "feeds": 3, "inputs": 3}), err)
