"""Redis store: the state several canary replicas share, and the lease that picks their leader.

Layout (every key under ``key_prefix``, ``canary:`` by default)::

    state:<rollout>      string  the controller state as JSON
    samples:<rollout>    string  the merged RolloutAccumulator as JSON (``to_dict``)
    decisions:<rollout>  list    decision log entries as JSON, oldest first, LTRIMmed
    rollouts             set     names with any of the three above
    inputs:<rollout>     hash    shared input health: process -> its counts as JSON
    inputs-order:<rollout> zset  process -> time of its last write (the oldest are dropped)
    history:<rollout>    zset    metric history: score = the point's Unix time, member =
                                 16-digit append number, keep flag ("1"/"0"), point JSON
    history-seq:<rollout> string INCR counter of the history's append numbers
    answers:<key>        hash    shared feedback: request id -> its answers (opaque JSON)
    answers-at:<key>     zset    request id -> Unix time of the answer (bounds, expiry)
    answers-meta:<key>   hash    request id -> "<seen><predicted>|<claim token>"
    lease                hash    holder, token; PX expiry = the lease's TTL
    lease-token          string  INCR counter of fencing tokens (starts at the Redis clock in
                                 ms, see _ACQUIRE); never deleted
    store-id             string  a random id written at the first open (see identity())

Why it is built this way:

- Sample deltas from several processes are merged by read-merge-write under WATCH/MULTI/EXEC:
  a concurrent writer makes EXEC fail and the merge is redone on the new value, so no delta
  is lost and none is merged twice (the merge itself is Python: Lua cannot merge histograms).
- The lease and every fenced write are Lua scripts: Redis runs a script alone, so "is this
  still the running lease's token?" and the write are one atomic step.
- Connections have socket and connect timeouts, and the client does not retry by itself: a
  hung or dead Redis becomes a StoreError within the timeout instead of a hang, and a write
  whose answer was lost is never sent twice behind canary's back (a decision appended twice).
  Idempotent calls are retried once on a broken connection (a Redis restart leaves every
  pooled connection dead; the retry reconnects).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError

from canary.errors import FencedError, StoreError
from canary.observe import RolloutAccumulator
from canary.store._history import DEFAULT_MAX_HISTORY, LOW_WATER, check_max_points
from canary.store._protocol import (
    CLAIMED,
    DEFAULT_MAX_DECISIONS,
    DEFAULT_MAX_INPUT_PROCESSES,
    UNMET,
    AnswerClaim,
    ClaimResult,
    Lease,
    StoredAnswer,
    check_answers,
    check_claims,
    check_keep,
    check_lease_request,
    check_limit,
    check_max_decisions,
    decode,
    encode,
    encode_accumulator,
    merge_in_pieces,
)

T = TypeVar("T")

DEFAULT_TIMEOUT = 3.0  # seconds a Redis call (or a connect) may take before it is a StoreError
MAX_MERGE_ATTEMPTS = 64  # add_samples retries after concurrent writers before giving up
APPLIED_TTL = 7 * 24 * 3600  # seconds the last batch number of a writer is kept per rollout
_NO_FENCE = ""

# KEYS[1] lease, KEYS[2] token counter; ARGV[1] holder, ARGV[2] ttl in ms.
# Free or expired (an expired key reads as absent) -> a new token; ours -> renewed, same token.
# A missing counter (a new Redis, or one that restarted empty) starts at the Redis clock in
# milliseconds, so tokens keep growing even across a Redis that lost its data: a leader
# fenced before the loss cannot get its old token back from a fresh counter.
_ACQUIRE = """
redis.replicate_commands()
local holder = redis.call('HGET', KEYS[1], 'holder')
if not holder then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    local now = redis.call('TIME')
    redis.call('SET', KEYS[2], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
  end
  local token = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', token)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return token
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('HGET', KEYS[1], 'token'))
end
return false
"""

# KEYS[1] lease; ARGV[1] holder.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] lease -> {holder, token, pttl, seconds, microseconds} or false; one atomic read.
_LEASE = """
local cur = redis.call('HMGET', KEYS[1], 'holder', 'token')
if not cur[1] then
  return false
