"""``trio-wsgate client``: poke a running gateway from a terminal or a script."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import trio

from .client import Backoff, Client, ClientState, open_client
from .exceptions import ClientClosed, HandlerError, SessionLost

__all__ = ["run_client"]


def _parse_data(text: str | None) -> Any:
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word is sent as a string


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=repr)


def run_client(args: argparse.Namespace) -> int:
    """Run the ``client`` sub-command; return the exit status.

    0 when everything was answered, 1 for an error reply, 2 when the client stopped
    (refused, or out of connection attempts).
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {
        "token": args.token,
        "encoding": args.encoding,
        "backoff": Backoff(max_attempts=args.max_attempts),
    }
    if args.event is not None:
        return trio.run(_one_request, args.url, args.event, _parse_data(args.data), options)
    return trio.run(_interactive, args.url, options)


async def _one_request(url: str, event: str, data: Any, options: dict[str, Any]) -> int:
    async with open_client(url, **options) as client:
        try:
            reply = await client.request(event, data)
        except HandlerError as exc:
            print(f"error {exc.code}: {exc.reason}", file=sys.stderr)
            return 1
        except (ClientClosed, SessionLost) as exc:
            print(f"no answer: {exc}", file=sys.stderr)
            return 2
        print(_show(reply))
        return 0


async def _interactive(url: str, options: dict[str, Any]) -> int:
    async with open_client(url, **options) as client, trio.open_nursery() as printers:
        printers.start_soon(_print_states, client)
        printers.start_soon(_print_messages, client)
        async with trio.open_nursery() as requests:  # at end of input, wait for answers
            status = await _read_commands(client, requests)
        printers.cancel_scope.cancel()
        return status


async def _read_commands(client: Client, nursery: trio.Nursery) -> int:
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return 0 if not client.closed else 2
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        command, _, rest = line.partition(" ")
        try:
            if command == "!send":
                event, _, rest = rest.strip().partition(" ")
                await client.send(event, _parse_data(rest))
            elif command in _TOPIC_COMMANDS:
                topic, _, rest = rest.strip().partition(" ")
                nursery.start_soon(_topic_command, client, command, topic, _parse_data(rest))
            else:
                nursery.start_soon(_request, client, command, _parse_data(rest))
        except ClientClosed as exc:
            print(f"! {exc}", file=sys.stderr)
            return 2


_TOPIC_COMMANDS = ("!sub", "!unsub", "!pub")


async def _topic_command(client: Client, command: str, topic: str, data: Any) -> None:
    try:
        if command == "!sub":
            answer: Any = await client.subscribe(topic)
        elif command == "!unsub":
            await client.unsubscribe(topic)
            answer = None
        else:
            answer = await client.publish(topic, data)
        print(f"< {command[1:]} {topic}: {_show(answer)}", flush=True)
    except HandlerError as exc:
        print(f"< error {command[1:]} {topic}: {exc.code}: {exc.reason}", flush=True)
    except (ClientClosed, SessionLost) as exc:
        print(f"! {command[1:]} {topic}: {exc}", file=sys.stderr, flush=True)


async def _request(client: Client, event: str, data: Any) -> None:
    try:
        print(f"< reply {event}: {_show(await client.request(event, data))}", flush=True)
    except HandlerError as exc:
        print(f"< error {event}: {exc.code}: {exc.reason}", flush=True)
    except (ClientClosed, SessionLost) as exc:
        print(f"! {event}: {exc}", file=sys.stderr, flush=True)


async def _print_messages(client: Client) -> None:
    try:
        async for message in client.messages():
            where = f" [{message.topic}#{message.offset}]" if message.topic else ""
            print(f"< msg {message.event}{where}: {_show(message.data)}", flush=True)
    except ClientClosed as exc:
        print(f"! {exc}", file=sys.stderr, flush=True)


async def _print_states(client: Client) -> None:
    async for state in client.state_changes():
        extra = f" session {client.session}" if state is not ClientState.CONNECTING else ""
        print(f"* {state.value}{extra}", file=sys.stderr, flush=True)
