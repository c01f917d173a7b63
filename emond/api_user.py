"""``user/...`` routes: register, login, logout, auth, get, set, getuuid, API keys, password."""

from __future__ import annotations

from typing import Any

from emond.api import PUBLIC, READ, WRITE, ApiError, Call, Router
from emond.context import NodeContext

LOGIN_WINDOW = 15 * 60  # seconds a failed login counts against user and address
LOGIN_FAILURES_PER_USER = 5
LOGIN_FAILURES_PER_ADDRESS = 30


def add_user_routes(router: Router, ctx: NodeContext) -> None:
    users, auth = ctx.users, ctx.auth

    async def register(call: Call) -> Any:
        if not ctx.config.users.registration:
            raise ApiError("Registration is disabled", 403)
        return await users.register(
            call.get("username", "") or "",
            call.get("password", "") or "",
            call.get("email", "") or "",
            call.get("timezone", "UTC") or "UTC",
        )

    async def checked_login(call: Call) -> int:
        username = call.get("username", "") or ""
        address = auth.client(call.request)
        if not await auth.login_allowed(username, address, LOGIN_FAILURES_PER_USER, LOGIN_FAILURES_PER_ADDRESS):
            raise ApiError("Too many login attempts, please try again later", 429)
        try:
            userid = await users.authenticate(username, call.get("password", "") or "")
        except ApiError:
            await auth.login_failed(username, address, LOGIN_WINDOW)
            raise
        await auth.login_succeeded(username)
        return userid

    async def login(call: Call) -> Any:
        userid = await checked_login(call)
        await auth.start_session(call.request, userid, call.flag("rememberme", False))
        user = await users.get(userid)
        return {"success": True, "message": "Login successful", "startingpage": user["startingpage"]}

    async def auth_route(call: Call) -> Any:
        userid = await checked_login(call)
        user = await users.get(userid)
        return {"success": True, "userid": userid, "apikey_write": user["apikey_write"], "apikey_read": user["apikey_read"]}

    async def logout(call: Call) -> Any:
        await auth.end_session(call.request)
        return {"success": True, "message": "Logout successful"}

    async def get(call: Call) -> Any:
        user = await users.get(call.userid)
        if not call.auth.write:
            user.pop("apikey_write")  # a read key must not reveal the write key
        return user

    async def set_route(call: Call) -> Any:
        fields = call.json_param("data", "Invalid data, expected a JSON object")
        if not isinstance(fields, dict):
            raise ApiError("Invalid data, expected a JSON object")
        await users.set_profile(call.userid, fields)
        return {"success": True, "message": "Account updated"}

    async def getuuid(call: Call) -> Any:
        user = await users.get(call.userid)
        return {"success": True, "message": user["uuid"]}

    def new_key(kind: str):
        async def route(call: Call) -> Any:
            key, old_digest = await users.new_apikey(call.userid, kind)
            await auth.forget_key(old_digest)
            return key

        return route

    async def changepassword(call: Call) -> Any:
        await users.change_password(call.userid, call.get("old", "") or "", call.get("new", "") or "")
        return {"success": True, "message": "Password updated"}

    async def timezone(call: Call) -> Any:
        return await users.timezone(call.userid)

    router.add("user", "register", PUBLIC, register)
    router.add("user", "login", PUBLIC, login)
    router.add("user", "auth", PUBLIC, auth_route)
    router.add("user", "logout", PUBLIC, logout)
    router.add("user", "get", READ, get)
    router.add("user", "set", WRITE, set_route)
    router.add("user", "getuuid", READ, getuuid)
    router.add("user", "newapikeywrite", WRITE, new_key("write"))
    router.add("user", "newapikeyread", WRITE, new_key("read"))
    router.add("user", "changepassword", WRITE, changepassword)
    router.add("user", "timezone", READ, timezone)


__all__ = ["add_user_routes"]
