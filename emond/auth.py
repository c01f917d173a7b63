"""Who is calling: API keys (query, POST, Bearer), sessions, and login throttling.

A key is resolved by its sha256 digest: an in-process cache of a few
seconds, then Redis (``emond:apikey:<digest>``), then the database. A
regenerated key's Redis entry is deleted, so every process stops accepting
the old key within the in-process cache's lifetime. Sessions live in Redis
(any emond process serves them), under the digest of their token.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time
from typing import Callable

from twisted.web.server import Request

from emond.api import Auth, InvalidApiKey
from emond.redis import Redis
from emond.users import Users, apikey_digest

COOKIE = b"emond_session"
KEY_CACHE_SECONDS = 5.0
REDIS_KEY_TTL = 3600


class Authenticator:
    def __init__(
        self,
        users: Users,
        redis: Redis,
        session_ttl: int,
        trusted_proxies: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.users = users
        self.redis = redis
        self.session_ttl = session_ttl
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self._clock = clock
        self._keys: dict[str, tuple[int, bool, float]] = {}

    async def __call__(self, request: Request, params: dict[str, str]) -> Auth | None:
        key = params.get("apikey") or _bearer(request)
        if key:
            owner = await self.key_owner(key)
            if owner is None:
                raise InvalidApiKey()
            return Auth(owner[0], owner[1], "apikey")
        token = request.getCookie(COOKIE)
        if token:
            userid = await self.redis.call("GET", _session_key(token))
            if userid is not None:
                return Auth(int(userid), True, "session")
        return None

    async def key_owner(self, key: str) -> tuple[int, bool] | None:
        """(userid, write) for a valid key, else None."""
        digest = apikey_digest(key)
        now = self._clock()
        cached = self._keys.get(digest)
        if cached is not None and cached[2] > now:
            return cached[0], cached[1]
        entry = await self.redis.call("GET", b"emond:apikey:" + digest.encode())
        if entry is not None:
            uid, kind = entry.split(b":")
            owner = (int(uid), kind == b"w")
        else:
            found = await self.users.by_apikey(key)
            if found is None:
                return None
            owner = (found.userid, found.write)
            value = f"{owner[0]}:{'w' if owner[1] else 'r'}"
            await self.redis.call("SET", b"emond:apikey:" + digest.encode(), value, "EX", REDIS_KEY_TTL)
        if len(self._keys) > 100_000:
            self._keys.clear()  # bounded: a flood of distinct valid keys cannot grow it forever
        self._keys[digest] = (owner[0], owner[1], now + KEY_CACHE_SECONDS)
        return owner

    async def forget_key(self, digest: str) -> None:
        """A key was replaced: stop accepting it (other processes within seconds)."""
        self._keys.pop(digest, None)
        await self.redis.call("DEL", b"emond:apikey:" + digest.encode())

    # -- sessions ----------------------------------------------------------

    async def start_session(self, request: Request, userid: int, remember: bool) -> None:
        token = secrets.token_urlsafe(32).encode()
        ttl = self.session_ttl if remember else min(self.session_ttl, 86400)
        await self.redis.call("SET", _session_key(token), str(userid), "EX", ttl)
        request.addCookie(
            COOKIE,
            token,
            path=b"/",
            max_age=str(ttl).encode() if remember else None,
            httpOnly=True,
            secure=self.is_https(request),
            sameSite="strict",
        )

    async def end_session(self, request: Request) -> None:
        token = request.getCookie(COOKIE)
        if token:
            await self.redis.call("DEL", _session_key(token))
        request.addCookie(COOKIE, b"", path=b"/", max_age=b"0", httpOnly=True, sameSite="strict")

    def is_https(self, request: Request) -> bool:
        if request.isSecure():
            return True
        peer = client_address(request)
        if self._trusted and _in(peer, self._trusted):
            return request.getHeader(b"x-forwarded-proto") == b"https"
        return False

    def client(self, request: Request) -> str:
        """The caller's address; X-Forwarded-For only from a trusted proxy."""
        peer = client_address(request)
        if self._trusted and _in(peer, self._trusted):
            forwarded = request.getHeader(b"x-forwarded-for")
            if forwarded:
                return forwarded.decode("ascii", "replace").split(",")[-1].strip()
        return peer

    # -- login throttling ----------------------------------------------------

    async def login_allowed(self, username: str, address: str, per_user: int, per_address: int) -> bool:
        counts = await self.redis.pipeline(
            [("GET", _throttle_key("u", username.lower())), ("GET", _throttle_key("a", address))]
        )
        user_fails, address_fails = (int(c) if c is not None else 0 for c in counts)
        return user_fails < per_user and address_fails < per_address

    async def login_failed(self, username: str, address: str, window: int) -> None:
        keys = (_throttle_key("u", username.lower()), _throttle_key("a", address))
        await self.redis.pipeline([cmd for key in keys for cmd in (("INCR", key), ("EXPIRE", key, window))])

    async def login_succeeded(self, username: str) -> None:
        await self.redis.call("DEL", _throttle_key("u", username.lower()))


def _bearer(request: Request) -> str | None:
    header = request.getHeader(b"authorization")
    if not header:
        return None
    return header.decode("ascii", "replace").replace("Bearer ", "").strip() or None


def _session_key(token: bytes) -> bytes:
    return b"emond:session:" + hashlib.sha256(token).hexdigest().encode()


def _throttle_key(kind: str, who: str) -> bytes:
    return f"emond:login:{kind}:{hashlib.sha256(who.encode()).hexdigest()}".encode()


def client_address(request: Request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or "unix"


def _in(address: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
