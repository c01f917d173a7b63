"""Shared scaffolding for property-based tests of decoders (hypothesis).

``DECODER`` bounds the examples so the suite stays fast; ``assert_linear`` checks that a
decoder's time grows at most linearly with its input, on inputs built to trigger backtracking
or recursion, and that the largest parameter the API accepts is decoded well inside the
~50 ms a request may hold the reactor.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any, Callable

from hypothesis import HealthCheck, settings

DECODER = settings(
    max_examples=300,
    deadline=timedelta(milliseconds=500),  # one example; generous for a shared 2-core box
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # nothing written into the checkout
)

SMALL = 4096  # characters
LARGE = 64 * 1024  # the longest parameter value the API takes
BUDGET = 0.05  # seconds: the most one decode may hold the reactor at LARGE


def _best_of_three(decode: Callable[[str], Any], text: str) -> float:
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        try:
            decode(text)
        except Exception:  # the refusals are checked by the property tests; only time here
            pass
        best = min(best, time.perf_counter() - began)
        if best > BUDGET:
            break  # far too slow already: do not wait out more runs
    return best


def assert_linear(test: Any, decode: Callable[[str], Any], make: Callable[[int], str], attempts: int = 3) -> None:
    """``decode(make(n))`` at n = SMALL and LARGE (16×): within BUDGET, and at most ~4× worse
    than linear (quadratic growth would be 256×). A busy machine can stretch one measurement,
    so a few attempts are made; a decoder that really is slow fails every one."""
    small, large = make(SMALL), make(LARGE)
    scale = len(large) / max(len(small), 1)
    t_large = math.inf
    for _ in range(attempts):
        t_small = _best_of_three(decode, small)
        if t_small > BUDGET:
            continue  # the small input alone is too slow: never try the large one
        t_large = _best_of_three(decode, large)
        if t_large < BUDGET and t_large < 4 * scale * t_small + 0.002:
            return
    test.fail(
        f"{len(small)} → {len(large)} characters: {t_small * 1e3:.3f} ms → {t_large * 1e3:.3f} ms "
        f"(budget {BUDGET * 1e3:.0f} ms, linear × 4 = {4 * scale * t_small * 1e3 + 2:.1f} ms): {large[:40]!r}..."
    )
