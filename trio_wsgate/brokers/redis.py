"""The Redis broker: many nodes act as one gateway (docs/architecture.md, layer 5).

Built on coredis, which runs under trio (it is anyio-based). What lives in Redis, under a
prefix (``wsgate`` by default):

* ``{p}:t:{topic}:meta``, a hash: the topic's ``epoch`` and last ``offset``. It outlives
  the history (a day, or the history TTL if longer, from the last use), so a client that
  saw the last offset still recovers after the history expired.
* ``{p}:t:{topic}:log``, a Stream: the history. Entry ids are ``<offset>-1``; each entry
  holds the publication (``p``: msgpack of ``[event, data]``) and the Redis time it was
  published (``t``, ms), against which ``history_ttl`` is applied. ``MAXLEN`` keeps
  ``history_size`` entries.
* ``{p}:c:{topic}``, a pub/sub channel: live publications, as ``offset\\nepoch\\npayload``.
* ``{p}:presence:{topic}``, a sorted set of ``session\\nuser`` scored by expiry (Redis
  time, ms): every node refreshes its own entries, so a node that dies leaves nothing
  behind for long.
* ``{p}:control``, a pub/sub channel: messages to every node (kicks, hand-overs).
* ``{p}:s:{session}``: the node that holds the session, refreshed by that node; and
  ``{p}:parked:{session}``, the state of a session that a node left for another:
  parked by a draining node for whichever node its client resumes on (until its
  resume window runs out), or handed over to the node that asked for it (for 30 s:
  if that answer comes after the asking node stopped waiting, its look in the parked
  states, or the client's next resume anywhere, still finds it).

The URL is ``redis://host:port/db``, ``unix:///path`` or, for a primary found through
Sentinel, ``redis+sentinel://host:port[,host:port...]/service_name[?db=N]`` (a
password in it is the primary's). Through Sentinel the broker asks every half second
where the primary is, and when it has moved drops every connection to the old one (a
primary demoted by ``SENTINEL FAILOVER`` keeps accepting writes for seconds, which the
new one never sees) and catches up, as after an outage.

After any outage or failover, each topic the node follows is checked for an offset
that went back (a new primary that had not received the last writes, a Redis
restarted from an older file): such a topic gets a new epoch, so that no node drops
new publications as already delivered and every client learns that the history it
knew is gone.

Publishing is one Lua script: it creates the epoch if the topic has none (a new epoch
starts a new log), assigns the next offset atomically, appends to the log and publishes.
Offsets are therefore consecutive per topic across all nodes.

Delivery to the node keeps the contract of ``base.py`` (each publication once, in offset
order). Redis pub/sub is at-most-once: a message lost while the listener reconnects shows
up as a gap in offsets, filled from the log before the message that revealed it; and a
periodic check compares each topic's offset in Redis with the last one delivered, so a
gap is filled even when no later message comes to reveal it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import anyio
import coredis
import msgpack
import trio
from coredis.connection import TCPLocation

from ..exceptions import BrokerUnavailable
from .base import ControlReceiver, History, Publication, Receiver

__all__ = ["RedisBroker", "SentinelUrl", "host_port", "split_url"]

logger = logging.getLogger("trio_wsgate.redis")

# What coredis raises when Redis cannot be reached (TimeoutError is an OSError), or
# when what it reached is no longer the primary (a replica after a failover answers
# writes with READONLY; through Sentinel, a connection to a demoted primary is stale):
# every one of them is "unavailable" to the caller, and Redis counts as lost until
# the health check (and, through Sentinel, the watch on the primary) says otherwise.
_UNREACHABLE = (
    coredis.exceptions.ConnectionError,
    OSError,
    coredis.exceptions.ReadOnlyError,
    coredis.exceptions.StalePrimaryError,
    # Redis Cluster (brokers/cluster.py): slots without a primary, a layout coredis
    # cannot route by (a primary just lost), nodes answering a fan-out differently,
    # and (_MOVING) a slot moving for longer than coredis retries.
    coredis.exceptions.RedisClusterError,
)
# A slot of a Redis Cluster in the middle of moving (a script whose keys are half
# migrated, redirections beyond coredis's retries): that command fails, but the
# cluster is not lost.
_MOVING = (coredis.exceptions.ClusterError, coredis.exceptions.TryAgainError)
# Errors of a cluster that are a command's own fault, not the cluster's.
_NOT_LOST = (coredis.exceptions.ClusterCrossSlotError, coredis.exceptions.ClusterTransactionError)

#: A client of one Redis, or of a Redis Cluster (brokers/cluster.py).
Client = coredis.Redis[bytes] | coredis.RedisCluster[bytes]

#: How long a topic's meta outlives its last use at least (ms).
_META_TTL_MS = 24 * 3600 * 1000

# The topic's epoch, made if it has none (a new epoch starts a new log). KEYS: meta,
# log; ARGV[1]: a new epoch's name; ARGV[5] '1' (through Sentinel): an epoch belongs
# to the primary that numbered it, known by its replication id, which a promoted
# replica changes. So the first publication on a new primary starts a new epoch:
# offsets it kept below what nodes delivered from the old one are never reused.
# ARGV[5] '2' (a Redis Cluster, where keys also move between primaries intact): only
# a primary promoted from the one that numbered the topic (whose replication id it
# keeps as master_replid2) starts a new epoch; a primary the keys migrated to takes
# the topic over as it is.
_EPOCH = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local rid = false
if ARGV[5] ~= '0' then
  local info = redis.call('INFO', 'replication')
  rid = string.match(info, 'master_replid:(%w+)')
  local known = redis.call('HGET', KEYS[1], 'rid')
  if epoch and known and known ~= rid then
    if ARGV[5] == '1' or known == string.match(info, 'master_replid2:(%w+)') then
      epoch = false
    else
      redis.call('HSET', KEYS[1], 'rid', rid)
    end
  elseif epoch and not known then
    redis.call('HSET', KEYS[1], 'rid', rid)
  end
end
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  if rid then redis.call('HSET', KEYS[1], 'rid', rid) end
end
"""

