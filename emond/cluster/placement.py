"""Where a new user goes: the shard with the fewest active feeds per unit of weight.

A shard's load is what its users' feeds bring (points to process and store), so new users
go where there are fewest feeds for the shard's ``weight`` (a shard on twice the hardware
gets weight 2). Every feed row counts as active: the central database keeps no per-feed
activity, and a feed that stopped receiving still costs its storage server reads and disk.
Ties go to the shard with fewest users (an empty cluster fills its shards in turn), then by
name. Two registrations at the same moment may pick the same shard: the balance is
approximate by design, and it corrects itself with the next registrations.
"""

from __future__ import annotations

from emond.config import NodeConfig
from emond.meta.db import Database

# Users and feeds per shard, one query (users without feeds counted once each).
_LOAD = (
    "SELECT u.shard, COUNT(DISTINCT u.id), COUNT(f.id) FROM users u "
    "LEFT JOIN feeds f ON f.userid = u.id GROUP BY u.shard"
)


async def place_new_user(db: Database, config: NodeConfig) -> str:
    """The configured shard a new user goes to (with one shard, that one, without a query)."""
    names = list(config.shards)
    if len(names) == 1:
        return names[0]
    load = {str(shard): (int(users), int(feeds)) for shard, users, feeds in await db.query(_LOAD)}
    return choose_shard({name: config.shards[name].weight for name in names}, load)


def choose_shard(weights: dict[str, float], load: dict[str, tuple[int, int]]) -> str:
    """The shard of ``weights`` (name -> weight) with the fewest feeds per weight, then fewest
    users, then the first name; ``load`` is name -> (users, feeds), missing for an empty shard."""

    def key(name: str) -> tuple[float, int, str]:
        users, feeds = load.get(name, (0, 0))
        return (feeds / weights[name], users, name)

    return min(weights, key=key)
