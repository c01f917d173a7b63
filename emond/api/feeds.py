"""``feed/...`` routes: create, list, read (data, average, DMY, values, meta,
export, csv), write (insert, update), set and delete.

Access: every route that names a feed is registered PUBLIC or WRITE and
checks ownership itself. A read is allowed if the feed is public or belongs
to the caller; a write needs write access (the router) and ownership. A
private feed of someone else is answered 403 (401 without credentials),
never with its data.

Answers follow current emoncms (compat spec §A) with the improvements of
spec B: errors are HTTP 400 with ``{"success": false, "message": ...}``;
``feed/list.json``, ``feed/aget.json`` and ``feed/timevalue.json`` add
``disk_time``/``disk_value``, the last point actually on disk, next to
``time``/``value``, the last value accepted.

Reads (``feed/data.json``, ``datanew``, ``average.json``, ``csvexport.json``)
are ``emond.api.feeddata``: the request rules of current emoncms, one query per
feed to its storage server.

Writes (``feed/insert.json``, ``feed/update.json``) go through the node's
feed writer: the answer comes once the record is durably queued for its
storage server, so a read just after may not show it yet (``disk_*`` says
what has arrived). A time outside the storage window is refused at once
(400, recorded for ``input/rejected.json``); a record the storage server
refuses later (padding limit) is recorded by its sender. The last value
moves forward only: a back-filled point never replaces a newer one.

Number forms, as current emoncms types them: the fields of a feed are
strings as its Redis hash gives them (``"id":"1"``); ``time`` is an int and
``value`` a number (the accepted value as PHP stored it in Redis, 14
significant digits) or null; ``disk_time``/``disk_value`` likewise, the
value being the stored float32. ``feed/value.json`` and ``feed/fetch.json``
answer numbers (or null), ``feed/timevalue.json`` numbers. A value that is
not finite (on disk or in Redis) is null.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, AsyncIterator

import numpy as np
from twisted.internet import defer

from emond.api.http import PUBLIC, WRITE, Call, Raw, Route, Streamed, decode_json, json_bytes
from emond.api.context import NodeContext
from emond.engine import MAX_TIME as MAX_READ_TIME
from emond.engine import MIN_TIME as MIN_READ_TIME
from emond.engine import FeedError, RowLimit, Series
from emond.errors import EmondError, Failed, Forbidden, Invalid, Unauthenticated, UnknownFeeds
from emond.api.feeddata import (
    DataRequest,
    FeedPlan,
    csv_body,
    multi_csv_body,
    php_int,
    php_numeric,
    php_truthy,
    request_ids,
    rows_json,
    shape,
    zone_or_utc,
)
from emond.meta.feeds import Feed
from emond.numbers import MAX_ID, php_number
from emond.storage.feedstore import DiskSummary
from emond.phpfina import MIN_INTERVAL
from emond.records import (
    ENGINE_PHPFINA,
    PADDING_JOIN,
    PADDING_NAN,
    REASON_NO_FEED,
    REASON_PADDING,
    REASON_TOO_NEW,
    REASON_TOO_OLD,
    Refusal,
    make_records,
)
from emond.meta.refusals import Refused

MAX_TIME = 2**32 - 1  # record times are uint32 seconds
MAX_INTERVAL = 366 * 86400  # longest PHPFina interval accepted at create
MAX_FETCH = 1000  # ids per feed/fetch.json
FLOAT32_MAX = float(np.finfo(np.float32).max)
ID = re.compile(r"[0-9]{1,12}")
FIELDS = ("id", "userid", "name", "datatype", "tag", "public", "size", "engine", "server", "unit", "interval")


EXPORT_CHUNK = 36 * 32768  # bytes per chunk: whole PHPFina slots and whole PHPTimeSeries records


# -- access ------------------------------------------------------------

async def load(ctx: NodeContext, call: Call) -> Feed:
    feed = await ctx.feeds.get(parse_id(call.get("id"), "id"))
    if feed is None:
        raise Invalid("Feed does not exist")
    return feed


async def readable(ctx: NodeContext, call: Call) -> Feed:
    feed = await load(ctx, call)
    if not can_read(call, feed):
        if call.auth is None:
            raise Unauthenticated("Authentication required")
        raise Forbidden("Permission denied")
    return feed


async def owned(ctx: NodeContext, call: Call) -> Feed:
    """A feed the caller may write (the route itself requires write access)."""
    feed = await load(ctx, call)
    if feed.userid != call.userid:
        raise Forbidden("Permission denied")
    return feed


# -- feed objects --------------------------------------------------------

async def entries(ctx: NodeContext, found: list[Feed]) -> list[dict[str, Any]]:
    """List entries: one Redis pipeline and one disk pass (per storage server) for all feeds.

    ``disk_*`` is read from the feed's files where its storage server is
    hosted here; for another server, it is the last point its sender
    recorded as applied (``feed:disk:<id>``).
    """
    last = await timevalues(ctx, found)
    disk = await ctx.store.summaries(found)
    out = []
    for f in found:
        accepted, applied = last[f.id]
        summary = disk[f.id]
        if summary.size is None and applied is not None:
            summary = DiskSummary(None, applied)
        out.append(entry(f, accepted, summary))
    return out


async def by_owner(ctx: NodeContext, feeds: list[Feed]) -> list[tuple[NodeContext, list[Feed]]]:
    """The feeds grouped by the context of their owner's shard: their last values live in
    that shard's Redis, whoever reads them (a public feed, read from any front)."""
    owners = {userid: await ctx.of_user(userid) for userid in {f.userid for f in feeds}}
    groups: dict[str, tuple[NodeContext, list[Feed]]] = {}
    for feed in feeds:
        owner = owners[feed.userid]
        groups.setdefault(owner.shard, (owner, []))[1].append(feed)
    return list(groups.values())


