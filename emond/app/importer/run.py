"""The import, user by user: feeds (files, then their rows), inputs, then the account.

Order makes an interrupted import safe to run again, with no progress table: a feed's row
is written only once its files are in place and verified (a feed row means its files are
there); a user's row is written last, so its API keys work only once its feeds and inputs
are imported. Each item is judged against what emond holds (``target``): one imported by
an earlier run is left as it is and counted as ``already``. Redis state is written only
where emond has none (``state.SET_ABSENT``), so it never replaces what emond computed since.
Nothing is written on a dry run; the report is the same, with ``would`` statuses.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import threads

from emond.app.importer import files as fs
from emond.app.importer.plan import (
    apikey_usable,
    clip_description,
    engine_problem,
    feed_problem,
    input_problem,
    timezone_or_utc,
    translate_processlist,
)
from emond.app.importer.progress import ImportProgress
from emond.app.importer.remote import StreamTargets, StreamUnavailable
from emond.app.importer.source import EmoncmsDatabase, SourceData, SourceFeed, SourceInput, SourceUser
from emond.app.importer.state import REBUILT, StateCopier, StateUnavailable
from emond.app.importer.target import FeedRow, Index, InputRow, NewUser, Writer, describe, load_index
from emond.cluster.placement import place_new_user
from emond.config import NodeConfig
from emond.meta.db import Database
from emond.meta.feeds import Feed
from emond.meta.schema import migrate
from emond.meta.users import apikey_digest, new_apikey, username_key
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES
from emond.storage.location import location_dir

KINDS = ("users", "inputs", "feeds", "files", "bytes")


class ImportFailed(Exception):
    """The import cannot go on (a source or emond's storage unusable); run it again once fixed."""


@dataclass(frozen=True)
class ImportOptions:
    mysql: str
    phpfina: str
    phptimeseries: str
    redis: str | None = None
    shard: str | None = None
    adopt: bool = False
    dry_run: bool = False


@dataclass
class Report:
    dry_run: bool
    mode: str
    imported: Counter[str] = field(default_factory=Counter)
    already: Counter[str] = field(default_factory=Counter)
    unmapped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def refuse(self, kind: str, ident: int | str, reason: str, **more: Any) -> None:
        self.unmapped.append({"kind": kind, "id": ident, **more, "reason": reason})

    def note(self, kind: str, ident: int, text: str) -> None:
        self.notes.append({"kind": kind, "id": ident, "note": text})

    def count(self, kind: str, already: bool, n: int = 1) -> None:
        (self.already if already else self.imported)[kind] += n

    def add_files(self, results: list[fs.FileResult], already: bool) -> None:
        self.files += [r.as_json() for r in results]
        self.count("files", already, len(results))
        self.count("bytes", already, sum(r.bytes for r in results))

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "mode": self.mode,
            "counts": {k: self.imported[k] + self.already[k] for k in KINDS},
            "imported": {k: self.imported[k] for k in KINDS},
            "already": {k: self.already[k] for k in KINDS},
            "unmapped": self.unmapped,
            "notes": self.notes,
            "files": self.files,
            "verified": all(f["verified"] is not False for f in self.files),  # what this run put in place
            "state": self.state,
        }


