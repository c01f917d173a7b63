"""Who is calling: API keys (query, POST, Bearer), sessions, and throttles on password
guessing and registrations.

A key is resolved by its sha256 digest: an in-process cache of a few
seconds, then Redis (``emond:apikey:<digest>``), then the database. A
regenerated key's Redis entry is deleted (as are both keys of an account an
operator disables), so every process stops accepting the old key within the
in-process cache's lifetime. A lookup that read the database before such a
change cannot put the key back in Redis after it: every change bumps
``emond:apikey:epoch``, and a lookup caches what it read only if the epoch is
still the one it saw before reading. Sessions live in Redis
(any emond process serves them), under the digest of their token. Nothing
secret (a key, a token, a password) is logged or used raw in a key name.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from twisted.protocols.policies import ProtocolWrapper
from twisted.web.server import Request

from emond.config import UsersSection
from emond.errors import InvalidApiKey, TooMany
from emond import keys
from emond.redis import Redis
from emond.meta.users import Users, apikey_digest

COOKIE = b"emond_session"
KEY_CACHE_SECONDS = 5.0
REDIS_KEY_TTL = 3600
TOO_MANY_ATTEMPTS = "Too many attempts, please try again later"  # current emoncms's words
TOO_MANY_REGISTRATIONS = "Too many registrations from this address, please try again later"


def csrf_of(token: bytes) -> str:
    """A session token's CSRF token: an HMAC keyed by the token (not its sha256, which names
    the session in Redis), so revealing it in a page reveals nothing of the cookie."""
    return hmac.new(token, b"emond csrf", hashlib.sha256).hexdigest()


@dataclass
class Auth:
    """Who is calling, as the API's routes see it."""

    userid: int
    write: bool
    via: str  # "apikey" or "session"

# KEYS: a key's cache entry, the epoch. ARGV: the epoch read before the database was, the
# entry, its TTL. Cached only if no key was forgotten since that read.
_CACHE_KEY = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: the session; ARGV[1]: the generation key prefix. The session's value if it is of
# the user's current generation; a session of an older generation is deleted.
_SESSION = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
local uid, gen = string.match(v, '^(%d+):?(%d*)')
if not uid then return false end
if gen == '' then gen = '0' end
if (redis.call('GET', ARGV[1] .. uid) or '0') ~= gen then
  redis.call('DEL', KEYS[1])
  return false
end
return v
"""

# KEYS: (user, address), address, user, the user's slow-down slot.
# ARGV: window, per-client limit, per-address limit, per-user cap, slow-down seconds.
# 0: the attempt may go ahead (it is counted as a failure until given back); else seconds to wait.
_ATTEMPT = """
local function count(k) return tonumber(redis.call('GET', k) or '0') end
local function wait(k) local t = redis.call('TTL', k); if t < 1 then t = 1 end; return t end
if count(KEYS[1]) >= tonumber(ARGV[2]) then return wait(KEYS[1]) end
if count(KEYS[2]) >= tonumber(ARGV[3]) then return wait(KEYS[2]) end
if count(KEYS[3]) >= tonumber(ARGV[4]) then
  if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[5]) then return wait(KEYS[4]) end
end
for i = 1, 3 do
  redis.call('INCR', KEYS[i])
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
return 0
"""

# KEYS: (user, address), address, user. The pair starts afresh; the others get this attempt back.
_ACCEPTED = """
redis.call('DEL', KEYS[1])
for i = 2, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('DECR', KEYS[i]) <= 0 then redis.call('DEL', KEYS[i]) end
end
return 0
"""

# KEYS: (user, address), address, user. An attempt whose password was never checked (the KDF
# was too busy) is given back to all three.
_UNCHECKED = """
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('DECR', KEYS[i]) <= 0 then redis.call('DEL', KEYS[i]) end
end
return 0
"""

# KEYS[1]: a counter; ARGV: window, limit. 0 if this one is within the limit, else seconds to wait.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if n > tonumber(ARGV[2]) then
  local t = redis.call('TTL', KEYS[1]); if t < 1 then t = 1 end; return t
end
return 0
"""


