"""Configuration: one TOML file per process, loaded into immutable, validated objects.

Every section is a frozen dataclass; its fields are the allowed keys, their
annotations the types, their defaults the defaults (a field without one is
required). Unknown keys, wrong types, values out of range, missing files and
inconsistent sections are refused at start: checking goes on past the first
problem, and ``ConfigError`` carries every one with its table, key and line
(``emond-admin check-config`` prints them all; its message is the first, one
line naming the key). Relative paths are relative to the folder of the config
file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import typing
import dataclasses
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Iterator, Mapping, TypeVar
from urllib.parse import urlsplit

from twisted.internet import endpoints

from emond.engine import FIVE_YEARS, MAX_DATAPOINTS, TWO_DAYS
from emond.phpfina import MAX_PADDING
from emond.tomllines import KeyLines


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file: where (``[table] key``) and what."""

    table: str | None  # "input", "shards.a", "storage.servers.1"; None: the file itself
    key: str | None  # "max_values", "storage[1]"; None: the table as a whole
    message: str
    line: int | None = None  # in the file, where the key (or its table) is written

    def __str__(self) -> str:
        if self.table is None:
            return self.message
        return f"[{self.table}]{' ' + self.key if self.key else ''}: {self.message}"

    def located(self, path: str) -> str:
        """``path:LINE: [table] key: message`` (without LINE when it is not written in the file)."""
        return f"{path}:{self.line}: {self}" if self.line else f"{path}: {self}"


_LEGACY = re.compile(r"^\[([^\]]+)\](?: (\S+))?: (.*)$", re.S)


class ConfigError(Exception):
    """A config file refused. ``problems``: every problem found, in the order checked; the
    message is the first, one line naming the key (``[input] queues: expected an integer,
    got 'many'``). ``ConfigError("[table] key: message")`` makes one problem of that text."""

    def __init__(self, problems: "str | list[ConfigProblem]", path: str = "") -> None:
        if isinstance(problems, str):
            found = _LEGACY.match(problems)
            problems = [ConfigProblem(found[1], found[2], found[3]) if found else ConfigProblem(None, None, problems)]
        self.problems = problems
        self.path = path  # as given to the loader
        first = problems[0]
        super().__init__(f"{path}: {first}" if first.table is None and path else str(first))

    def located(self) -> list[str]:
        """Every problem as ``path:LINE: [table] key: message``, in the order of the file's
        lines (those not written in it, e.g. a missing section's, last)."""
        ordered = sorted(self.problems, key=lambda p: (p.line is None, p.line or 0))
        return [p.located(self.path) for p in ordered]


def _path(**kw: Any) -> Any:
    """A field holding a path, resolved against the config file's folder."""
    return field(metadata={"path": True}, **kw)


def _endpoint(**kw: Any) -> Any:
    """A field holding a Twisted server endpoint string."""
    return field(metadata={"endpoint": True}, **kw)


DEFAULT_SHARD = "default"  # the one shard of a node without [shards]
SHARD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class NodeSection:
    name: str = "node0"
    # Roles (architecture §7). front: the HTTP input endpoint and the JSON API for any user.
    # shard: the shard whose input queues this process consumes and whose storage queues it
    # drains ("": none, a front only).
    front: bool = True
    shard: str = DEFAULT_SHARD
    http: str = _endpoint(default="tcp:8080:interface=127.0.0.1")
    # true: the http port is opened with SO_REUSEPORT, so several `twistd emond` processes on
    # the same Redis and database share it (the kernel spreads connections); tcp: endpoints only
    reuse_port: bool = False
    datadir: str = _path(default="var")
    storage: tuple[int, ...] = (0,)
    access_log: bool = False  # one log line per HTTP request (costs ~15% of a post's CPU)
    # Seconds a stop (SIGTERM) may take: HTTP requests in progress get half of it (then are cut),
    # the pipeline's work in hand the rest; what is left then is abandoned and logged (nothing
    # acknowledged is lost: it stays in Redis).
    drain_timeout: float = 10.0
    log_level: str = "info"  # debug, info, warn, error or critical (SIGHUP applies a change)


