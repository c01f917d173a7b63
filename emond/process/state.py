"""A consumer's process state in Redis: what it loads before a pass, how it
rebuilds what Redis lost, and what it commits (the process functions that
change the state in between are pure: ``emond.process.functions``).

Before a pass the consumer loads, for the inputs, feeds and extra state the
pass's process lists read and that its tenure has not cached yet, their
values from Redis (one pipeline). After the pass the changed values and the
storage records the lists emitted go into the queue's fenced commit
(``to_commit``), one Lua script with the acknowledgement.

State Redis has lost (FLUSHALL, a promoted replica, a new disk) is rebuilt,
never restarted:

- a feed's last value comes from its last point on disk. Its time is the
  latest a packet counted in that point can have had: a PHPTimeSeries
  record's own time, the last second of a PHPFina slot. So no packet
  already counted is counted again (a device's retry after the loss); the
  price, for PHPFina, is that packets in the rest of that slot count as
  already counted, and the first increment after the rebuild counts from
  the slot's end: at most one interval short, once. It is written back to
  Redis. A NaN point gives the value 0. A storage server that cannot be
  read stops the pass until it can (``StorageUnreadable``): a total is
  never restarted from 0.
- a feed written by a daily step has its point at a day start: only the day
  is known, not the time of its last packet (``day_only``). The day's value
  is kept; the first packet after the rebuild adds no time-based increment
  (kWh/d, on-time: the baseline restarts, as after a gap); max/min compare
  with the day's value. This state stays in the tenure, not in Redis (a day
  start there would read as a packet at midnight); each tenure rebuilds it
  alike until a packet is applied. Wh increments (kwhinc_to_kwhd) of a
  packet counted before the loss and sent again count again: nothing on
  disk tells which packets of the day were counted.
- a step's last applied times (``emond:step``) need no rebuild: the feed's
  time (or the extra state's) already refuses what was counted.
- extra state (``process:<name>:<feed>``) gone: the reference reading
  restarts (wh_accumulator, kwh_to_kwhd, kwh_to_power, ratechange: the
  next reading sets it, no increment is counted from it), totals are kept.
- an input's last value comes from the database (``inputs.time/value``,
  written by the consumer at most every ``[input] lastvalue_save_interval``
  seconds): a value at most that old, never a made-up 0.
"""

from __future__ import annotations

import zoneinfo
from typing import Any, Iterable, Mapping, Protocol

import numpy as np
from twisted.logger import Logger

from emond import keys
from emond.engine import NoSuchFeed
from emond.errors import EmondError
from emond.meta.feeds import Feed
from emond.storage.feedstore import FeedStore
from emond.meta.inputs import Inputs
from emond.queue import Commit
from emond.records import ENGINE_PHPFINA, RECORD
from emond.redis import Redis
from emond.process.functions import ExtraKey, ProcessState, day_start, stored_number, stored_time

Wanted = list[tuple[str, Any]]  # ("input" | "step", input id), ("feed", feed id), ("extra", ExtraKey)


class StorageUnreadable(Exception):
    """A feed's last point on disk is needed and its storage server cannot be read now."""


class FeedOwner(Protocol):
    """What rebuilding a feed needs of the user whose list computes with it."""

    feeds: Mapping[int, Feed]  # the user's feeds, by id
    tz: zoneinfo.ZoneInfo
    daily: set[int]  # the feeds a daily step of the user writes


# -- loading ------------------------------------------------------------------------


def missing(state: ProcessState, inputids: Iterable[int], feedids: Iterable[int], extra: Iterable[ExtraKey]) -> Wanted:
    """What must be loaded from Redis before running (not cached in the state yet)."""
    wanted: Wanted = []
    for i in inputids:
        if i not in state.inputs:
            wanted.append(("input", i))
        if i not in state.steps:
            wanted.append(("step", i))
    wanted += [("feed", f) for f in feedids if f not in state.feeds]
    wanted += [("extra", k) for k in extra if k not in state.extra]
    return wanted


