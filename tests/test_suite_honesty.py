"""The suite cannot go green by not running: a missing server is an error, a skip
fails the summary unless allow-listed with a reason, and every fixture is in the repository.

Each case runs a real, tiny ``trial`` in a scratch folder (a child process) and then
``bin/trial-summary`` on its output, as ``bin/test`` does.
"""

from __future__ import annotations

import os
import re
import runpy
import sys

from twisted.internet import defer, utils
from twisted.trial import unittest

from tests.support.daemon import ROOT

SUMMARY = os.path.join(ROOT, "bin", "trial-summary")

PASS_AND_SKIP = """
from twisted.trial import unittest

class Scratch(unittest.TestCase):
    def test_passes(self):
        pass

    def test_skips(self):
        raise unittest.SkipTest("no widget on this machine")
"""

NEEDS_REDIS = """
from twisted.trial import unittest
from tests.support import redis_server

class Scratch(unittest.TestCase):
    def test_needs_redis(self):
        redis_server()
"""

NEEDS_MARIADB = """
from twisted.trial import unittest
from emond.app import programs
from tests.support import mariadb_server

programs.SBIN = "/nonexistent"  # mariadbd lives in /usr/sbin: hide it too

class Scratch(unittest.TestCase):
    def test_needs_mariadb(self):
        mariadb_server()
"""

NEEDS_HAPROXY = """
from twisted.trial import unittest
from emond.app import programs
from tests.support.daemon import start_haproxy

programs.SBIN = "/nonexistent"  # haproxy lives in /usr/sbin: hide it too

class Scratch(unittest.TestCase):
    def test_needs_haproxy(self):
        start_haproxy("haproxy.cfg", ".")
"""


class ScratchRun:
    """A scratch package with one test module, run by trial in a child process."""

    def __init__(self, test: unittest.TestCase, source: str) -> None:
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(os.path.join(self.dir, "scratch"))
        with open(os.path.join(self.dir, "scratch", "__init__.py"), "w"):
            pass
        with open(os.path.join(self.dir, "scratch", "test_scratch.py"), "w") as f:
            f.write(source)
        self.log = os.path.join(self.dir, "trial.log")

    @defer.inlineCallbacks
    def trial(self, path: str = os.environ.get("PATH", "")):
        """Run trial with ``path`` as PATH; its output goes to ``self.log``. Fires with (output, exit code)."""
        env = {"PATH": path, "PYTHONPATH": os.pathsep.join([self.dir, ROOT]), "HOME": self.dir}
        argv = ["-m", "twisted.trial", f"--temp-directory={os.path.join(self.dir, '_trial_temp')}", "scratch"]
        out, err, code = yield utils.getProcessOutputAndValue(sys.executable, argv, env=env, path=self.dir)
        output = (out + err).decode(errors="replace")
        with open(self.log, "w") as f:
            f.write(output)
        return output, code

    @defer.inlineCallbacks
    def summary(self, allowed: str | None = None):
        """Run bin/trial-summary on the log (with ``allowed`` as the allow-list). Fires with (lines, exit code)."""
        allow = os.path.join(self.dir, "skips.txt")
        with open(allow, "w") as f:
            f.write(allowed or "# nothing allowed\n")
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, [SUMMARY, "--allow", allow, self.log], env={}, path=self.dir
        )
        return (out + err).decode().splitlines(), code


class SkipSummaryTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_skip_not_allow_listed_fails_the_run_and_is_named(self):
        run = ScratchRun(self, PASS_AND_SKIP)
        output, code = yield run.trial()
        self.assertEqual(code, 0, output)  # trial itself calls a skip a success
        self.assertIn("PASSED (skips=1, successes=1)", output)
        lines, code = yield run.summary()
        self.assertEqual(code, 1)
        self.assertEqual(lines[-1], "1 passed, 1 failed")
        self.assertIn("scratch.test_scratch.Scratch.test_skips (no widget on this machine)", lines[0])

    @defer.inlineCallbacks
    def test_an_allow_listed_skip_with_a_reason_passes(self):
        run = ScratchRun(self, PASS_AND_SKIP)
        yield run.trial()
        lines, code = yield run.summary("# why\nscratch.test_scratch.Scratch.test_skips: the widget is optional\n")
        self.assertEqual((lines, code), (["1 passed, 0 failed, 1 skipped"], 0))

    @defer.inlineCallbacks
    def test_an_allow_list_entry_without_a_reason_is_refused(self):
        run = ScratchRun(self, PASS_AND_SKIP)
        yield run.trial()
        lines, code = yield run.summary("scratch.test_scratch.Scratch.test_skips:\n")
        self.assertEqual(code, 1)
        self.assertEqual(lines[-1], "1 passed, 1 failed")

    @defer.inlineCallbacks
    def test_a_run_that_never_finished_fails(self):
        run = ScratchRun(self, PASS_AND_SKIP)
        with open(run.log, "w") as f:
            f.write("scratch.test_scratch\n  Scratch\n    test_passes ...")
        lines, code = yield run.summary()
        self.assertEqual((lines, code), (["0 passed, 1 failed"], 1))

    def test_the_project_allow_list_is_well_formed(self):
        read_allowed = runpy.run_path(SUMMARY)["read_allowed"]  # bin/trial-summary's own reader
        allowed, bad = read_allowed(os.path.join(ROOT, "tests", "skips.txt"))
        self.assertEqual(bad, [])
        for test, reason in allowed.items():
            self.assertTrue(reason, test)


class MissingServerTests(unittest.TestCase):
    """Without the server's program on the machine, a test that needs it errors, naming the package."""

    timeout = 60

    @defer.inlineCallbacks
    def check(self, source: str, program: str, package: str):
        run = ScratchRun(self, source)
        output, code = yield run.trial(path="/nonexistent")
        self.assertNotEqual(code, 0, output)
        self.assertIn("FAILED (errors=1)", output)
        self.assertNotIn("SKIPPED", output)
        self.assertIn(f"MissingProgram: {program} is not installed", output)
        self.assertIn(f"install the Debian package {package}", output)
        lines, code = yield run.summary()
        self.assertEqual((lines[-1], code), ("0 passed, 1 failed", 1))

    def test_missing_redis_server_is_an_error(self):
        return self.check(NEEDS_REDIS, "redis-server", "redis-server")

    def test_missing_mariadbd_is_an_error(self):
        return self.check(NEEDS_MARIADB, "mariadbd", "mariadb-server")

    def test_missing_haproxy_is_an_error(self):
        return self.check(NEEDS_HAPROXY, "haproxy", "haproxy")


class FixtureTests(unittest.TestCase):
    def test_tests_read_nothing_outside_the_repository(self):
        """A fresh clone has no reference folder beside it: no test may reach for one."""
        outside = re.compile(r"""\.\.[/"', ]+shared|/work/+shared""")  # (does not match its own source)
        offenders = []
        for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
            for name in files:
                if name.endswith((".py", ".txt", ".json")):
                    with open(os.path.join(folder, name), errors="replace") as f:
                        if outside.search(f.read()):
                            offenders.append(name)
        self.assertEqual(offenders, [])

    def test_phpfina_fixtures_are_in_the_repository(self):
        folder = os.path.join(ROOT, "tests", "fixtures", "phpfina")
        self.assertEqual(
            sorted(os.listdir(folder)),
            sorted([f"{i}{suffix}" for i in range(1, 5) for suffix in (".meta", ".dat")] + ["writes.json"]),
        )
