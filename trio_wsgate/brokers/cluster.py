"""The Redis Cluster broker: :class:`~trio_wsgate.brokers.redis.RedisBroker` over a
Redis Cluster, with sharded pub/sub (docs/operations.md, "A Redis Cluster").

What differs from one Redis:

* **Hash tags.** Every key of a topic (meta, log, presence) and its channel carry the
  same hash tag, so each of the topic's scripts touches one slot, as Redis Cluster
  requires, and the offsets stay gap-free. So do a session's keys (holder, parked). The
  tag is a hash of the name, not the name itself: a name may hold ``{`` or ``}``, and
  a client picks its topics and its resume's session id.
* **Sharded pub/sub.** A topic's publications go out with ``SPUBLISH`` from the
  publishing script, to the nodes subscribed with ``SSUBSCRIBE`` on the primary that
  holds the topic's slot only, not to every node of the cluster as ``PUBLISH`` does.
  Control messages (kicks, hand-overs) go on one shard channel too.
* **A failover starts a new epoch**, as through Sentinel: a replica promoted in the
  place of the primary that numbered a topic starts a new epoch at its first
  publication (it knows that primary's replication id as its ``master_replid2``). A
  primary that a topic's keys migrated to, intact, goes on with its numbering.
* **Slots move.** When a slot moves to another primary (resharding, a failover), Redis
  tells its subscribers ``sunsubscribe``, and coredis forgets the channel; it does not
  subscribe again, and its pub/sub holds connections only to the primaries it knew when
  it started. So a watchdog compares the channels wanted with those held, every
  ``watch_interval``: it refreshes the moved slots (a keyed command, which follows the
  ``MOVED`` answer), subscribes again, and, if that fails (a primary the pub/sub has no
  connection to), makes a new pub/sub. What was published meanwhile is filled from the
  topic's log by offset, as after any outage.
* **Several sessions at once** (the presence refresh, parking at drain): one script per
  slot, since a script may not span slots. Parking is all-or-nothing per slot; when
  some slots took their sessions and others did not, :class:`PartlyParked` says which.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import coredis
import trio
from coredis._utils import hash_slot  # the slot coredis routes a key by
from coredis.connection import TCPLocation

from ..exceptions import BrokerUnavailable
from .base import PartlyParked
from .redis import Client, RedisBroker, host_port, split_url

__all__ = ["ClusterBroker", "ClusterUrl"]

logger = logging.getLogger("trio_wsgate.redis")


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """A ``redis+cluster://`` URL, parsed: the credentials are not shown."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> ClusterUrl | None:
        """The parts of ``redis+cluster://[user:password@]host[:port][,host[:port]...]``
        (credentials percent-decoded); None for another URL.

        Raises:
            ValueError: it names no node, or a bad one.
        """
        parts = split_url(url, "redis+cluster")
        if parts is None:
            return None
        username, password, rest = parts
        hosts, _, options = rest.partition("/")
        if options.strip("/"):
            # A database or options (TLS...) it would not honour: say so, not ignore it.
            raise ValueError("redis+cluster:// takes host:port[,host:port...] and nothing else")
        nodes = tuple(host_port(host, 6379) for host in hosts.split(",") if host)
        if not nodes:
            raise ValueError("redis+cluster:// needs host:port[,host:port...]")
        return cls(nodes, username, password)


#: Slots parked at once at drain (a script each: a script may not span slots).
_PARKING_AT_ONCE = 32


def _tag(name: str) -> str:
    """The hash tag of a topic's or a session's keys: a hash of the name, so that no
    ``{`` or ``}`` in the name can make two of its keys land in different slots."""
    return "{" + hashlib.blake2b(name.encode(), digest_size=8).hexdigest() + "}"


