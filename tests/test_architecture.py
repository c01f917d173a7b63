"""The architecture contract (``.importlinter``): folders in data-path order, imports
only downward. ``lint-imports`` runs here so that ``bin/test`` (and CI) fails on an
upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint_imports(checkout: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` run in ``checkout`` (its ``.importlinter`` and its ``emond``)."""
    env = {**os.environ, "PYTHONPATH": checkout}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)


class ImportContractTests(unittest.TestCase):
    def test_the_contract_is_kept(self) -> None:
        result = lint_imports(ROOT)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("2 kept, 0 broken", result.stdout)

    def upward(self, module: str, line: str) -> subprocess.CompletedProcess[str]:
        """The contract run over a copy of the package in which ``module`` imports upward."""
        copy = tempfile.mkdtemp(prefix="emond-arch-")
        self.addCleanup(shutil.rmtree, copy)
        shutil.copytree(os.path.join(ROOT, "emond"), os.path.join(copy, "emond"), ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(os.path.join(ROOT, ".importlinter"), copy)
        path = os.path.join(copy, *module.split(".")) + ".py"
        with open(path, "a") as f:
            f.write(f"\n{line}\n")
        return lint_imports(copy)

    def test_a_layer_importing_a_layer_above_it_breaks_the_build(self) -> None:
        result = self.upward("emond.meta.db", "import emond.api.http  # upward")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("emond.meta.db -> emond.api.http", result.stdout)

    def test_a_shared_module_importing_a_layer_breaks_the_build(self) -> None:
        result = self.upward("emond.queue", "import emond.storage.sender  # upward")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("emond.queue -> emond.storage.sender", result.stdout)
