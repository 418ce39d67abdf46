"""Several Redis instances as one broker: topics and sessions sharded by a consistent hash.

``--redis URL`` given several times (docs/operations.md, "Past one Redis"). Each
instance is a whole :class:`~trio_wsgate.brokers.redis.RedisBroker` of its own; this
broker only says which one serves what:

* a **topic** (its offset and epoch, its history Stream, its pub/sub channel and its
  presence) lives on the shard of ``jump_hash(topic)``: the publish script still
  touches one instance, so offsets stay consecutive and gap-free;
* a **session** (the key naming its node, its parked state, its hand-over) lives on
  the shard of ``jump_hash(session id)``;
* a **control message** (a kick) goes out on the shard of the user or session it is
  about; every node listens to the control channel of every shard.

Jump consistent hash (Lamping and Veach, 2014): no table, an even spread, and when a
shard is added only the keys that must move to it move. Every node must be given the
same instances in the same order.

One instance down degrades only what lives on it: its topics and sessions answer
``unavailable`` while the others go on; ``healthy`` is False while any is down, and
:meth:`health` says which (``wsgate_broker_up{shard}``, ``/readyz``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import trio

from ..exceptions import BrokerUnavailable
from .base import Broker, ControlReceiver, History, PartlyParked, Publication, Receiver

__all__ = ["ShardedBroker", "jump_hash", "shard_key", "shard_name"]

# Hand-overs asked for whose answer this node may still give: request -> shard.
_MAX_REQUESTS = 10_000

_T = TypeVar("_T")


def jump_hash(key: int, buckets: int) -> int:
    """The bucket of a 64-bit ``key`` among ``buckets`` (Lamping and Veach, 2014)."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    bucket, jump = -1, 0
    while jump < buckets:
        bucket = jump
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        jump = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_key(name: str) -> int:
    """The 64-bit key of a topic or session id: the same on every node and run."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def shard_name(url: str) -> str:
    """What a shard is called in metrics and ``/readyz``: where it is, never its
    credentials (``host:port``, with ``/db`` past 0; a socket's path; a Sentinel
    service). Two URLs of one name are one Redis."""
    scheme, _, rest = url.partition("://")
    rest = rest.rpartition("@")[2]  # the credentials, whatever characters they hold
    rest, _, query = rest.partition("?")
    db = next((v for k, _, v in (p.partition("=") for p in query.split("&")) if k == "db"), "")
    if scheme == "unix":
        name = rest
    else:
        location, _, path = rest.partition("/")
        if scheme == "redis+sentinel":
            return f"sentinel:{path}" + (f"/{db}" if db not in ("", "0") else "")
        if scheme == "redis+cluster":
            return f"cluster:{location.partition(',')[0]}"
        db = db or path or "0"
        if location.startswith("["):  # [v6] or [v6]:port
            has_port = location.rpartition("]")[2].startswith(":")
        else:
            has_port = ":" in location
        name = location if has_port else f"{location or 'localhost'}:6379"
    return name + (f"/{db}" if db not in ("", "0") else "")


class ShardedBroker:
    """Topics and sessions spread over several brokers by a consistent hash.

    Args:
        shards: the brokers, in the order every node is given them.
        names: what each is called (``wsgate_broker_up{shard}``).
    """

    shared = True

    def __init__(self, shards: Sequence[Broker], names: Sequence[str]) -> None:
        if len(shards) < 2 or len(names) != len(shards):
            raise ValueError("a sharded broker needs two shards or more, each named")
        if len(set(names)) != len(names):
            raise ValueError(f"the same Redis given twice: {', '.join(names)}")
        self.shards = list(shards)
        self.names = list(names)
        self._control: ControlReceiver | None = None
        self._requests: OrderedDict[str, Broker] = OrderedDict()

    def __repr__(self) -> str:
        return f"<ShardedBroker {len(self.shards)} shards>"

    @property
    def healthy(self) -> bool:
        """False while any shard cannot be reached."""
        return all(shard.healthy for shard in self.shards)

    def health(self) -> dict[str, bool]:
        """Whether each shard can be reached, by name."""
        return {name: shard.healthy for name, shard in zip(self.names, self.shards, strict=True)}

    def _index(self, name: str) -> int:
        return jump_hash(shard_key(name), len(self.shards))

    def _of(self, name: str) -> Broker:
        return self.shards[self._index(name)]

    def _group(self, items: Iterable[_T], name_of: Callable[[_T], str]) -> dict[int, list[_T]]:
        groups: dict[int, list[_T]] = {}
        for item in items:
            groups.setdefault(self._index(name_of(item)), []).append(item)
        return groups

    # -- life -------------------------------------------------------------------------

    def bind(self, receiver: Receiver, control: ControlReceiver | None = None) -> None:
        """Set the node's receivers; every shard delivers to them."""
        self._control = control
        for shard in self.shards:
            shard.bind(receiver, self._control_of(shard))

    def _control_of(self, shard: Broker) -> ControlReceiver:
        def receive(message: dict[str, Any]) -> None:
            if message.get("kind") == "handover" and isinstance(message.get("request"), str):
                # The answer goes back through the shard the request came on.
                self._requests[message["request"]] = shard
                while len(self._requests) > _MAX_REQUESTS:
                    self._requests.popitem(last=False)
            if self._control is not None:
                self._control(message)

        return receive

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every shard, until cancelled; started once each has."""
        async with trio.open_nursery() as nursery:
            for shard in self.shards:
                await nursery.start(shard.run)
            task_status.started()

    # -- topics -----------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        data: Any,
        event: str | None = None,
        *,
        encoded: dict[str, tuple[bytes, int]] | None = None,
    ) -> Publication:
        """Publish on the topic's shard."""
        return await self._of(topic).publish(topic, data, event, encoded=encoded)

    async def subscribe(self, topic: str) -> None:
        """Listen to the topic on its shard."""
        await self._of(topic).subscribe(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stop listening to the topic."""
        await self._of(topic).unsubscribe(topic)

    async def history(self, topic: str, since: int | None = None) -> History:
        """The topic's history, from its shard."""
        return await self._of(topic).history(topic, since)

    async def set_presence(self, topic: str, session: str, user: str | None, present: bool) -> None:
        """Presence lives with its topic."""
        await self._of(topic).set_presence(topic, session, user, present)

    async def presence(self, topic: str) -> dict[str, str | None]:
        """The topic's presence, from its shard."""
        return await self._of(topic).presence(topic)

    async def broadcast(self, message: dict[str, Any]) -> None:
        """On the shard of the user or session the message is about (every node
        listens to every shard's control channel, so each gets it once)."""
        about = message.get("user") or message.get("session") or ""
        await self._of(str(about)).broadcast(message)

    # -- sessions ---------------------------------------------------------------------

    async def claim_sessions(self, sessions: list[str], node: str) -> None:
        """Record ``node`` as the holder, on each session's shard: every shard is
        asked (each remembers its own and claims them again once it is back), and
        the first refusal is raised after."""
        refused: BrokerUnavailable | None = None
        for index, group in self._group(sessions, str).items():
            try:
                await self.shards[index].claim_sessions(group, node)
            except BrokerUnavailable as exc:
                refused = refused or exc
        if refused is not None:
            raise refused

    async def release_session(self, session: str, node: str) -> None:
        """Forget the session's holder, on its shard."""
        await self._of(session).release_session(session, node)

    async def find_session(self, session: str) -> tuple[dict[str, Any] | None, str | None]:
        """Where the session is, from its shard."""
        return await self._of(session).find_session(session)

    async def park_sessions(self, sessions: list[tuple[dict[str, Any], float]], node: str) -> None:
        """Park each session on its shard (all of one shard at once, or none of them).

        Raises:
            BrokerUnavailable: no shard parked any.
            PartlyParked: some shards did: the sessions it names are parked.
        """
        parked: set[str] = set()
        refused: BrokerUnavailable | None = None
        for index, group in self._group(sessions, lambda item: item[0]["id"]).items():
            try:
                await self.shards[index].park_sessions(group, node)
            except BrokerUnavailable as exc:
                refused = refused or exc
            else:
                parked.update(state["id"] for state, _ in group)
        if refused is not None:
            if parked:
                raise PartlyParked(str(refused), parked)
            raise refused

    async def request_handover(
        self, session: str, owner: str, node: str, timeout: float
    ) -> dict[str, Any] | None:
        """Ask the owner for the session through the session's shard."""
        return await self._of(session).request_handover(session, owner, node, timeout)

    async def answer_handover(self, request: str, to: str, state: dict[str, Any] | None) -> None:
        """Answer through the shard the request came on."""
        shard = self._requests.pop(request, None)
        if shard is None and state is not None:
            shard = self._of(str(state.get("id", "")))
        if shard is None:
            return  # a request this node never saw: nobody waits for this answer
        await shard.answer_handover(request, to, state)

    def statistics(self) -> dict[str, int]:
        """``topics``: the topics this node listens to, on every shard; ``gaps``: times
        publications were lost to this node (RedisBroker.statistics)."""
        return {
            name: sum(shard.statistics().get(name, 0) for shard in self.shards)
            for name in ("topics", "gaps")
        }
