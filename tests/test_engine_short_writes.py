"""A write the disk takes only in part (a file size limit, a full disk) is an error for the
whole batch, never a batch stored in part with no error (the storage server then
acknowledges nothing, and the batch is sent again later)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from twisted.trial import unittest

# Run in a child process: RLIMIT_FSIZE applies to a whole process (CPython ignores SIGXFSZ,
# so a write past the limit is short, then fails with EFBIG).
CHILD = textwrap.dedent(
    """
    import errno, resource, sys
    import numpy as np
    from emond.phpfina import PHPFina
    from emond.phptimeseries import PHPTimeSeries
    from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES, make_records

    kind, directory = sys.argv[1], sys.argv[2]
    T0 = 1_700_000_000
    clock = lambda: T0 + 1000
    if kind == "phpfina":
        engine = PHPFina(directory, clock=clock)
        engine.create(1, 10)
        batch = make_records(1, T0 + 10 * np.arange(100), np.arange(100.0), ENGINE_PHPFINA)  # 400 bytes
    else:
        engine = PHPTimeSeries(directory, clock=clock)
        engine.create(1)
        batch = make_records(1, T0 + 10 * np.arange(100), np.arange(100.0), ENGINE_PHPTIMESERIES)  # 900 bytes
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
    try:
        refusals = engine.apply_batch(batch)
    except OSError as e:
        print("refused", errno.errorcode.get(e.errno, e.errno))
    else:
        print("stored without an error", len(refusals))
    """
)


class ShortWriteTests(unittest.TestCase):
    def run_child(self, kind: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, kind, self.mktemp()], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def test_phpfina_batch_past_a_file_size_limit_is_an_error(self) -> None:
        self.assertEqual(self.run_child("phpfina"), "refused EFBIG")

    def test_phptimeseries_batch_past_a_file_size_limit_is_an_error(self) -> None:
        self.assertEqual(self.run_child("phptimeseries"), "refused EFBIG")
