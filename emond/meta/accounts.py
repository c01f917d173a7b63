"""The operator's SQL on accounts (``emond-admin user ...``): the list of users, one user's
details, disabling and enabling an account, and setting its password."""

from __future__ import annotations

from typing import Any

from emond.meta.db import Database
from emond.meta.users import username_key

# Per user: what ``user list`` shows, then what ``user show`` adds.
_COUNTS = (
    "(SELECT COUNT(*) FROM feeds f WHERE f.userid = u.id), (SELECT COUNT(*) FROM inputs i WHERE i.userid = u.id)"
)
_LISTED = f"u.id, u.username, u.email, u.shard, {_COUNTS}, u.disabled"
_DETAILS = f"{_LISTED}, u.admin, u.timezone, u.created, u.lastlogin"


def _listed(row: tuple[Any, ...]) -> dict[str, Any]:
    userid, username, email, shard, feeds, inputs, disabled = row[:7]
    return {
        "id": int(userid),
        "username": username,
        "email": email,
        "shard": shard,
        "feeds": int(feeds),
        "inputs": int(inputs),
        "disabled": bool(disabled),
    }


async def list_users(db: Database) -> list[dict[str, Any]]:
    """Every user, by id: id, username, email, shard, feeds, inputs, disabled."""
    return [_listed(row) for row in await db.query(f"SELECT {_LISTED} FROM users u ORDER BY u.id")]


async def user_details(db: Database, name: str) -> dict[str, Any] | None:
    """The user of that exact name, else of the one holding it whatever its case (as at
    login): what ``list_users`` shows and admin, timezone, created and lastlogin (unix
    seconds; null before the first login). None when there is none."""
    statement = f"SELECT {_DETAILS} FROM users u WHERE {{where}} ORDER BY u.id"
    row = await db.one(statement.format(where="u.username = ?"), name)
    if row is None:
        row = await db.one(statement.format(where="u.username_key = ?"), username_key(name))
    if row is None:
        return None
    admin, timezone, created, lastlogin = row[7:]
    return {
        **_listed(row),
        "admin": bool(admin),
        "timezone": timezone,
        "created": int(created),
        "lastlogin": int(lastlogin) if lastlogin is not None else None,
    }


async def set_disabled(db: Database, userid: int, disabled: bool) -> list[str]:
    """Disable (or enable) the account; the digests of its two API keys (to drop from caches)."""
    await db.execute("UPDATE users SET disabled = ? WHERE id = ?", 1 if disabled else 0, userid)
    row = await db.one("SELECT apikey_write_hash, apikey_read_hash FROM users WHERE id = ?", userid)
    return [row[0], row[1]] if row is not None else []


async def set_password_hash(db: Database, userid: int, hashed: str) -> None:
    """Store a new password hash (emond.meta.users.hash_password); a legacy salt goes."""
    await db.execute("UPDATE users SET password = ?, salt = '' WHERE id = ?", hashed, userid)
