"""Users: accounts, passwords and API keys (the metadata layer, no HTTP here).

Passwords are hashed with scrypt: deliberately slow (~0.1 s of CPU and 16 MiB
each), so in a small, bounded pool of its own (``[users] kdf_threads`` and
``kdf_queue``; a hash beyond them is refused at once with ``PoolBusy``). Few
threads also bound the memory: glibc keeps the last 16 MiB block in each
thread's arena, so every KDF thread ever used holds one for good. A
legacy emoncms hash, ``sha256_hex(salt + sha256_hex(password))``, is accepted
once and replaced by scrypt at that login. API keys are 32 lowercase hex
characters from ``secrets``, found by the sha256 digest of the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import unicodedata
import uuid
import zoneinfo
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from emond.config import DEFAULT_SHARD
from emond.meta.db import Database, is_duplicate
from emond.errors import Invalid, NotFound
from emond.pools import BoundedPool, PoolBusy

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # 128 * r * n bytes: 16 MiB per hash
EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
APIKEY = re.compile(r"^[0-9a-f]{32}$")
# Checked for a username that does not exist, so that answering takes as long as a wrong
# password (no password has this digest: all zeros).
DUMMY_HASH = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${'00' * 16}${'00' * 64}"
# current emoncms's answers, the same for an unknown username and a wrong password
LOGIN_FAILED = "Incorrect username or password"
# emoncms's answer for an account whose login an administrator turned off (access = 0), given
# only after the right password, so it tells a guesser nothing
LOGIN_DISABLED = "Login disabled for this account"
# user/get.json and user/set.json fields, as emoncms names them
PROFILE_FIELDS = ("name", "location", "timezone", "language", "bio", "gravatar", "startingpage", "email")
USER_COLUMNS = (
    "id, username, email, apikey_write, apikey_read, uuid, admin, name, location, timezone, "
    "language, bio, gravatar, startingpage, lastlogin"
)


def new_apikey() -> str:
    return secrets.token_hex(16)


def apikey_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str, salt: str) -> bool:
    """Constant-time check against a scrypt hash or a legacy emoncms one. Every check runs
    the KDF once (a legacy check against DUMMY_HASH too), so its time tells nothing about
    which kind of account, if any, the name belongs to."""
    if stored.startswith("scrypt$"):
        return _scrypt_matches(password, stored)
    _scrypt_matches(password, DUMMY_HASH)
    inner = hashlib.sha256(password.encode()).hexdigest()
    legacy = hashlib.sha256((salt + inner).encode()).hexdigest()
    return hmac.compare_digest(legacy, stored)


def _scrypt_matches(password: str, stored: str) -> bool:
    _, n, r, p, salt_hex, digest_hex = stored.split("$")
    digest = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p), maxmem=64 * 1024 * 1024
    )
    return hmac.compare_digest(digest.hex(), digest_hex)


def check_new_password(password: str) -> None:
    if not 4 <= len(password) <= 250:
        raise Invalid("Password length error")


def username_key(username: str) -> str:
    """What makes two usernames the same one: case does not (usernames are ASCII)."""
    return username.lower()


def valid_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
        return True
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False


@dataclass(frozen=True)
class Verified:
    """A correct login: the user, and the password hash that was checked (it may change later)."""

    userid: int
    password_hash: str


@dataclass(frozen=True)
class KeyOwner:
    userid: int
    write: bool


class Users:
    """Account rules and storage; messages are emoncms's."""

    def __init__(self, db: Database, kdf: BoundedPool) -> None:
        self.db = db
        self.kdf = kdf  # every hash and check runs here

    async def register(
        self,
        username: str,
        password: str,
        email: str,
        timezone: str = "UTC",
        shard: str | Callable[[], Awaitable[str]] = DEFAULT_SHARD,
    ) -> dict[str, Any]:
        """A new account on ``shard``: a name, or what chooses one once the request is
        found valid (emond.cluster.placement, which the metadata layer does not import)."""
        if not username or not password or not email:
            raise Invalid("Missing username, password or email parameter")
        if not username.isascii() or not username.isalnum():
            raise Invalid("Username must only contain a-z and 0-9 characters")
        if not 3 <= len(username) <= 30:
            raise Invalid("Username length error")
        if len(email) > 128 or not EMAIL.match(email):
            raise Invalid("Email address format error")
        check_new_password(password)
        if not valid_timezone(timezone):
            raise Invalid("Invalid timezone")
        hashed = await self.kdf.run(hash_password, password)
        write, read = new_apikey(), new_apikey()
        if callable(shard):
            shard = await shard()

        key = username_key(username)

        def insert(txn: Any) -> int:
            if txn.query("SELECT id FROM users WHERE username_key = ? OR username = ?", key, username):
                raise Invalid("Username already exists")
            first = not txn.query("SELECT id FROM users LIMIT 1")
            return txn.insert(
                "INSERT INTO users (username, username_key, email, password, salt, apikey_write, apikey_read, "
                "apikey_write_hash, apikey_read_hash, uuid, admin, timezone, bio, created, shard) "
                "VALUES (?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                username, key, email, hashed, write, read, apikey_digest(write), apikey_digest(read),
                str(uuid.uuid4()), 1 if first else 0, timezone, int(time.time()), shard,
            )

        try:
            userid = await self.db.transaction(insert)
        except Invalid:
            raise
        except Exception as e:  # the unique indexes, when two registrations race
            if is_duplicate(e):
                raise Invalid("Username already exists")
            raise
        return {"success": True, "verifyemail": False, "userid": userid, "apikey_read": read, "apikey_write": write}

    async def authenticate(self, username: str, password: str, failed: str = LOGIN_FAILED) -> Verified:
        """The user of a correct username and password (a legacy hash is upgraded). An unknown
        username and a wrong password fail alike, ``failed``, after one KDF run each.

        A username matches whatever its case, as on emoncms (MySQL's default collations ignore
        case, so emoncms users type their name in any case). Twins that predate unique
        usernames (see emond.meta.schema) each still match their exact spelling; another spelling
        matches the oldest. A disabled account (``emond-admin user disable``) is refused with
        LOGIN_DISABLED once its password is found right.
        """
        if not username or not password:
            raise Invalid("Username or password empty")
        rows = await self.db.query(
            "SELECT id, username, password, salt, disabled FROM users WHERE username_key = ? OR username = ? ORDER BY id",
            username_key(username), username,
        )
        exact = [r for r in rows if r[1] == username]
        row = (exact or rows or [None])[0]
        stored, salt = (row[2], row[3]) if row is not None else (DUMMY_HASH, "")
        correct = await self.kdf.run(check_password, password, stored, salt)
        if row is None or not correct:
            raise Invalid(failed)
        if row[4]:
            raise Invalid(LOGIN_DISABLED)
        userid = int(row[0])
        if not stored.startswith("scrypt$"):
            try:
                stored = await self.kdf.run(hash_password, password)
                await self.db.execute("UPDATE users SET password = ?, salt = '' WHERE id = ?", stored, userid)
            except PoolBusy:
                pass  # the login stands; the legacy hash is upgraded at a quieter login
        await self.db.execute("UPDATE users SET lastlogin = ? WHERE id = ?", int(time.time()), userid)
        return Verified(userid, stored)

    async def still_current(self, verified: Verified) -> bool:
        """Whether the password checked at login is still the user's (not changed since), and
        the account not disabled since."""
        row = await self.db.one("SELECT password, disabled FROM users WHERE id = ?", verified.userid)
        return row is not None and not row[1] and hmac.compare_digest(row[0], verified.password_hash)

    async def by_apikey(self, key: str) -> KeyOwner | None:
        """Who owns a key, and whether it is the write key; None for a disabled account's."""
        if not APIKEY.match(key):
            return None
        digest = apikey_digest(key)
        row = await self.db.one(
            "SELECT id, apikey_write_hash FROM users WHERE (apikey_write_hash = ? OR apikey_read_hash = ?) AND disabled = 0",
            digest, digest,
        )
        if row is None:
            return None
        return KeyOwner(int(row[0]), hmac.compare_digest(row[1], digest))

    async def get(self, userid: int) -> dict[str, Any]:
        row = await self.db.one(f"SELECT {USER_COLUMNS} FROM users WHERE id = ?", userid)
        if row is None:
            raise NotFound("User does not exist")
        names = [c.strip() for c in USER_COLUMNS.split(",")]
        user = dict(zip(names, row))
        user["bio"] = user["bio"] or ""
        return user

    async def timezone(self, userid: int) -> str:
        row = await self.db.one("SELECT timezone FROM users WHERE id = ?", userid)
        return row[0] if row else "UTC"

    async def set_profile(self, userid: int, fields: dict[str, Any]) -> None:
        updates: dict[str, str] = {}
        for name, value in fields.items():
            if name not in PROFILE_FIELDS:
                continue  # unknown fields are ignored, as emoncms
            value = "" if value is None else str(value)
            if name == "email" and not EMAIL.match(value):
                raise Invalid("Email address format error")
            if name == "timezone" and not valid_timezone(value):
                raise Invalid("Invalid timezone")
            limit = 5 if name == "language" else 64 if name != "bio" else 4096
            if len(value) > limit:
                raise Invalid(f"{name} is too long")
            if name != "bio" and any(unicodedata.category(c).startswith("C") for c in value):
                raise Invalid(f"invalid characters in {name}")
            updates[name] = value
        if updates:
            assignments = ", ".join(f"{name} = ?" for name in updates)  # names from PROFILE_FIELDS only
            await self.db.execute(f"UPDATE users SET {assignments} WHERE id = ?", *updates.values(), userid)

    async def change_password(
        self, userid: int, old: str, new: str, before_update: Callable[[], Awaitable[Any]]
    ) -> None:
        """Check ``old``, then call ``before_update`` (ending sessions) and store ``new``."""
        check_new_password(new)
        row = await self.db.one("SELECT password, salt FROM users WHERE id = ?", userid)
        if row is None or not await self.kdf.run(check_password, old, row[0], row[1]):
            raise Invalid("Old password incorrect")
        hashed = await self.kdf.run(hash_password, new)
        await before_update()
        await self.db.execute("UPDATE users SET password = ?, salt = '' WHERE id = ?", hashed, userid)

    async def username(self, userid: int) -> str:
        row = await self.db.one("SELECT username FROM users WHERE id = ?", userid)
        if row is None:
            raise NotFound("User does not exist")
        return str(row[0])

    async def new_apikey(self, userid: int, kind: str) -> tuple[str, str]:
        """Replace the ``write`` or ``read`` key; returns (new key, old key's digest)."""
        assert kind in ("write", "read")
        row = await self.db.one(f"SELECT apikey_{kind}_hash FROM users WHERE id = ?", userid)
        if row is None:
            raise NotFound("User does not exist")
        key = new_apikey()
        await self.db.execute(
            f"UPDATE users SET apikey_{kind} = ?, apikey_{kind}_hash = ? WHERE id = ?", key, apikey_digest(key), userid
        )
        return key, row[0]
