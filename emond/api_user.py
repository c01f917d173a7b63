"""``user/...`` routes: register, login, logout, auth, get, set, getuuid, API keys, password.

Every route that checks a password (login, auth, changepassword) goes through the
throttle of emond.auth first; registrations are throttled per address.
"""

from __future__ import annotations

from typing import Any

from emond.api import PUBLIC, READ, WRITE, Call, Router
from emond.context import NodeContext
from emond.errors import Forbidden, Invalid
from emond.pools import PoolBusy
from emond.users import LOGIN_FAILED, Verified, check_new_password

AUTH_FAILED = "Incorrect authentication"  # current emoncms's user/auth answer, for both failures


def add_user_routes(router: Router, ctx: NodeContext) -> None:
    users, auth, limits = ctx.users, ctx.auth, ctx.config.users

    async def register(call: Call) -> Any:
        if not limits.registration:
            raise Forbidden("Registration is disabled")
        # Every attempt counts (not only successes): "Username already exists" tells who has an
        # account, so probing through registration is slowed down as well.
        await auth.registration_attempt(auth.client(call.request), limits)
        return await users.register(
            call.get("username", "") or "",
            call.get("password", "") or "",
            call.get("email", "") or "",
            call.get("timezone", "UTC") or "UTC",
        )

    async def checked_login(call: Call, failed: str) -> Verified:
        username = call.get("username", "") or ""
        password = call.get("password", "") or ""
        if not username or not password:
            raise Invalid("Username or password empty")
        address = auth.client(call.request)
        await auth.password_attempt(username, address, limits)  # counted before it is checked
        try:
            verified = await users.authenticate(username, password, failed)
        except PoolBusy:
            await auth.password_unchecked(username, address)
            raise
        await auth.password_accepted(username, address)
        return verified

    async def login(call: Call) -> Any:
        remember = call.flag("rememberme", False)
        verified = await checked_login(call, LOGIN_FAILED)
        # A password change racing this login must not leave it a session: the generation is
        # read first, then the password checked above must still be the user's. A change after
        # that read bumps the generation, which ends this session.
        generation = await auth.session_generation(verified.userid)
        if not await users.still_current(verified):
            raise Invalid(LOGIN_FAILED)
        await auth.start_session(call.request, verified.userid, remember, generation)
        user = await users.get(verified.userid)
        return {"success": True, "message": "Login successful", "startingpage": user["startingpage"]}

    async def auth_route(call: Call) -> Any:
        verified = await checked_login(call, AUTH_FAILED)
        user = await users.get(verified.userid)
        return {"success": True, "userid": verified.userid, "apikey_write": user["apikey_write"], "apikey_read": user["apikey_read"]}

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
            raise Invalid("Invalid data, expected a JSON object")
        await users.set_profile(call.userid, fields)
        return {"success": True, "message": "Account updated"}

    async def getuuid(call: Call) -> Any:
        user = await users.get(call.userid)
        return {"success": True, "message": user["uuid"]}

    # A new API key leaves sessions alone: keys and sessions are separate credentials, and a
    # key never yields a session (only a password does), so a leaked key is dealt with by
    # replacing the key; logging the owner out of the browser they are using would add nothing.
    def new_key(kind: str):
        async def route(call: Call) -> Any:
            key, old_digest = await users.new_apikey(call.userid, kind)
            await auth.forget_key(old_digest)
            return key

        return route

    async def changepassword(call: Call) -> Any:
        old, new = call.get("old", "") or "", call.get("new", "") or ""
        check_new_password(new)
        username = await users.username(call.userid)
        address = auth.client(call.request)
        current = await auth.session(call.request) if call.auth.via == "session" else None
        # A write key or a session can guess the old password here: throttled like a login.
        await auth.password_attempt(username, address, limits)

        async def end_sessions() -> None:
            # before the new password is stored: if Redis fails, nothing has changed
            await auth.end_all_sessions(call.userid)

        try:
            await users.change_password(call.userid, old, new, end_sessions)
        except PoolBusy:
            await auth.password_unchecked(username, address)
            raise
        await auth.password_accepted(username, address)
        # ... and after: a login that read the old hash before the change ends with the rest
        generation = await auth.end_all_sessions(call.userid)
        if current is not None:  # the caller stays logged in, with a fresh session (the old one is dead)
            await auth.start_session(call.request, call.userid, current.remember, generation)
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