async def lastvalues(ctx: NodeContext, feeds: list[Feed]) -> dict[int, tuple[int, float] | None]:
    """``Feeds.lastvalues`` of feeds of any users: one pipeline per shard."""
    out: dict[int, tuple[int, float] | None] = {}
    for owner, group in await by_owner(ctx, feeds):
        out.update(await owner.feeds.lastvalues([f.id for f in group]))
    return out


async def timevalues(ctx: NodeContext, feeds: list[Feed]) -> dict[int, Any]:
    """``Feeds.timevalues`` of feeds of any users: one pipeline per shard."""
    out: dict[int, Any] = {}
    for owner, group in await by_owner(ctx, feeds):
        out.update(await owner.feeds.timevalues([f.id for f in group]))
    return out


async def disk_last(ctx: NodeContext, feed: Feed) -> tuple[int, float | None] | None:
    try:
        return await ctx.store.lastvalue(feed)
    except EmondError:
        return None  # files missing, or the server not reachable from here


# -- create, list, get, set, delete -----------------------------------

async def feed_create(ctx: NodeContext, call: Call) -> Any:
    name = call.get("name", "") or ""
    tag = call.get("tag", "") or ""
    unit = call.get("unit", "") or ""
    datatype = small_int(call.get("datatype"), 1, "missing datatype: 1: realtime, 2: daily")
    engine = small_int(call.get("engine"), None, "Engine id not valid", "missing parameter: engine")
    # The storage servers of the caller's shard: its storage queues are in the shard's Redis.
    server = small_int(call.get("server"), ctx.config.default_server(ctx.shard), "server must be a number")
    servers = sorted(ctx.config.shards[ctx.shard].storage)
    if not servers:  # a node that only accepts and consumes, on a database shared with others
        raise Invalid("No storage server is configured for new feeds on this node")
    if server not in servers:
        raise Invalid(f"server must be {or_list(servers)}")
    interval = 0
    if engine == ENGINE_PHPFINA:
        interval = max(phpfina_interval(call.get("options")), MIN_INTERVAL)
    feed = await create_feed(ctx, call.userid, name, tag, datatype, engine, interval, server, unit)
    return {"success": True, "feedid": feed.id, "result": True}


async def create_feed(
    ctx: NodeContext, userid: int, name: str, tag: str, datatype: int, engine: int, interval: int, server: int, unit: str = ""
) -> Feed:
    """A new feed: its row, then its files on its storage server; no row is left without files."""
    feed = await ctx.feeds.create(userid, name, tag, datatype, engine, interval, server, unit)
    try:
        await ctx.store.create(feed)
    except BaseException as e:
        await ctx.feeds.delete(feed)
        if isinstance(e, (FeedError, OSError)):
            raise Failed("the feed engine could not create the feed") from e
        raise  # the storage server unavailable or slow: answered as such
    return feed


