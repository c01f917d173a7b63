"""Reliable queues in Redis streams, each with at most one active consumer.

An input queue ``emond:in:<n>`` holds elements appended by the web layer (one
element per queue per flush, holding every frame of that flush for that
queue). A storage queue ``emond:st:<server>`` holds packed RECORD batches,
each with a per-queue sequence number.

A consumer holds a queue through a lease (``emond:lease:<queue>`` =
``owner:token``, with a TTL) whose token comes from a counter that grows
with every new holder (the fencing token). It reads elements from the head
of the stream and removes them only in ``commit``: one Lua script that first
checks the lease still carries its token and then, atomically, applies the
state changes the consumer computed, appends to other queues and deletes the
consumed elements. A stalled former holder therefore cannot commit, and an
element leaves its queue only once its processing is durable in Redis; the
elements of a consumer that died are simply read again by the next holder.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

from emond import keys
from emond.config import InputSection
from emond.keys import storage_seq, storage_stream
from emond.redis import Redis, RedisUnavailable

# Commands a commit may carry (a whitelist: the script runs them verbatim).
COMMIT_COMMANDS = frozenset({"HSET", "HDEL", "DEL", "SET", "INCRBY", "EXPIRE", "XADD"})

LEASE = """
local current = redis.call('GET', KEYS[1])
if current then
  if current == ARGV[1] .. ':' .. ARGV[3] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(ARGV[3])
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
"""

# Raise a fencing counter to at least ARGV[1] (never lowers it).
RAISE_FENCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV: holder, n ids, ids..., then ops: name, nargs, args...
# XADDSEQ stream seqkey payload: XADD with the next sequence number of that stream.
# HSETMAX key time value: set {time, value} only if time is not older than the stored one.
COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local i = 2
local n = tonumber(ARGV[i])
i = i + 1
local j = 0
while j < n do
  local k = math.min(n - j, 1000)
  redis.call('XDEL', KEYS[2], unpack(ARGV, i + j, i + j + k - 1))
  j = j + k
end
i = i + n
while i <= #ARGV do
  local name = ARGV[i]
  local nargs = tonumber(ARGV[i + 1])
  i = i + 2
  if name == 'XADDSEQ' then
    local seq = redis.call('INCR', ARGV[i + 1])
    redis.call('XADD', ARGV[i], '*', 's', seq, 'b', ARGV[i + 2])
  elseif name == 'HSETMAX' then
    local stored = redis.call('HGET', ARGV[i], 'time')
    if (not stored) or tonumber(stored) <= tonumber(ARGV[i + 1]) then
      redis.call('HSET', ARGV[i], 'time', ARGV[i + 1], 'value', ARGV[i + 2])
    end
  else
    redis.call(name, unpack(ARGV, i, i + nargs - 1))
  end
  i = i + nargs
end
return 1
"""

# Append with the stream's next sequence number (storage queues, outside a consumer commit).
APPEND_SEQ = """
local seq = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], '*', 's', seq, 'b', ARGV[1])
"""


class QueueLayoutError(Exception):
    """This process's queue layout disagrees with the one recorded in Redis."""


@dataclass(frozen=True)
class QueueLayout:
    """How users map to input queues: by a hash of the id, or by emoncms.org-style id ranges."""

    queues: int
    mapping: str
    ranges: tuple[int, ...]

    @classmethod
    def from_config(cls, section: InputSection) -> "QueueLayout":
        if section.mapping == "ranges" and len(section.ranges) + 1 != section.queues:
            raise QueueLayoutError(f"[input] ranges: {len(section.ranges)} bounds make {len(section.ranges) + 1} queues, not {section.queues}")
        return cls(section.queues, section.mapping, tuple(section.ranges))

    def queue_for(self, userid: int) -> int:
        if self.mapping == "ranges":
            for i, bound in enumerate(self.ranges):
                if userid < bound:
                    return i
            return len(self.ranges)
        return zlib.crc32(str(userid).encode()) % self.queues

    def encode(self) -> str:
        return json.dumps({"queues": self.queues, "mapping": self.mapping, "ranges": list(self.ranges)}, sort_keys=True)

    async def check(self, redis: Redis) -> None:
        """Record the layout at first start; refuse to run with a different one."""
        await redis.call("SET", keys.INPUT_LAYOUT, self.encode(), "NX")
        recorded = await redis.call("GET", keys.INPUT_LAYOUT)
        if recorded is None or recorded.decode() != self.encode():
            raise QueueLayoutError(
                f"input queue layout in Redis is {recorded!r}, this config says {self.encode()}; "
                "drain the queues before changing [input] queues/mapping/ranges"
            )


class LeaseLost(Exception):
    """The lease was taken by another holder: stop consuming this queue."""