_PUBLISH = (
    _EPOCH
    + """
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local maxlen = tonumber(ARGV[3])
if maxlen > 0 then
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('XADD', KEYS[2], 'MAXLEN', maxlen, offset .. '-1', 'p', ARGV[2], 't', ms)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('PUBLISH', KEYS[3], offset .. '\\n' .. epoch .. '\\n' .. ARGV[2])
return {offset, epoch}
"""
)

# The same through sharded pub/sub (a Redis Cluster): to the primary of the topic's slot.
_SPUBLISH = _PUBLISH.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")

_HISTORY = (
    _EPOCH
    + """
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local first = tonumber(ARGV[2])
local last = tonumber(ARGV[4])
local entries = {}
if first >= 0 and (last < 0 or last >= first) then
  local upto = '+'
  if last >= 0 then upto = last .. '-1' end
  entries = redis.call('XRANGE', KEYS[2], first .. '-0', upto)
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {offset, epoch, entries, ms}
"""
)

_PRESENCE_SET = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '1' then
    redis.call('ZADD', KEYS[1], ms + ttl, ARGV[i])
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

_CLAIM = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
end
return 1
"""

# The holders this node refreshes: a session stays its own only while its holder key
# names it, or names no one and no parked state waits for it (else another node took
# it, or a park this node took for failed, its answer late, went through).
# KEYS: (holder, parked) per session; ARGV: ttl ms, then the node per session.
# Returns the (1-based) numbers of the sessions no longer held.
_REFRESH = """
local lost = {}
for i = 1, #KEYS, 2 do
  local n = (i + 1) / 2
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[n + 1] or (not holder and redis.call('EXISTS', KEYS[i + 1]) == 0) then
    redis.call('SET', KEYS[i], ARGV[n + 1], 'PX', ARGV[1])
  else
    lost[#lost + 1] = n
  end
end
return lost
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

_PUT = "return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])"

# What the node that asked for a hand-over takes: the state, and its time left (ms).
_TAKE = """
local ttl = redis.call('PTTL', KEYS[1])
return {redis.call('GETDEL', KEYS[1]), ttl}
"""

# KEYS: (parked, owner) per session; ARGV: node, then (ttl ms, state) per session.
_PARK = """
for i = 1, #KEYS, 2 do
  local n = (i + 1) / 2
  redis.call('SET', KEYS[i], ARGV[2 * n + 1], 'PX', ARGV[2 * n])
  if redis.call('GET', KEYS[i + 1]) == ARGV[1] then redis.call('DEL', KEYS[i + 1]) end
end
return 1
"""

# A parked session's state (taken: one node resumes it) and its time left (ms), or
# else nothing and the session's holder.
_FIND = """
local ttl = redis.call('PTTL', KEYS[1])
local state = redis.call('GETDEL', KEYS[1])
if state then return {state, ttl} end
return {false, 0, redis.call('GET', KEYS[2])}
"""

# A topic whose offset went back below what this node delivered, in the same epoch,
# starts a new epoch. KEYS: meta, log; ARGV: epoch delivered, offset delivered, new epoch.
_REGRESSED = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
if epoch == ARGV[1] and offset < tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'offset', 0)
  return 1
end
return 0
"""

_PRESENCE_GET = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ms, '+inf')
"""


@dataclass(slots=True)
class _Position:
    epoch: str
    offset: int


def _decode_payload(payload: bytes) -> tuple[str | None, Any]:
    event, data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    return event, data


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unpack_state(packed: bytes) -> dict[str, Any]:
    state: dict[str, Any] = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return state


def host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.

    Raises:
        ValueError: an empty host, or a port that is not a number.
    """
    if text.startswith("["):
        host, _, after = text[1:].partition("]")
        port = after[1:] if after.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host or (port and not port.isdigit()):
        raise ValueError(f"not a host[:port]: {text!r}")
    return host, int(port) if port else default_port


def split_url(url: str, scheme: str) -> tuple[str | None, str | None, str] | None:
    """``scheme://[user:password@]rest`` as (user, password, rest), the credentials
    percent-decoded as in ``redis://`` URLs; None for a URL of another scheme."""
    found, sep, rest = url.partition("://")
    if not sep or found != scheme:
        return None
    credentials, at, rest = rest.rpartition("@")  # whatever characters they hold
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return username, password, rest


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A ``redis+sentinel://`` URL, parsed: the primary's credentials are not shown."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SentinelUrl | None:
        """The parts of ``redis+sentinel://[user:password@]host[:port][,...]/service[?db=N]``
        (credentials percent-decoded, as in ``redis://`` URLs); None for another URL.

        Raises:
            ValueError: it names no Sentinel or no service, or a bad host or db.
        """
        parts = split_url(url, "redis+sentinel")
        if parts is None:
            return None
        username, password, rest = parts
        hosts, _, path = rest.partition("/")
        service, _, query = path.partition("?")
        sentinels = tuple(host_port(host, 26379) for host in hosts.split(",") if host)
        db = 0
        for pair in filter(None, query.split("&")):
            key, _, value = pair.partition("=")
            if key == "db":
                if not value.isdigit():
                    raise ValueError(f"db must be a number, not {value!r}")
                db = int(value)
        if not sentinels or not service:
            raise ValueError("redis+sentinel:// needs host:port[,host:port...]/service_name")
        return cls(sentinels, unquote(service), db, username, password)


