"""Sequencing and acknowledgement without I/O (docs/protocol.md §4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_wsgate.exceptions import ProtocolError
from trio_wsgate.reliability import Inbox, Outbox, Receipt


def test_outbox_numbers_without_gaps_and_holds_back_beyond_the_window() -> None:
    outbox: Outbox[str] = Outbox(window=2)
    assert [outbox.push(x) for x in "abcd"] == [True, True, False, False]
    assert [seq for seq, _ in outbox.in_flight] == [1, 2]
    assert [seq for seq, _ in outbox.waiting] == [3, 4]
    assert outbox.receive_ack(1) == ["c"]
    assert outbox.receive_ack(1) == []  # repeated acks are harmless
    assert outbox.receive_ack(3) == ["d"]
    assert list(outbox.unacknowledged()) == [(4, "d")]


def test_ack_above_what_was_sent_is_1002() -> None:
    outbox: Outbox[str] = Outbox(window=1)
    outbox.push("a")
    outbox.push("b")  # held back: not sent, so not ackable
    with pytest.raises(ProtocolError) as info:
        outbox.receive_ack(2)
    assert info.value.code == 1002


def test_inbox_accepts_in_order_and_acks_duplicates_again() -> None:
    inbox = Inbox(window=4)
    assert inbox.receive(1) is Receipt.NEW
    assert not inbox.ack_pending  # received, not processed: nothing to ack yet
    inbox.mark_processed(1)
    assert inbox.ack_pending
    assert not inbox.ack_urgent
    assert inbox.take_ack() == 1
    assert not inbox.ack_pending
    assert inbox.receive(1) is Receipt.DUPLICATE
    assert inbox.ack_urgent
    assert inbox.take_ack() == 1


def test_ack_is_urgent_at_half_the_window() -> None:
    inbox = Inbox(window=4)
    for seq in (1, 2):
        inbox.receive(seq)
        inbox.mark_processed(seq)
    assert inbox.ack_urgent


@pytest.mark.parametrize(("seq", "expected"), [(3, "skips ahead"), (0, None)])
def test_gaps_are_1002(seq: int, expected: str | None) -> None:
    inbox = Inbox(window=4)
    inbox.receive(1)
    if expected is None:
        assert inbox.receive(seq) is Receipt.DUPLICATE
        return
    with pytest.raises(ProtocolError, match=expected) as info:
        inbox.receive(seq)
    assert info.value.code == 1002


def test_exceeding_the_window_is_1002() -> None:
    inbox = Inbox(window=2)
    inbox.receive(1)
    inbox.receive(2)
    with pytest.raises(ProtocolError, match="window"):
        inbox.receive(3)
    inbox.mark_processed(2)
    inbox.take_ack()
    assert inbox.receive(3) is Receipt.NEW


@given(
    window=st.integers(1, 8),
    count=st.integers(0, 60),
    acks=st.lists(st.integers(0, 70), max_size=40),
)
def test_any_ack_sequence_keeps_the_window_and_the_order(
    window: int, count: int, acks: list[int]
) -> None:
    """Whatever the peer acks, in-flight never exceeds the window, and what is
    written is every item exactly once, in order."""
    outbox: Outbox[int] = Outbox(window)
    written: list[int] = []
    for item in range(1, count + 1):
        if outbox.push(item):
            written.append(item)
        assert len(outbox.in_flight) <= window
    for ack in acks:
        if ack > outbox.last_sent:
            with pytest.raises(ProtocolError):
                outbox.receive_ack(ack)
            continue
        written.extend(outbox.receive_ack(ack))
        assert len(outbox.in_flight) <= window
    # Ack everything that is left, window by window.
    while outbox.in_flight:
        written.extend(outbox.receive_ack(outbox.last_sent))
    assert written == list(range(1, count + 1))
    assert outbox.next_seq == count + 1


@given(
    window=st.integers(1, 4),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(1, 300)),
            st.tuples(st.just("ack"), st.integers(0, 3)),
            st.tuples(st.just("rewind"), st.integers(1, 4)),
        ),
        min_size=3,
        max_size=40,
    ),
)
def test_the_bytes_kept_are_those_of_what_is_unacknowledged(
    window: int, steps: list[tuple[str, int]]
) -> None:
    """``nbytes`` is what ``measure`` counts of every item not yet acknowledged, through
    pushes, partial and whole acks (with items held back or not) and rewinds."""
    outbox: Outbox[bytes] = Outbox(window, measure=len)
    for kind, value in steps:
        if kind == "push":  # a few at a time, past the window as often as not
            for _ in range(1 + value % 6):
                outbox.push(b"x" * value)
        elif kind == "ack":  # value steps back from the last seq written
            outbox.receive_ack(max(outbox.acked, outbox.last_sent - value))
        else:
            outbox.rewind(outbox.acked, value)
        assert outbox.nbytes == sum(len(item) for _, item in outbox.unacknowledged())


# -- both directions across drops and resumes (docs/protocol.md §4, §5) ---------------------


class Side:
    """One end of a session: its outbox, its inbox and what it delivered."""

    def __init__(self, window: int) -> None:
        self.outbox: Outbox[tuple[int, int]] = Outbox(window)  # items: (seq, payload)
        self.inbox = Inbox(window)
        self.sent: list[int] = []
        self.delivered: list[int] = []
        self.unprocessed: list[tuple[int, int]] = []  # received, handler still running

    def detach(self) -> None:
        self.unprocessed.clear()  # handlers cancelled: not processed
        self.inbox.detach()


class Link:
    """A session between two sides over connections that may drop at any time.

    A wire carries ``(seq, payload, ack)`` for sequenced envelopes and
    ``(None, None, ack)`` for a standalone ack.
    """

    def __init__(self, window: int) -> None:
        self.sides = (Side(window), Side(window))
        self.wires: tuple[list[tuple[int | None, int | None, int | None]], ...] = ([], [])
        self.connected = True
        self.counter = 0

    def send(self, i: int) -> None:
        side = self.sides[i]
        self.counter += 1
        side.sent.append(self.counter)
        inbox, outbox = side.inbox, side.outbox
        goes_now = self.connected and outbox.open
        ack = inbox.take_ack() if goes_now and inbox.ack_pending else None
        seq = outbox.next_seq
        if outbox.push((seq, self.counter)) and self.connected:
            self.wires[i].append((seq, self.counter, ack))

    def deliver(self, i: int) -> None:
        """The next envelope on the wire from side ``i`` arrives at the other side."""
        if not self.wires[i]:
            return
        seq, payload, ack = self.wires[i].pop(0)
        peer = self.sides[1 - i]
        if ack is not None:
            self._on_ack(1 - i, ack)
        if seq is None:
            return
        if peer.inbox.receive(seq) is Receipt.NEW:
            assert payload is not None
            peer.unprocessed.append((seq, payload))

    def _on_ack(self, i: int, ack: int) -> None:
        for seq, payload in self.sides[i].outbox.receive_ack(ack):
            self.wires[i].append((seq, payload, None))

    def process(self, i: int) -> None:
        side = self.sides[i]
        if side.unprocessed:
            seq, payload = side.unprocessed.pop(0)
            side.delivered.append(payload)
            side.inbox.mark_processed(seq)

    def ack(self, i: int) -> None:
        side = self.sides[i]
        if self.connected and side.inbox.ack_pending:
            self.wires[i].append((None, None, side.inbox.take_ack()))

    def drop(self) -> None:
        if self.connected:
            self.connected = False
            self.wires[0].clear()
            self.wires[1].clear()
            for side in self.sides:
                side.detach()

    def resume(self) -> None:
        """hello {resume: ack} from side 0, welcome {ack} from side 1, then resends."""
        if self.connected:
            return
        self.connected = True
        client, server = self.sides
        hello_ack = client.inbox.resume()
        welcome_ack = server.inbox.resume()
        for i, (side, ack) in enumerate(((server, hello_ack), (client, welcome_ack))):
            wire = self.wires[1 - i]
            for seq, payload in side.outbox.rewind(ack):
                wire.append((seq, payload, None))

    def settle(self) -> None:
        self.resume()
        while any(self.wires) or any(s.unprocessed or s.inbox.ack_pending for s in self.sides):
            for i in (0, 1):
                self.deliver(i)
                self.process(i)
                self.ack(i)


ACTIONS = ["send0", "send1", "deliver0", "deliver1", "process0", "process1"]
ACTIONS += ["ack0", "ack1", "drop", "resume"]


@given(
    window=st.integers(1, 6),
    actions=st.lists(st.sampled_from(ACTIONS), max_size=200),
)
def test_any_drops_and_resumes_deliver_each_stream_exactly_once_in_order(
    window: int, actions: list[str]
) -> None:
    link = Link(window)
    for action in actions:
        if action in ("drop", "resume"):
            getattr(link, action)()
        else:
            getattr(link, action[:-1])(int(action[-1]))
        for i, me in enumerate(link.sides):
            peer = link.sides[1 - i]
            # At every step: what was delivered is a prefix of what the peer sent.
            assert me.delivered == peer.sent[: len(me.delivered)]
            assert len(me.outbox.in_flight) <= window
    link.settle()
    for i, me in enumerate(link.sides):
        assert me.delivered == link.sides[1 - i].sent
        assert len(me.outbox) == 0