REDIS_TLS = "rediss"  # the scheme of a Redis reached over TLS ([tls] ca and cert)


@dataclass(frozen=True)
class RedisSection:
    # Empty: start a private redis-server under <datadir>/redis (single node). Else
    # redis://[:PASSWORD@]HOST:PORT/DB, rediss://... (TLS) or unix:///PATH?db=N.
    url: str = ""
    timeout: float = 5.0
    tls_name: str = ""  # with rediss://: the name Redis's certificate must carry ("": the url's host)

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.url).scheme == REDIS_TLS


@dataclass(frozen=True)
class DatabaseSection:
    url: str = "sqlite:///var/emond.db"


@dataclass(frozen=True)
class InputSection:
    queues: int = 64
    mapping: str = "hash"  # or "ranges"
    ranges: tuple[int, ...] = ()
    max_body: int = 8 << 20  # bytes of a request body (emoncms: PHP's post_max_size, 8 MB)
    max_inflated: int = 16 << 20  # bytes a compressed bulk may inflate to
    # frames in one input/bulk (emonhub catches up in batches of 1000); values in one request
    max_frames: int = 5000
    max_values: int = 100_000
    time_future: int = 86_400  # seconds ahead of the clock a datapoint's time may be
    rate_limit: float = 20.0  # requests per second per user (0: no limit)
    rate_burst: int = 200
    max_nodes: int = 32  # per user
    max_inputs: int = 1000  # per user
    lease_ms: int = 10_000  # how long a dead consumer holds its queues before another takes over
    lastvalue_save_interval: float = 10.0  # seconds between copies of input last values to the database
    # false: this process only accepts (a front node); other `twistd emond` processes on the
    # same Redis and database consume, e.g. one per core, each on its own HTTP port
    consume: bool = True


@dataclass(frozen=True)
class FeedsSection:
    default_server: int = 0
    # Rows one feed/data.json read may ask for per feed (current emoncms's max_datapoints).
    max_datapoints: int = MAX_DATAPOINTS
    read_timeout: float = 30.0  # seconds a storage server has to answer a read (then 504)
    # Threads formatting read answers (dates, CSV), and how many answers may wait for one (503 beyond).
    render_threads: int = 2
    render_queue: int = 32


@dataclass(frozen=True)
class UsersSection:
    registration: bool = True
    session_days: int = 30
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks).
    trusted_proxies: tuple[str, ...] = ()
    # Password guessing (user/login, user/auth, user/changepassword), counted in a fixed window;
    # see emond/meta/auth.py for why there are three counts.
    login_window: int = 900  # seconds a failed attempt counts
    login_failures_per_client: int = 5  # one username from one address: then 429 for that pair
    login_failures_per_address: int = 30  # one address, any usernames: then 429 for that address
    login_failures_per_user: int = 100  # one username, all addresses: then slowed, never locked
    login_slow_seconds: int = 10  # ... to one attempt per this many seconds for that username
    registrations_per_address: int = 10  # user/register attempts per address per window (429 beyond)
    registration_window: int = 3600
    max_feeds: int = 1000  # per user (403 beyond)
    # Password hashes (scrypt: 16 MiB and ~0.1 s of CPU each) run in this many threads at once;
    # this many more may wait, and a login beyond them is answered 503 at once.
    kdf_threads: int = 2
    kdf_queue: int = 16


@dataclass(frozen=True)
class EnginesSection:
    window_past: int = FIVE_YEARS
    window_future: int = TWO_DAYS
    max_padding: int = MAX_PADDING
    open_files: int = 4096
    sync: bool = True
    # Group commit: batches written while the write thread is busy share one sync pass, at
    # most this many; each is acknowledged only once that pass is done. 1: a pass per batch.
    sync_group: int = 16
    # Threads reading feed files, per storage location (writes have one of their own: a
    # location applies one batch at a time); reads that may wait for one (503 beyond).
    read_threads: int = 4
    read_queue: int = 100


