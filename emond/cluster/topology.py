"""The shards of a process's config checked against the topology recorded in the central database.

Every process sharing the database must agree on which shards exist and which storage servers
each holds: a user's queues, state and feed files are wherever their shard says. The first
process to start records its shards; one configured otherwise refuses to start, naming what
differs, rather than put a user's data where the others will not look for it.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from twisted.logger import Logger

from emond.config import DEFAULT_SHARD, NodeConfig
from emond.meta.db import Database, Transaction
from emond.meta.schema import under_migration_lock
from emond.meta.shards import record_topology, recorded_topology, shards_of_users

log = Logger()
HINT = "(emond-admin shards shows the recorded topology)"


class TopologyMismatch(Exception):
    """This config's shards differ from those recorded in the database, or users are on a
    shard it lacks; the message names what differs."""


def storage_text(server_ids: Iterable[int]) -> str:
    """Storage server ids as the ``shards`` table records them: sorted, "1,2"."""
    return ",".join(str(sid) for sid in sorted(server_ids))


def configured_topology(config: NodeConfig) -> dict[str, str]:
    """Shard name -> its storage server ids as text, from the config."""
    return {name: storage_text(shard.storage) for name, shard in config.shards.items()}


def without_shards(config: NodeConfig) -> bool:
    """Is this the one default shard of a config without [shards]? (A [shards.NAME] section
    always names its Redis, by URL or through Sentinel; the implicit one has neither.)"""
    shard = config.shards.get(DEFAULT_SHARD)
    return len(config.shards) == 1 and shard is not None and not shard.redis and not shard.sentinels


async def check_topology(db: Database, config: NodeConfig) -> None:
    """Record the config's shards on first start; raise ``TopologyMismatch`` when they differ
    from those recorded, or when users are on a shard the config lacks. Safe when several
    processes start at once (MariaDB: under the schema migration lock).

    Without [shards], every storage server is the default shard's, and each process knows
    those it hosts or reaches (a front may know none): the recorded default shard gathers
    them all, and only a recorded topology of other shards is a mismatch."""
    configured = configured_topology(config)
    merge = without_shards(config)
    await db.transaction(lambda txn: under_migration_lock(txn, db.dialect, lambda t: _check(t, configured, merge)))


def _check(txn: Transaction, configured: Mapping[str, str], merge: bool) -> None:
    recorded = recorded_topology(txn)
    problems = []
    if merge and set(recorded) == {DEFAULT_SHARD}:
        configured = {DEFAULT_SHARD: _union(recorded[DEFAULT_SHARD], configured[DEFAULT_SHARD])}
    elif recorded:
        problems = differences(recorded, configured)
    stranded = sorted(shards_of_users(txn) - set(configured))
    if stranded:
        problems.append(f"users are on {_shards(stranded)}, which this config lacks")
    if problems:
        raise TopologyMismatch(f"topology mismatch: {'; '.join(problems)} {HINT}")
    if recorded != configured:  # the first start, or the default shard knows more servers
        record_topology(txn, configured)
        log.info("topology recorded: {shards}", shards=_listing(configured))


def storage_ids(text: str) -> list[int]:
    """The storage server ids of a recorded shard ("1,2"; "" for none)."""
    return [int(sid) for sid in text.split(",") if sid]


def _union(*storages: str) -> str:
    return storage_text({sid for text in storages for sid in storage_ids(text)})


def differences(recorded: Mapping[str, str], configured: Mapping[str, str]) -> list[str]:
    """What differs between two topologies (shard name -> storage ids as text), in words."""
    if set(recorded) != set(configured):
        return [f"the database records shards {', '.join(sorted(recorded))}; this config has {', '.join(sorted(configured))}"]
    return [
        f"shard {name} has storage servers {recorded[name]} in the database; this config gives it {configured[name]}"
        for name in sorted(recorded)
        if recorded[name] != configured[name]
    ]


def _shards(names: list[str]) -> str:
    return f"shard {names[0]}" if len(names) == 1 else f"shards {', '.join(names)}"


def _listing(topology: Mapping[str, str]) -> str:
    return "; ".join(f"{name}: storage {storage}" for name, storage in sorted(topology.items()))