class Importer:
    def __init__(self, config: NodeConfig, options: ImportOptions, reactor: Any, progress: ImportProgress) -> None:
        self.config = config
        self.options = options
        self.reactor = reactor
        self.progress = progress
        self.report = Report(options.dry_run, "adopt" if options.adopt else "copy")
        self.dirs = {ENGINE_PHPFINA: options.phpfina, ENGINE_PHPTIMESERIES: options.phptimeseries}
        self.locations = {
            sid: location_dir(config.node.datadir, sid, i == 0) for i, sid in enumerate(config.node.storage)
        }
        self.db: Database | None = None
        self.writer: Writer | None = None
        self.index = Index()
        self.state: StateCopier | None = None  # with --redis
        self.streams = StreamTargets(config, reactor)
        self.placed: dict[str, set[int]] = {"feeds": set(), "inputs": set()}  # source ids now in emond (this run or before)

    # -- the whole run ----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        self._check_options()
        data = await self._read_source()
        self.progress.say(
            f"emoncms: {len(data.users)} users, {len(data.inputs)} inputs, {len(data.feeds)} feeds"
            + (" (dry run: nothing is written)" if self.options.dry_run else "")
        )
        try:
            await self._open_target()
            if self.options.redis is not None:
                self.state = StateCopier(self.config, self.reactor, self.options.redis, self.options.dry_run)
                prefix = await self.state.find_prefix([i.id for i in data.inputs], [f.id for f in data.feeds])
                self.progress.say(f"emoncms redis: keys found under the prefix {prefix!r}")
            self.progress.start(len(data.users) + len(data.feeds))
            users = {u.id for u in data.users}
            feeds_of: dict[int, list[SourceFeed]] = {}
            inputs_of: dict[int, list[SourceInput]] = {}
            for feed in data.feeds:
                feeds_of.setdefault(feed.userid, []).append(feed)
            for inp in data.inputs:
                inputs_of.setdefault(inp.userid, []).append(inp)
            for user in sorted(data.users, key=lambda u: u.id):
                await self._user(user, feeds_of.get(user.id, []), inputs_of.get(user.id, []))
            for feed in data.feeds:
                if feed.userid not in users:
                    self.report.refuse("feed", feed.id, f"its user {feed.userid} is not in emoncms's users table", user=feed.userid)
                    self.progress.step(f"feed {feed.id}: no such user {feed.userid}")
            for inp in data.inputs:
                if inp.userid not in users:
                    self.report.refuse("input", inp.id, f"its user {inp.userid} is not in emoncms's users table", user=inp.userid)
            for table in data.missing_tables:
                self.report.refuse("table", table, "not in the emoncms database: nothing of it imported")
            if self.writer is not None:
                for table, items in (("users", data.users), ("inputs", data.inputs), ("feeds", data.feeds)):
                    await self.writer.reserve_ids(table, max((item.id for item in items), default=0))
        except StateUnavailable as e:
            raise ImportFailed(str(e)) from e
        finally:
            self.progress.stop()
            await self._close()
        self.report.state = self.state.summary() if self.state is not None else dict(REBUILT)
        return self.report.as_json()

    def _check_options(self) -> None:
        for engine, directory in self.dirs.items():
            if not os.path.isdir(directory):
                raise ImportFailed(f"--{fs.engine_dir(engine)}: no such directory: {directory}")
        shard = self.options.shard
        if shard is not None and shard not in self.config.shards:
            raise ImportFailed(f"--shard: no shard {shard!r} in this config ({', '.join(sorted(self.config.shards))})")
        for name in [shard] if shard is not None else list(self.config.shards):
            server = self.config.default_server(name)
            if server in self.locations:
                continue
            if self.options.adopt:
                raise ImportFailed(
                    f"--adopt: shard {name}'s storage server {server} is not hosted by this config ([node] storage): "
                    "files are adopted only where they are on this machine; use --copy (sent over the stream)"
                )
            if server not in self.config.storage_servers:
                raise ImportFailed(f"shard {name}: its storage server {server} is neither hosted nor in [storage.servers]")

    async def _read_source(self) -> SourceData:
        try:
            source = EmoncmsDatabase(self.options.mysql)
        except ValueError as e:
            raise ImportFailed(f"--mysql: {e} (mysql://USER:PASSWORD@HOST:PORT/DB)") from e
        source.open()
        try:
            return await source.read()
        except Exception as e:
            raise ImportFailed(f"emoncms database: {describe(e)}") from e
        finally:
            await source.close()

    async def _open_target(self) -> None:
        path = self.config.sqlite_path
        if self.options.dry_run and path is not None and not os.path.exists(path):
            return  # no emond database yet: it holds nothing, and a dry run creates nothing
        self.db = Database.connect(self.config.database.url, path)
        try:
            if not self.options.dry_run:
                await migrate(self.db)
                self.writer = Writer(self.db)
            self.index = await load_index(self.db)
        except Exception as e:
            raise ImportFailed(f"emond database: {describe(e)}") from e

    async def _close(self) -> None:
        await self.streams.close()
        if self.state is not None:
            await self.state.close()
        if self.db is not None:
            await self.db.close()

    # -- one user ---------------------------------------------------------------------------

    async def _user(self, user: SourceUser, feeds: list[SourceFeed], inputs: list[SourceInput]) -> None:
        verdict = await self._judge_user(user, feeds)
        if isinstance(verdict, str):
            self.report.refuse("user", user.id, verdict, username=user.username)
            for feed in feeds:
                self.report.refuse("feed", feed.id, f"its user {user.id} is not imported", user=user.id)
                self.progress.step(f"feed {feed.id}: user not imported")
            for inp in inputs:
                self.report.refuse("input", inp.id, f"its user {user.id} is not imported", user=user.id)
            self.progress.step(f"user {user.id} {user.username}: not imported ({verdict})")
            return
        new, shard = verdict
        for feed in sorted(feeds, key=lambda f: f.id):
            await self._feed(feed, shard)
        await self._inputs(user, inputs)
        if new is not None:
            try:
                if self.writer is not None:
                    await self.writer.insert_user(new)
            except Exception as e:
                raise ImportFailed(f"user {user.id}: {describe(e)}") from e
            digests = (apikey_digest(new.apikey_write), apikey_digest(new.apikey_read))
            self.index.add_user(user.id, user.username, shard, new.holds_key, digests)
        self.report.count("users", new is None)
        if self.state is not None:  # the state of its inputs and feeds in emond (imported now or before)
            await self.state.copy(
                user.id, shard, sorted({i.id for i in inputs} & self.placed["inputs"]), sorted({f.id for f in feeds} & self.placed["feeds"])
            )
        status = "already imported" if new is None else ("would import" if self.options.dry_run else "imported")
        self.progress.step(f"user {user.id} {user.username}: {status} (shard {shard})")

    async def _judge_user(self, user: SourceUser, feeds: list[SourceFeed]) -> tuple[NewUser | None, str] | str:
        """(the row to add or None if imported already, its shard), or why it cannot be imported."""
        there = self.index.users.get(user.id)
        if there is not None:
            if there.username == user.username:
                return None, there.shard
            return f"id {user.id} is emond user {there.username!r}'s"
        if not user.username or len(user.username) > 30:
            return f"username {user.username[:60]!r} is not 1-30 characters"
        if user.username in self.index.usernames:
            return f"emond user {self.index.usernames[user.username]} has the username {user.username!r}"
        keys_: list[str] = []
        for kind, key in (("write", user.apikey_write), ("read", user.apikey_read)):
            if not apikey_usable(key):
                key = new_apikey()
                self.report.note("user", user.id, f"apikey_{kind} was not 32 hexadecimal characters (no API accepted it): a new one was made")
            owner = self.index.key_owners.get(apikey_digest(key))
            if owner is not None and owner != user.id:
                return f"its {kind} API key is emond user {owner}'s"
            keys_.append(key)
        timezone = timezone_or_utc(user.timezone)
        if timezone != user.timezone:
            self.report.note("user", user.id, f"timezone {user.timezone!r} is not one emond knows: UTC")
        holder = self.index.username_keys.get(username_key(user.username))
        if holder is not None:
            self.report.note("user", user.id, f"user {holder} has this username in another case: each logs in by its exact spelling")
        shard = self._shard_of_earlier_run(user, feeds) or self.options.shard
        if shard is None:
            shard = await place_new_user(self.db, self.config) if self.db is not None else next(iter(self.config.shards))
        return NewUser(user, shard, timezone, keys_[0], keys_[1], holder is None), shard

    def _shard_of_earlier_run(self, user: SourceUser, feeds: list[SourceFeed]) -> str | None:
        """The shard an import cut short before the user's row put some of its feeds on: the
        rest go there too (placement may choose otherwise now)."""
        for feed in feeds:
            row = self.index.feeds.get(feed.id)
            if row is not None and row.userid == user.id:
                try:
                    shard = self.config.shard_of_server(row.server)
                except KeyError:
                    continue
                if self.options.shard not in (None, shard):
                    self.report.note("user", user.id, f"an earlier run put its feeds on shard {shard}: the rest go there too")
                return shard
        return None

    # -- feeds ------------------------------------------------------------------------------

    async def _feed(self, feed: SourceFeed, shard: str) -> None:
        problem = engine_problem(feed.engine) or feed_problem(feed.name, feed.tag, feed.unit)
        if problem is not None:
            self._refuse_feed(feed, problem)
            return
        source_dir = self.dirs[feed.engine]
        files = await threads.deferToThread(fs.inspect, feed.engine, source_dir, feed.id)
        if files.problem is not None:
            self._refuse_feed(feed, files.problem)
            return
        there = self.index.feeds.get(feed.id)
        if there is not None:
            if (there.userid, there.tag, there.name, there.engine) != (feed.userid, feed.tag, feed.name, feed.engine):
                self._refuse_feed(feed, f"id {feed.id} is another emond feed's (user {there.userid}, {there.tag}:{there.name})")
                return
            results = await self._check(feed, there.server, files, source_dir)
            self.report.add_files(results, already=True)
            self.report.count("feeds", True)
            self.placed["feeds"].add(feed.id)
            self.progress.step(f"feed {feed.id} {feed.tag}:{feed.name}: already imported")
            return
        twin = self.index.feed_names.get((feed.userid, feed.tag, feed.name))
        if twin is not None:
            self._refuse_feed(feed, f"feed {twin} of the same user has the same tag and name ({feed.tag}:{feed.name}): rename one on emoncms")
            return
        server = self.config.default_server(shard)
        interval = files.interval if feed.engine == ENGINE_PHPFINA else 0
        if self.options.dry_run:
            target = self._target_dir(server, feed.engine)
            results = await threads.deferToThread(fs.plan_feed, files, source_dir, target, self.options.adopt)
        else:
            results = await self._place(self._emond_feed(feed, server, interval), files, source_dir)
            try:
                assert self.writer is not None
                await self.writer.insert_feed(feed, server, interval)
            except Exception as e:
                raise ImportFailed(f"feed {feed.id}: {describe(e)}") from e
        self.index.add_feed(feed.id, FeedRow(feed.userid, feed.tag, feed.name, feed.engine, server))
        self.report.add_files(results, already=False)
        self.report.count("feeds", False)
        self.placed["feeds"].add(feed.id)
        verb = "would be " + ("adopted" if self.options.adopt else "copied") if self.options.dry_run else results[0].status
        self.progress.step(f"feed {feed.id} {feed.tag}:{feed.name}: {verb} ({sum(r.bytes for r in results)} bytes)")

    async def _place(self, feed: Feed, files: fs.FeedFiles, source_dir: str) -> list[fs.FileResult]:
        """Copy or adopt into a hosted location, or send to a storage server over the stream."""
        place = fs.adopt_feed if self.options.adopt else fs.copy_feed
        try:
            if feed.server in self.locations:
                target = self._target_dir(feed.server, feed.engine)
                results = await threads.deferToThread(place, files, source_dir, target, self.config.engines.sync)
            else:
                results = await self.streams.put(feed, files, source_dir)
        except (fs.AdoptImpossible, StreamUnavailable) as e:
            raise ImportFailed(str(e)) from e
        except OSError as e:
            raise ImportFailed(f"feed {files.feedid}: {e}") from e
        bad = [r.name for r in results if not r.verified]
        if bad:
            raise ImportFailed(f"feed {files.feedid}: {', '.join(bad)} do not match their source")
        return results

    async def _check(self, feed: SourceFeed, server: int, files: fs.FeedFiles, source_dir: str) -> list[fs.FileResult]:
        """An imported feed's files against the source's, where this config reaches them."""
        if server in self.locations:
            return await threads.deferToThread(fs.check_existing, files, source_dir, self._target_dir(server, feed.engine))
        if server in self.config.storage_servers:
            try:
                return await self.streams.check(self._emond_feed(feed, server, files.interval), files, source_dir)
            except StreamUnavailable as e:
                raise ImportFailed(str(e)) from e
        return await threads.deferToThread(fs.check_existing, files, source_dir, None)  # not reachable: not compared

    @staticmethod
    def _emond_feed(feed: SourceFeed, server: int, interval: int) -> Feed:
        return Feed(feed.id, feed.userid, feed.name, feed.tag, feed.datatype, feed.public, feed.engine, server, interval, feed.unit)

    def _refuse_feed(self, feed: SourceFeed, reason: str) -> None:
        self.report.refuse("feed", feed.id, reason, user=feed.userid, engine=feed.engine)
        self.progress.step(f"feed {feed.id} {feed.tag}:{feed.name}: not imported ({reason})")

    def _target_dir(self, server: int, engine: int) -> str:
        location = self.locations.get(server)
        if location is None:  # a storage server reached over the stream
            return f"storage{server}:{fs.engine_dir(engine)}"
        return os.path.join(location, fs.engine_dir(engine))

    # -- inputs -----------------------------------------------------------------------------

    async def _inputs(self, user: SourceUser, inputs: list[SourceInput]) -> None:
        verdicts: dict[int, str | bool] = {}  # id -> already (True), new (False) or why not
        for inp in sorted(inputs, key=lambda i: i.id):
            verdict = self._judge_input(inp)
            verdicts[inp.id] = verdict
            if isinstance(verdict, str):
                self.report.refuse("input", inp.id, verdict, user=user.id, nodeid=inp.nodeid, name=inp.name)
            elif not verdict:
                self.index.add_input(inp.id, InputRow(inp.userid, inp.nodeid, inp.name))
        feeds = frozenset(self.index.feeds_of.get(user.id, ()))
        imported = frozenset(i for i, v in verdicts.items() if not isinstance(v, str))
        rows = []
        for inp in sorted(inputs, key=lambda i: i.id):
            verdict = verdicts[inp.id]
            if isinstance(verdict, str):
                continue
            listed = translate_processlist(inp.processlist, feeds, imported)
            for item, reason in listed.dropped:
                self.report.refuse("process", inp.id, f"{reason}: removed from the list", user=user.id, item=item)
            for text in listed.notes:
                self.report.note("input", inp.id, text)
            description = clip_description(inp.description)
            if description != inp.description:
                self.report.note("input", inp.id, "description cut to 255 characters")
            if not verdict:
                rows.append((inp, description, listed.text))
            self.report.count("inputs", bool(verdict))
            self.placed["inputs"].add(inp.id)
        if self.writer is not None:
            try:
                await self.writer.insert_inputs(rows)
            except Exception as e:
                raise ImportFailed(f"inputs of user {user.id}: {describe(e)}") from e

    def _judge_input(self, inp: SourceInput) -> str | bool:
        problem = input_problem(inp.nodeid, inp.name)
        if problem is not None:
            return problem
        there = self.index.inputs.get(inp.id)
        if there is not None:
            if there == InputRow(inp.userid, inp.nodeid, inp.name):
                return True
            return f"id {inp.id} is another emond input's (user {there.userid}, {there.nodeid}:{there.name})"
        twin = self.index.input_names.get((inp.userid, inp.nodeid, inp.name))
        if twin is not None:
            return f"input {twin} has the same node and name: emond keeps one input per node and name"
        return False