end
local now = redis.call('TIME')
return {cur[1], cur[2], redis.call('PTTL', KEYS[1]), now[1], now[2]}
"""

# The fence check every fenced write starts with: KEYS[1] is the lease, ARGV[1] the writer's
# token ('' = unfenced). On a stale token the script returns {0, running token or ''}.
_FENCE = """
if ARGV[1] ~= '' then
  local running = redis.call('HGET', KEYS[1], 'token')
  if running ~= ARGV[1] then
    return {0, running or ''}
  end
end
"""

# KEYS lease, state, rollouts; ARGV fence, JSON, rollout.
_PUT_STATE = (
    _FENCE
    + """
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return {1, ''}
"""
)

# KEYS lease, decisions, rollouts; ARGV fence, JSON, rollout, max_decisions.
_APPEND_DECISION = (
    _FENCE
    + """
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
redis.call('SADD', KEYS[3], ARGV[3])
return {1, ''}
"""
)

# KEYS lease, state, samples, decisions, rollouts, history, history-seq; ARGV fence, rollout.
_RESET = (
    _FENCE
    + """
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7])
redis.call('SREM', KEYS[5], ARGV[2])
return {1, ''}
"""
)


_SCRIPTS = {
    "acquire": _ACQUIRE,
    "release": _RELEASE,
    "lease": _LEASE,
    "put_state": _PUT_STATE,
    "append_decision": _APPEND_DECISION,
    "reset": _RESET,
}


# -- shared input health --
# KEYS[1] inputs hash (process -> JSON), KEYS[2] inputs-order zset (process -> write time in
# microseconds by the Redis clock); ARGV process, JSON, keep. The last `keep` written stay.
_PUT_INPUT_HEALTH = """
redis.replicate_commands()
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(now[1]) * 1000000 + tonumber(now[2]), ARGV[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, extra - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
return 1
"""
_SCRIPTS["put_input_health"] = _PUT_INPUT_HEALTH


# -- shared feedback answers --
# Per rollout: answers:<r> hash id -> data, answers-at:<r> zset id -> at (Unix seconds of the
# answer), answers-meta:<r> hash id -> "<seen><predicted>|<claim token>" (token "" = not
# claimed; a marker of answers the claimer held itself has meta but no data). Each write
# sets the three keys to expire 2 x ttl later: a rollout nobody answers for leaves nothing.
_ANSWERS_DROP = """
local function drop(ids)
  for j = 1, #ids, 1000 do
    local part = {unpack(ids, j, math.min(j + 999, #ids))}
    redis.call('HDEL', KEYS[1], unpack(part))
    redis.call('ZREM', KEYS[2], unpack(part))
    redis.call('HDEL', KEYS[3], unpack(part))
  end
end
"""
# KEYS data, at, meta; ARGV cutoff (drop at <= it), max_entries, expiry ms, then per answer
# id, at, data, flags ("11": seen, predicted). A claimed entry is never overwritten.
_PUT_ANSWERS = (
    _ANSWERS_DROP
    + """
for b = 4, #ARGV, 4 do
  local id = ARGV[b]
  local meta = redis.call('HGET', KEYS[3], id)
  if (not meta) or string.sub(meta, 4) == '' then
    redis.call('HSET', KEYS[1], id, ARGV[b + 2])
    redis.call('ZADD', KEYS[2], ARGV[b + 1], id)
    redis.call('HSET', KEYS[3], id, ARGV[b + 3] .. '|')
  end
end
drop(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1]))
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if extra > 0 then
  drop(redis.call('ZRANGE', KEYS[2], 0, extra - 1))
end
for k = 1, 3 do
  redis.call('PEXPIRE', KEYS[k], ARGV[3])
end
return 1
"""
)
# KEYS data, at, meta of each rollout in lookup order; ARGV now, number of rollouts, each
# rollout's ttl, then per claim id, token, need, local rollout (1-based, 0: none), local at.
# Per claim: {0} (nothing anywhere) or {rollout index, status, at, data or ''}.
_CLAIM_ANSWERS = """
local now = tonumber(ARGV[1])
local nr = tonumber(ARGV[2])
local out = {}
for b = 3 + nr, #ARGV, 5 do
  local id, token, need = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  local li = tonumber(ARGV[b + 3])
  local res = {0}
  for r = 1, nr do
    local kd, ka, km = KEYS[r * 3 - 2], KEYS[r * 3 - 1], KEYS[r * 3]
    local meta = redis.call('HGET', km, id)
    if meta then
      local at = redis.call('ZSCORE', ka, id) or '0'
      local by = string.sub(meta, 4)
      local data = redis.call('HGET', kd, id)
      if by ~= '' then
        if by ~= token then
          res = {r, 'taken', at, ''}
        elseif data then
          res = {r, 'claimed', at, data}
        else
          res = {r, 'marked', at, ''}
        end
      elseif tonumber(at) + tonumber(ARGV[2 + r]) <= now then
        res = {r, 'expired', at, ''}
      elseif not (need == '' or (need == 'seen' and string.sub(meta, 1, 1) == '1')
          or (need == 'predicted' and string.sub(meta, 2, 2) == '1')) then
        res = {r, 'unmet', at, data or ''}
      else
        redis.call('HSET', km, id, string.sub(meta, 1, 3) .. token)
        res = {r, 'claimed', at, data or ''}
      end
      break
    end
  end
  if res[1] == 0 and li > 0 then
    local lat = ARGV[b + 4]
    redis.call('HDEL', KEYS[li * 3 - 2], id)
    redis.call('ZADD', KEYS[li * 3 - 1], lat, id)
    redis.call('HSET', KEYS[li * 3], id, '00|' .. token)
    local ms = math.ceil(tonumber(ARGV[2 + li]) * 2000)
    for k = li * 3 - 1, li * 3 do
      if redis.call('PTTL', KEYS[k]) < ms then
        redis.call('PEXPIRE', KEYS[k], ms)
      end
    end
    res = {li, 'marked', lat, ''}
  end
  out[#out + 1] = res
end
return out
"""
_SCRIPTS["put_answers"] = _PUT_ANSWERS
_SCRIPTS["claim_answers"] = _CLAIM_ANSWERS
ANSWERS_PER_CALL = 1000  # answers written per script call (Redis runs one script at a time)


# -- metric history --
# The same function as canary.store._history.thin, on the history zset: KEYS[2] ``history``;
# ARGV[5] max points, ARGV[6] points left by a thinning. Member = 16-digit append number,
# keep flag, JSON (so equal times sort by append). The first and the newest always stay.
_THIN_LUA = """
local function thin(key, max, low)
  local n = redis.call('ZCARD', key)
  if n <= max then
    return
  end
  local all = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local members, times, keeps = {}, {}, {}
  for j = 1, #all, 2 do
    local k = (j + 1) / 2
    members[k] = all[j]
    times[k] = tonumber(all[j + 1])
    keeps[k] = string.sub(all[j], 17, 17) == '1'
  end
  local target = n - low
  local newest = times[n]
  local scored = {}
  for k = 2, n - 1 do
    if not keeps[k] then
      local age = newest - times[k]
      if age < 1e-9 then
        age = 1e-9
      end
      scored[#scored + 1] = {(times[k + 1] - times[k - 1]) / age, k}
    end
  end
  table.sort(scored, function(a, b)
    if a[1] ~= b[1] then
      return a[1] < b[1]
    end
    return a[2] < b[2]
  end)
  local taken, count = {}, 0
  for _, e in ipairs(scored) do
    if count >= target then
      break
    end
    local k = e[2]
    if not taken[k - 1] and not taken[k + 1] then
      taken[k] = true
      count = count + 1
    end
  end
  local over = n - count - max
  local k = 2
  while over > 0 and k < n do
    if not taken[k] then
      taken[k] = true
      count = count + 1
      over = over - 1
    end
    k = k + 1
  end
  local drop = {}
  for i = 2, n - 1 do
    if taken[i] then
      drop[#drop + 1] = members[i]
    end
  end
  for j = 1, #drop, 1000 do
    redis.call('ZREM', key, unpack(drop, j, math.min(j + 999, #drop)))
  end
end
"""
# KEYS lease, history, history-seq; ARGV fence, at, keep flag, JSON, max points, low.
_APPEND_HISTORY = (
    _FENCE
    + _THIN_LUA
    + """
local seq = redis.call('INCR', KEYS[3])
local member = string.format('%016d', seq) .. ARGV[3] .. ARGV[4]
redis.call('ZADD', KEYS[2], ARGV[2], member)
thin(KEYS[2], tonumber(ARGV[5]), tonumber(ARGV[6]))
return {1, ''}
"""
)
_SCRIPTS["append_history"] = _APPEND_HISTORY


_USERINFO_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` without its password (userinfo or ``password=`` query), for error messages."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1:***@", url))


class RedisStore:
    """A :class:`~canary.store.Store` in Redis, shared by every canary process that uses it.

    Parameters
    ----------
    url
        ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS) or
        ``unix:///path/to/socket?db=N``.
    max_decisions
        Decision log entries kept per rollout; appending trims older ones.
    key_prefix
        Prepended to every key, so several deployments can share one Redis database.
    timeout, connect_timeout
        Seconds a call may wait for Redis (socket read/write) and for a connection; past
        them the call raises StoreError instead of hanging the caller.

    Notes
    -----
    Redis restarted empty cannot be told from a new Redis by the data alone; :meth:`open`
    writes a random ``store-id`` key when there is none, and :meth:`identity` reads it back,
    so a process can notice that the Redis it opened lost its data (the id changed or is
    gone).
    """

    def __init__(
        self,
        url: str,
        *,
        max_decisions: int = DEFAULT_MAX_DECISIONS,
        key_prefix: str = "canary:",
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        check_max_decisions(max_decisions)
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError(
                f"timeouts must be > 0, got timeout={timeout!r}, "
                f"connect_timeout={connect_timeout!r}"
            )
        self.url = url
        self.max_decisions = max_decisions
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._safe_url = redact_url(url)
        self._where = f"state store {self._safe_url}"
        self._client: aioredis.Redis | None = None
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._store_id: str | None = None
        self._scripts: dict[str, AsyncScript] = {}  # registered by open()
        self._lease_key = key_prefix + "lease"
        self._token_key = key_prefix + "lease-token"
        self._rollouts_key = key_prefix + "rollouts"
        self._id_key = key_prefix + "store-id"

    def __repr__(self) -> str:
        return f"RedisStore({redact_url(self.url)!r})"

    def _key(self, kind: str, rollout: str) -> str:
        return f"{self.key_prefix}{kind}:{rollout}"

    def _live(self) -> aioredis.Redis:
        if self._closed:
            raise StoreError(f"{self._where} is closed")
        if self._client is None:  # set by open() before its PING, cleared if that fails
            raise StoreError(f"{self._where} is not open; call open() first")
        return self._client

    async def _run(
        self,
        what: str,
        call: Callable[[aioredis.Redis], Awaitable[T]],
        *,
        idempotent: bool = True,
    ) -> T:
        """Run ``call`` on the client; every failure becomes a StoreError naming ``what``.

        An idempotent call is retried once when its connection turns out broken (the
        pooled connection of a Redis that restarted); nothing else is retried here.
        """
        client = self._live()
        attempts = 2 if idempotent else 1
        for attempt in range(attempts):
            try:
                return await call(client)
            except StoreError:
                raise
            except RedisConnectionError as exc:  # refused, reset, closed (not a timeout)
                if attempt + 1 < attempts:
                    continue
                raise StoreError(f"{self._where}: cannot {what}: {_describe(exc)}") from exc
            except (TimeoutError, RedisError, OSError, UnicodeError) as exc:
                raise StoreError(f"{self._where}: cannot {what}: {_describe(exc)}") from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _get(self, key: str, what: str) -> str | None:
        """GET ``key`` as text (the client decodes replies; bytes only if that changes)."""
        value: bytes | str | None = await self._run(what, lambda c: c.get(key))
        return None if value is None else _str(value)

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, PING, and write the store id if this Redis has none; idempotent.

        A failed open leaves the store closed to calls but not closed for good: open() can
        be called again once Redis answers.
        """
        async with self._open_lock:  # a second open() waits for the first one's PING
            if self._closed:
                raise StoreError(f"{self._where} is closed")
            if self._opened:
                return
            try:
                client = aioredis.Redis.from_url(
                    self.url,
                    decode_responses=True,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.connect_timeout,
                    retry=Retry(NoBackoff(), 0),  # see the module docstring: no silent resends
                )
            except (ValueError, TypeError) as exc:
                raise StoreError(f"cannot open {self._where}: bad url: {exc}") from exc
            # EVALSHA, loading the script again when Redis lost its cache (a restart).
            self._scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}
            self._client = client
            try:
                await self._run("connect (PING)", lambda c: c.ping())
                await self._run(
                    "write the store id", lambda c: c.set(self._id_key, _new_id(), nx=True)
                )
                self._store_id = await self._get(self._id_key, "read the store id")
            except BaseException:
                self._client = None
                await _quietly_close(client)
                raise
            self._opened = True

    async def close(self) -> None:
        """Close the connections; calls after it raise StoreError. Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except (RedisError, OSError) as exc:
                raise StoreError(f"cannot close {self._where}: {_describe(exc)}") from exc

    async def identity(self) -> str | None:
        """The store id in Redis now, or None when it is gone.

        :meth:`open` wrote it (or found it); when it differs from :attr:`store_id` or is
        None, this Redis lost its data since (restarted empty, flushed, failed over to an
        empty replica).
        """
        return await self._get(self._id_key, "read the store id")

    @property
    def store_id(self) -> str | None:
        """The store id seen at :meth:`open` (None before it)."""
        return self._store_id

    # -- state ----------------------------------------------------------------------------

    async def get_state(self, rollout: str) -> dict[str, Any] | None:
        key = self._key("state", rollout)
        text = await self._get(key, f"read state of rollout {rollout!r}")
        what = f"state of rollout {rollout!r} in {self._safe_url}"
        return None if text is None else decode(text, what)

    async def put_state(
        self, rollout: str, state: dict[str, Any], *, fence: int | None = None
    ) -> None:
        text = encode(state, f"state of rollout {rollout!r}")  # before yielding: a copy
        keys = [self._lease_key, self._key("state", rollout), self._rollouts_key]
        await self._fenced(
            f"write state of rollout {rollout!r}", "put_state", keys, [text, rollout], fence
        )

    def _script(
        self, name: str, keys: list[str], args: list[str | int]
    ) -> Callable[[aioredis.Redis], Awaitable[Any]]:
        """A call for :meth:`_run` that runs the Lua script ``name`` on its client."""
        return lambda client: self._scripts[name](keys=keys, args=args, client=client)

    async def _fenced(
        self,
        what: str,
        name: str,
        keys: list[str],
        args: list[str | int],
        fence: int | None,
        *,
        idempotent: bool = True,
    ) -> None:
        """Run the fenced write script ``name``; FencedError when its token is stale."""
        call = self._script(name, keys, [_fence(fence), *args])
        reply = await self._run(what, call, idempotent=idempotent)
        try:
            ok, running = int(reply[0]), str(reply[1])
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise StoreError(f"{self._where}: cannot {what}: unexpected reply {reply!r}") from exc
        if not ok:
            now = f"the running lease has token {running}" if running else "no lease is running"
            raise FencedError(
                f"{self._where}: refused to {what}: fencing token {fence} is stale ({now});"
                " this process is not the leader any more"
            )

    # -- samples --------------------------------------------------------------------------

    async def add_samples(
        self, rollout: str, delta: RolloutAccumulator, *, batch: tuple[str, int] | None = None
    ) -> None:
        copy = delta.snapshot()  # taken now: the caller may record into ``delta`` later
        key = self._key("samples", rollout)
        # The last batch of each writer merged into this rollout, set in the same
        # transaction as the merge: a batch sent again after its answer was lost is seen.
        applied = self._key("applied", rollout)
        what = f"samples of rollout {rollout!r} in {self._safe_url}"

        def merged_text(text: str | None) -> str:
            """The stored totals with ``copy`` merged in, encoded: in a thread and in pieces
            (:func:`let_go`), so the proxy's event loop never waits for a whole decode, merge
            and encode (milliseconds for a rollout with many signals)."""
            if text is None:
                return encode_accumulator(copy, what)
            merged = _accumulator(decode(text, what), what)
            if merged.accuracy != copy.accuracy:
                raise StoreError(
                    f"cannot add {what}: cannot merge accumulators of accuracy"
                    f" {copy.accuracy} into {merged.accuracy}"
                )
            merge_in_pieces(merged, copy)
            return encode_accumulator(merged, what)

        async def merge(client: aioredis.Redis) -> None:
            spent = 0.001  # seconds the last merge took: the window another writer can hit
            for attempt in range(MAX_MERGE_ATTEMPTS):
                async with client.pipeline(transaction=True) as pipe:
                    await pipe.watch(key, applied)
                    if batch is not None:
                        last = await pipe.hget(applied, batch[0])
                        if last is not None and int(last) >= batch[1]:
                            return  # merged already: its answer was lost, not the write
                    text = await pipe.get(key)
                    stored = None if text is None else _str(text)
                    started = time.monotonic()
                    encoded = await asyncio.to_thread(merged_text, stored)
                    spent = max(spent, time.monotonic() - started)
                    pipe.multi()
                    pipe.set(key, encoded)
                    pipe.sadd(self._rollouts_key, rollout)
                    if batch is not None:
                        pipe.hset(applied, batch[0], str(batch[1]))
                        pipe.expire(applied, APPLIED_TTL)
                    try:
                        await pipe.execute()
                        return
                    except WatchError:  # another writer merged first: redo on its result
                        pass
                # Jittered backoff, in units of a merge's duration, so that colliding writers
                # spread out instead of overlapping again.
                await asyncio.sleep(random.uniform(0, min(1.0, spent * 2 ** min(attempt, 5))))
            raise StoreError(
                f"cannot add {what}: {MAX_MERGE_ATTEMPTS} attempts collided with other writers"
            )

        # Without a batch number, not retried on a broken connection: EXEC may have run
        # before the answer was lost. With one, a resend finds out and merges nothing.
        await self._run(f"add samples of rollout {rollout!r}", merge, idempotent=batch is not None)

    async def get_samples(self, rollout: str) -> RolloutAccumulator | None:
        key = self._key("samples", rollout)
        what = f"samples of rollout {rollout!r} in {self._safe_url}"
        text = await self._get(key, f"read samples of rollout {rollout!r}")
        if text is None:
            return None
        # Decoded in a thread: milliseconds the proxy's event loop would otherwise wait for.
        return await asyncio.to_thread(lambda: _accumulator(decode(text, what), what))

    # -- decisions ------------------------------------------------------------------------

    async def append_decision(
        self, rollout: str, entry: dict[str, Any], *, fence: int | None = None
    ) -> None:
        text = encode(entry, f"decision of rollout {rollout!r}")
        keys = [self._lease_key, self._key("decisions", rollout), self._rollouts_key]
        # Not retried on a broken connection: the entry may have been appended already.
        await self._fenced(
            f"append a decision of rollout {rollout!r}",
            "append_decision",
            keys,
            [text, rollout, self.max_decisions],
            fence,
            idempotent=False,
        )

    async def decisions(self, rollout: str, limit: int = 100) -> list[dict[str, Any]]:
        check_limit(limit)
        if limit == 0:  # LRANGE -0 -1 would be the whole list
            self._live()
            return []
        key = self._key("decisions", rollout)
        what = f"decision of rollout {rollout!r} in {self._safe_url}"
        texts: list[bytes | str] = await self._run(
            f"read decisions of rollout {rollout!r}", lambda c: c.lrange(key, -limit, -1)
        )
        return [decode(_str(text), what) for text in texts]

    # -- rollouts -------------------------------------------------------------------------

    async def reset(self, rollout: str, *, fence: int | None = None) -> None:
        keys = [
            self._lease_key,
            self._key("state", rollout),
            self._key("samples", rollout),
            self._key("decisions", rollout),
            self._rollouts_key,
            *self._history_keys(rollout),
        ]
        await self._fenced(f"reset rollout {rollout!r}", "reset", keys, [rollout], fence)

    async def rollouts(self) -> list[str]:
        names: set[bytes | str] = await self._run(
            "list rollouts", lambda c: c.smembers(self._rollouts_key)
        )
        return sorted(_str(name) for name in names)

    # -- lease ----------------------------------------------------------------------------

    async def acquire_lease(self, holder: str, ttl: float) -> int | None:
        check_lease_request(holder, ttl)
        if not math.isfinite(ttl):
            raise StoreError(f"a lease TTL must be a finite number of seconds, got {ttl!r}")
        ms = max(1, round(ttl * 1000))
        # Idempotent: a resend after a lost answer finds the lease ours and renews it.
        token = await self._run(
            f"acquire the lease for {holder!r}",
            self._script("acquire", [self._lease_key, self._token_key], [holder, ms]),
        )
        try:
            return None if token is None else int(token)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self._where}: corrupt lease token {token!r}") from exc

    async def release_lease(self, holder: str) -> None:
        await self._run(
            f"release the lease of {holder!r}",
            self._script("release", [self._lease_key], [holder]),
        )

    async def lease(self) -> Lease | None:
        reply = await self._run("read the lease", self._script("lease", [self._lease_key], []))
        if reply is None:
            return None
        try:
            holder, token, pttl, seconds, micros = reply
            now = int(seconds) + int(micros) / 1e6
            # pttl -1 (no expiry) only if something else wrote the key: it never runs out.
            expires_at = float("inf") if int(pttl) < 0 else now + int(pttl) / 1000
            return Lease(holder=str(holder), token=int(token), expires_at=expires_at)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self._where}: corrupt lease {reply!r}: {exc}") from exc

    # -- shared input health --

    async def put_input_health(
        self,
        rollout: str,
        process: str,
        entry: dict[str, Any],
        *,
        keep: int = DEFAULT_MAX_INPUT_PROCESSES,
    ) -> None:
        """One script: the entry written, the oldest beyond ``keep`` dropped (idempotent: a
        resend writes the same absolute counts again)."""
        check_keep(keep)
        text = encode(entry, f"input health of rollout {rollout!r}")
        keys = [self._key("inputs", rollout), self._key("inputs-order", rollout)]
        await self._run(
            f"write input health of rollout {rollout!r}",
            self._script("put_input_health", keys, [process, text, keep]),
        )

    async def input_health(self, rollout: str) -> dict[str, dict[str, Any]]:
        key = self._key("inputs", rollout)
        what = f"input health of rollout {rollout!r} in {self._safe_url}"
        entries: dict[bytes | str, bytes | str] = await self._run(
            f"read input health of rollout {rollout!r}", lambda c: c.hgetall(key)
        )
        return {_str(p): decode(_str(text), what) for p, text in entries.items()}

    async def drop_input_health(self, rollout: str, processes: Sequence[str] | None = None) -> None:
        keys = [self._key("inputs", rollout), self._key("inputs-order", rollout)]
        names = None if processes is None else list(processes)

        async def drop(client: aioredis.Redis) -> None:
            if names is None:
                await client.delete(*keys)
            elif names:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.hdel(keys[0], *names)
                    pipe.zrem(keys[1], *names)
                    await pipe.execute()

        await self._run(f"drop input health of rollout {rollout!r}", drop)

    # -- shared feedback answers --

    def _answer_keys(self, rollout: str) -> list[str]:
        return [
            self._key("answers", rollout),
            self._key("answers-at", rollout),
            self._key("answers-meta", rollout),
        ]

    async def put_answers(
        self,
        rollout: str,
        answers: Sequence[StoredAnswer],
        *,
        ttl: float,
        max_entries: int,
        now: float | None = None,
    ) -> None:
        """One script per :data:`ANSWERS_PER_CALL` answers (idempotent: a resend writes the
        same entries, and never over a claimed one)."""
        check_answers(ttl, max_entries)
        cutoff = (time.time() if now is None else now) - 2 * ttl
        head: list[str | int] = [repr(cutoff), max_entries, max(1, math.ceil(ttl * 2000))]
        keys = self._answer_keys(rollout)
        for start in range(0, max(1, len(answers)), ANSWERS_PER_CALL):
            args = list(head)
            for a in answers[start : start + ANSWERS_PER_CALL]:
                flags = f"{int(a.seen)}{int(a.predicted)}"
                args.extend((a.request_id, repr(float(a.at)), a.data, flags))
            await self._run(
                f"write feedback answers of rollout {rollout!r}",
                self._script("put_answers", keys, args),
            )

    async def claim_answers(
        self,
        rollouts: Mapping[str, float],
        claims: Sequence[AnswerClaim],
        *,
        now: float | None = None,
    ) -> list[ClaimResult | None]:
        """One script: every claim of the call, atomically (idempotent by the claims'
        tokens: a resend after a lost answer gets the same results)."""
        check_claims(rollouts, claims)
        if not claims:
            self._live()
            return []
        names = list(rollouts)
        keys = [k for name in names for k in self._answer_keys(name)]
        index = {name: i + 1 for i, name in enumerate(names)}
        args: list[str | int] = [repr(time.time() if now is None else now), len(names)]
        args.extend(repr(float(rollouts[name])) for name in names)
        for c in claims:
            li, lat = (0, "0") if c.local is None else (index[c.local[0]], repr(float(c.local[1])))
            args.extend((c.request_id, c.token, c.need, li, lat))
        reply = await self._run("claim feedback answers", self._script("claim_answers", keys, args))
        try:
            out: list[ClaimResult | None] = []
            for row in reply:
                if int(row[0]) == 0:
                    out.append(None)
                    continue
                status, data = _str(row[1]), _str(row[3])
                keep = status in (CLAIMED, UNMET)
                out.append(
                    ClaimResult(
                        names[int(row[0]) - 1], status, float(_str(row[2])), data if keep else None
                    )
                )
            if len(out) != len(claims):
                raise ValueError(f"{len(out)} results for {len(claims)} claims")
            return out
        except (TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"{self._where}: corrupt claim reply: {exc}") from exc

    # -- metric history --

    def _history_keys(self, rollout: str) -> list[str]:
        return [self._key("history", rollout), self._key("history-seq", rollout)]

    async def append_history(
        self,
        rollout: str,
        point: dict[str, Any],
        *,
        at: float,
        keep: bool = False,
        max_points: int = DEFAULT_MAX_HISTORY,
        fence: int | None = None,
    ) -> None:
        """One Lua script: the fence checked, the point added, the history thinned."""
        check_max_points(max_points)
        text = encode(point, f"history of rollout {rollout!r}")
        when = float(at)
        if not math.isfinite(when):
            raise StoreError(f"cannot store history of rollout {rollout!r}: time {at!r}")
        keys = [self._lease_key, *self._history_keys(rollout)]
        low = int(max_points * LOW_WATER)
        # Not retried on a broken connection: the point may have been added already.
        await self._fenced(
            f"append history of rollout {rollout!r}",
            "append_history",
            keys,
            [repr(when), "1" if keep else "0", text, max_points, low],
            fence,
            idempotent=False,
        )

    async def history(self, rollout: str, since: float | None = None) -> list[dict[str, Any]]:
        key = self._key("history", rollout)
        low = "-inf" if since is None else f"({float(since)!r}"
        what = f"history of rollout {rollout!r} in {self._safe_url}"

        async def read(client: aioredis.Redis) -> list[bytes | str]:
            return cast(list[bytes | str], await client.zrangebyscore(key, low, "+inf"))

        members = await self._run(f"read history of rollout {rollout!r}", read)

        def decoded() -> list[dict[str, Any]]:
            return [decode(_str(m)[17:], what) for m in members]

        # Up to max_points decoded: milliseconds the proxy's event loop need not wait for.
        return await asyncio.to_thread(decoded) if len(members) > 50 else decoded()


def _fence(fence: int | None) -> str:
    return _NO_FENCE if fence is None else str(int(fence))


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _new_id() -> str:
    return uuid.uuid4().hex


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
        return f"timed out ({text})"
    return text


def _accumulator(data: dict[str, Any], what: str) -> RolloutAccumulator:
    try:
        return RolloutAccumulator.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(f"corrupt {what}: {exc!r}") from exc


async def _quietly_close(client: aioredis.Redis) -> None:
    try:
        await client.aclose()
    except (RedisError, OSError):
        pass  # open() is already failing with the error that matters


__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_MERGE_ATTEMPTS",
    "RedisStore",
    "redact_url",
]
