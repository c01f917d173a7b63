"""``input/...`` management routes (compat spec §1.5): lists, last values, descriptions,
deletion, refusals, the process table, and process lists in both the current
emoncms form (``process/get|set|reset``) and the emoncms.org form
(``process/add|list|delete|move|reset``).

Every process list change goes through ``Inputs.change_processlist``: one
transaction that judges the steps the change brings in (``process.check_steps``)
and writes the list, so concurrent changes cannot lose each other or let two
lists write one feed. ``input/post`` and ``input/bulk`` live with the input path.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from emond.api.http import READ, WRITE, Call, Raw, Route, decode_json, json_bytes
from emond.api.context import NodeContext
from emond.api.feeds import create_feed
from emond.errors import Invalid
from emond.meta.feeds import check_engine, valid_feed_name
from emond.meta.inputs import Input
from emond.names import valid_input_name
from emond.numbers import MAX_ID
from emond.phpfina import MIN_INTERVAL
from emond.processlist import (
    MAX_STEPS,
    MSG_DELETED,
    MSG_FORMAT,
    MSG_TOO_MANY,
    MSG_UNKNOWN,
    PROCESSES,
    ProcessListError,
    Step,
    format_processlist,
    format_step,
    make_step,
    parse_lenient,
    parse_processlist,
    parse_processlist_json,
    process_id,
    processes_json,
)
from emond.records import ENGINE_PHPFINA

MAX_DELETE = 1000  # ids in one input/delete.json?inputids=[...] (a user has at most 1000 inputs)
MAX_FEED_INTERVAL = 365 * 86400
DEFAULT_FEED_INTERVAL = 10
NO_INPUT = "Input does not exist"
_INT = re.compile(r"[+-]?[0-9]{1,12}")


def _strict_int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if _INT.fullmatch(text) else None


def _ident(value: Any) -> int | None:
    """A database id from a parameter or a JSON item: a positive INT, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number: int | None = value
    elif isinstance(value, str):
        number = _strict_int(value)
    else:
        return None
    return number if number is not None and 0 < number <= MAX_ID else None


def processlist_steps(text: str) -> list[Step]:
    """``processlist`` of ``input/process/set``: the text form (``1:5,2:0.1``) or current
    emoncms's JSON form (``[{"fn":"process__log_to_feed","args":[5]}]``)."""
    if text.lstrip().startswith("["):
        return parse_processlist_json(decode_json(text, MSG_FORMAT))
    return parse_processlist(text)


def _clean(text: str) -> str:
    """emoncms drops the characters an input or node name cannot hold before a lookup."""
    return "".join(c for c in text if valid_input_name(c))


def _lastvalue(last: tuple[int | None, float | None] | None) -> tuple[int | None, float | None]:
    return last if last is not None else (None, None)


async def owned_input(ctx: NodeContext, call: Call) -> Input:
    raw = call.get("inputid")
    if raw is None or raw == "":
        raise Invalid("missing parameter: inputid")
    inputid = _ident(raw)
    if inputid is None:
        raise Invalid(NO_INPUT)
    return await ctx.inputs.owned(call.userid, inputid)


async def with_lastvalues(ctx: NodeContext, userid: int) -> list[tuple[Input, int | None, float | None]]:
    rows = await ctx.inputs.list(userid)
    last = await ctx.inputs.lastvalues([row.id for row in rows])
    return [(row, *_lastvalue(last.get(row.id))) for row in rows]


# -- reads ---------------------------------------------------------------------------

async def input_list(ctx: NodeContext, call: Call) -> Any:
    return [
        {
            "id": str(row.id),
            "nodeid": row.nodeid,
            "name": row.name,
            "description": row.description,
            "processList": row.processlist,
            "time": when,
            "value": value,
        }
        for row, when, value in await with_lastvalues(ctx, call.userid)
    ]


async def input_get(ctx: NodeContext, call: Call) -> Any:
    nodes: dict[str, dict[str, Any]] = {}
    for row, when, value in await with_lastvalues(ctx, call.userid):
        nodes.setdefault(row.nodeid, {})[row.name] = {"time": when, "value": value, "processList": row.processlist}
    subactions = [unquote(s) for s in call.subactions]
    if subactions:
        node: str | None = subactions[0]
    else:
        node = call.get("node")
    if node is None:
        return nodes
    found = nodes.get(_clean(node))
    if len(subactions) > 1:
        name: str | None = subactions[1]
    else:
        name = call.get("name")
    if found is None:
        return Raw(json_bytes("Node does not exist"), code=400)
    if name is None:
        return found
    variable = found.get(_clean(name))
    if variable is None:
        return Raw(json_bytes("Node variable does not exist"), code=400)
    return variable