@dataclass(frozen=True)
class Session:
    userid: int
    remember: bool


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
        self._clock = clock
        self._keys: dict[str, tuple[int, bool, float]] = {}
        self.reconfigure(session_ttl, trusted_proxies)

    def reconfigure(self, session_ttl: int, trusted_proxies: tuple[str, ...]) -> None:
        """New sessions' lifetime and the proxies believed from now on (a reload)."""
        self.session_ttl = session_ttl
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    async def __call__(self, request: Request, params: dict[str, str]) -> Auth | None:
        key = params.get("apikey") or _bearer(request)
        if key:
            owner = await self.key_owner(key)
            if owner is None:
                raise InvalidApiKey()
            return Auth(owner[0], owner[1], "apikey")
        session = await self.session(request)
        return Auth(session.userid, True, "session") if session is not None else None

    async def key_owner(self, key: str) -> tuple[int, bool] | None:
        """(userid, write) for a valid key, else None."""
        digest = apikey_digest(key)
        now = self._clock()
        cached = self._keys.get(digest)
        if cached is not None and cached[2] > now:
            return cached[0], cached[1]
        entry, epoch = await self.redis.call("MGET", keys.apikey(digest), keys.APIKEY_EPOCH)
        if entry is not None:
            uid, kind = entry.split(b":")
            owner = (int(uid), kind == b"w")
        else:
            found = await self.users.by_apikey(key)
            if found is None:
                return None
            owner = (found.userid, found.write)
            value = f"{owner[0]}:{'w' if owner[1] else 'r'}"
            await self.redis.call("EVAL", _CACHE_KEY, 2, keys.apikey(digest), keys.APIKEY_EPOCH, epoch or b"", value, REDIS_KEY_TTL)
        if len(self._keys) > 100_000:
            self._keys.clear()  # bounded: a flood of distinct valid keys cannot grow it forever
        self._keys[digest] = (owner[0], owner[1], now + KEY_CACHE_SECONDS)
        return owner

    async def forget_key(self, digest: str) -> None:
        """A key was replaced: stop accepting it (other processes within seconds)."""
        self._keys.pop(digest, None)
        await forget_keys(self.redis, [digest])

    # -- sessions ----------------------------------------------------------
    #
    # A session is ``emond:session:<sha256(token)>`` = ``userid:generation:remember``. A user's
    # generation (``emond:session:gen:<userid>``, absent = 0) grows when their password changes,
    # which ends every session made before, on every process, without listing them.

    async def session_generation(self, userid: int) -> int:
        """The user's current generation. A login reads it, then makes sure the password it
        checked is still the user's, then starts the session: a change after the read ends it."""
        value = await self.redis.call("GET", keys.session_generation(userid))
        return int(value) if value is not None else 0

    async def start_session(self, request: Request, userid: int, remember: bool, generation: int) -> None:
        token = secrets.token_urlsafe(32).encode()
        ttl = self.session_ttl if remember else min(self.session_ttl, 86400)
        value = f"{userid}:{generation}:{1 if remember else 0}"
        await self.redis.call("SET", keys.session(token), value, "EX", ttl)
        request.addCookie(
            COOKIE,
            token,
            path=b"/",
            max_age=str(ttl).encode() if remember else None,
            httpOnly=True,
            secure=self.is_https(request),
            sameSite="strict",
        )

    async def session(self, request: Request) -> Session | None:
        """The caller's live session, if any (one round trip)."""
        token = request.getCookie(COOKIE)
        if not token:
            return None
        value = await self.redis.call("EVAL", _SESSION, 1, keys.session(token), keys.SESSION_GENERATION_PREFIX)
        if not value:
            return None
        userid, _generation, remember = (value.decode().split(":") + ["0", "0"])[:3]
        return Session(int(userid), remember == "1")

    def csrf_token(self, request: Request) -> str | None:
        """The CSRF token of the caller's session cookie (None without one): derived from the
        cookie's secret token, so any process checks it without storing it, and a page served
        to that session is the only place a script can read it (the cookie is HttpOnly)."""
        token = request.getCookie(COOKIE)
        return csrf_of(token) if token else None

    def csrf_valid(self, request: Request, supplied: str | None) -> bool:
        expected = self.csrf_token(request)
        return expected is not None and supplied is not None and hmac.compare_digest(expected.encode(), supplied.encode())

    async def end_session(self, request: Request) -> None:
        token = request.getCookie(COOKIE)
        if token:
            await self.redis.call("DEL", keys.session(token))
        request.addCookie(COOKIE, b"", path=b"/", max_age=b"0", httpOnly=True, secure=self.is_https(request), sameSite="strict")

    async def end_all_sessions(self, userid: int) -> int:
        """End every session of the user (all processes); fires with the new generation."""
        return await end_sessions(self.redis, userid)

    def is_https(self, request: Request) -> bool:
        if request.isSecure():
            return True
        # Who vouches for X-Forwarded-Proto is who connected: under the PROXY protocol
        # that is the balancer (trusted), not the client its header names.
        peer = connection_address(request)
        if self._trusted and _in(peer, self._trusted):
            return request.getHeader(b"x-forwarded-proto") == b"https"
        return False

    def client(self, request: Request) -> str:
        """The caller's address. X-Forwarded-For is read from the right, one hop per trusted
        proxy: the first address not vouched for by a trusted proxy is the client."""
        address = client_address(request)
        if not self._trusted:
            return address
        headers = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        hops = [h.strip() for h in b",".join(headers).decode("ascii", "replace").split(",")]
        for hop in reversed(hops):
            if not _in(address, self._trusted):
                break
            hop_ip = _ip(hop)
            if hop_ip is None:
                break  # garbage from a proxy: the proxy itself is the best we know
            address = str(hop_ip)
        return address

    # -- password guessing and registrations ----------------------------------
    #
    # Three counts, because one is not enough:
    # - per (username, address): the guesser at one address is stopped after a few failures,
    #   while the owner elsewhere is unaffected (a count per username alone would let anyone
    #   lock anyone out);
    # - per address: one address trying many usernames is stopped too;
    # - per username, all addresses: a botnet guessing one account from many addresses. Past a
    #   generous cap this slows the account to one attempt per ``login_slow_seconds`` instead of
    #   locking it: the owner still gets in, guessing becomes uselessly slow.
    # An attempt is counted (as a failure) before its password is checked, in one Lua script, so
    # concurrent guesses cannot all slip under the limit; a success gives its count back. IPv6
    # clients count per /64 (one host usually holds a whole /64 and can rotate within it).
    # A refusal is not logged: a guesser could otherwise fill the log at will.

    async def password_attempt(self, username: str, address: str, limits: UsersSection) -> None:
        """Count one password check; TooMany (with the seconds to wait) when over a limit."""
        keys = _attempt_keys(username, address)
        wait = await self.redis.call(
            "EVAL", _ATTEMPT, len(keys), *keys,
            limits.login_window, limits.login_failures_per_client, limits.login_failures_per_address,
            limits.login_failures_per_user, limits.login_slow_seconds,
        )
        if int(wait) > 0:
            raise TooMany(TOO_MANY_ATTEMPTS, int(wait))

    async def password_accepted(self, username: str, address: str) -> None:
        """The checked password was right: forget that pair's failures, give the attempt back."""
        keys = _attempt_keys(username, address)
        await self.redis.call("EVAL", _ACCEPTED, 3, *keys[:3])

    async def password_unchecked(self, username: str, address: str) -> None:
        """The password was never checked (refused as too busy): the attempt does not count."""
        keys = _attempt_keys(username, address)
        await self.redis.call("EVAL", _UNCHECKED, 3, *keys[:3])

    async def registration_attempt(self, address: str, limits: UsersSection) -> None:
        """Count one registration from the address; TooMany when over the limit."""
        key = keys.login_throttle("r", address_bucket(address))
        wait = await self.redis.call("EVAL", _COUNT, 1, key, limits.registration_window, limits.registrations_per_address)
        if int(wait) > 0:
            raise TooMany(TOO_MANY_REGISTRATIONS, int(wait))