async def feed_list(ctx: NodeContext, call: Call) -> Any:
    wanted = call.get("userid")
    if wanted is None or wanted == "":
        if call.auth is None:
            raise Unauthenticated("Authentication required")
        found = await ctx.feeds.list(call.userid)
    else:
        userid = parse_id(wanted, "userid")
        own = call.auth is not None and call.auth.userid == userid
        found = await ctx.feeds.list(userid, public_only=not own)
    return await entries(ctx, found)


async def feed_get(ctx: NodeContext, call: Call) -> Any:
    feed = await readable(ctx, call)
    name = call.get("field")
    if not name:
        raise Invalid("Missing field parameter")
    if name not in FIELDS + ("time", "value", "disk_time", "disk_value"):
        raise Invalid("Invalid field")
    (item,) = await entries(ctx, [feed])
    return item[name]


async def feed_aget(ctx: NodeContext, call: Call) -> Any:
    feed = await readable(ctx, call)
    (item,) = await entries(ctx, [feed])
    return item


async def feed_getmeta(ctx: NodeContext, call: Call) -> Any:
    feed = await readable(ctx, call)
    meta = await ctx.store.meta(feed)
    if feed.engine == ENGINE_PHPFINA:
        return {"interval": meta.interval, "start_time": meta.start_time, "npoints": meta.npoints, "end_time": meta.end_time}
    return {"start_time": meta.start_time, "end_time": meta.end_time, "npoints": meta.npoints}


async def feed_set(ctx: NodeContext, call: Call) -> Any:
    feed = await owned(ctx, call)
    fields = json_object(call.get("fields"), "Field could not be updated")
    await ctx.feeds.update(feed, fields)
    return {"success": True, "message": "Field updated"}


async def feed_delete(ctx: NodeContext, call: Call) -> Any:
    feed = await owned(ctx, call)
    await ctx.store.delete(feed)  # the files first: a row left behind can be deleted again
    await ctx.feeds.delete(feed)  # the row and its Redis last value
    await ctx.inputs.forget_feed(feed.userid, feed.id)  # its steps leave every process list
    # emoncms.org answered null; current emoncms answers this.
    return {"success": True, "message": "Feed removed successfully."}


# -- last values -------------------------------------------------------

async def feed_value(ctx: NodeContext, call: Call) -> Any:
    feed = await readable(ctx, call)
    when = call.get("time")
    if php_truthy(when):  # emoncms: the value at a time (the nearest slot, or the next record)
        number = php_numeric(when)
        if number is None or not MIN_READ_TIME <= number <= MAX_READ_TIME:
            raise Invalid("time must be a unix time in seconds")
        return await ctx.store.value_at(feed, math.trunc(number))
    last = (await lastvalues(ctx, [feed]))[feed.id]
    if last is not None:
        return accepted_number(last[1])
    disk = await disk_last(ctx, feed)  # as emoncms, rebuilt from the data when Redis has none
    return disk_number(disk[1]) if disk else None


async def feed_timevalue(ctx: NodeContext, call: Call) -> Any:
    feed = await readable(ctx, call)
    item = (await entries(ctx, [feed]))[0]
    return {k: item[k] for k in ("time", "value", "disk_time", "disk_value")}


async def feed_fetch(ctx: NodeContext, call: Call) -> Any:
    texts = (call.get("ids") or "").split(",")
    if len(texts) > MAX_FETCH:
        raise Invalid(f"at most {MAX_FETCH} ids per request")
    ids: list[int | None] = []
    for text in texts:
        try:
            ids.append(parse_id(text, "ids"))
        except Invalid:
            ids.append(None)
    found = await ctx.feeds.get_many(i for i in ids if i is not None)
    allowed = [f for f in found.values() if can_read(call, f)]
    last = await lastvalues(ctx, allowed)
    missing = [f for f in allowed if last[f.id] is None]
    disk = await ctx.store.summaries(missing) if missing else {}
    out: list[Any] = []
    for i in ids:
        feed = found.get(i) if i is not None else None
        if feed is None or not can_read(call, feed):
            out.append(False)  # no such feed, or not yours: as emoncms
        elif last[feed.id] is not None:
            out.append(accepted_number(last[feed.id][1]))
        else:
            point = disk[feed.id].last
            out.append(disk_number(point[1]) if point else None)
    return out