@dataclass
class Commit:
    """What a consumer commits with an acknowledgement, built up then sent as one script call."""

    ops: list[Any] = field(default_factory=list)

    def command(self, name: str, *args: Any) -> None:
        assert name in COMMIT_COMMANDS, name
        self.ops += [name, len(args), *args]

    def append_storage(self, server: int, payload: bytes) -> None:
        self.ops += ["XADDSEQ", 3, storage_stream(server), storage_seq(server), payload]

    def set_if_newer(self, key: str, when: int, value: str) -> None:
        self.ops += ["HSETMAX", 3, key, when, value]


class Scripts:
    """The Lua scripts, loaded once per Redis connection set and called by digest."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._sha: dict[str, str] = {}

    async def run(self, script: str, keys: list[Any], args: list[Any]) -> Any:
        sha = self._sha.get(script) or hashlib.sha1(script.encode()).hexdigest()
        try:
            return await self.redis.call("EVALSHA", sha, len(keys), *keys, *args)
        except RedisUnavailable:
            raise
        except Exception as e:
            if "NOSCRIPT" not in str(e):
                raise
        self._sha[script] = sha
        return await self.redis.call("EVAL", script, len(keys), *keys, *args)


class Lease:
    """One queue's lease for one holder; ``token`` is 0 while not held."""

    def __init__(self, scripts: Scripts, queue: str, owner: str, ttl_ms: int) -> None:
        self.scripts = scripts
        self.queue = queue
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.token = 0

    @property
    def key(self) -> str:
        return keys.lease(self.queue)

    @property
    def holder(self) -> str:
        return f"{self.owner}:{self.token}"

    @property
    def fence_key(self) -> str:
        return keys.fence(self.queue)

    async def acquire_or_renew(self) -> bool:
        """True while we hold the lease (a new token means a new tenure)."""
        token = await self.scripts.run(LEASE, [self.key, self.fence_key], [self.owner, self.ttl_ms, self.token])
        self.token = int(token)
        return self.token > 0

    async def catch_up(self, seen: int) -> None:
        """The queue's reader has seen tokens up to ``seen`` (kept on its disk) while Redis's
        counter is behind it: Redis lost its data, or was restored from an older copy. Lift the
        counter past ``seen`` and give the lease up, so the next tenure's token is newer than any
        the reader has seen. A holder whose Redis is intact never gets here: its token is the
        newest ever handed out."""
        await self.scripts.run(RAISE_FENCE, [self.fence_key], [seen])
        await self.release()

    async def release(self) -> None:
        if self.token:
            await self.scripts.run(RELEASE, [self.key], [self.holder])
            self.token = 0

    async def commit(self, stream: str, ids: list[bytes], commit: Commit) -> None:
        """Atomically apply ``commit`` and delete ``ids`` from ``stream``, if we still hold the lease."""
        done = await self.scripts.run(COMMIT, [self.key, stream], [self.holder, len(ids), *ids, *commit.ops])
        if int(done) != 1:
            self.token = 0
            raise LeaseLost(self.queue)


async def read_head(redis: Redis, stream: str, after: bytes | None, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Up to ``count`` elements of ``stream`` after id ``after`` (from the head when None)."""
    start = b"(" + after if after else b"-"
    reply = await redis.call("XRANGE", stream, start, b"+", b"COUNT", count)
    return [(entry[0], dict(zip(entry[1][::2], entry[1][1::2]))) for entry in reply or []]


def encode_group(group: list[Any]) -> bytes:
    """One request's part of an input queue element: ``[userid, received, time_ref, frames]``
    (frames as ``inputparse.Bulk`` has them), in msgpack: floats stay binary (six times
    cheaper to write than JSON) and a bulk's frames go in as decoded. Packed when the
    request is appended, so a value msgpack refuses (OverflowError) fails that request only."""
    return msgpack.packb(group)


def join_groups(packed: list[bytes]) -> bytes:
    """An input queue element from packed groups: the msgpack array of them, as
    ``msgpack.packb(groups)`` writes it (a header, then the items as they are)."""
    n = len(packed)
    if n < 16:
        header = bytes((0x90 | n,))
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return b"g" + header + b"".join(packed)


def encode_groups(groups: list[Any]) -> bytes:
    """An input queue element: the requests of one flush (see ``encode_group``)."""
    return join_groups([encode_group(g) for g in groups])


def decode_groups(payload: bytes) -> list[Any]:
    kind = payload[:1]
    if kind == b"g":
        return msgpack.unpackb(payload[1:])
    # Elements written by earlier versions: packets [userid, time, node, values, received].
    if kind == b"m":
        packets = msgpack.unpackb(payload[1:])
    elif kind == b"z":
        packets = json.loads(zlib.decompress(payload[1:]))
    else:
        packets = json.loads(payload[1:])
    return [[userid, received, when, [[0, node, values]]] for userid, when, node, values, received in packets]
