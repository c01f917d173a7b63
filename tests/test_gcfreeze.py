"""FreezeWhenReady: the start's objects leave the collector's scans once the process serves."""

from __future__ import annotations

import gc

from twisted.internet.task import Clock
from twisted.trial import unittest

from emond.app.gcfreeze import READY_POLL, FreezeWhenReady


class FreezeWhenReadyTests(unittest.TestCase):
    def test_frozen_once_ready_and_only_then(self) -> None:
        self.addCleanup(gc.unfreeze)  # the test process goes on collecting as before
        gc.unfreeze()
        answers = [(False, "not listening yet"), (False, "redis"), (True, "")]
        asked = []

        async def ready():
            asked.append(True)
            return answers[min(len(asked), len(answers)) - 1]

        clock = Clock()
        service = FreezeWhenReady(ready, clock)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(gc.get_freeze_count(), 0)
        clock.advance(READY_POLL)
        clock.advance(READY_POLL)
        self.assertFalse(service.frozen)
        self.assertEqual(gc.get_freeze_count(), 0)
        clock.advance(READY_POLL)
        self.assertTrue(service.frozen)
        self.assertGreater(gc.get_freeze_count(), 0)
        clock.advance(10 * READY_POLL)
        self.assertEqual(len(asked), 3)  # asked no more once frozen

    def test_stopped_before_ready_never_freezes(self) -> None:
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()

        async def ready():
            return True, ""

        clock = Clock()
        service = FreezeWhenReady(ready, clock)
        service.startService()
        service.stopService()
        clock.advance(10 * READY_POLL)
        self.assertFalse(service.frozen)
        self.assertEqual(gc.get_freeze_count(), 0)
