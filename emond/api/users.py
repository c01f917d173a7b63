"""``user/...`` routes: register, login, logout, auth, get, set, getuuid, API keys, password.

Every route that checks a password (login, auth, changepassword) goes through the
throttle of emond.meta.auth first; registrations are throttled per address.
"""

from __future__ import annotations

from typing import Any

from emond.api.http import PUBLIC, READ, WRITE, Call, Route
from emond.api.context import NodeContext
from emond.cluster.placement import place_new_user
from emond.errors import Forbidden, Invalid
from emond.pools import PoolBusy
from emond.meta.users import LOGIN_FAILED, Verified, check_new_password

AUTH_FAILED = "Incorrect authentication"  # current emoncms's user/auth answer, for both failures


async def user_register(ctx: NodeContext, call: Call) -> Any:
    if not ctx.config.users.registration:
        raise Forbidden("Registration is disabled")
    # Every attempt counts (not only successes): "Username already exists" tells who has an
    # account, so probing through registration is slowed down as well.
    await ctx.auth.registration_attempt(ctx.auth.client(call.request), ctx.config.users)
    return await ctx.users.register(
        call.get("username", "") or "",
        call.get("password", "") or "",
        call.get("email", "") or "",
        call.get("timezone", "UTC") or "UTC",
        shard=lambda: place_new_user(ctx.db, ctx.config),
    )


async def checked_login(ctx: NodeContext, call: Call, failed: str) -> Verified:
    username = call.get("username", "") or ""
    password = call.get("password", "") or ""
    if not username or not password:
        raise Invalid("Username or password empty")
    address = ctx.auth.client(call.request)
    await ctx.auth.password_attempt(username, address, ctx.config.users)  # counted before it is checked
    try:
        verified = await ctx.users.authenticate(username, password, failed)
    except PoolBusy:
        await ctx.auth.password_unchecked(username, address)
        raise
    await ctx.auth.password_accepted(username, address)
    return verified


async def user_login(ctx: NodeContext, call: Call) -> Any:
    remember = call.flag("rememberme", False)
    verified = await checked_login(ctx, call, LOGIN_FAILED)
    # A password change racing this login must not leave it a session: the generation is
    # read first, then the password checked above must still be the user's. A change after
    # that read bumps the generation, which ends this session.
    generation = await ctx.auth.session_generation(verified.userid)
    if not await ctx.users.still_current(verified):
        raise Invalid(LOGIN_FAILED)
    await ctx.auth.start_session(call.request, verified.userid, remember, generation)
    user = await ctx.users.get(verified.userid)
    return {"success": True, "message": "Login successful", "startingpage": user["startingpage"]}


async def user_auth(ctx: NodeContext, call: Call) -> Any:
    verified = await checked_login(ctx, call, AUTH_FAILED)
    user = await ctx.users.get(verified.userid)
    return {"success": True, "userid": verified.userid, "apikey_write": user["apikey_write"], "apikey_read": user["apikey_read"]}


async def user_logout(ctx: NodeContext, call: Call) -> Any:
    await ctx.auth.end_session(call.request)
    return {"success": True, "message": "Logout successful"}


async def user_get(ctx: NodeContext, call: Call) -> Any:
    user = await ctx.users.get(call.userid)
    if not call.auth.write:
        user.pop("apikey_write")  # a read key must not reveal the write key
    return user


async def user_set(ctx: NodeContext, call: Call) -> Any:
    fields = call.json_param("data", "Invalid data, expected a JSON object")
    if not isinstance(fields, dict):
        raise Invalid("Invalid data, expected a JSON object")
    await ctx.users.set_profile(call.userid, fields)
    return {"success": True, "message": "Account updated"}


async def user_getuuid(ctx: NodeContext, call: Call) -> Any:
    user = await ctx.users.get(call.userid)
    return {"success": True, "message": user["uuid"]}


# A new API key leaves sessions alone: keys and sessions are separate credentials, and a
# key never yields a session (only a password does), so a leaked key is dealt with by
# replacing the key; logging the owner out of the browser they are using would add nothing.
async def new_key(ctx: NodeContext, call: Call, kind: str) -> str:
    key, old_digest = await ctx.users.new_apikey(call.userid, kind)
    await ctx.auth.forget_key(old_digest)
    return key


async def user_newapikeywrite(ctx: NodeContext, call: Call) -> Any:
    return await new_key(ctx, call, "write")


async def user_newapikeyread(ctx: NodeContext, call: Call) -> Any:
    return await new_key(ctx, call, "read")


async def user_changepassword(ctx: NodeContext, call: Call) -> Any:
    old, new = call.get("old", "") or "", call.get("new", "") or ""
    check_new_password(new)
    username = await ctx.users.username(call.userid)
    address = ctx.auth.client(call.request)
    current = await ctx.auth.session(call.request) if call.auth.via == "session" else None
    # A write key or a session can guess the old password here: throttled like a login.
    await ctx.auth.password_attempt(username, address, ctx.config.users)

    async def end_sessions() -> None:
        # before the new password is stored: if Redis fails, nothing has changed
        await ctx.auth.end_all_sessions(call.userid)

    try:
        await ctx.users.change_password(call.userid, old, new, end_sessions)
    except PoolBusy:
        await ctx.auth.password_unchecked(username, address)
        raise
    await ctx.auth.password_accepted(username, address)
    # ... and after: a login that read the old hash before the change ends with the rest
    generation = await ctx.auth.end_all_sessions(call.userid)
    if current is not None:  # the caller stays logged in, with a fresh session (the old one is dead)
        await ctx.auth.start_session(call.request, call.userid, current.remember, generation)
    return {"success": True, "message": "Password updated"}


async def user_timezone(ctx: NodeContext, call: Call) -> Any:
    return await ctx.users.timezone(call.userid)


# -- the table: every user/... route ------------------------------------------------

USER_ROUTES: tuple[Route, ...] = (
    Route("user", "register", PUBLIC, user_register),
    Route("user", "login", PUBLIC, user_login),
    Route("user", "auth", PUBLIC, user_auth),
    Route("user", "logout", PUBLIC, user_logout),
    Route("user", "get", READ, user_get),
    Route("user", "set", WRITE, user_set),
    Route("user", "getuuid", READ, user_getuuid),
    Route("user", "newapikeywrite", WRITE, user_newapikeywrite),
    Route("user", "newapikeyread", WRITE, user_newapikeyread),
    Route("user", "changepassword", WRITE, user_changepassword),
    Route("user", "timezone", READ, user_timezone),
)


__all__ = ["USER_ROUTES"]
