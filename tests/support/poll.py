"""Waiting for a condition in a test: looked at every POLL seconds until a deadline (never a
sleep that hopes the condition holds by then)."""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from twisted.internet import reactor, task

POLL = 0.05  # seconds between two looks


async def until(condition: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    """Wait until ``condition()`` holds (it may be a coroutine); AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if not isinstance(held, bool):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await task.deferLater(reactor, POLL, lambda: None)