# -- data --------------------------------------------------------------

async def caller_timezone(ctx: NodeContext, call: Call) -> str:
    """emoncms reads times in the timezone of the session's user (UTC without one)."""
    if call.auth is None:
        return "UTC"
    return zone_or_utc(await ctx.users.timezone(call.auth.userid))


async def data_feeds(ctx: NodeContext, call: Call, texts: list[str]) -> list[Feed]:
    """The feeds of a data request, in its order; all must exist and be readable."""
    numbers = [php_int(text) for text in texts]
    found = await ctx.feeds.get_many(n for n in numbers if 0 < n <= MAX_ID)
    missing = [n for n in numbers if n not in found]
    if missing:
        message = f"feed {missing[0]} does not exist" if len(missing) == 1 else f"{len(missing)} feeds do not exist"
        raise UnknownFeeds(message, missing)
    out = [found[n] for n in numbers]
    for feed in out:
        if not can_read(call, feed):
            if call.auth is None:
                raise Unauthenticated("Authentication required")
            raise Forbidden("Permission denied")
    return out


async def read_series(ctx: NodeContext, request: DataRequest, feed: Feed, plan: FeedPlan) -> Series:
    try:
        return await ctx.store.query(feed, plan.query)
    except RowLimit as e:  # the engine's words are replaced by emoncms's limit message
        raise Invalid(request.csv_limit_message(e.requested) if plan.csv else request.limit_message(e.requested))


async def feed_data(ctx: NodeContext, call: Call) -> Any:
    """feed/data.json, datanew, average.json and csvexport.json (current emoncms)."""
    # As emoncms: the feeds first (missing, not readable), then the request's parameters.
    found = await data_feeds(ctx, call, request_ids(call.params)[0])
    timezone = await caller_timezone(ctx, call)
    request = DataRequest.parse(call.params, call.action, timezone, ctx.config.feeds.max_datapoints)
    plans = [request.plan(feed, average, delta) for feed, (average, delta) in zip(found, request.flags())]
    wanted = [feed for feed, plan in zip(found, plans) if plan.delta]
    accepted = await lastvalues(ctx, wanted) if wanted else {}
    series = await defer.gatherResults(
        [defer.ensureDeferred(read_series(ctx, request, feed, plan)) for feed, plan in zip(found, plans)], consumeErrors=True
    ).addErrback(lambda failure: failure.value.subFailure.raiseException())
    # Formatting thousands of rows (dates, CSV) is done off the reactor, in the render pool.
    return await ctx.render.run(render_data, request, found, plans, series, accepted)