async def input_getinputs(ctx: NodeContext, call: Call) -> Any:
    nodes: dict[str, dict[str, Any]] = {}
    for row in await ctx.inputs.list(call.userid):
        nodes.setdefault(row.nodeid, {})[row.name] = {"id": str(row.id), "processList": row.processlist}
    return nodes


async def input_getallprocesses(ctx: NodeContext, call: Call) -> Any:
    return processes_json()


async def input_rejected(ctx: NodeContext, call: Call) -> Any:
    return await ctx.refusals.for_user(call.userid)


async def input_process_get(ctx: NodeContext, call: Call) -> Any:
    return (await owned_input(ctx, call)).processlist


# -- changes -------------------------------------------------------------------------

async def input_set(ctx: NodeContext, call: Call) -> Any:
    inp = await owned_input(ctx, call)
    fields = call.json_param("fields", "Invalid fields, expected a JSON object")
    if not isinstance(fields, dict):
        raise Invalid("Invalid fields, expected a JSON object")
    if "name" in fields:
        raise Invalid("Input names cannot be changed: the device names its inputs")
    if "description" not in fields:
        raise Invalid("Field could not be updated")
    description = fields["description"]
    if isinstance(description, (int, float)) and not isinstance(description, bool):
        description = str(description)
    if not isinstance(description, str):
        raise Invalid("invalid characters in input description")
    await ctx.inputs.set_description(inp, description)
    return {"success": True, "message": "Field updated"}


async def input_delete(ctx: NodeContext, call: Call) -> Any:
    if call.get("inputid") not in (None, ""):
        inp = await owned_input(ctx, call)
        await ctx.inputs.delete(call.userid, [inp.id])
        return {"success": True, "message": "Input deleted"}
    if call.get("inputids") in (None, ""):
        raise Invalid("missing parameter: inputid or inputids")
    wanted = call.json_param("inputids", "inputids must be a JSON array of input ids")
    if not isinstance(wanted, list):
        raise Invalid("inputids must be a JSON array of input ids")
    if len(wanted) > MAX_DELETE:
        raise Invalid(f"at most {MAX_DELETE} inputs can be deleted at once")
    ids = [_ident(item) for item in wanted]
    if any(i is None for i in ids):
        raise Invalid("inputids must be a JSON array of input ids")
    deleted = await ctx.inputs.delete(call.userid, [i for i in ids if i is not None])
    return {"success": True, "message": "Inputs deleted", "deleted": len(deleted)}


async def input_process_set(ctx: NodeContext, call: Call) -> Any:
    inp = await owned_input(ctx, call)
    if "processlist" not in call.params:
        raise Invalid("missing parameter: processlist")
    steps = processlist_steps(call.params["processlist"])
    await ctx.inputs.change_processlist(call.userid, inp.id, lambda current: (steps, format_processlist(steps)))
    return {"success": True, "message": "Input processlist updated"}


async def input_process_reset(ctx: NodeContext, call: Call) -> Any:
    inp = await owned_input(ctx, call)
    await ctx.inputs.change_processlist(call.userid, inp.id, lambda current: (None, ""))
    return {"success": True, "message": "Input processlist updated"}


def appended(step: Step):
    def change(current: str) -> tuple[list[Step], str]:
        previous = parse_lenient(current)
        text = f"{current},{format_step(step)}" if current else format_step(step)
        return previous + [step], text

    return change


