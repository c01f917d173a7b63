"""``engine.OpenFiles``: the bounded pool of feed file handles both engines use."""

from __future__ import annotations

import os
import tempfile

from twisted.trial import unittest

from emond.engine import OpenFiles


class OpenFilesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="emond-openfiles-")
        self.closed: list[tuple[int, int]] = []
        self.files = OpenFiles(2, lambda feedid, fd: self.closed.append((feedid, os.fstat(fd).st_ino)))
        self.addCleanup(self.files.close_all)

    def open(self, feedid: int) -> int:
        return self.files.get(feedid, os.path.join(self.dir, f"{feedid}.dat"), os.O_RDWR | os.O_CREAT)

    def test_a_pooled_handle_is_reused(self) -> None:
        self.assertEqual(self.open(1), self.open(1))
        self.assertEqual(list(self.files.handles), [1])

    def test_the_least_recently_used_is_closed_first_after_its_hook(self) -> None:
        self.open(1)
        self.open(2)
        self.open(1)  # 2 is now the least recently used
        self.open(3)
        self.assertEqual(list(self.files.handles), [1, 3])
        # the hook saw feed 2's handle while it was still open (fstat succeeded)
        self.assertEqual(self.closed, [(2, os.stat(os.path.join(self.dir, "2.dat")).st_ino)])

    def test_forget_closes_and_close_all_empties(self) -> None:
        fd = self.open(1)
        self.files.forget(1)
        self.assertRaises(OSError, os.fstat, fd)
        self.files.forget(1)  # not pooled: nothing to do
        self.open(2)
        self.files.close_all()
        self.assertEqual(len(self.files.handles), 0)

    def test_a_limit_below_one_keeps_one(self) -> None:
        files = OpenFiles(0, lambda feedid, fd: None)
        self.addCleanup(files.close_all)
        self.assertEqual(files.limit, 1)
