"""The metrics' labels stay bounded whatever clients send."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing
from trio.testing import MockClock

from trio_wsgate import Server
from trio_wsgate.metrics import CLOSE_CODE_LABELS, Metrics
from trio_wsgate.protocol import CloseCode
from trio_wsgate.testing import open_memory_connection

from .test_resume import running


def close_series(server: Server) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["code"], sample.labels["reason"]): sample.value
        for metric in server.metrics.registry.collect()
        if metric.name == "wsgate_closes"
        for sample in metric.samples
        if sample.name == "wsgate_closes_total"
    }


def test_close_codes_map_to_a_bounded_label_set() -> None:
    labels = {Metrics.close_code_label(code) for code in range(-1, 70_000)}
    assert labels == {str(code) for code in CLOSE_CODE_LABELS} | {"other"}
    assert len(labels) == 27
    # Every code this server sends is named.
    assert {Metrics.close_code_label(code) for code in CloseCode} == {
        str(int(code)) for code in CloseCode
    }
    for code in (3000, 3999, 4010, 4100, 4999, 999, 1016, 5000, "x", "", None, "1e3"):
        assert Metrics.close_code_label(code) == "other", code
    assert Metrics.close_code_label("1000") == Metrics.close_code_label(1000) == "1000"
    assert Metrics.close_code_label(" 4009 ") == "4009"


async def test_client_close_codes_add_at_most_one_series(
    autojump_clock: MockClock, make_server: Callable[..., Server]
) -> None:
    """Issue 18, case 11: a client's own close code was a label, a series per code."""
    server = make_server()
    codes = [*range(3000, 4000), 4010, 4100, 4999]
    async with running(server) as nursery:
        for code in codes:
            async with open_memory_connection(server, nursery) as client:
                await client.hello()
                await client.close(code, "mine")
        async with open_memory_connection(server, nursery) as client:
            await client.hello()
            await client.close(1000)
        await trio.testing.wait_all_tasks_blocked()
        assert not server.connections
    series = close_series(server)
    assert series == {("other", "clean"): len(codes), ("1000", "clean"): 1}