@dataclass(frozen=True)
class HealthSection:
    """``[health]`` of both processes: who sees the details, how long a check may take."""

    # Requests with `Authorization: Bearer <admin_token>` see /health details and /metrics
    # from anywhere ("": only from this machine).
    admin_token: str = ""
    # Requests from 127.0.0.1 / ::1 (or a Unix socket) see them too. Set false when a reverse
    # proxy on this machine forwards public requests and is not in [users] trusted_proxies.
    localhost: bool = True
    check_timeout: float = 2.0  # seconds one check may take before it counts as failed


@dataclass(frozen=True)
class NodeHealthSection(HealthSection):
    """A node's ``[health]``: also when its queues count as unwell."""

    max_input_lag: float = 60.0  # seconds the oldest element of an input queue may wait
    max_storage_lag: float = 300.0  # ... of a storage queue (a storage server down or slow)
    max_input_length: int = 0  # elements in one input queue (0: no limit)
    max_storage_length: int = 0  # elements in one storage queue (0: no limit)
    max_ack_wait: float = 10.0  # seconds a batch may wait for a remote storage server's acknowledgement


MIN_ADMIN_TOKEN = 16  # characters: a short token is guessable


@dataclass(frozen=True)
class ShardSection:
    """``[shards.NAME]``: a shard, with its own Redis (its users' input queues, process state,
    last values and storage queues) and its own storage servers."""

    # redis://[:PASSWORD@]HOST:PORT/DB, or rediss://... (TLS with [tls] ca and cert); ""
    # when `sentinels` are given (and, for the one shard of a node without [shards], the
    # node's [redis]).
    redis: str = ""
    sentinels: tuple[str, ...] = ()  # "HOST:PORT" of the Redis Sentinels watching the shard's Redis
    service: str = ""  # the Sentinel service (master) name
    password: str = ""  # of the shard's Redis when found through Sentinel
    db: int = 0  # ... and its database number
    sentinel_password: str = ""  # the sentinels' own (their requirepass)
    tls: bool = False  # with sentinels: reach them and the master they name over TLS ([tls] ca and cert)
    # With TLS: the name the certificates of the shard's Redis (and of its sentinels) must
    # carry ("": the host connected to).
    tls_name: str = ""
    timeout: float = 2.0  # seconds the shard's Redis has to answer (then 503 for its users only)
    # Replicas that must hold an accepted post before the device gets `ok` (Redis WAIT), and
    # how long to wait for them (then 503: the device sends again).
    wait_replicas: int = 0
    wait_timeout: float = 1.0
    storage: tuple[int, ...] = ()  # ids of its storage servers (hosted in [node] storage or in [storage.servers])
    weight: float = 1.0  # new users go to the shard with the fewest active feeds per weight

    @property
    def uses_tls(self) -> bool:
        """Whether the shard's own Redis (not the node's [redis]) is reached over TLS."""
        return self.tls if self.sentinels else urlsplit(self.redis).scheme == REDIS_TLS


@dataclass(frozen=True)
class RemoteServer:
    endpoint: str
    name: str = ""


@dataclass(frozen=True)
class TLSSection:
    ca: str = _path()
    cert: str = _path()


@dataclass(frozen=True)
class StorageSection:
    id: int
    listen: str = _endpoint(default="tcp:7443:interface=127.0.0.1")
    http: str = _endpoint(default="tcp:7480:interface=127.0.0.1")
    datadir: str = _path(default="var/storage")
    allow: tuple[str, ...] = ()
    drain_timeout: float = 10.0  # seconds a stop (SIGTERM) may take, as [node] drain_timeout
    log_level: str = "info"  # as [node] log_level


LOG_LEVELS = ("debug", "info", "warn", "error", "critical")  # twisted.logger.LogLevel names