async def feed_export(ctx: NodeContext, call: Call) -> Any:
    # Public or yours, as current emoncms (emoncms.org wanted the owner's write key).
    feed = await readable(ctx, call)
    start = max(call.integer("start", 0, "start must be a byte offset"), 0)
    first = await ctx.store.export(feed, start, EXPORT_CHUNK)
    fina = feed.engine == ENGINE_PHPFINA
    # Where the first chunk began: PHPFina starts one slot early (emoncms), PHPTimeSeries on a record.
    offset = (start // 4 * 4 - 4 if start // 4 * 4 >= 4 else 0) if fina else start // 9 * 9

    async def chunks() -> AsyncIterator[bytes]:
        data, sent = first, 0
        while data:
            yield data
            sent += len(data)
            if len(data) < EXPORT_CHUNK:
                return
            # ask for the next byte range, undoing the engine's own start adjustment
            data = await ctx.store.export(feed, offset + sent + (4 if fina else 0), EXPORT_CHUNK)

    filename = f"{feed.id}.dat" if fina else f"feed_{feed.id}.MYD"
    return Streamed(
        chunks,
        content_type=b"application/octet-stream",
        headers={b"Content-Disposition": f"attachment; filename={filename}".encode(), b"Cache-Control": b"no-cache"},
    )


# -- writes ------------------------------------------------------------

async def feed_insert(ctx: NodeContext, call: Call) -> Any:
    feed = await owned(ctx, call)
    when = time_param(call)
    number = value_param(call)
    padding = PADDING_JOIN if call.flag("join", False) else PADDING_NAN
    if when < 0:
        refusals = [Refusal(feed.id, when, REASON_TOO_OLD)]
    elif when > MAX_TIME:
        refusals = [Refusal(feed.id, when, REASON_TOO_NEW)]
    else:
        batch = make_records(feed.id, [when], [number], feed.engine, padding)
        refusals = await ctx.writer.write(feed.server, batch)
    if refusals:
        reason = refusals[0].reason
        await ctx.refusals.record(call.userid, [Refused(when, "", f"feed:{feed.id}", reason)])
        raise Invalid(refusal_message(reason, ctx))
    await ctx.feeds.advance_lastvalue(feed.id, when, number)
    return number


# -- the table: every feed/... route -------------------------------------------


FEED_ROUTES: tuple[Route, ...] = (
    Route("feed", "create", WRITE, feed_create),
    Route("feed", "list", PUBLIC, feed_list),
    Route("feed", "get", PUBLIC, feed_get),
    Route("feed", "aget", PUBLIC, feed_aget),
    Route("feed", "getmeta", PUBLIC, feed_getmeta),
    Route("feed", "set", WRITE, feed_set),
    Route("feed", "delete", WRITE, feed_delete),
    Route("feed", "value", PUBLIC, feed_value),
    Route("feed", "timevalue", PUBLIC, feed_timevalue),
    Route("feed", "fetch", PUBLIC, feed_fetch),
    Route("feed", "data", PUBLIC, feed_data),
    Route("feed", "datanew", PUBLIC, feed_data),
    Route("feed", "average", PUBLIC, feed_data),
    Route("feed", "csvexport", PUBLIC, feed_data),
    Route("feed", "export", PUBLIC, feed_export),
    Route("feed", "insert", WRITE, feed_insert),
    Route("feed", "update", WRITE, feed_insert),
)


# -- helpers (no I/O) ----------------------------------------------------------


def can_read(call: Call, feed: Feed) -> bool:
    return bool(feed.public) or (call.auth is not None and call.auth.userid == feed.userid)


def entry(feed: Feed, last: tuple[int, float] | None, disk: DiskSummary) -> dict[str, Any]:
    """A feed as ``feed/list.json`` shows it."""
    on_disk = disk.last
    if last is not None:
        when, value = last[0], accepted_number(last[1])
    elif on_disk is not None:  # no accepted value known (Redis emptied, copied data): the disk's
        when, value = on_disk[0], disk_number(on_disk[1])
    else:
        when, value = None, None
    return {
        "id": str(feed.id),
        "userid": str(feed.userid),
        "name": feed.name,
        "datatype": str(feed.datatype),
        "tag": feed.tag,
        "public": str(feed.public),
        "size": str(disk.size) if disk.size is not None else None,
        "engine": str(feed.engine),
        "server": str(feed.server),
        "unit": feed.unit,
        "interval": str(feed.interval),
        "time": when,
        "value": value,
        "disk_time": on_disk[0] if on_disk else None,
        "disk_value": disk_number(on_disk[1]) if on_disk else None,
    }


def php_text(value: float) -> str | None:
    """PHP's float to string (precision 14): ``231.5``, ``100``, ``1.0E+20``."""
    if not math.isfinite(value):
        return None
    text = "%.14G" % value
    if "E" not in text:
        return text
    mantissa, exponent = text.split("E")
    if "." not in mantissa:
        mantissa += ".0"
    power = int(exponent)
    return f"{mantissa}E{'+' if power >= 0 else '-'}{abs(power)}"


def accepted_number(value: float) -> float | None:
    """A last accepted value as current emoncms answers it: what PHP stored in
    Redis (its float-to-string, 14 significant digits) read back as a number."""
    text = php_text(value)
    return float(text) if text is not None else None


def disk_number(value: float | None) -> float | None:
    """A value on disk (a float32) as a number; None if missing or not finite."""
    if value is None or not math.isfinite(value):
        return None
    return float(np.float32(value))


def render_data(
    request: DataRequest, found: list[Feed], plans: list[FeedPlan], series: list[Series], accepted: dict[int, Any]
) -> Raw:
    """The answer of a data request, in emoncms's shapes: one feed's rows, or
    ``[{"feedid", "data"}, ...]``, or a CSV file."""
    rows: list[Any] = []
    for feed, plan, result in zip(found, plans, series):
        last = accepted.get(feed.id)
        # the accepted last value as emoncms reads it back from Redis, else the disk's
        last = (last[0], accepted_number(last[1])) if last is not None else result.last
        times, values = shape(result, plan, request.dp if plan.query.split is None else None, last)
        if plan.csv:
            return csv_answer(csv_body(times, values, request), str(feed.id))
        rows.append(rows_json(times, values, request))
    if request.multi_csv:
        return csv_answer(multi_csv_body(rows), "-".join(request.ids))
    if request.singular and len(found) == 1:
        return Raw(json_bytes(rows[0]))
    return Raw(json_bytes([{"feedid": text, "data": data} for text, data in zip(request.ids, rows)]))


def csv_answer(body: bytes, name: str) -> Raw:
    return Raw(
        body,
        content_type=b"text/csv; charset=utf-8",
        headers={b"Content-Disposition": f"attachment; filename={name}.csv".encode(), b"Cache-Control": b"no-cache"},
    )


def parse_id(text: str | None, name: str) -> int:
    if text is None or text.strip() == "":
        raise Invalid(f"missing parameter: {name}")
    text = text.strip()
    if not ID.fullmatch(text):
        raise Invalid(f"{name} must be a whole number")
    number = int(text)
    if number > MAX_ID:
        raise Invalid("Feed does not exist" if name == "id" else f"{name} out of range")
    return number


def small_int(text: str | None, default: int | None, invalid: str, missing: str | None = None) -> int:
    if text is None or text.strip() == "":
        if default is None:
            raise Invalid(missing or invalid)
        return default
    text = text.strip()
    if not re.fullmatch(r"-?[0-9]{1,9}", text):
        raise Invalid(invalid)
    return int(text)


def or_list(items: list[int]) -> str:
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def json_object(text: str | None, message: str) -> dict[str, Any]:
    if not text:
        raise Invalid(message)
    value = decode_json(text, message)  # finite numbers, 64-bit integers, bounded nesting
    if not isinstance(value, dict):
        raise Invalid(message)
    return value


def phpfina_interval(options: str | None) -> int:
    """The interval of ``options={"interval":N}`` (a number or a numeric string)."""
    fields = json_object(options, 'options must be a JSON object such as {"interval":10}')
    raw = fields.get("interval")
    if isinstance(raw, bool) or raw is None:
        raise Invalid("interval must be an integer")
    if isinstance(raw, str):
        number = php_number(raw)  # ASCII digits only, as emoncms's is_numeric
    else:
        number = float(raw) if isinstance(raw, (int, float)) else None  # decode_json: finite, 64-bit
    if number is None or number != int(number):
        raise Invalid("interval must be an integer")
    interval = int(number)
    if interval > MAX_INTERVAL:
        raise Invalid(f"interval must be at most {MAX_INTERVAL} seconds")
    return interval


def time_param(call: Call) -> int:
    text = call.get("time")
    if text is None or text.strip() == "":
        return int(time.time())
    number = php_number(text)  # ASCII digits only, finite
    if number is None:
        raise Invalid("time must be a unix time in seconds")
    return int(number)


def value_param(call: Call) -> float:
    text = call.get("value")
    number = php_number(text) if text is not None else None  # ASCII digits only, finite
    if number is None:
        raise Invalid("Value must be numeric")
    if abs(number) > FLOAT32_MAX:
        raise Invalid("Value out of range (a feed stores 32-bit floats)")
    return number


def refusal_message(reason: str, ctx: NodeContext) -> str:
    engines = ctx.config.engines
    if reason == REASON_TOO_OLD:
        return f"time is older than the storage window ({engines.window_past // 86400} days)"
    if reason == REASON_TOO_NEW:
        return f"time is too far in the future (more than {engines.window_future // 3600} hours ahead)"
    if reason == REASON_PADDING:
        return f"time is too far from the feed's data (more than {engines.max_padding} missing slots)"
    if reason == REASON_NO_FEED:
        return "Feed does not exist"
    return f"datapoint refused: {reason}"


__all__ = ["FEED_ROUTES", "create_feed"]