async def forget_keys(redis: Redis, digests: list[str]) -> None:
    """Keys replaced, or of an account disabled (already so in the database): drop their
    cached owners from the central Redis, so that every process looks them up again once its
    in-process cache (KEY_CACHE_SECONDS) has expired. The epoch goes first: a lookup that read
    the database before the change no longer caches what it read."""
    await redis.pipeline([("INCR", keys.APIKEY_EPOCH), *(("DEL", keys.apikey(d)) for d in digests)])


async def end_sessions(redis: Redis, userid: int) -> int:
    """End every session of the user, on every process (its generation grows); the new one."""
    return int(await redis.call("INCR", keys.session_generation(userid)))


def _bearer(request: Request) -> str | None:
    header = request.getHeader(b"authorization")
    if not header:
        return None
    return header.decode("ascii", "replace").replace("Bearer ", "").strip() or None


def _attempt_keys(username: str, address: str) -> tuple[bytes, bytes, bytes, bytes]:
    # Usernames match case-insensitively at login, so they count so too.
    user, bucket = username.lower(), address_bucket(address)
    return (
        keys.login_throttle("c", f"{user}\n{bucket}"),
        keys.login_throttle("a", bucket),
        keys.login_throttle("u", user),
        keys.login_throttle("s", user),
    )


def address_bucket(address: str) -> str:
    """What a throttle counts per: the IPv4 address, or the IPv6 /64 (an IPv4-mapped one as IPv4)."""
    ip = _ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_address(request: Request) -> str:
    """The caller's address as the connection tells it: with a ``haproxy:`` endpoint, the
    client's from the PROXY header."""
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or "unix"


def connection_address(request: Request) -> str:
    """The address at the other end of the socket itself: under the PROXY protocol (and
    TLS, and any other wrapper) the one that connected, e.g. HAProxy."""
    channel = request.channel  # None once the client has gone
    transport = channel.transport if channel is not None else None
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    peer = transport.getPeer() if transport is not None else None
    return getattr(peer, "host", None) or "unix"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _in(address: str, networks: list) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in net for net in networks)