def load_commands(wanted: Wanted) -> list[tuple[Any, ...]]:
    """The Redis commands reading ``wanted`` (one pipeline)."""
    commands: list[tuple[Any, ...]] = []
    for kind, key in wanted:
        if kind == "input":
            commands.append(("HMGET", keys.input_lastvalue(key), "time", "value"))
        elif kind == "feed":
            commands.append(("HMGET", keys.feed_lastvalue(key), "time", "value"))
        elif kind == "step":
            commands.append(("HGETALL", keys.step_times(key)))
        else:
            commands.append(("HGETALL", keys.process_state(*key)))
    return commands


def loaded(state: ProcessState, wanted: Wanted, replies: list[Any]) -> tuple[list[int], list[int]]:
    """Cache what Redis answered; returns the (inputs, feeds) it has no last value for, left
    uncached: their state is rebuilt (``rebuild_inputs``, ``rebuild_feed``), never made up."""
    absent_inputs: list[int] = []
    absent_feeds: list[int] = []
    for (kind, key), reply in zip(wanted, replies):
        if kind in ("input", "feed"):
            t, v = reply
            if t is None and v is None:
                (absent_inputs if kind == "input" else absent_feeds).append(key)
                continue
            # an unreadable time (emoncms.org kept date strings for feeds) is no time, not an error:
            # a total survives it (time 0 counts no increment), and the queue is not stuck on it
            when, value = stored_time(t) or 0, stored_number(v)
            if kind == "input":
                state.inputs[key] = (when, value)
            else:
                state.feeds[key] = (when, 0.0 if value is None else value)
        else:
            pairs = _pairs(reply)
            if kind == "step":
                state.steps[key] = {k.decode(): int(v) for k, v in pairs}
            else:
                state.extra[key] = {k.decode(): v.decode() for k, v in pairs}
    return absent_inputs, absent_feeds


def _pairs(reply: Any) -> list[tuple[bytes, bytes]]:
    if isinstance(reply, dict):
        return list(reply.items())
    reply = reply or []
    return list(zip(reply[::2], reply[1::2]))


# -- rebuilding (the rules are in the module docstring) ----------------------------------


def rebuild_inputs(state: ProcessState, inputids: Iterable[int], stored: Mapping[int, tuple[int | None, float | None]]) -> None:
    """Inputs Redis lost: their last values as the database keeps them, written back."""
    for i in inputids:
        when, value = stored.get(i, (None, None))
        if when is None:
            state.inputs[i] = (0, None)  # never had a value
        else:
            state.inputs[i] = (when, value)
            state.dirty_inputs.add(i)


def rebuild_feed(
    state: ProcessState, feedid: int, point: tuple[int, float | None] | None, slot: int = 1, daily: zoneinfo.ZoneInfo | None = None
) -> None:
    """A feed Redis lost, from its last point on disk (``None``: an empty feed, nothing to go on from).

    ``slot``: the seconds a point stands for (a PHPFina interval; 1 for
    PHPTimeSeries). ``daily``: the user's timezone when a daily step writes
    the feed.
    """
    if point is None:
        state.feeds[feedid] = (0, 0.0)
        return
    when, value = point
    latest = when + max(int(slot), 1) - 1  # the latest time a packet counted in the point can have had
    total = 0.0 if value is None else float(value)
    if daily is not None:
        state.feeds[feedid] = (day_start(latest, daily), total)
        state.day_only.add(feedid)
    else:
        state.feeds[feedid] = (latest, total)
        state.dirty_feeds.add(feedid)