async def new_feed_for(ctx: NodeContext, call: Call, inp: Input, processid: int) -> Any:
    """The feed ``process/add.json?newfeedname=`` asks for, created on its storage server."""
    proc = PROCESSES[processid]
    if proc.deleted:
        raise ProcessListError(MSG_DELETED)
    if not proc.writes:
        raise Invalid("This process does not write to a feed")
    if len(parse_lenient(inp.processlist)) >= MAX_STEPS:
        raise ProcessListError(MSG_TOO_MANY)
    name = call.get("newfeedname") or ""
    tag = call.get("newfeedtag")
    if tag is None:
        tag = inp.nodeid if valid_feed_name(inp.nodeid) else ""
    raw_engine = call.get("engine")
    if raw_engine in (None, ""):
        engine = ENGINE_PHPFINA if ENGINE_PHPFINA in proc.engines else proc.engines[0]
    else:
        parsed = _strict_int(raw_engine)
        if parsed is None:
            raise Invalid("Engine id not valid")
        engine = parsed
        check_engine(engine)
        if engine not in proc.engines:
            raise Invalid("This process cannot write to a feed of this engine")
    raw_interval = call.get("newfeedinterval")
    interval = DEFAULT_FEED_INTERVAL if raw_interval in (None, "") else _strict_int(raw_interval)
    if interval is None or not 0 < interval <= MAX_FEED_INTERVAL:
        raise Invalid(f"newfeedinterval must be a whole number of seconds, at most {MAX_FEED_INTERVAL}")
    interval = max(interval, MIN_INTERVAL) if engine == ENGINE_PHPFINA else 0
    server = ctx.config.default_server(ctx.shard)  # a storage server of the user's shard
    return await create_feed(ctx, call.userid, name, tag, proc.datatype, engine, interval, server)


async def input_process_add(ctx: NodeContext, call: Call) -> Any:
    inp = await owned_input(ctx, call)
    try:
        processid = process_id(call.get("processid") or "")
    except ProcessListError:
        raise ProcessListError(MSG_UNKNOWN)
    feed = None
    if call.get("newfeedname") not in (None, ""):
        feed = await new_feed_for(ctx, call, inp, processid)
        step = Step(processid, feed.id)
    else:
        step = make_step(processid, call.get("arg"))
    try:
        await ctx.inputs.change_processlist(call.userid, inp.id, appended(step))
    except BaseException:
        if feed is not None:  # the list refused it after all (a concurrent change): no orphan feed
            try:
                await ctx.store.delete(feed)
            finally:
                await ctx.feeds.delete(feed)
        raise
    answer: dict[str, Any] = {"success": True, "message": "Process added"}
    if feed is not None:
        answer["feedid"] = feed.id
    return answer


def position(call: Call, items: list[str]) -> int:
    index = _strict_int(call.get("processid"))
    if index is None or not 0 < index <= len(items):
        raise Invalid("There is no process at this position")
    return index - 1


async def input_process_delete(ctx: NodeContext, call: Call) -> Any:
    inp = await owned_input(ctx, call)

    def change(current: str) -> tuple[None, str]:
        items = current.split(",") if current else []
        del items[position(call, items)]
        return None, ",".join(items)

    await ctx.inputs.change_processlist(call.userid, inp.id, change)
    return {"success": True, "message": "Process deleted"}


async def input_process_move(ctx: NodeContext, call: Call) -> Any:
    inp = await owned_input(ctx, call)
    moveby = _strict_int(call.get("moveby"))
    if moveby not in (-1, 0, 1):
        raise Invalid("moveby must be -1 or 1")

    def change(current: str) -> tuple[None, str]:
        items = current.split(",") if current else []
        index = position(call, items)
        other = min(max(index + moveby, 0), len(items) - 1)
        items[index], items[other] = items[other], items[index]
        return None, ",".join(items)

    await ctx.inputs.change_processlist(call.userid, inp.id, change)
    return {"success": True, "message": "Process moved"}


# -- the table: every input/... management route ----------------------------------

INPUT_ROUTES: tuple[Route, ...] = (
    Route("input", "list", READ, input_list),
    Route("input", "get", READ, input_get),
    Route("input", "getinputs", READ, input_getinputs),
    Route("input", "get_inputs", READ, input_getinputs),
    Route("input", "getallprocesses", READ, input_getallprocesses),
    Route("input", "rejected", READ, input_rejected),
    Route("input", "set", WRITE, input_set),
    Route("input", "delete", WRITE, input_delete),
    Route("input", "process/get", READ, input_process_get),
    Route("input", "process/list", READ, input_process_get),
    Route("input", "process/set", WRITE, input_process_set),
    Route("input", "process/reset", WRITE, input_process_reset),
    Route("input", "process/add", WRITE, input_process_add),
    Route("input", "process/delete", WRITE, input_process_delete),
    Route("input", "process/move", WRITE, input_process_move),
)


__all__ = ["INPUT_ROUTES"]