class ClusterBroker(RedisBroker):
    """Topics, history and presence in a Redis Cluster, shared by every node that uses it.

    Takes :class:`RedisBroker`'s arguments; ``url`` is
    ``redis+cluster://[user:password@]host:port[,host:port...]``, naming any of the
    cluster's nodes (more than one, so that the node starts while one is down).

    Args:
        watch_interval: seconds between checks that every channel wanted is held.
    """

    def __init__(self, url: str, *, watch_interval: float = 1.0, **settings: Any) -> None:
        super().__init__(url, **settings)
        # A replica promoted in the place of the primary that numbered a topic (it may
        # lack the last publications) starts a new epoch at its first publication,
        # rather than numbering again offsets that nodes already delivered; a primary
        # the topic's keys migrated to (intact) goes on with its numbering.
        self._by_primary = "2"
        self._publish_script = self._sharded_publish_script  # on the topic's shard channel
        where = ClusterUrl.parse(url)
        if where is None:
            raise ValueError("a ClusterBroker needs a redis+cluster:// URL")
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError("in a Redis Cluster the key prefix may not hold { or }")
        self._where = where
        self.watch_interval = watch_interval
        # The channel of each topic followed, as the watchdog last saw them: a channel's
        # name holds a hash of the topic's (_tag), made once rather than every check.
        self._channel_names: dict[str, bytes] = {}

    # After a failed ping, a new health client: the old one's layout may still hold a
    # primary that is gone (coredis refreshes it only after many errors), and its
    # pings, sent to every primary it knows, would fail on for good.
    _renew_health_client = True

    def __repr__(self) -> str:  # the URL may hold a password
        return f"<ClusterBroker prefix={self.prefix!r}>"

    # -- keys: each name's keys in one slot ---------------------------------------------

    def _named(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{_tag(name)}{name}"

    def _topic_of(self, channel: bytes) -> str | None:
        if not channel.startswith(self._channel_prefix):
            return None
        # After the prefix: the 18 characters of the tag, then the topic.
        return channel[len(self._channel_prefix) + 18 :].decode()

    # -- the cluster's clients and sharded pub/sub ---------------------------------------

    @contextlib.asynccontextmanager
    async def _new_client(self, max_connections: int) -> AsyncIterator[Client]:
        where = self._where
        client: coredis.RedisCluster[bytes] = coredis.RedisCluster(
            startup_nodes=[TCPLocation(host, port) for host, port in where.nodes],
            decode_responses=False,
            username=where.username,
            password=where.password,
            max_connections=max_connections,
            max_connections_per_node=True,
        )
        async with client:
            yield client

    def _open_pubsub(self, listener: Client, channels: list[str]) -> Any:
        assert isinstance(listener, coredis.RedisCluster)
        return listener.sharded_pubsub(
            channels=channels, retry_policy=None, subscription_timeout=self.command_timeout
        )

    async def _send_control(self, packed: bytes) -> None:
        client = self._redis()
        assert isinstance(client, coredis.RedisCluster)
        await client.spublish(self._control_channel, packed)

    async def _listen(self, pubsub: Any) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_channels, pubsub)
            await super()._listen(pubsub)

    async def _watch_channels(self, pubsub: Any) -> None:
        """Subscribe again to what a moved slot took away (see the module's docstring)."""
        while True:
            await trio.sleep(self.watch_interval)
            held = {c if isinstance(c, bytes) else c.encode() for c in pubsub.channels}
            missing = sorted(channel.decode() for channel in self._wanted_channels() - held)
            if not missing:
                continue
            logger.warning(
                "%d channel(s) no longer held (their slot moved): subscribing again", len(missing)
            )
            try:
                await self._follow_slots(missing)
                with trio.fail_after(self.command_timeout):
                    await pubsub.subscribe(*missing)
            except (
                BrokerUnavailable,
                trio.TooSlowError,
                TimeoutError,
                KeyError,
                coredis.exceptions.RedisError,
            ):
                # A primary this pub/sub has no connection to, or no answer: a new
                # pub/sub, which subscribes to every channel wanted on the layout as
                # it is now, and catches up from the logs.
                logger.warning("making a new sharded pub/sub for the cluster's new layout")
                if self._pubsub_scope is not None:
                    self._pubsub_scope.cancel()
                return
            # A topic unsubscribed from meanwhile is not held on for nothing.
            wanted = self._wanted_channels()
            unwanted = [channel for channel in missing if channel.encode() not in wanted]
            if unwanted:
                with contextlib.suppress(trio.TooSlowError, coredis.exceptions.RedisError):
                    with trio.fail_after(self.command_timeout):
                        await pubsub.unsubscribe(*unwanted)
            # What was published on those topics meanwhile, from their logs.
            for channel in missing:
                topic = self._topic_of(channel.encode())
                if topic is not None:
                    with contextlib.suppress(BrokerUnavailable):
                        await self._catch_up(topic)

    def _wanted_channels(self) -> set[bytes]:
        """The channels this node must hold: control messages', and each followed
        topic's. Every ``watch_interval``, for as many topics as the node follows (each
        user's own topic among them): the names are kept from one check to the next, so
        that a check costs a lookup per topic, not a hash."""
        names, positions = self._channel_names, self._positions
        wanted = {self._control_channel.encode()}
        for topic in positions:
            channel = names.get(topic)
            if channel is None:
                channel = names[topic] = self._channel(topic).encode()
            wanted.add(channel)
        if len(names) > len(positions):  # every followed topic is in names: the rest go
            for topic in [topic for topic in names if topic not in positions]:
                del names[topic]
        return wanted

    async def _follow_slots(self, channels: list[str]) -> None:
        """Tell the pub/sub's client where the channels' slots are now: a keyed command
        to each slot, whose ``MOVED`` answer, if any, moves it in that client's layout
        (the one ``SSUBSCRIBE`` is routed by). Bounded as every command is.

        Raises:
            BrokerUnavailable: the cluster could not be asked.
        """
        client = self._listener
        if client is None:
            raise BrokerUnavailable("Redis is unreachable")
        seen: set[int] = set()
        with self._guarded():
            for channel in channels:
                slot = hash_slot(channel.encode())
                if slot not in seen:
                    seen.add(slot)
                    await client.exists([channel])  # a channel's name hashes as a key does

    async def _listen_to(self, pubsub: Any, channel: str) -> None:
        """``SSUBSCRIBE``, routed by the pub/sub's layout, once a keyed command has
        brought the channel's slot up to date in it (one round trip, for the node's
        first subscriber of a topic only). If the slot's primary is one the pub/sub has
        no connection to, or it does not answer, the pub/sub is made anew, and the
        caller told to try again."""
        scope = self._pubsub_scope  # the pub/sub's, not a newer one's
        await self._follow_slots([channel])
        try:
            with trio.fail_after(self.command_timeout):
                await pubsub.subscribe(channel)
        except (trio.TooSlowError, TimeoutError, KeyError, coredis.exceptions.RedisError) as exc:
            logger.warning("could not subscribe on the cluster: making a new sharded pub/sub")
            if scope is not None and self._pubsub is pubsub:
                scope.cancel()
            raise BrokerUnavailable("the cluster's layout changed: try again") from exc

    # -- several sessions: one script per slot -----------------------------------------

    async def _claim(self, owned: dict[str, str]) -> None:
        if not owned:
            return
        ttl = int(self.presence_ttl * 1000)
        with self._guarded():
            async with self._redis().pipeline(transaction=False) as pipe:
                for session, node in owned.items():
                    pipe.set(self._session_key(session), node, px=ttl)

    async def _refresh_claims(self, owned: dict[str, str]) -> list[str]:
        """One script per slot (a session's holder and parked keys share its slot); a
        slot that does not answer keeps its sessions claimed until the next refresh."""
        by_slot: dict[int, dict[str, str]] = {}
        for session, node in owned.items():
            slot = hash_slot(self._session_key(session).encode())
            by_slot.setdefault(slot, {})[session] = node
        lost: list[str] = []
        limit = trio.CapacityLimiter(_PARKING_AT_ONCE)

        async def refresh(group: dict[str, str]) -> None:
            async with limit:
                with contextlib.suppress(BrokerUnavailable):
                    lost.extend(await super(ClusterBroker, self)._refresh_claims(group))

        async with trio.open_nursery() as nursery:
            for group in by_slot.values():
                nursery.start_soon(refresh, group)
        return lost

    async def park_sessions(self, sessions: list[tuple[dict[str, Any], float]], node: str) -> None:
        """Park each slot's sessions with one script (all of them, or none).

        Raises:
            BrokerUnavailable: no slot took any.
            PartlyParked: some did: the sessions it names are parked.
        """
        by_slot: dict[int, list[tuple[dict[str, Any], float]]] = {}
        for item in sessions:
            slot = hash_slot(self._parked_key(item[0]["id"]).encode())
            by_slot.setdefault(slot, []).append(item)
        parked: set[str] = set()
        refused: list[BrokerUnavailable] = []
        limit = trio.CapacityLimiter(_PARKING_AT_ONCE)

        async def park(group: list[tuple[dict[str, Any], float]]) -> None:
            async with limit:
                try:
                    await super(ClusterBroker, self).park_sessions(group, node)
                except BrokerUnavailable as exc:
                    refused.append(exc)
                else:
                    parked.update(state["id"] for state, _ in group)

        async with trio.open_nursery() as nursery:
            for group in by_slot.values():
                nursery.start_soon(park, group)
        if refused:
            if parked:
                raise PartlyParked(str(refused[0]), parked)
            raise refused[0]
