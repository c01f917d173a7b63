"""emond keeps no state in its modules: what a process holds lives in the objects its service
tree builds from the config and passes down. A module may hold constants, and those are
immutable (tuples, frozensets, MappingProxyType, frozen dataclasses), so that no code can
turn one into state shared by every request, test or service tree of the process."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections import deque

from twisted.trial import unittest

import emond

MUTABLE = (dict, list, set, bytearray, deque)


def mutable_globals() -> list[str]:
    """``module.name`` of every module-level value of emond that can be changed in place."""
    found = []
    for info in pkgutil.walk_packages(emond.__path__, "emond."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if name.startswith("__"):  # __all__, __builtins__, ...: Python's, not state
                continue
            unfrozen = (
                dataclasses.is_dataclass(value)
                and not isinstance(value, type)
                and not type(value).__dataclass_params__.frozen  # type: ignore[attr-defined]
            )
            if isinstance(value, MUTABLE) or unfrozen:
                found.append(f"{info.name}.{name}")
    return found


class ModuleStateTests(unittest.TestCase):
    def test_no_module_level_mutable_state(self):
        self.assertEqual(mutable_globals(), [])
