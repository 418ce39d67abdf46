"""What each close code means for the session: one table (docs/protocol.md §8)."""

from __future__ import annotations

import pytest

from trio_wsgate.protocol.closecodes import CloseCode, CloseReason, ends_session, reason_for


@pytest.mark.parametrize(
    ("code", "reason", "ends"),
    [
        (CloseCode.PROTOCOL_ERROR, CloseReason.PROTOCOL_ERROR, True),
        (CloseCode.UNSUPPORTED_DATA, CloseReason.PROTOCOL_ERROR, True),
        (CloseCode.INVALID_DATA, CloseReason.PROTOCOL_ERROR, True),
        (CloseCode.MESSAGE_TOO_BIG, CloseReason.PROTOCOL_ERROR, True),
        (CloseCode.POLICY_VIOLATION, CloseReason.POLICY, True),
        (CloseCode.UNAUTHORIZED, CloseReason.UNAUTHORIZED, True),
        (CloseCode.KICKED, CloseReason.KICK, True),
        (CloseCode.INTERNAL_ERROR, CloseReason.INTERNAL_ERROR, False),
        (CloseCode.GOING_AWAY, CloseReason.DRAIN, False),
        (CloseCode.SLOW_CONSUMER, CloseReason.SLOW_CONSUMER, False),
        (CloseCode.TAKEN_OVER, CloseReason.TAKE_OVER, False),
        (CloseCode.RATE_LIMITED, CloseReason.RATE_LIMIT, False),
        (CloseCode.NORMAL, CloseReason.SERVER_CLOSE, False),
        (4321, CloseReason.SERVER_CLOSE, False),  # an application's own code
    ],
)
def test_each_code_has_its_reason_and_says_whether_the_session_ends(
    code: int, reason: CloseReason, ends: bool
) -> None:
    assert reason_for(code) is reason
    assert ends_session(reason) is ends


def test_the_ends_of_a_connection_that_are_not_codes() -> None:
    assert ends_session(CloseReason.BYE)
    for kept in (CloseReason.RESET, CloseReason.EOF, CloseReason.HEARTBEAT_TIMEOUT, None):
        assert not ends_session(kept)
    assert reason_for(4321, CloseReason.PROTOCOL_ERROR) is CloseReason.PROTOCOL_ERROR