class RedisBroker:
    """Topics, history and presence in Redis, shared by every node that uses it.

    Args:
        url: ``redis://host:port/db``.
        history_size: publications each topic keeps; 0 keeps none.
        history_ttl: seconds a publication is kept; None: until pushed out.
        prefix: the prefix of every key and channel.
        presence_ttl: seconds a presence entry lives unless its node refreshes it.
        sync_interval: seconds between checks that no live publication was missed.
        health_interval: seconds between pings that tell whether Redis is reachable.
        command_timeout: seconds a Redis command may take; one that takes longer fails
            (:class:`BrokerUnavailable`) without Redis counting as lost for it.
        max_backoff: the longest pause between pings while Redis does not answer.
        unreachable_after: pings in a row left unanswered (each for ``health_interval``,
            at least a second) before Redis counts as lost. A refused or broken
            connection counts at once.
        max_connections: connections the node's commands may use at once.
    """

    shared = True
    #: The script that numbers, logs and publishes a publication; and the one that
    #: publishes on the topic's shard channel (brokers/cluster.py).
    _publish_script = _PUBLISH
    _sharded_publish_script = _SPUBLISH

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 100,
        history_ttl: float | None = 300.0,
        prefix: str = "wsgate",
        presence_ttl: float = 60.0,
        sync_interval: float = 5.0,
        health_interval: float = 1.0,
        command_timeout: float = 2.0,
        max_backoff: float = 5.0,
        unreachable_after: int = 3,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self._sentinel_url = SentinelUrl.parse(url)
        # Through Sentinel, a topic's epoch belongs to its primary (_EPOCH).
        self._by_primary = "1" if self._sentinel_url is not None else "0"
        self._sentinel: coredis.Sentinel[bytes] | None = None
        # Through Sentinel, the clients whose pools follow the primary: the commands'
        # and the health check's for the broker's life, the pub/sub's while it lasts.
        self._clients: set[coredis.Redis[bytes]] = set()
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.prefix = prefix
        self._channel_prefix = f"{prefix}:c:".encode()  # of every topic's channel
        self.presence_ttl = presence_ttl
        self.sync_interval = sync_interval
        self.gaps = 0  # times publications were lost to this node (_publications_lost)
        self.health_interval = health_interval
        self.command_timeout = command_timeout
        self.max_backoff = max_backoff
        self.unreachable_after = unreachable_after
        self.max_connections = max_connections
        #: True while Redis answers (``/readyz`` says "degraded" otherwise).
        self.healthy = False
        self._healthy_again = trio.Event()
        self._pubsub_scope: trio.CancelScope | None = None
        # Set when Redis answers again: each catching-up task waits on its own.
        self._recovered = {"positions": trio.Event(), "presence": trio.Event()}
        self._client: Client | None = None
        self._nursery: trio.Nursery | None = None
        self._pubsub: Any = None
        self._listener: Client | None = None  # the pub/sub's own client, while it lasts
        self._receiver: Receiver | None = None
        self._control: ControlReceiver | None = None
        self._positions: dict[str, _Position] = {}  # last delivered, per subscribed topic
        self._presence: dict[str, dict[str, str | None]] = {}  # what this node put there
        self._ready = trio.Event()
        self._handovers: dict[str, trio.Event] = {}  # requests waiting for an answer
        self._owned: dict[str, str] = {}  # session -> node, as claimed by this process
        self._order = trio.Lock()  # one delivery at a time: offsets stay in order
        # Takes of sessions' states under way at once (_take), one per connection to
        # Redis. A reconnect herd asks for thousands at once: all under way together,
        # each waited seconds behind the others, past command_timeout, and the
        # resumes failed (1011), came back and failed again: 3,198 give-ups and 187
        # of 5,000 clients back in 40 s (docs/benchmarks.md). Bounded, they go in
        # order, each timed from when it is sent: 5,000 of 5,000 back.
        self._takes = trio.Semaphore(max(1, max_connections))

    def __repr__(self) -> str:  # the URL may hold a password
        return f"<RedisBroker prefix={self.prefix!r}>"

    # -- keys -------------------------------------------------------------------------

    def _named(self, kind: str, name: str) -> str:
        """The key (or channel) of ``kind`` for a topic or a session named ``name``."""
        return f"{self.prefix}:{kind}:{name}"

    def _meta(self, topic: str) -> str:
        return self._named("t", topic) + ":meta"

    def _log(self, topic: str) -> str:
        return self._named("t", topic) + ":log"

    def _channel(self, topic: str) -> str:
        return self._named("c", topic)

    def _presence_key(self, topic: str) -> str:
        return self._named("presence", topic)

    @property
    def _control_channel(self) -> str:
        return f"{self.prefix}:control"

    def _meta_ttl_ms(self) -> int:
        return max(_META_TTL_MS, int((self.history_ttl or 0) * 1000))

    # -- life -------------------------------------------------------------------------

    def bind(self, receiver: Receiver, control: ControlReceiver | None = None) -> None:
        """Set the node's receivers: of live publications, and of control messages."""
        self._receiver = receiver
        self._control = control

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, listen and keep presence fresh, until cancelled."""
        async with contextlib.AsyncExitStack() as stack:
            where = self._sentinel_url
            if where is not None:
                self._sentinel = await stack.enter_async_context(
                    coredis.Sentinel([TCPLocation(host, port) for host, port in where.sentinels])
                )
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._hold_client)
                    if where is not None:
                        nursery.start_soon(self._follow_primary, where.service)
                    # Ready once the first ping is answered or failed: /readyz then
                    # says whether Redis is there from the node's first moment.
                    await nursery.start(self._watch_health)
                    await nursery.start(self._listen_forever)
                    nursery.start_soon(self._refresh_presence)
                    nursery.start_soon(self._check_positions)
                    self._ready.set()
                    task_status.started()
            finally:
                self._client = self._pubsub = self._nursery = self._sentinel = None

    @property
    def _open_timeout(self) -> float:
        """How long opening a client may take (a cluster's asks for the layout)."""
        return 2 * max(self.command_timeout, 1.0)

    async def _hold_client(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The commands' client, for the broker's life. A Redis client connects when
        first used, but a cluster's learns the layout as it opens: while that fails or
        takes longer than ``_open_timeout``, it is tried again after a pause, or as
        soon as the health check hears Redis again (commands answer
        :class:`BrokerUnavailable` meanwhile), so that the node starts, and serves
        degraded, without its Redis."""
        rng = random.Random()
        started = False
        failures = 0
        while True:
            reason = "no answer"
            with trio.move_on_after(self._open_timeout) as scope:
                try:
                    async with self._new_client(self.max_connections) as client:
                        scope.deadline = math.inf  # opened: held for good
                        self._client, failures = client, 0
                        if not started:
                            started = True
                            task_status.started()
                        await trio.sleep_forever()
                except (*_UNREACHABLE, coredis.exceptions.RedisError) as exc:
                    reason = repr(exc)
            self._client = None
            failures += 1
            log = logger.warning if failures == 1 else logger.info
            log("could not open a client of Redis (%s): trying again", reason)
            if not started:
                started = True
                task_status.started()
            pause = rng.uniform(self.health_interval, 2 * self.health_interval)
            if self.healthy:
                await trio.sleep(pause)
            else:
                with trio.move_on_after(pause):
                    await self._healthy_again.wait()

    @contextlib.asynccontextmanager
    async def _new_client(self, max_connections: int) -> AsyncIterator[Client]:
        """A client of the primary, from the URL or through Sentinel, for the block."""
        where = self._sentinel_url
        if where is None:
            async with coredis.Redis.from_url(self.url, max_connections=max_connections) as client:
                yield client
            return
        assert self._sentinel is not None
        client = self._sentinel.primary_for(
            where.service,
            max_connections=max_connections,
            db=where.db,
            username=where.username,
            password=where.password,
        )
        self._clients.add(client)
        try:
            async with client:
                yield client
        finally:
            self._clients.discard(client)

    async def _follow_primary(self, service: str) -> None:
        """Through Sentinel: every half second, where is the primary? When it has
        moved, every client's pool drops its connections to the old one (coredis does
        that on asking), the pub/sub is made anew, and the node catches up."""
        assert self._sentinel is not None
        known: tuple[str, int] | None = None
        while True:
            try:
                with trio.fail_after(max(self.command_timeout, 1.0)):
                    primary = await self._sentinel.discover_primary(service)
                if known is not None and primary != known:
                    logger.warning("the Redis primary moved (Sentinel): following it")
                    for client in list(self._clients):
                        follow = getattr(client.connection_pool, "get_primary_location", None)
                        if follow is not None:
                            # (It asks Sentinel again: bounded like the question above,
                            # or a Sentinel that hangs now stops every later move.)
                            with trio.fail_after(max(self.command_timeout, 1.0)):
                                await follow()
                    if self._pubsub_scope is not None:
                        self._pubsub_scope.cancel()
                    for event in self._recovered.values():
                        event.set()
                known = primary
            except (*_UNREACHABLE, trio.TooSlowError, coredis.exceptions.RedisError) as exc:
                logger.info("Sentinel did not say where the primary is: %r", exc)
            await trio.sleep(0.5)

    async def _listen_forever(self, *, task_status: trio.TaskStatus[None]) -> None:
        """One pub/sub connection at a time, subscribed to every channel we want.

        When Redis is lost (the health check says so), the connection is dropped and,
        once Redis answers again, a new one subscribes everything anew; then the
        positions are checked, so what was published meanwhile is delivered from the
        logs.

        Each pub/sub connection comes from a client of its own, closed with it, and
        coredis does not reconnect it by itself (``retry_policy=None``): a lost pub/sub
        connection ends it here, and the loop makes a new one. coredis 6.9 keeps a pool
        slot for every pooled connection that broke while lent out, as a pub/sub's
        always is; on the commands' client, 64 lost pub/sub connections left every
        command waiting for a slot (tests/test_redis.py). (Its own reconnection would
        also have lost what was published meanwhile until the next position check.)
        """
        started = False
        refused = 0  # pub/subs in a row that Redis refused
        while True:
            if not self.healthy:
                # Redis is away (at start-up too: the node serves, degraded). coredis
                # would retry opening a pub/sub without end; the health check says
                # when there is one to open.
                if not started:
                    started = True
                    task_status.started()
                await self._healthy_again.wait()
            # Opening is bounded (a cluster's client asks for the layout); once open,
            # the pub/sub lasts until it fails or is dropped.
            scope = self._pubsub_scope = trio.CancelScope()
            scope.deadline = trio.current_time() + self._open_timeout
            channels = [self._control_channel, *map(self._channel, self._positions)]
            try:
                with scope:
                    async with (
                        self._new_client(2) as listener,
                        self._open_pubsub(listener, channels) as pubsub,
                    ):
                        self._pubsub, self._listener = pubsub, listener
                        # Topics followed since the channels were listed, with no
                        # pub/sub to listen on then: this one listens to them too.
                        missing = {*map(self._channel, self._positions)} - {*channels}
                        for channel in sorted(missing):
                            await self._listen_also(pubsub, channel)
                        scope.deadline = math.inf
                        refused = 0
                        if not started:
                            started = True
                            task_status.started()
                        else:
                            self._recovered["positions"].set()  # catch up from the logs
                        await self._listen(pubsub)
            except* anyio.ClosedResourceError:
                # coredis 6.9's pubsub, cancelled, tries to UNSUBSCRIBE on a connection
                # it has already closed: only ever while we are dropping it.
                if not scope.cancel_called and trio.current_effective_deadline() != -math.inf:
                    raise
            except* _UNREACHABLE:
                self._lost()
            except* coredis.exceptions.RedisError as group:
                # Anything else Redis answered the pub/sub with (an ACL refusing a
                # channel...) ends that pub/sub, never the node, nor counts Redis lost:
                # a new one, after a pause that grows while it goes on.
                logger.warning("the Redis pub/sub failed: %r", group.exceptions[0])
                refused += 1
            self._pubsub = self._listener = None
            if not scope.cancel_called:  # it ended by itself: do not spin
                await trio.sleep(min(self.max_backoff, 0.5 * 2**refused))

    def _open_pubsub(self, listener: Client, channels: list[str]) -> Any:
        """A pub/sub of ``listener`` subscribed to ``channels``, not reconnecting by
        itself, waiting for a subscription's acknowledgement as long as for any command
        (it comes after whatever the pub/sub holds: coredis's 1 s was too short for a
        node that is behind)."""
        return listener.pubsub(
            channels=channels, retry_policy=None, subscription_timeout=self.command_timeout
        )

    def _redis(self) -> Client:
        if self._client is None:
            raise BrokerUnavailable("the Redis broker is not running")
        return self._client

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """Bound the block by ``command_timeout``; Redis out of reach or too slow in it
        is :class:`BrokerUnavailable` (out of reach: Redis counts as lost).

        Bounded: after Redis restarts, a command on a connection it never answered on
        could otherwise wait forever (and hold up everything behind it).
        """
        try:
            with trio.fail_after(self.command_timeout):
                yield
        except (*_UNREACHABLE, coredis.exceptions.RedisError) as exc:
            raise self._unavailable(exc) from exc
        except trio.TooSlowError as exc:
            raise self._too_slow() from exc

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        """What a command that failed with ``exc`` tells its caller. Redis counts as
        lost when it could not be reached; not when it refused the command (out of
        memory, a script it is busy with, an ACL, a bug of ours: logged) or when a
        cluster's slot was only moving."""
        if isinstance(exc, _MOVING):
            return BrokerUnavailable(f"a slot of the Redis Cluster is moving: {exc!r}")
        if type(exc) is TimeoutError:
            # coredis's own wait (a subscription's acknowledgement behind the pub/sub's
            # backlog): slow, not lost. The health check decides that.
            return self._too_slow()
        if isinstance(exc, _NOT_LOST) or not isinstance(exc, _UNREACHABLE):
            logger.warning("Redis refused a command: %r", exc)
            return BrokerUnavailable(f"Redis refused the command: {exc!r}")
        self._lost()
        return BrokerUnavailable(f"Redis is unreachable: {exc!r}")

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        with self._guarded():
            return await self._redis().eval(script, keys=keys, args=args)

    async def _take(self, script: str, keys: list[str], put_back: str) -> Any:
        """Run ``script``, which takes a session's state out of Redis, as ``_call`` does.

        Its answer is ``[state, ttl_ms, ...]``; ``state`` is None (nil) when nothing was
        taken. If we stopped waiting (timeout, or the caller cancelled) after Redis ran
        it, the state would be gone with the answer nobody read. So the command runs in
        a task of the broker, and a state whose caller did not take it is parked again
        under ``put_back`` for its remaining time, for the client's next resume.
        """
        async with self._takes:
            return await self._take_now(script, keys, put_back)

    async def _take_now(self, script: str, keys: list[str], put_back: str) -> Any:
        nursery = self._nursery
        if nursery is None:
            raise BrokerUnavailable("the Redis broker is not running")
        answer: list[Any] = []
        done = trio.Event()
        abandoned = False

        async def take() -> None:
            try:
                # Long enough for any answer Redis sends at all.
                with trio.move_on_after(max(30.0, 10 * self.command_timeout)):
                    answer.append(await self._redis().eval(script, keys=keys, args=[]))
            except (BrokerUnavailable, *_UNREACHABLE, coredis.exceptions.RedisError) as exc:
                answer.append(exc)
            finally:
                done.set()  # cancelled too (the node stops): its caller need not wait
            if abandoned:  # no checkpoint since done.set(): the caller cannot miss it
                await self._give_back(answer, put_back)

        nursery.start_soon(take)
        taken = False
        try:
            with trio.move_on_after(self.command_timeout):
                await done.wait()
            if not done.is_set():
                raise self._too_slow()
            if not answer:
                raise BrokerUnavailable("Redis did not answer")
            if isinstance(answer[0], BrokerUnavailable):
                raise answer[0]
            if isinstance(answer[0], BaseException):
                raise self._unavailable(answer[0]) from answer[0]
            taken = True
            return answer[0]
        finally:
            if not taken:
                if done.is_set():
                    nursery.start_soon(self._give_back, answer, put_back)
                else:
                    abandoned = True

    async def _give_back(self, answer: list[Any], key: str) -> None:
        """Park a taken state again; this node holds the only copy, so keep trying
        (a second at a time, once a second) for as long as it had left."""
        if not answer or not isinstance(answer[0], list):
            return
        state, ttl_ms = answer[0][0], _int(answer[0][1])
        if not isinstance(state, bytes) or ttl_ms <= 0:
            return
        logger.warning("a session's state was taken for a resume that gave up: parking it again")
        deadline = trio.current_time() + ttl_ms / 1000
        while (left := deadline - trio.current_time()) > 0:
            try:
                with trio.fail_after(max(self.command_timeout, 1.0)):
                    await self._redis().eval(_PUT, keys=[key], args=[state, int(left * 1000) or 1])
                return
            except (
                BrokerUnavailable,
                *_UNREACHABLE,
                coredis.exceptions.RedisError,
                trio.TooSlowError,
            ):
                await trio.sleep(1.0)
        logger.error("a session's state could not be parked again: its client starts anew")

    def _too_slow(self) -> BrokerUnavailable:
        # A busy node or a busy Redis, not a lost one: the health check decides that.
        return BrokerUnavailable(f"Redis did not answer within {self.command_timeout} s")

    def _lost(self) -> None:
        if self.healthy:
            logger.warning("Redis is unreachable: serving local connections only")
            self.healthy = False
            # A new event only on the way down: whoever waits for Redis to come back
            # waits on this one, which the health check sets when it answers again.
            self._healthy_again = trio.Event()
        if self._pubsub_scope is not None:
            self._pubsub_scope.cancel()  # a new pub/sub connection once Redis is back

    async def _watch_health(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ping Redis; when it answers again, catch up at once (positions, presence).

        Redis counts as lost when the connection is refused or broken, or when
        ``unreachable_after`` pings in a row go unanswered: one slow answer is a busy
        node or a busy Redis, not a lost one. While it does not answer, the pings back
        off exponentially (with jitter, up to ``max_backoff``), so that a fleet of nodes
        does not hammer a Redis coming up.

        The pings go on a connection of their own, so that their answer does not wait
        behind a burst of commands. With ``_renew_health_client`` (a cluster, whose
        layout changes when a primary is lost) each failed ping is followed by a new
        client, which learns the layout anew.
        """
        rng = random.Random()
        started = False
        while True:
            failed: BaseException = trio.TooSlowError()  # if the client does not open
            with trio.move_on_after(self._open_timeout) as scope:
                try:
                    async with self._new_client(1) as health:
                        scope.deadline = math.inf
                        while True:
                            renew: BaseException | None = None
                            try:
                                with trio.fail_after(max(self.health_interval, 1.0)):
                                    await health.ping()
                            except (
                                *_UNREACHABLE,
                                coredis.exceptions.RedisError,
                                trio.TooSlowError,
                            ) as exc:
                                pause, renew = self._ping_failed(exc, rng), exc
                            else:
                                pause = self._ping_answered()
                            if not started:  # the first ping is done, answered or not
                                started = True
                                task_status.started()
                            await trio.sleep(pause)
                            # A slow answer is a busy Redis: the same client asks again,
                            # until so many go unanswered that Redis counts as lost.
                            if (
                                renew is not None
                                and self._renew_health_client
                                and (
                                    not isinstance(renew, trio.TooSlowError)
                                    or self._ping_failures >= self.unreachable_after
                                )
                            ):
                                break
                    continue
                except (*_UNREACHABLE, coredis.exceptions.RedisError) as exc:
                    failed = exc  # the client could not even open: as a failed ping
            pause = self._ping_failed(failed, rng)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(pause)

    #: Make a new health client after each failed ping (brokers/cluster.py).
    _renew_health_client = False
    _ping_failures = 0

    def _ping_failed(self, exc: BaseException, rng: random.Random) -> float:
        """Count a ping that failed (any error counts as no answer: a Redis still
        loading its data, a password changed); return the pause before the next."""
        self._ping_failures += 1
        failures = self._ping_failures
        if not isinstance(exc, trio.TooSlowError) or failures >= self.unreachable_after:
            self._lost()
        elif self.healthy:
            logger.info("Redis did not answer a ping (%d in a row)", failures)
        ceiling = max(
            self.health_interval, min(self.health_interval * 2**failures, self.max_backoff)
        )
        return rng.uniform(self.health_interval, ceiling)

    def _ping_answered(self) -> float:
        """Redis answered: if it had been lost, catch up now."""
        self._ping_failures = 0
        if not self.healthy:
            self.healthy = True
            self._healthy_again.set()
            logger.warning("Redis is reachable: catching up")
            for event in self._recovered.values():
                event.set()
            if self._control is not None:
                self._control({"kind": "recovered"})
        return self.health_interval

    # -- publications -----------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        data: Any,
        event: str | None = None,
        *,
        encoded: dict[str, tuple[bytes, int]] | None = None,
    ) -> Publication:
        """Number the publication in Redis, log it and publish it to every node.

        Raises:
            BrokerUnavailable: Redis could not be reached; nothing was published.
        """
        payload = msgpack.packb([event, data], use_bin_type=True)
        offset, epoch = await self._call(
            self._publish_script,
            [self._meta(topic), self._log(topic), self._channel(topic)],
            [
                secrets.token_hex(4),
                payload,
                self.history_size,
                self._meta_ttl_ms(),
                self._by_primary,
            ],
        )
        publication = Publication(topic, _int(offset), _str(epoch), data, event)
        if encoded:
            publication.encoded.update(encoded)
        return publication

    async def history(self, topic: str, since: int | None = None) -> History:
        """The held publications after ``since`` (within ``history_ttl``) and the position."""
        return await self._history(topic, since)

    async def _history(self, topic: str, since: int | None, until: int | None = None) -> History:
        first = -1 if since is None else since + 1
        last = -1 if until is None else until
        offset, epoch, entries, now_ms = await self._call(
            _HISTORY,
            [self._meta(topic), self._log(topic)],
            [secrets.token_hex(4), first, self._meta_ttl_ms(), last, self._by_primary],
        )
        epoch = _str(epoch)
        oldest = -math.inf if self.history_ttl is None else _int(now_ms) - self.history_ttl * 1000
        held: list[Publication] = []
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            if _int(values[b"t"]) <= oldest:
                continue
            event, data = _decode_payload(values[b"p"])
            entry_offset = _int(_str(entry_id).partition("-")[0])
            held.append(Publication(topic, entry_offset, epoch, data, event))
        return History(held, _int(offset), epoch)

    async def subscribe(self, topic: str) -> None:
        """Listen to the topic's channel; deliveries start from its current offset."""
        await self._ready.wait()
        pubsub = self._pubsub
        if pubsub is None:
            raise BrokerUnavailable("Redis is unreachable")
        channel = self._channel(topic)
        await self._listen_to(pubsub, channel)
        position = await self._history(topic, None)
        async with self._order:
            self._positions.setdefault(topic, _Position(position.epoch, position.offset))
        current = self._pubsub
        if current is not None and current is not pubsub:
            # Redis came back meanwhile, and the new pub/sub subscribed the channels
            # followed when it opened: perhaps without this one. (It would have been
            # heard only from the log, every sync_interval, until the next one.)
            await self._listen_also(current, channel)

    async def _listen_also(self, pubsub: Any, channel: str) -> None:
        """Listen to a channel already followed (in ``_positions``) on ``pubsub`` too.

        It never fails: the topic is followed from here on whatever happens, so that
        the hub, which unsubscribes only what it saw subscribed, never leaves it behind.
        Bounded and shielded; if it does not go through, that pub/sub is made anew,
        and the next one lists the channel with the others.
        """
        listened = False
        with trio.CancelScope(shield=True), trio.move_on_after(2 * self.command_timeout):
            try:
                await self._listen_to(pubsub, channel)
                listened = True
            except BrokerUnavailable:
                pass
        if not listened and self._pubsub is pubsub and self._pubsub_scope is not None:
            self._pubsub_scope.cancel()

    async def _listen_to(self, pubsub: Any, channel: str) -> None:
        with self._guarded():
            await pubsub.subscribe(channel)

    async def unsubscribe(self, topic: str) -> None:
        """Stop listening to the topic's channel."""
        self._positions.pop(topic, None)
        if self._pubsub is not None:
            try:
                with trio.fail_after(self.command_timeout):
                    await self._pubsub.unsubscribe(self._channel(topic))
            except (*_UNREACHABLE, trio.TooSlowError):
                logger.warning("could not unsubscribe from %s: Redis is unreachable", topic)
            except (KeyError, coredis.exceptions.RedisError) as exc:
                # A cluster's sharded pub/sub, its slot just moved: the channel goes
                # with the next pub/sub (one is made anew when the layout changes).
                logger.warning("could not unsubscribe from %s: %r", topic, exc)

    async def _listen(self, pubsub: Any) -> None:
        control = self._control_channel.encode()
        # Not ``async for``: coredis ends that iteration whenever the pub/sub holds no
        # channel for a moment (a cluster's slot that moved takes its channels away).
        while True:
            message = await pubsub.get_message()
            if message is None or message.get("type") != "message":
                continue
            channel, data = message["channel"], message["data"]
            if isinstance(channel, str):
                channel = channel.encode()
            try:
                if channel == control:
                    self._on_control(msgpack.unpackb(data, raw=False))
                else:
                    topic = self._topic_of(channel)
                    if topic is not None:
                        await self._on_live(topic, data)
            except Exception:
                logger.exception("a message from Redis could not be handled")

    def _topic_of(self, channel: bytes) -> str | None:
        """The topic whose channel this is; None for a channel of no topic."""
        prefix = self._channel_prefix
        return channel[len(prefix) :].decode() if channel.startswith(prefix) else None

    async def _on_live(self, topic: str, data: bytes) -> None:
        offset_text, epoch_text, payload = data.split(b"\n", 2)
        offset, epoch = int(offset_text), epoch_text.decode()
        async with self._order:
            position = self._positions.get(topic)
            if position is None:
                return  # no longer subscribed
            if epoch == position.epoch:
                if offset <= position.offset:
                    return  # already delivered (filled from the log)
                if offset > position.offset + 1:
                    await self._fill(topic, position, offset - 1)
            elif offset > 1:
                # The first of a new epoch that pub/sub hands over is not its first (a
                # failover: the pub/sub follows the new primary after it took some):
                # those before it come from the log first, or they were lost here.
                await self._fill(topic, position, offset - 1)
            event, value = _decode_payload(payload)
            self._deliver(topic, position, Publication(topic, offset, epoch, value, event))

    async def _fill(self, topic: str, position: _Position, until: int) -> None:
        """Deliver from the log what pub/sub lost, up to ``until`` (-1: all it holds),
        holding ``_order``.

        If the topic has a new epoch (Redis lost it, and it started again), everything
        of the new epoch is what was lost. If the log no longer reaches back to the
        position (pub/sub lost more than the history keeps, or the node fell that far
        behind), what it does not hold is lost to this node's subscribers: the hub is
        told (``{"kind": "gap"}``) before what follows is delivered, never silently.
        """
        history = await self._history(topic, position.offset, until)
        if history.epoch != position.epoch:
            history = await self._history(topic, 0, until)
            if history.publications:
                logger.warning("%s started a new epoch: its earlier offsets are gone", topic)
        else:
            last = history.offset if until < 0 else min(until, history.offset)
            held = history.publications
            first = held[0].offset if held else last + 1
            if first > position.offset + 1 and last > position.offset:
                self._publications_lost(topic, position, first - 1)
        for publication in history.publications:
            if publication.epoch != position.epoch or publication.offset > position.offset:
                self._deliver(topic, position, publication)
        if history.publications:
            logger.info("filled a gap of %s from the log", topic)

    def _publications_lost(self, topic: str, position: _Position, upto: int) -> None:
        """Publications after the position up to ``upto`` (same epoch) are not in the
        log any more: tell the hub, whose subscribers that had not got them start again
        (docs/operations.md, "When the pub/sub falls behind"), and move past them."""
        logger.warning(
            "%s: publications %d-%d (epoch %s) were lost to this node: its pub/sub fell "
            "further behind than the history keeps",
            topic,
            position.offset + 1,
            upto,
            position.epoch,
        )
        self.gaps += 1
        if self._control is not None:
            self._control(
                {
                    "kind": "gap",
                    "topic": topic,
                    "epoch": position.epoch,
                    "after": position.offset,
                    "upto": upto,
                }
            )
        position.offset = upto

    async def _new_epoch_if_behind(self, topic: str, position: _Position) -> None:
        """After an outage: if Redis holds the topic at an offset below what this node
        delivered, in the same epoch (it lost the last writes), start a new epoch."""
        moved = await self._call(
            _REGRESSED,
            [self._meta(topic), self._log(topic)],
            [position.epoch, position.offset, secrets.token_hex(4)],
        )
        if _int(moved):
            logger.warning(
                "%s: Redis lost publications this node delivered (a failover or a "
                "restart from an older file): the topic starts a new epoch",
                topic,
            )

    def _deliver(self, topic: str, position: _Position, publication: Publication) -> None:
        position.epoch, position.offset = publication.epoch, publication.offset
        if self._receiver is not None:
            self._receiver(publication)

    async def _catch_up(self, topic: str, *, regressed: bool = False) -> None:
        """Deliver from the topic's log what pub/sub lost of it, if it is followed; with
        ``regressed``, first start a new epoch if Redis went back (after an outage)."""
        async with self._order:
            position = self._positions.get(topic)
            if position is not None:
                if regressed:
                    await self._new_epoch_if_behind(topic, position)
                await self._fill(topic, position, -1)

    async def _check_positions(self) -> None:
        """Now and then, fill what pub/sub lost though no later message revealed it.

        Only topics whose position has not moved since the last check (pub/sub
        delivered nothing of them for an interval), and every topic after an outage:
        a node that is behind, still reading what pub/sub holds for it, is not made
        to jump past it to the log's end (what the log no longer holds would be lost).
        """
        unchecked: set[str] = set()  # topics whose offset may have gone back
        seen: dict[str, tuple[str, int]] = {}  # each topic's position at the last check
        while True:
            if await self._pause("positions", self.sync_interval):
                unchecked.update(self._positions)  # after an outage: every one of them
            unchecked.intersection_update(self._positions)  # no longer followed: forgotten
            now = {topic: (p.epoch, p.offset) for topic, p in self._positions.items()}
            # (A topic followed since the last check counts as still: nothing of it
            # had been read then.)
            stalled = [
                t for t, place in now.items() if t in unchecked or seen.get(t, place) == place
            ]
            seen = now
            for topic in stalled:
                try:
                    await self._catch_up(topic, regressed=topic in unchecked)
                    unchecked.discard(topic)
                except BrokerUnavailable:
                    break  # try again next time (the unchecked ones stay so)
                except Exception:
                    logger.exception("checking %s failed", topic)

    # -- presence and control ----------------------------------------------------------

    async def set_presence(self, topic: str, session: str, user: str | None, present: bool) -> None:
        """Record a session joining or leaving a topic, for every node to see."""
        local = self._presence.setdefault(topic, {})
        if present:
            local[session] = user
        else:
            local.pop(session, None)
            if not local:
                del self._presence[topic]
        member = f"{session}\n{user or ''}"
        await self._call(
            _PRESENCE_SET,
            [self._presence_key(topic)],
            [int(self.presence_ttl * 1000), member, "1" if present else "0"],
        )

    async def presence(self, topic: str) -> dict[str, str | None]:
        """The sessions present in the topic on every node, with their users."""
        members = await self._call(_PRESENCE_GET, [self._presence_key(topic)], [])
        present: dict[str, str | None] = {}
        for member in members:
            session, _, user = _str(member).partition("\n")
            present[session] = user or None
        return present

    async def _pause(self, task: str, seconds: float) -> bool:
        """Sleep ``seconds``, or until Redis is back after an outage (then True)."""
        with trio.move_on_after(seconds):
            await self._recovered[task].wait()
        recovered = self._recovered[task].is_set()
        self._recovered[task] = trio.Event()
        return recovered

    def _on_control(self, message: dict[str, Any]) -> None:
        if message.get("kind") == "handed":
            waiter = self._handovers.get(message.get("request", ""))
            if waiter is not None:
                waiter.set()
        elif self._control is not None:
            self._control(message)

    async def _refresh_presence(self) -> None:
        while True:
            await self._pause("presence", self.presence_ttl / 3)
            try:
                lost = await self._refresh_claims(dict(self._owned))
            except BrokerUnavailable:
                continue
            if lost:
                self._no_longer_held(lost)
            for topic, sessions in list(self._presence.items()):
                args: list[Any] = [int(self.presence_ttl * 1000)]
                for session, user in sessions.items():
                    args += [f"{session}\n{user or ''}", "1"]
                try:
                    await self._call(_PRESENCE_SET, [self._presence_key(topic)], args)
                except BrokerUnavailable:
                    break

    async def broadcast(self, message: dict[str, Any]) -> None:
        """Send a control message to every node, this one included."""
        with self._guarded():
            await self._send_control(msgpack.packb(message, use_bin_type=True))

    async def _send_control(self, packed: bytes) -> None:
        await self._redis().publish(self._control_channel, packed)

    # -- sessions: ownership and hand-over ---------------------------------------------

    def _session_key(self, session: str) -> str:
        return self._named("s", session)

    async def _claim(self, owned: dict[str, str]) -> None:
        if not owned:
            return
        ttl = int(self.presence_ttl * 1000)
        keys = [self._session_key(session) for session in owned]
        await self._call(_CLAIM, keys, [ttl, *owned.values()])

    async def _refresh_claims(self, owned: dict[str, str]) -> list[str]:
        """Refresh the holder of each session of ``owned`` (session -> node) that is
        still held so; return the others (:data:`_REFRESH`)."""
        if not owned:
            return []
        sessions = list(owned)
        keys = [key for s in sessions for key in (self._session_key(s), self._parked_key(s))]
        lost = await self._call(_REFRESH, keys, [int(self.presence_ttl * 1000), *owned.values()])
        return [sessions[_int(number) - 1] for number in lost]

    def _no_longer_held(self, sessions: list[str]) -> None:
        """Another node holds these sessions now, or their state is parked for one: this
        node stops claiming them, and the hub lets its copies go (``{"kind": "moved"}``),
        so that it never hands out or claims again a state older than theirs."""
        for session in sessions:
            self._owned.pop(session, None)
        logger.warning(
            "%d session(s) this node held are held elsewhere or parked now: let go", len(sessions)
        )
        if self._control is not None:
            self._control({"kind": "moved", "sessions": sessions})

    async def claim_sessions(self, sessions: list[str], node: str) -> None:
        """Record ``node`` as the holder of the sessions, refreshed until released."""
        for session in sessions:
            self._owned[session] = node
        await self._claim({session: node for session in sessions})

    async def release_session(self, session: str, node: str) -> None:
        """Forget the session's holder, if it is still ``node``."""
        self._owned.pop(session, None)
        await self._call(_RELEASE, [self._session_key(session)], [node])

    def _parked_key(self, session: str) -> str:
        return self._named("parked", session)

    async def find_session(self, session: str) -> tuple[dict[str, Any] | None, str | None]:
        """A parked session's state (taken from Redis), or else the node holding it."""
        parked = self._parked_key(session)
        answer = await self._take(_FIND, [parked, self._session_key(session)], parked)
        if answer[0] is not None:
            return _unpack_state(answer[0]), None
        holder = answer[2] if len(answer) > 2 else None
        return None, None if holder is None else _str(holder)

    async def park_sessions(self, sessions: list[tuple[dict[str, Any], float]], node: str) -> None:
        """Leave the sessions' states for other nodes, and stop holding them.

        One Lua script, so that either all of them are parked or none is.
        """
        keys: list[str] = []
        args: list[Any] = [node]
        for state, ttl in sessions:
            keys += [self._parked_key(state["id"]), self._session_key(state["id"])]
            args += [max(1, int(ttl * 1000)), msgpack.packb(state, use_bin_type=True)]
        await self._call(_PARK, keys, args)
        for state, _ in sessions:
            self._owned.pop(state["id"], None)

    async def request_handover(
        self, session: str, owner: str, node: str, timeout: float
    ) -> dict[str, Any] | None:
        """Ask the owner for the session; wait up to ``timeout`` for its state."""
        request = secrets.token_hex(8)
        answered = self._handovers[request] = trio.Event()
        try:
            message = {"kind": "handover", "session": session, "owner": owner}
            await self.broadcast({**message, "to": node, "request": request})
            with trio.move_on_after(timeout):
                await answered.wait()
            if not answered.is_set():
                return None
            key = self._parked_key(session)
            packed, _ = await self._take(_TAKE, [key], key)
        finally:
            del self._handovers[request]
        return None if packed is None else _unpack_state(packed)

    async def answer_handover(self, request: str, to: str, state: dict[str, Any] | None) -> None:
        """Leave the state for the asking node, parked, and tell it."""
        if state is not None:
            packed = msgpack.packb(state, use_bin_type=True)
            await self._call(_PUT, [self._parked_key(state["id"])], [packed, 30000])
        await self.broadcast({"kind": "handed", "request": request, "to": to})

    def statistics(self) -> dict[str, int]:
        """``topics``: topics this node listens to; ``gaps``: times publications were
        lost to this node because its pub/sub fell behind the history."""
        return {"topics": len(self._positions), "gaps": self.gaps}
