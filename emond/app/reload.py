"""What a reload (SIGHUP) may change in a running process, and what needs a restart.

The config file is read again with the loader the process started with; the keys that
differ from the running config are split into those a running process takes (limits
read per request, trusted proxies, the log level, the drain budget) and the others (ports,
database and Redis urls, shards, storage ids, data directories, pools ...), which keep
their running values until a restart. The ``[tls]`` files are read again at every reload
whatever the config says (a renewed certificate replaces the old file); their paths need a
restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from emond.config import NodeConfig, StorageConfig

# Per section (a config's field name), the keys a reload applies.
NODE_RELOADABLE: Mapping[str, frozenset[str]] = MappingProxyType({
    "node": frozenset({"access_log", "drain_timeout", "log_level"}),
    "input": frozenset({
        "max_body", "max_inflated", "max_frames", "max_values", "time_future", "rate_limit", "rate_burst",
        "max_nodes", "max_inputs",
    }),
    "users": frozenset({
        "registration", "session_days", "trusted_proxies", "login_window", "login_failures_per_client",
        "login_failures_per_address", "login_failures_per_user", "login_slow_seconds", "registrations_per_address",
        "registration_window", "max_feeds",
    }),
    "feeds": frozenset({"max_datapoints", "read_timeout"}),
})
STORAGE_RELOADABLE: Mapping[str, frozenset[str]] = MappingProxyType({
    "storage": frozenset({"allow", "drain_timeout", "log_level"}),
})

# A config field's name in the file, where it differs.
_SECTION_NAMES = MappingProxyType({"storage_servers": "storage.servers"})


@dataclass(frozen=True)
class Change:
    section: str  # the config's field: "input", "shards", ...
    key: str  # "" for a whole section, or a table of it ("[shards] a")
    where: str  # as the file says it: "[input] max_values", "[shards.a] redis"


@dataclass(frozen=True)
class Plan:
    applied: tuple[Change, ...]  # changes the running process takes
    refused: tuple[Change, ...]  # changes that need a restart (their old values stay)
    config: Any  # the running config with the applied changes


def changes(old: Any, new: Any) -> list[Change]:
    """Every key whose value differs between two configs of one kind."""
    found: list[Change] = []
    for f in dataclasses.fields(old):
        if f.name == "path":
            continue
        section = _SECTION_NAMES.get(f.name, f.name)
        _diff(getattr(old, f.name), getattr(new, f.name), f.name, section, found)
    return found


def _diff(old: Any, new: Any, field: str, section: str, found: list[Change], key: str = "") -> None:
    if old == new:
        return
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        for f in dataclasses.fields(old):
            if getattr(old, f.name) != getattr(new, f.name):
                found.append(Change(field, f.name if not key else f"{key}.{f.name}", f"[{section}] {f.name}"))
        return
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for name in sorted(set(old) | set(new), key=str):
            if name in old and name in new:
                _diff(old[name], new[name], field, f"{section}.{name}", found, str(name))
            else:
                found.append(Change(field, str(name), f"[{section}] {name}"))
        return
    found.append(Change(field, "", f"[{section}]"))  # a section added or removed ([tls])


def plan(old: Any, new: Any, reloadable: Mapping[str, frozenset[str]]) -> Plan:
    """What a reload from ``old`` to ``new`` does: each change applied or refused, and the
    config the process runs with after it."""
    applied, refused = [], []
    for change in changes(old, new):
        (applied if change.key in reloadable.get(change.section, ()) else refused).append(change)
    sections: dict[str, Any] = {}
    for change in applied:
        section = sections.get(change.section, getattr(old, change.section))
        sections[change.section] = dataclasses.replace(section, **{change.key: getattr(getattr(new, change.section), change.key)})
    return Plan(tuple(applied), tuple(refused), dataclasses.replace(old, **sections))


def reloadable_of(config: NodeConfig | StorageConfig) -> Mapping[str, frozenset[str]]:
    return NODE_RELOADABLE if isinstance(config, NodeConfig) else STORAGE_RELOADABLE
