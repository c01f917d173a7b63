"""``emond-admin user list|disable|enable|reset-password``: accounts, as the operator sees them.

    user list                      [{"id", "username", "email", "shard", "feeds", "inputs", "disabled"}, ...]
    user disable NAME              the user (as ``user show``), "disabled": true
    user enable NAME               ... "disabled": false
    user reset-password NAME [--password-stdin]
                                   {"id", "username", "password": NEW} (a random one, printed
                                   this once); with --password-stdin the first line of stdin is
                                   the new password and is not printed back

A disabled account keeps its data, but its API keys are answered 401 ``Invalid API key`` (as a
key that does not exist) and its password ``Login disabled for this account`` (emoncms's words
for an account without login access); its sessions end at once. Every process stops accepting
its keys within ``emond.meta.auth.KEY_CACHE_SECONDS`` (each keeps the keys it checked for that
long). A reset password is stored with scrypt and ends the user's sessions on every process.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from twisted.internet import threads

from emond.app.admin_common import AdminError, command, central_url, from_database, with_database
from emond.app.node import central_redis
from emond.config import NodeConfig
from emond.errors import Invalid
from emond.meta.accounts import list_users, set_disabled, set_password_hash, user_details
from emond.meta.auth import end_sessions, forget_keys
from emond.meta.db import Database
from emond.meta.users import check_new_password, hash_password
from emond.redis import Redis, RedisUnavailable

NEW_PASSWORD_BYTES = 12  # a random password: 16 characters of base64url, 96 bits


def register(user: Any) -> None:
    """Add the subcommands to ``user`` (the subparsers of ``emond-admin user``)."""
    user.add_parser("list", help="every user: id, username, email, shard, feeds, inputs, disabled").set_defaults(handler=command(user_list))
    disable = user.add_parser("disable", help="refuse the user's API keys and password (data kept), end their sessions")
    disable.add_argument("name")
    disable.set_defaults(handler=command(user_disable))
    enable = user.add_parser("enable", help="accept a disabled user's API keys and password again")
    enable.add_argument("name")
    enable.set_defaults(handler=command(user_enable))
    reset = user.add_parser("reset-password", help="a new password (random, printed once), ending the user's sessions")
    reset.add_argument("name")
    reset.add_argument("--password-stdin", action="store_true", help="read the new password from the first line of stdin")
    reset.set_defaults(handler=command(user_reset_password))


async def user_list(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    return await with_database(config, lambda db: from_database(list_users(db)))


async def _user(db: Database, name: str) -> dict[str, Any]:
    found = await from_database(user_details(db, name))
    if found is None:
        raise AdminError(f"no user named {name!r}")
    return found


async def _on_central(config: NodeConfig, reactor: Any, what: str, work: Any) -> None:
    """``work(redis)`` on the central Redis (where keys and sessions are cached); an
    AdminError if it does not answer."""
    redis: Redis = central_redis(config, central_url(config)).client(reactor, poolsize=1)
    redis.open()
    try:
        await work(redis)
    except RedisUnavailable as e:
        raise AdminError(f"{what}: central Redis: {e} (the database is changed already: run the command again)") from e
    finally:
        await redis.disconnect()


async def user_disable(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> dict[str, Any]:
    async def disable(db: Database) -> dict[str, Any]:
        user = await _user(db, args.name)
        # The database first: a key looked up from now on is refused; then the caches (and a
        # lookup racing this cannot cache the key again: emond.meta.auth.forget_keys).
        digests = await from_database(set_disabled(db, user["id"], True))

        async def forget(redis: Redis) -> None:
            await forget_keys(redis, digests)
            await end_sessions(redis, user["id"])

        await _on_central(config, reactor, "user disable", forget)
        return await _user(db, args.name)

    return await with_database(config, disable)


async def user_enable(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> dict[str, Any]:
    async def enable(db: Database) -> dict[str, Any]:
        user = await _user(db, args.name)
        await from_database(set_disabled(db, user["id"], False))  # nothing caches a refusal
        return await _user(db, args.name)

    return await with_database(config, enable)


def _new_password(from_stdin: bool) -> str:
    if not from_stdin:
        return secrets.token_urlsafe(NEW_PASSWORD_BYTES)
    password = sys.stdin.readline().rstrip("\r\n")
    try:
        check_new_password(password)
    except Invalid as e:
        raise AdminError(f"the password read from stdin: {e.message}") from e
    return password


async def user_reset_password(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> dict[str, Any]:
    password = _new_password(args.password_stdin)
    hashed = await threads.deferToThread(hash_password, password)  # scrypt: ~0.1 s, off the reactor

    async def reset(db: Database) -> dict[str, Any]:
        user = await _user(db, args.name)
        # Sessions end before the new hash is stored and again after (as user/changepassword):
        # a login that checked the old password meanwhile gets no lasting session.
        await _on_central(config, reactor, "user reset-password", lambda redis: end_sessions(redis, user["id"]))
        await from_database(set_password_hash(db, user["id"], hashed))
        await _on_central(config, reactor, "user reset-password", lambda redis: end_sessions(redis, user["id"]))
        return {"id": user["id"], "username": user["username"]}

    result = await with_database(config, reset)
    if not args.password_stdin:
        result["password"] = password
    return result