class StateLoader:
    """Loads what a pass reads into a tenure's state: from Redis, else rebuilt (inputs from
    the database, feeds from their last points on disk, one read per storage server)."""

    log = Logger()

    def __init__(self, redis: Redis, inputs: Inputs, store: FeedStore, reachable: set[int]) -> None:
        self.redis = redis
        self.inputs = inputs
        self.store = store
        self.reachable = reachable  # storage servers this process can read (hosted or linked)

    async def load(
        self,
        state: ProcessState,
        inputids: Iterable[int],
        feedids: Iterable[int],
        extra: Iterable[ExtraKey],
        read_feeds: Mapping[int, FeedOwner],
    ) -> None:
        """``read_feeds``: the feeds whose last value a step computes with, and whose list it is."""
        wanted = missing(state, inputids, feedids, extra)
        if not wanted:
            return
        absent_inputs, absent_feeds = loaded(state, wanted, await self.redis.pipeline(load_commands(wanted)))
        if absent_inputs:
            rebuild_inputs(state, absent_inputs, await self.inputs.stored_lastvalues(absent_inputs))
        # A feed only written (log_to_feed) needs no last value: its first write sets it.
        rebuild = {f: read_feeds[f] for f in absent_feeds if f in read_feeds}
        if rebuild:
            await self._rebuild_feeds(state, rebuild)

    async def _rebuild_feeds(self, state: ProcessState, absent: Mapping[int, FeedOwner]) -> None:
        found = {f: owner.feeds[f] for f, owner in absent.items() if f in owner.feeds}
        readable = [feed for feed in found.values() if feed.server in self.reachable]
        summaries = await self.store.summaries(readable) if readable else {}
        for feedid, owner in absent.items():
            feed = found.get(feedid)
            if feed is None:
                rebuild_feed(state, feedid, None)  # not the user's (deleted): its steps do nothing
                continue
            if feed.server not in self.reachable:
                # Nothing on this process reads that server: a new feed, or state it cannot rebuild.
                self.log.warn(
                    "feed {feed}: no last value in Redis and storage server {server} is not reachable from "
                    "this process to read its last point; it starts empty (give this process "
                    "[storage.servers] {server} to rebuild such state from disk)", feed=feedid, server=feed.server,
                )
                rebuild_feed(state, feedid, None)
                continue
            summary = summaries[feedid]
            point = summary.last if summary.size is not None else await self._disk_last(feed)
            slot = feed.interval if feed.engine == ENGINE_PHPFINA else 1
            rebuild_feed(state, feedid, point, slot, owner.tz if feedid in owner.daily else None)
        if readable:
            self.log.info("{n} feeds had no last value in Redis: rebuilt from their last points on disk", n=len(readable))

    async def _disk_last(self, feed: Feed) -> tuple[int, float | None] | None:
        """The last point of a feed whose summary failed: None if its files are gone, else
        ``StorageUnreadable`` (its server is down or failing): never a restart from 0."""
        try:
            return await self.store.lastvalue(feed)
        except (NoSuchFeed, KeyError):
            return None
        except (EmondError, OSError) as e:  # the engine refused, or the server is unavailable or slow
            raise StorageUnreadable(f"feed {feed.id}: last point on storage server {feed.server} unreadable ({e})") from e


# -- committing ---------------------------------------------------------------------


def to_commit(state: ProcessState, commit: Commit) -> None:
    """The state's changes and its storage records (one batch per storage server) into ``commit``."""
    for i in state.dirty_inputs:
        t, v = state.inputs[i]
        commit.command("HSET", keys.input_lastvalue(i), "time", t, "value", "" if v is None else repr(v))
    for f in state.dirty_feeds:
        t, v = state.feeds[f]
        # Only if newer: feed/insert may have set a later value meanwhile.
        commit.set_if_newer(keys.feed_lastvalue(f), t, repr(v))
    for i in state.dirty_steps:
        flat = [x for k, v in state.steps[i].items() for x in (k, v)]
        if flat:
            commit.command("HSET", keys.step_times(i), *flat)
    for key in state.dirty_extra:
        flat = [x for k, v in state.extra[key].items() for x in (k, v)]
        if flat:
            commit.command("HSET", keys.process_state(*key), *flat)
    # Records a pass ran as arrays (emond.process.plans) come first: a pass runs its chunks as
    # arrays before it runs any value by value.
    for server in [*state.arrays, *(s for s in state.records if s not in state.arrays)]:
        parts = list(state.arrays.get(server, ()))
        if server in state.records:
            parts.append(np.array(state.records[server], dtype=RECORD))
        commit.append_storage(server, (parts[0] if len(parts) == 1 else np.concatenate(parts)).tobytes())