@dataclass(frozen=True)
class NodeConfig:
    path: str
    node: NodeSection
    redis: RedisSection
    database: DatabaseSection
    input: InputSection
    feeds: FeedsSection
    users: UsersSection
    engines: EnginesSection
    storage_servers: Mapping[int, RemoteServer]
    tls: TLSSection | None
    health: NodeHealthSection = NodeHealthSection()
    # Every shard of the cluster by name; a node without [shards] has one, DEFAULT_SHARD,
    # on its [redis] with all its storage servers.
    shards: Mapping[str, ShardSection] = field(default_factory=lambda: MappingProxyType({}))

    def shard_of_server(self, server_id: int) -> str:
        """The shard a storage server belongs to."""
        for name, shard in self.shards.items():
            if server_id in shard.storage:
                return name
        raise KeyError(server_id)

    def default_server(self, shard: str) -> int:
        """The storage server of a new feed of a user on ``shard``: ``[feeds] default_server``
        when it is the shard's, else the shard's first."""
        servers = self.shards[shard].storage
        return self.feeds.default_server if self.feeds.default_server in servers or not servers else servers[0]

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite file of a ``sqlite:///`` database url, resolved; else None."""
        url = self.database.url
        if not url.startswith("sqlite:///"):
            return None
        return _resolve(os.path.dirname(self.path), url[len("sqlite:///") :])


@dataclass(frozen=True)
class StorageConfig:
    path: str
    storage: StorageSection
    engines: EnginesSection
    tls: TLSSection
    health: HealthSection = HealthSection()


Section = TypeVar("Section")
Health = TypeVar("Health", bound=HealthSection)

_TYPE_NAMES = MappingProxyType({str: "a string", int: "an integer", float: "a number", bool: "true or false"})
_PLACEHOLDERS = MappingProxyType({str: "", int: 0, float: 0.0, bool: False})
_BAD = object()  # a value refused (its problem recorded)
NODE_SECTIONS = frozenset({"node", "redis", "database", "input", "feeds", "users", "engines", "storage", "tls", "health", "shards"})
STORAGE_SECTIONS = frozenset({"storage", "engines", "tls", "health"})


