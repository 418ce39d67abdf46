"""Sequencing and acknowledgement without I/O (PROTOCOL.md §4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_wsgate.exceptions import ProtocolError
from trio_wsgate.session import Inbox, Outbox, Receipt


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
