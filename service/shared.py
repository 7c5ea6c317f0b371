"""The rate limit and idempotency records in Redis, so N replicas behave like one.

Each operation is one atomic command or Lua script. No replica's wall clock is ever compared
with another's: the rate schedule and the sent mark (when a create may have left, which starts
the settle window of service.find_or_create) hold the Redis server's ``TIME``, and every other
duration (a pending record's lock, a record's lifetime) is a key's TTL, counted by Redis. So
replicas with skewed clocks still share one schedule and one settle window.

When Redis cannot be reached the facade fails closed: the call gets UNAVAILABLE with RetryInfo
(never a hang, never a crash), the ``flexwebchat_shared_state_errors`` counter grows and a warning
is logged. Degrading to local limits would silently multiply the account's rate by the replica
count and drop the at-most-once guarantee, which is what callers rely on.

Nothing read from Redis is trusted unchecked: records carry an HMAC whose key is derived from the
facade's Twilio secret (so only a facade of this account can write one a caller will receive) and
is bound to the record's key (asked of ``service.credentials`` at each use: records written under
a previous secret still verify during a rotation); a record that does not decode or verify, or a
rate schedule beyond any legitimate one, is a shared-state failure like an unreachable Redis
(UNAVAILABLE, counted), and the key is given an expiry so the id recovers. Every key the facade
writes has a TTL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    RedisError,
    ResponseError,
)

from . import observability as obs
from .config import ConfigError, Settings
from .credentials import Credentials
from .errors import SharedStateUnavailable
from .idempotency import Record, SentMark
from .ratelimit import Gcra, RateLimiter, Unlimited

log = logging.getLogger("flexwebchat.shared")

SOCKET_TIMEOUT = 0.5  # a Redis that does not answer in this time counts as down
PREFIX = "flexwebchat"
MIN_REDIS_VERSION = (7, 0)  # SET with both NX and GET, which claims an id in one command
# The longest 429 pause the facade applies (service.upstream caps Retry-After at 60 s).
MAX_PAUSE_SECONDS = 60.0
MAX_PAYLOAD_BYTES = 64 * 1024
_HEX = re.compile(r"[0-9a-f]+")

# The arithmetic of service.ratelimit.Gcra, in microseconds of Redis server time.
# SCHEDULE reads the stored schedule: 0 when there is none, nil when it is not a number (nan,
# garbage, or a key of another type: redis.pcall, so that WRONGTYPE is bad state like any other,
# never an error that would fail every call for as long as the key lives).
SCHEDULE = """
local function stored_tat()
  local raw = redis.pcall('GET', KEYS[1])
  if type(raw) == 'table' then return nil end
  local tat = tonumber(raw or '0')
  if tat ~= tat then return nil end  -- nan
  return tat
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""
# KEYS: schedule, waiting callers (sorted set: caller -> end of its lease), last slot of each
# caller (hash). ARGV: interval, tolerance, furthest a legitimate schedule can be ahead, lease,
# grace, then the callers waiting at the asking replica (its head's first). Registers those callers
# as waiting for a lease. When a slot is due it goes to the waiting caller served longest ago, on
# whichever replica: if the asker holds that caller, it takes the slot for it; else it is told to
# ask again once the grace has passed, and takes the slot for its head's caller only if the slot
# is still free then (the replica in turn is gone or late: the slot is not lost).
# Returns {0, callers waiting, the caller the slot is for} or {microseconds until the asker may
# ask again, callers waiting, ''}, taking nothing; {-1, 0, ''} when the stored state was garbage,
# of another type or out of range (then it is deleted).
TAKE = (
    SCHEDULE
    + """
local function failed(reply) return type(reply) == 'table' and reply.err ~= nil end
local function reset()
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return {-1, 0, ''}
end
local tat = stored_tat()
if tat == nil or tat > now + tonumber(ARGV[3]) then return reset() end
local lease, grace = tonumber(ARGV[4]), tonumber(ARGV[5])
-- Leases that ended, or that no replica could have given (beyond one lease from now), go.
if failed(redis.pcall('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)) then return reset() end
local lease_end = string.format('%d', now + lease)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '(' .. lease_end, '+inf')
for i = 6, #ARGV do redis.call('ZADD', KEYS[2], lease_end, ARGV[i]) end
redis.call('PEXPIRE', KEYS[2], math.ceil(lease / 1000) + 1000)
local waiting = redis.call('ZRANGE', KEYS[2], 0, -1)
local due = tat - tonumber(ARGV[2])
if due > now then return {due - now, #waiting, ''} end
local turn, turn_served = nil, nil
for _, caller in ipairs(waiting) do
  local served = redis.pcall('HGET', KEYS[3], caller)
  if failed(served) then return reset() end
  served = math.min(tonumber(served) or 0, now)
  if turn == nil or served < turn_served then turn, turn_served = caller, served end
end
local mine = false
for i = 6, #ARGV do mine = mine or ARGV[i] == turn end
if not mine then
  if now - due < grace then return {grace - (now - due), #waiting, ''} end
  turn = ARGV[6]
end
local new_tat = math.max(tat, now) + tonumber(ARGV[1])
local idle_ms = math.ceil((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', idle_ms)
redis.call('HSET', KEYS[3], turn, string.format('%d', now))
redis.call('PEXPIRE', KEYS[3], idle_ms + 60000)
redis.call('ZREM', KEYS[2], turn)
return {0, #waiting, turn}
"""
)
# KEYS: schedule. ARGV: tolerance, penalty. No slot comes due before now + penalty. A garbage or
# out-of-range schedule, or a key of another type, is overwritten.
PENALIZE = (
    SCHEDULE
    + """
local tat = math.min(stored_tat() or 0, now)
local new_tat = math.max(tat, now + tonumber(ARGV[2]) + tonumber(ARGV[1]))
local idle_ms = math.ceil((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', idle_ms)
return 0
"""
)
# Idempotency records are JSON; only their owner may refresh, complete or release a pending one.
# RECORD reads the one at KEYS[1]: nil when there is none, or what is there is not a record (not
# JSON, or a key of another type), so such a key never turns into a script error.
RECORD = """
local function record()
  local v = redis.pcall('GET', KEYS[1])
  if type(v) ~= 'string' then return nil end
  local ok, decoded = pcall(cjson.decode, v)
  if ok and type(decoded) == 'table' then return decoded end
  return nil
end
"""
REFRESH = (
    RECORD
    + """
local r = record()
if r and r.owner == ARGV[1] and not r.done then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)
COMPLETE = (
    RECORD
    + """
local r = record()
if (not r) or r.owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
)
# The sent mark holds Redis's TIME, in seconds, when a create may have left, and how long its
# sender's request can stay in flight from then (ARGV[2], seconds): every replica reads the age
# against the same clock and waits the sender's window, never its own (replicas may run different
# attempt timeouts during a rolling change). SENT_AGO returns {age in microseconds, window in
# microseconds or -1 when the mark has none (written without one: the reader's own applies)};
# {-1, -1} when there is no mark. A mark that is no number, of another type, negative or later
# than now (nan, inf), or whose window is no number, negative or longer than the mark lives, is
# read as "sent just now" with no window, and rewritten as such with an expiry (ARGV[1] ms), so
# that it delays the id by one settle time at most, never for good.
NOW = """
local t = redis.call('TIME')
local stamp = string.format('%d.%06d', tonumber(t[1]), tonumber(t[2]))
"""
MARK_SENT = (
    NOW
    + """
redis.call('SET', KEYS[1], stamp .. ' ' .. ARGV[2], 'PX', ARGV[1])
return 1
"""
)
SENT_AGO = (
    NOW
    + """
local raw = redis.pcall('GET', KEYS[1])
if raw == false then return {-1, -1} end
local now = tonumber(stamp)
local sent, window = nil, -1
if type(raw) == 'string' then
  local at, settle = string.match(raw, '^(%S+) (%S+)$')
  if at then
    sent, window = tonumber(at), tonumber(settle)
    if not window or window ~= window or window < 0 or window * 1000 > tonumber(ARGV[1]) then
      sent = nil
    else
      window = math.floor(window * 1000000)
    end
  else
    sent = tonumber(raw)
  end
end
if sent and sent >= 0 and sent <= now then return {math.floor((now - sent) * 1000000), window} end
redis.call('SET', KEYS[1], stamp, 'PX', ARGV[1])
return {0, -1}
"""
)
RELEASE = (
    RECORD
    + """
local r = record()
if r and r.owner == ARGV[1] and not r.done then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)


async def connect_shared_state(
    settings: Settings, credentials: Credentials
) -> tuple[RateLimiter | Unlimited, RedisRecords]:
    assert settings.redis_url is not None
    client = _client(settings.redis_url.reveal(), settings.redis_ca_file)
    with contextlib.suppress(RedisError):  # unreachable: readiness waits for it (first_answer)
        await _check_version(client)
    limiter: RateLimiter | Unlimited = Unlimited()
    schedule: RedisSchedule | None = None
    if settings.rate_limit_rps > 0:
        # Twilio's limit is per account, so is the budget: keyed by the account SID, never the
        # credential, or an auth token and an API key (or two keys mid-rotation) get one each.
        # The braces are a hash tag (Redis Cluster).
        key = f"{PREFIX}:{{{settings.account_sid.lower()}}}:ratelimit"
        schedule = RedisSchedule(client, key, settings.rate_limit_rps, settings.rate_limit_burst)
        limiter = RateLimiter(schedule, schedule.gcra.interval)
    records = RedisRecords(
        client,
        credentials.record_mac_keys,
        settings.account_sid.lower(),
        settings.idempotency_ttl,
    )

    async def reconnect(url: str) -> str:
        """A new REDIS_URL (from REDIS_URL_FILE): tried first (connect, AUTH, PING). Used from
        the next operation on when it answers, or when neither it nor the one in use does (a
        move while Redis is down); refused, keeping the one in use, when its Redis refuses the
        login, or when it is unreachable while the one in use answers. The old client is closed
        once operations already sent on it have had their time."""
        new, old = _client(url, settings.redis_ca_file), records.client
        problem = await _refusal(new, old)
        # The probe's connection is not kept: one killed while idle would fail an operation.
        await new.connection_pool.disconnect()
        if problem:
            await new.aclose()
            return problem
        records.use(new)
        if schedule is not None:
            schedule.use(new)
        log.info("reconnecting to Redis with the new REDIS_URL")
        loop = asyncio.get_running_loop()
        loop.call_later(OLD_CLIENT_GRACE, lambda: loop.create_task(old.aclose()))
        return ""

    credentials.on_redis_url(reconnect)
    return limiter, records


OLD_CLIENT_GRACE = 10 * SOCKET_TIMEOUT


async def _refusal(new: aioredis.Redis, old: aioredis.Redis) -> str:
    """Why the new client must not replace the old one, or ''; see ``reconnect``."""
    try:
        await new.ping()
    except _REFUSED_LOGIN as exc:
        return REFUSED_LOGIN_MESSAGE.format(_first_word(exc))
    except ResponseError:
        return ""  # it answered (PING refused by an ACL, say): the login worked
    except RedisError as exc:
        unreachable = f"the new REDIS_URL's Redis cannot be reached ({type(exc).__name__})"
        try:
            await old.ping()
        except RedisError:
            log.warning(f"{unreachable}; the one in use cannot either: switching to the new one")
            return ""
        return f"{unreachable} while the one in use answers: check its host and port"
    return ""


def _client(url: str, ca_file: str) -> aioredis.Redis:
    # REDIS_CA_FILE: a private CA for rediss://; the system's trust store otherwise.
    tls: dict[str, Any] = {"ssl_ca_certs": ca_file} if ca_file and url.startswith("rediss:") else {}
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry_on_timeout=False,
        **tls,
    )


# Redis answered, and refused REDIS_URL's user or password.
_REFUSED_LOGIN = (AuthenticationError, AuthenticationWrongNumberOfArgsError)
REFUSED_LOGIN_MESSAGE = (
    "REDIS_URL: Redis refused its user or password ({}): put the right ones in REDIS_URL "
    "(redis://:PASSWORD@host:port/0, or redis://USER:PASSWORD@... with ACLs)"
)


async def _check_version(client: aioredis.Redis) -> None:
    """ConfigError for a Redis older than 7.0 or refusing the URL's password; RedisError when it
    cannot be reached."""
    try:
        info = await client.info("server")
    except _REFUSED_LOGIN as exc:
        raise ConfigError(REFUSED_LOGIN_MESSAGE.format(_first_word(exc))) from None
    except RedisError as exc:
        if not isinstance(exc, ResponseError):
            raise
        # e.g. INFO not allowed by an ACL: the operator vouches for the version
        log.warning("cannot read the Redis version", extra={"fields": {"error": str(exc)}})
        return
    version = str(info.get("redis_version", ""))
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers < MIN_REDIS_VERSION:
        raise ConfigError(
            f"REDIS_URL: Redis {version or '(unknown version)'} is too old; the facade needs "
            f"{'.'.join(map(str, MIN_REDIS_VERSION))} or later (SET with NX and GET)"
        )


async def _check_eviction_policy(client: aioredis.Redis) -> None:
    """Warns when Redis may evict the records under memory pressure (managed Redis often defaults
    to ``volatile-lru``): every key the facade writes expires, so every policy but ``noeviction``
    may drop a record before its TTL, and with it the id's promise when the facade cannot look
    the conversation up. Where CONFIG GET is refused (an ACL, a managed Redis), says so once."""
    try:
        answer = await client.config_get("maxmemory-policy")
    except RedisError as exc:
        log.info(
            "cannot read Redis's maxmemory-policy; make sure it is noeviction",
            extra={"fields": {"error": type(exc).__name__}},
        )
        return
    policy = next((_text(value) for value in answer.values()), "")
    if policy and policy != "noeviction":
        log.warning(
            "Redis may evict idempotency records under memory pressure: set maxmemory-policy to "
            "noeviction (CONFIG SET maxmemory-policy noeviction, or the managed service's "
            "parameter group) and give it enough memory",
            extra={"fields": {"maxmemory_policy": policy}},
        )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable(exc: RedisError) -> SharedStateUnavailable:
    obs.SHARED_STATE_ERRORS.inc()
    log.warning("Redis operation failed", extra={"fields": {"error": type(exc).__name__}})
    return SharedStateUnavailable(type(exc).__name__)


class RedisSchedule:
    """One GCRA schedule for every replica, whose slots go to the callers waiting on any of them
    in turn."""

    def __init__(self, client: aioredis.Redis, key: str, rate: float, burst: int) -> None:
        self.use(client)
        self._keys = [key, f"{key}:waiting", f"{key}:served"]
        self.gcra = Gcra(rate, burst)
        self.contenders = 0
        # A legitimate schedule is never further ahead than a slot or the longest 429 pause.
        self._max_ahead = MAX_PAUSE_SECONDS + self.gcra.tolerance + self.gcra.interval + 1.0
        # How long a due slot is kept for the caller in turn: every replica with calls waiting
        # asks when it comes due, within milliseconds unless it is loaded or gone.
        self._grace = min(self.gcra.interval / 2, 0.25)
        # A replica with calls waiting asks at least once per slot; a caller not asked for
        # within two is no longer waiting there.
        self._lease = 2 * (self.gcra.interval + self._grace)

    def use(self, client: aioredis.Redis) -> None:
        """Sends every later operation to ``client`` (a reconnect with a new REDIS_URL)."""
        self._client = client
        self._take = client.register_script(TAKE)
        self._penalize = client.register_script(PENALIZE)

    async def take(self, callers: Sequence[str]) -> tuple[float, str]:
        args: list[Any] = [
            _us(self.gcra.interval),
            _us(self.gcra.tolerance),
            _us(self._max_ahead),
            _us(self._lease),
            _us(self._grace),
            *callers,
        ]
        try:
            wait_us, contenders, turn = await self._take(keys=self._keys, args=args)
        except RedisError as exc:
            raise _unavailable(exc) from None
        if int(wait_us) < 0:
            raise _untrusted("the rate schedule was garbage or out of range; it was reset")
        self.contenders = int(contenders)
        return int(wait_us) / 1e6, turn.decode() if isinstance(turn, bytes) else str(turn)

    async def penalize(self, seconds: float) -> None:
        args = [_us(self.gcra.tolerance), _us(seconds)]
        try:
            await self._penalize(keys=self._keys[:1], args=args)
        except RedisError as exc:
            raise _unavailable(exc) from None


class RedisRecords:
    """Idempotency records; a pending lock expires unless its owner's heartbeat renews it."""

    def __init__(
        self,
        client: aioredis.Redis,
        mac_keys: Callable[[], Sequence[bytes]],
        account: str,
        mark_ttl: float,
    ) -> None:
        self._mac_keys = mac_keys  # the first signs; every one verifies
        self._mark_ttl = mark_ttl  # how long a rewritten sent mark lives, as mark_sent's
        # Per account: two deployments sharing one Redis never see each other's request_ids.
        self._prefix = f"{PREFIX}:{account}"
        self.use(client)

    def use(self, client: aioredis.Redis) -> None:
        """Sends every later operation to ``client`` (a reconnect with a new REDIS_URL)."""
        self._client = client
        self._refresh = client.register_script(REFRESH)
        self._complete = client.register_script(COMPLETE)
        self._release = client.register_script(RELEASE)
        self._mark_sent = client.register_script(MARK_SENT)
        self._sent_ago = client.register_script(SENT_AGO)

    def _key(self, key: str) -> str:
        return f"{self._prefix}:idempotency:{key}"

    async def claim(self, key: str, record: Record, lock_seconds: float) -> Record | None:
        try:
            # SET NX GET: stores ours if the key is free, else returns what is there; one command.
            existing = await self._client.set(
                self._key(key), self._encode(key, record), nx=True, px=_ms(lock_seconds), get=True
            )
        except RedisError as exc:
            if not _wrong_type(exc):
                raise _unavailable(exc) from None
            reason = "is of another type"
        else:
            if existing is None:
                return None
            try:
                return self._decode(key, cast(bytes, existing))
            except ValueError as exc:
                reason = str(exc)
        # Not ours, damaged or not even a string: never replay it. An expiry (if it had none)
        # lets the id recover once a dead owner's lock would have expired.
        with contextlib.suppress(RedisError):
            await self._client.pexpire(self._key(key), _ms(lock_seconds), nx=True)
        raise _untrusted(f"an idempotency record {reason}")

    async def refresh(self, key: str, owner: str, lock_seconds: float) -> None:
        await self._run(self._refresh, key, owner, _ms(lock_seconds))

    async def complete(self, key: str, record: Record, ttl_seconds: float) -> bool:
        try:
            encoded = self._encode(key, record)
            stored = await self._complete(
                keys=[self._key(key)], args=[record.owner, encoded, _ms(ttl_seconds)]
            )
            if stored:
                await self._client.delete(self._sent_key(key))
        except RedisError as exc:
            raise _unavailable(exc) from None
        return bool(stored)

    def _sent_key(self, key: str) -> str:
        return f"{self._prefix}:sent:{key}"

    async def mark_sent(self, key: str, ttl_seconds: float, settle_seconds: float) -> None:
        args: list[int | str] = [_ms(ttl_seconds), f"{settle_seconds:.6f}"]
        try:
            await self._mark_sent(keys=[self._sent_key(key)], args=args)
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def sent_ago(self, key: str) -> SentMark | None:
        """Untrusted: see SENT_AGO for what an unreadable mark reads as."""
        try:
            age_us, settle_us = (
                int(value)
                for value in await self._sent_ago(
                    keys=[self._sent_key(key)], args=[_ms(self._mark_ttl)]
                )
            )
        except RedisError as exc:
            raise _unavailable(exc) from None
        if age_us < 0:
            return None
        return SentMark(age_us / 1e6, None if settle_us < 0 else settle_us / 1e6)

    async def release(self, key: str, owner: str) -> None:
        await self._run(self._release, key, owner)

    async def first_answer(self, interval: float = 1.0) -> None:
        """Returns once Redis has answered a PING. Until then the facade reports NOT_SERVING, so a
        Redis that was never reachable (a typo, a NetworkPolicy) stops a rollout instead of
        taking every replica's calls down; later outages fail calls closed, one by one."""
        failures = 0
        while True:
            try:
                await self._client.ping()
            except RedisError as exc:
                obs.SHARED_STATE_ERRORS.inc()
                if failures == 0:  # once, not every second
                    message = "Redis is unreachable at startup; NOT_SERVING until it answers"
                    if isinstance(exc, _REFUSED_LOGIN):
                        message = REFUSED_LOGIN_MESSAGE.format(_first_word(exc))
                    log.error(message, extra={"fields": {"error": type(exc).__name__}})
                failures += 1
            else:
                if failures:
                    log.info("Redis answered; serving", extra={"fields": {"failures": failures}})
                await _check_eviction_policy(self._client)
                return
            await asyncio.sleep(interval)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(self, script: Any, key: str, *args: object) -> None:
        try:
            await script(keys=[self._key(key)], args=list(args))
        except RedisError as exc:
            raise _unavailable(exc) from None

    @staticmethod
    def _mac(mac_key: bytes, key: str, fields: dict[str, Any]) -> str:
        signed = json.dumps([key, *(fields[name] for name in _SIGNED)], separators=(",", ":"))
        return hmac.new(mac_key, signed.encode(), hashlib.sha256).hexdigest()

    def _encode(self, key: str, record: Record) -> str:
        fields: dict[str, Any] = {
            "fingerprint": record.fingerprint,
            "owner": record.owner,
            "done": record.done,
            "ok": record.ok,
            "payload": base64.b64encode(record.payload).decode(),
        }
        mac_key = self._mac_keys()[0]
        fields["mac"] = self._mac(mac_key, key, fields)
        # Signed apart, so that replicas reading only the fields above still verify the record.
        fields["completed_at"] = record.completed_at
        fields["completed_mac"] = _completed_mac(mac_key, key, fields["mac"], record.completed_at)
        return json.dumps(fields)

    def _decode(self, key: str, raw: bytes) -> Record:
        """The record, or ValueError saying why it cannot be trusted."""
        try:
            data = json.loads(raw)
            fields = {name: data[name] for name in (*_SIGNED, "mac")}
        except (ValueError, TypeError, KeyError, RecursionError):  # Recursion: "[[[[..."
            raise ValueError("does not decode") from None
        presented = str(fields["mac"])
        mac_key = next(
            (
                mac_key
                for mac_key in self._mac_keys()
                if hmac.compare_digest(presented, self._mac(mac_key, key, fields))
            ),
            None,
        )
        if mac_key is None:
            raise ValueError("fails its HMAC (forged, or written with another secret)")
        fingerprint, owner, done, ok, payload = (fields[name] for name in _SIGNED)
        if not (
            isinstance(fingerprint, str)
            and _HEX.fullmatch(fingerprint)
            and isinstance(owner, str)
            and _HEX.fullmatch(owner)
            and isinstance(done, bool)
            and isinstance(ok, bool)
            and isinstance(payload, str)
            and len(payload) <= MAX_PAYLOAD_BYTES * 4 // 3 + 4
        ):
            raise ValueError("holds out-of-range fields")
        try:
            decoded = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise ValueError("holds an undecodable payload") from None
        # Absent from records written without it: unknown (0), which ends no session later.
        completed_at = data.get("completed_at", 0.0) if isinstance(data, dict) else 0.0
        if completed_at != 0.0:
            if not isinstance(completed_at, float) or not hmac.compare_digest(
                str(data.get("completed_mac")),
                _completed_mac(mac_key, key, presented, completed_at),
            ):
                raise ValueError("fails its HMAC (forged, or written with another secret)")
        return Record(
            fingerprint=fingerprint,
            owner=owner,
            done=done,
            ok=ok,
            payload=decoded,
            completed_at=completed_at,
        )


_SIGNED = ("fingerprint", "owner", "done", "ok", "payload")


def _completed_mac(mac_key: bytes, key: str, mac: str, completed_at: float) -> str:
    signed = json.dumps([key, mac, completed_at]).encode()
    return hmac.new(mac_key, b"completed_at\x00" + signed, hashlib.sha256).hexdigest()


def _untrusted(reason: str) -> SharedStateUnavailable:
    obs.SHARED_STATE_ERRORS.inc()
    log.error("untrusted shared state", extra={"fields": {"error": reason}})
    return SharedStateUnavailable(reason)


def _first_word(exc: RedisError) -> str:
    """Redis's error code (WRONGPASS, NOAUTH), never the rest, which may quote the URL."""
    return (str(exc).split() or [type(exc).__name__])[0]


def _wrong_type(exc: RedisError) -> bool:
    """A key holding another type (a list, a hash): bad state, not an unreachable Redis."""
    return str(exc).startswith("WRONGTYPE")


def _us(seconds: float) -> int:
    return int(seconds * 1e6)


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)
