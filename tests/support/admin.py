"""``emond-admin`` run as the operator runs it: its console script, a subprocess of its own (in
a thread, so that a node running in the test's reactor keeps answering meanwhile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from twisted.internet import defer, threads

from emond.app.programs import ROOT, checkout_env

ADMIN = os.path.join(os.path.dirname(sys.executable), "emond-admin")  # the console script setup.py installs


@defer.inlineCallbacks
def run_admin(*args: str, stdin: str | None = None, timeout: float = 300):
    """``emond-admin ARGS``: (exit status, stdout JSON, stderr JSON); None for an empty stream."""
    done = yield threads.deferToThread(
        subprocess.run, [ADMIN, *args], input=stdin, capture_output=True, text=True, env=checkout_env(), cwd=ROOT, timeout=timeout
    )
    return done.returncode, _json(done.stdout), _json(done.stderr)


def _json(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError(f"emond-admin printed what is not one JSON value: {text[-2000:]!r}") from None