class _Problems:
    """The problems found so far, in the order checked.

    Checking goes on past a refused value: its section gets the key's default (or a
    placeholder for a required key) and a later check of that key says nothing more, since
    it would only be judging the stand-in. A table that is not a table is skipped whole."""

    def __init__(self) -> None:
        self.found: list[ConfigProblem] = []
        self._values: set[tuple[str, str]] = set()  # (table, key) whose value was refused
        self._tables: set[str] = set()  # tables refused whole

    def add(self, table: str, key: str | None, message: str, whole: bool = False) -> None:
        """Record a problem; ``whole``: nothing else in that table is worth checking."""
        if not self.refused(table, key):
            problem = ConfigProblem(table, key, message)
            if problem not in self.found:
                self.found.append(problem)
        if whole:
            self._tables.add(table)

    def refuse_value(self, table: str, key: str) -> None:
        self._values.add((table, key))

    def refused(self, table: str, key: str | None = None) -> bool:
        """Whether the table, or the value of its key, was refused already."""
        base = key.split("[", 1)[0] if key else None
        return table in self._tables or (base is not None and (table, base) in self._values)

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """For a check that raises ConfigError at its first problem: its problems join these."""
        try:
            yield
        except ConfigError as e:
            for p in e.problems:
                if p.table is None:
                    self.found.append(p)
                else:
                    self.add(p.table, p.key, p.message)


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _check(value: Any, kind: Any, problems: _Problems, table: str, key: str) -> Any:
    """``value`` converted to ``kind``; _BAD (and its problem recorded) if it is not one."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list):
            problems.add(table, key, f"expected a list, got {value!r}")
            return _BAD
        items = [_check(v, item, problems, table, f"{key}[{i}]") for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in items) else tuple(items)
    # TOML booleans are ints in Python; keep them apart.
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        problems.add(table, key, f"expected {_TYPE_NAMES[kind]}, got {value!r}")
        return _BAD
    return value


def _placeholder(kind: Any) -> Any:
    return () if typing.get_origin(kind) is tuple else _PLACEHOLDERS[kind]


def _section(cls: type[Section], table: Any, name: str, base: str, problems: _Problems) -> Section:
    """The section ``[name]`` from its TOML table; every problem recorded, a refused value
    replaced by its default (a required one by a placeholder) so that checking goes on."""
    if not isinstance(table, dict):
        problems.add(name, None, f"expected a table, got {table!r}", whole=True)
        table = {}
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in known:
            problems.add(name, key, "unknown key")
    values = {}
    for key, f in known.items():
        if key not in table:
            value = f.default
            if f.default is MISSING:
                problems.add(name, key, "required key missing")
                value = _BAD
        else:
            value = _check(table[key], hints[key], problems, name, key)
        if value is _BAD:
            problems.refuse_value(name, key)
            value = _placeholder(hints[key]) if f.default is MISSING else f.default
        if f.metadata.get("path"):
            value = _resolve(base, value)
        if f.metadata.get("endpoint") and not problems.refused(name, key):
            _check_endpoint(value, problems, name, key)
        values[key] = value
    return cls(**values)


def _check_endpoint(description: str, problems: _Problems, table: str, key: str) -> None:
    try:
        # Parsing needs no reactor; nothing listens yet.
        endpoints.serverFromString(None, description)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as e:
        problems.add(table, key, f"not a server endpoint ({e}): {description!r}")


_TOML_AT = re.compile(r"\(at line (\d+), column \d+\)")


def _load_toml(path: str, shown: str) -> tuple[dict[str, Any], str]:
    """The file's tables and its text; ConfigError (the file's one problem) when it cannot be
    read or is not TOML (tomllib's message names the line)."""

    def refused(message: str, line: int | None = None) -> ConfigError:
        return ConfigError([ConfigProblem(None, None, message, line)], shown)

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise refused("config file not found") from None
    except OSError as e:
        raise refused(f"config file not readable: {e.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise refused(f"not valid TOML: not UTF-8 (byte {e.start})", raw[: e.start].count(b"\n") + 1) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        at = _TOML_AT.search(str(e))
        raise refused(f"not valid TOML: {e}", int(at[1]) if at else text.count("\n") + 1) from None


def _refuse_if_any(problems: _Problems, text: str, shown: str) -> None:
    """ConfigError with every problem found, each with the line of its key, if any."""
    if problems.found:
        lines = KeyLines(text)
        located = [dataclasses.replace(p, line=lines.line(p.table, p.key)) for p in problems.found]
        raise ConfigError(located, shown)


def _unknown_sections(data: Mapping[str, Any], allowed: frozenset[str], problems: _Problems) -> None:
    for name in data:
        if name not in allowed:
            problems.add(name, None, "unknown section", whole=True)


def _tls(data: Mapping[str, Any], base: str, problems: _Problems) -> TLSSection:
    tls = _section(TLSSection, data.get("tls", {}), "tls", base, problems)
    for name in ("ca", "cert"):
        if not problems.refused("tls", name) and not os.path.isfile(getattr(tls, name)):
            problems.add("tls", name, f"file not found: {getattr(tls, name)}")
    return tls


def _health(cls: type[Health], data: Mapping[str, Any], base: str, problems: _Problems) -> Health:
    health = _section(cls, data.get("health", {}), "health", base, problems)
    if health.admin_token and len(health.admin_token) < MIN_ADMIN_TOKEN:
        problems.add("health", "admin_token", f"at least {MIN_ADMIN_TOKEN} characters (or \"\" for none)")
    positive = ["check_timeout"]
    if isinstance(health, NodeHealthSection):
        positive += ["max_input_lag", "max_storage_lag", "max_ack_wait"]
        for name in ("max_input_length", "max_storage_length"):
            if getattr(health, name) < 0:
                problems.add("health", name, f"must be 0 (no limit) or more, got {getattr(health, name)}")
    for name in positive:
        if not getattr(health, name) > 0:
            problems.add("health", name, f"must be more than 0, got {getattr(health, name)}")
    return health


def config_kind(path: str) -> str:
    """Whether the file is a node's config (``twistd emond``) or a storage server's
    (``twistd emond-storage``): ``[storage]`` with a storage server's keys (id, listen, ...)
    and none of a node's sections is a storage server's. ConfigError if it cannot be read."""
    data, _ = _load_toml(os.path.abspath(path), path)
    storage = data.get("storage")
    server_keys = {f.name for f in fields(StorageSection)}
    looks_storage = isinstance(storage, dict) and any(key in server_keys for key in storage)
    looks_node = any(name in data for name in NODE_SECTIONS - STORAGE_SECTIONS) or (
        isinstance(storage, dict) and "servers" in storage
    )
    return "storage" if looks_storage and not looks_node else "node"


def load_node_config(path: str) -> NodeConfig:
    """Load and validate the config of a ``twistd emond`` node (ConfigError: every problem)."""
    shown, path = path, os.path.abspath(path)
    data, text = _load_toml(path, shown)
    problems = _Problems()
    config = _node_config(data, path, problems)
    _refuse_if_any(problems, text, shown)
    return config


def _node_config(data: Mapping[str, Any], path: str, problems: _Problems) -> NodeConfig:
    base = os.path.dirname(path)
    _unknown_sections(data, NODE_SECTIONS, problems)
    servers: dict[int, RemoteServer] = {}
    storage = data.get("storage", {})
    if not isinstance(storage, dict):
        problems.add("storage", None, f"expected a table, got {storage!r}", whole=True)
        storage = {}
    for key in storage:
        if key != "servers":
            problems.add("storage", key, "unknown key")
    remote = storage.get("servers", {})
    if not isinstance(remote, dict):
        problems.add("storage.servers", None, f"expected a table, got {remote!r}", whole=True)
        remote = {}
    for sid, table in remote.items():
        if not sid.isdigit():
            problems.add("storage.servers", sid, "a storage server id must be a whole number")
            problems.refuse_value("storage.servers", "*")  # the shards' servers are not all known
            continue
        servers[int(sid)] = _section(RemoteServer, table, f"storage.servers.{sid}", base, problems)
    config = NodeConfig(
        path=path,
        node=_section(NodeSection, data.get("node", {}), "node", base, problems),
        redis=_section(RedisSection, data.get("redis", {}), "redis", base, problems),
        database=_section(DatabaseSection, data.get("database", {}), "database", base, problems),
        input=_section(InputSection, data.get("input", {}), "input", base, problems),
        feeds=_section(FeedsSection, data.get("feeds", {}), "feeds", base, problems),
        users=_section(UsersSection, data.get("users", {}), "users", base, problems),
        engines=_section(EnginesSection, data.get("engines", {}), "engines", base, problems),
        storage_servers=servers,
        # TLS is needed only to reach remote storage servers (and a Redis over TLS, below).
        tls=_tls(data, base, problems) if servers else None,
        health=_health(NodeHealthSection, data, base, problems),
    )
    config = dataclasses.replace(config, shards=_shards(data.get("shards"), config, base, problems))
    with problems.collecting():
        _validate_node(config, problems)
    with problems.collecting():
        config = _with_redis_tls(config, data, base, problems)
    return config


def _with_redis_tls(config: NodeConfig, data: Mapping[str, Any], base: str, problems: _Problems) -> NodeConfig:
    """``config`` with its [tls] loaded when a Redis is reached over TLS: the node presents
    its certificate to Redis and trusts only its CA, as on the storage stream."""
    keys = [("redis", "url")] if config.redis.uses_tls else []
    for name, shard in config.shards.items():
        if shard.uses_tls:
            keys.append((f"shards.{name}", "tls" if shard.sentinels else "redis"))
    if not keys or config.tls is not None:
        return config
    if "tls" not in data:
        problems.add(*keys[0], "Redis over TLS needs the [tls] section (ca, cert: the CA that signs Redis's certificate, and the node's)")
        return config
    return dataclasses.replace(config, tls=_tls(data, base, problems))


def _shards(table: Any, config: NodeConfig, base: str, problems: _Problems) -> Mapping[str, ShardSection]:
    """``[shards.NAME]`` sections checked against each other and the storage servers; without
    any, the one default shard holding every storage server on the node's [redis]."""
    servers = sorted(set(config.node.storage) | set(config.storage_servers))
    if table is None:
        return MappingProxyType({DEFAULT_SHARD: ShardSection(storage=tuple(servers))})
    if not isinstance(table, dict) or not table:
        problems.add("shards", None, "expected one table per shard, [shards.NAME]", whole=True)
        return MappingProxyType({})
    # Servers the config names but could not read: a shard naming one is not wrong for it.
    unsure = problems.refused("node", "storage") or problems.refused("storage.servers", "*") or problems.refused("storage.servers")
    shards: dict[str, ShardSection] = {}
    owner: dict[int, str] = {}
    for name, section in table.items():
        where = f"shards.{name}"
        if not SHARD_NAME.fullmatch(name):
            problems.add(where, None, "a shard name is 1-32 of a-z, 0-9, _ and -, starting with a letter or digit")
        shard = _section(ShardSection, section, where, base, problems)
        shards[name] = shard
        if problems.refused(where):
            continue
        if shard.sentinels:
            if shard.redis:
                problems.add(where, None, "give redis or sentinels, not both")
            if not shard.service:
                problems.add(where, "service", "required with sentinels (the Sentinel master name)")
            for address in shard.sentinels:
                host, _, port = address.rpartition(":")
                if not host or not port.isdigit():
                    problems.add(where, "sentinels", f"expected HOST:PORT, got {address!r}")
        else:
            if not problems.refused(where, "redis") and urlsplit(shard.redis).scheme not in ("redis", REDIS_TLS):
                problems.add(where, "redis", f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or sentinels, got {shard.redis!r}")
            for key in ("sentinel_password", "tls"):
                if getattr(shard, key):
                    hint = " (a redis url asks for TLS with rediss://)" if key == "tls" else ""
                    problems.add(where, key, f"only with sentinels{hint}")
        if shard.tls_name and not shard.uses_tls:
            problems.add(where, "tls_name", "only with TLS (a rediss:// url, or sentinels with tls = true)")
        for key in ("timeout", "wait_timeout"):
            if not getattr(shard, key) > 0:
                problems.add(where, key, f"must be more than 0 seconds, got {getattr(shard, key)}")
        if shard.wait_replicas < 0:
            problems.add(where, "wait_replicas", f"must not be negative, got {shard.wait_replicas}")
        if not shard.weight > 0:
            problems.add(where, "weight", f"must be more than 0, got {shard.weight}")
        if not shard.storage and not problems.refused(where, "storage"):
            problems.add(where, "storage", "a shard needs at least one storage server")
        for sid in shard.storage:
            if sid not in servers and not unsure:
                problems.add(where, "storage", f"server {sid} is neither hosted ([node] storage) nor in [storage.servers]")
            if sid in owner:
                problems.add(where, "storage", f"server {sid} is also shard {owner[sid]!r}'s")
            else:
                owner[sid] = name
    if not any(problems.refused(f"shards.{name}", "storage") for name in table):
        for sid in servers:
            if sid not in owner:
                problems.add("shards", None, f"storage server {sid} belongs to no shard")
    return MappingProxyType(shards)


def _validate_node(config: NodeConfig, problems: _Problems) -> None:
    """The checks of values against their ranges and each other, once the sections are read."""
    add = problems.add
    scheme = urlsplit(config.database.url).scheme
    if scheme not in ("sqlite", "mysql"):
        add("database", "url", f"expected sqlite:///PATH or mysql://..., got {config.database.url!r}")
    if config.redis.url and urlsplit(config.redis.url).scheme not in ("redis", REDIS_TLS, "unix"):
        add("redis", "url", f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///PATH, got {config.redis.url!r}")
    if config.redis.tls_name and not config.redis.uses_tls:
        add("redis", "tls_name", "only with a rediss:// url")
    _check_stop(problems, "node", config.node)
    if config.node.reuse_port and not config.node.http.startswith(("tcp:", "tcp6:")):
        add("node", "reuse_port", f"only for a tcp: or tcp6: http endpoint, got {config.node.http!r}")
    if config.input.queues < 1:
        add("input", "queues", f"must be at least 1, got {config.input.queues}")
    for key in ("max_body", "max_inflated", "max_frames", "max_values"):
        if getattr(config.input, key) < 1:
            add("input", key, f"must be at least 1, got {getattr(config.input, key)}")
    if config.input.time_future < 0:
        add("input", "time_future", f"must not be negative, got {config.input.time_future}")
    if config.input.mapping not in ("hash", "ranges"):
        add("input", "mapping", f"expected \"hash\" or \"ranges\", got {config.input.mapping!r}")
    if not config.input.lastvalue_save_interval > 0:
        add("input", "lastvalue_save_interval", f"must be more than 0, got {config.input.lastvalue_save_interval}")
    for sid in config.node.storage:
        if sid in config.storage_servers:
            add("node", "storage", f"server {sid} is also configured as remote in [storage.servers]")
    for proxy in config.users.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            add("users", "trusted_proxies", f"not an address or network: {proxy!r}")
    for name in (
        "login_window", "login_failures_per_client", "login_failures_per_address", "login_failures_per_user",
        "login_slow_seconds", "registrations_per_address", "registration_window", "max_feeds",
    ):
        if getattr(config.users, name) < 1:
            add("users", name, f"must be at least 1, got {getattr(config.users, name)}")
    if not 1 <= config.feeds.max_datapoints <= 1_000_000:
        add("feeds", "max_datapoints", f"must be between 1 and 1000000, got {config.feeds.max_datapoints}")
    _check_pool(problems, "users", "kdf", config.users.kdf_threads, config.users.kdf_queue)
    _check_pool(problems, "feeds", "render", config.feeds.render_threads, config.feeds.render_queue)
    _check_pool(problems, "engines", "read", config.engines.read_threads, config.engines.read_queue)
    if not config.feeds.read_timeout > 0:
        add("feeds", "read_timeout", f"must be more than 0 seconds, got {config.feeds.read_timeout}")
    if config.node.shard and config.node.shard not in config.shards and not problems.refused("shards"):
        names = ", ".join(sorted(config.shards))
        add("node", "shard", f"{config.node.shard!r} is not a configured shard ({names}); name one, or \"\" for a front only")
    if not config.node.front and not config.node.shard:
        add("node", None, "front = false and shard = \"\": this process would do nothing")
    if len(config.shards) > 1 and scheme != "mysql":
        add("database", "url", "several shards share one central database: mysql://... (SQLite is for one node)")
    hosted = set(config.node.storage) | set(config.storage_servers)
    if hosted and config.feeds.default_server not in hosted:
        add("feeds", "default_server", f"server {config.feeds.default_server} is neither hosted nor remote")


def _check_stop(problems: _Problems, table: str, section: NodeSection | StorageSection) -> None:
    if not section.drain_timeout > 0:
        problems.add(table, "drain_timeout", f"must be more than 0 seconds, got {section.drain_timeout}")
    if section.log_level not in LOG_LEVELS:
        problems.add(table, "log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {section.log_level!r}")


def _check_pool(problems: _Problems, table: str, prefix: str, threads: int, queue: int) -> None:
    if threads < 1:
        problems.add(table, f"{prefix}_threads", f"must be at least 1, got {threads}")
    if queue < 0:
        problems.add(table, f"{prefix}_queue", f"must not be negative, got {queue}")


def load_storage_config(path: str) -> StorageConfig:
    """Load and validate the config of a ``twistd emond-storage`` server (ConfigError: every problem)."""
    shown, path = path, os.path.abspath(path)
    base = os.path.dirname(path)
    data, text = _load_toml(path, shown)
    problems = _Problems()
    _unknown_sections(data, STORAGE_SECTIONS, problems)
    if "storage" not in data:
        problems.add("storage", None, "required section missing", whole=True)
    config = StorageConfig(
        path=path,
        storage=_section(StorageSection, data.get("storage", {}), "storage", base, problems),
        engines=_section(EnginesSection, data.get("engines", {}), "engines", base, problems),
        # The stream listener always needs TLS.
        tls=_tls(data, base, problems),
        health=_health(HealthSection, data, base, problems),
    )
    _check_pool(problems, "engines", "read", config.engines.read_threads, config.engines.read_queue)
    _check_stop(problems, "storage", config.storage)
    _refuse_if_any(problems, text, shown)
    return config
