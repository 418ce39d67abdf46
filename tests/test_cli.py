"""``trio-wsgate serve`` settings from flags and the environment."""

from __future__ import annotations

import pytest

from trio_wsgate import Config
from trio_wsgate.cli import build_parser, config_from_args


def config(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_repeatable_topic_patterns_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = config("--allow-subscribe", "room:*", "--allow-subscribe", "news")
    assert settings.allow_subscribe == ("room:*", "news")
    assert settings.allow_publish == ()
    monkeypatch.setenv("WSGATE_ALLOW_PUBLISH", "room:*, chat:* ,")
    monkeypatch.setenv("WSGATE_OPEN_API", "1")
    settings = config()
    assert settings.allow_publish == ("room:*", "chat:*")
    assert settings.open_api is True
    # The command line wins over the environment.
    settings = config("--allow-publish", "x")
    assert settings.allow_publish == ("x",)


def test_token_and_api_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "k" * 40
    monkeypatch.setenv("WSGATE_JWT_SECRET", secret)
    monkeypatch.setenv("WSGATE_API_KEY", "the-api-key-value")
    settings = config("--history-size", "5", "--history-ttl", "off", "--node-id", "n1")
    assert (settings.jwt_secret, settings.api_key) == (secret, "the-api-key-value")
    assert (settings.history_size, settings.history_ttl) == (5, None)
    assert settings.node_id == "n1"
    assert secret not in repr(settings)
    assert "the-api-key-value" not in repr(settings)
    with pytest.raises(ValueError, match="32 bytes"):
        config("--jwt-secret", "short")


def test_secrets_never_show_in_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WSGATE_JWT_SECRET", "j" * 40)
    monkeypatch.setenv("WSGATE_API_KEY", "the-api-key-value")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = capsys.readouterr().out
    assert "j" * 40 not in shown
    assert "the-api-key-value" not in shown


def test_limit_and_transport_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config(
        *("--transport", "asgi", "--max-connections", "100", "--max-connections-per-ip", "5"),
        *("--max-connections-per-user", "3", "--user-limit-policy", "close-oldest"),
        *("--accept-rate", "50", "--rate-limit", "20", "--rate-burst", "40"),
        *("--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example"),
        *("--max-fragments", "16", "--handshake-timeout", "5"),
    )
    assert settings.transport == "asgi"
    assert (settings.max_connections, settings.max_connections_per_ip) == (100, 5)
    assert (settings.max_connections_per_user, settings.user_limit_policy) == (3, "close-oldest")
    assert (settings.accept_rate, settings.rate_limit, settings.rate_burst) == (50, 20, 40)
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert (settings.max_fragments, settings.handshake_timeout) == (16, 5)
    assert config("--rate-limit", "off").rate_limit is None
    monkeypatch.setenv("WSGATE_ALLOWED_ORIGIN", "https://c.example")
    monkeypatch.setenv("WSGATE_COMPRESSION", "yes")
    settings = config()
    assert settings.allowed_origins == ("https://c.example",)
    assert settings.compression is True
    with pytest.raises(ValueError, match="websockets transport"):
        config("--transport", "trio-websocket")  # compression is on from the environment
    with pytest.raises(ValueError, match="at least 1"):
        config("--max-connections-per-user", "-1")
    with pytest.raises(SystemExit):
        config("--transport", "carrier-pigeon")


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        # Each broke every connection, or the node, at run time rather than at start.
        (("--keepalive-idle", "0"), "keepalive_idle"),
        (("--keepalive-count", "0"), "keepalive_count"),
        (("--keepalive-idle", "40000"), "keepalive_idle"),
        (("--hello-timeout", "-1"), "hello_timeout"),
        (("--heartbeat-interval", "-1"), "heartbeat_interval"),
        (("--history-ttl", "-1"), "history_ttl"),
        (("--max-request-head", "10"), "max_request_head"),
        (("--max-headers", "0"), "max_headers"),
        (("--port", "99999"), "port"),
        # An unknown scheme was taken for redis://localhost:6379 (with the password
        # given, against whatever listens there); a port that is not one crashed later.
        (("--redis", "http://:pw@127.0.0.1/"), "starts with one of"),
        (("--redis", "redis://127.0.0.1:abc/0"), "port is a number"),
    ],
)
def test_settings_that_would_break_every_connection_are_refused_at_start(
    argv: tuple[str, ...], why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        config(*argv)


def test_a_bad_environment_value_is_a_usage_error_of_serve_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a hostile review: WSGATE_PORT=abc raised ValueError while the parser
    was built, a traceback for every subcommand (token, client) too."""
    monkeypatch.setenv("WSGATE_PORT", "abc")
    monkeypatch.setenv("WSGATE_WORKERS", "two")
    parser = build_parser()  # no traceback here
    assert parser.parse_args(["token", "ada"]).command == "token"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve"])
    assert "invalid int value: 'abc'" in capsys.readouterr().err
    monkeypatch.delenv("WSGATE_PORT")
    monkeypatch.delenv("WSGATE_WORKERS")
    assert config().port == 8000


@pytest.mark.parametrize(
    ("value", "on"), [("On", True), ("TRUE", True), ("0", False), ("no", False)]
)
def test_switches_from_the_environment_take_any_case(
    monkeypatch: pytest.MonkeyPatch, value: str, on: bool
) -> None:
    monkeypatch.setenv("WSGATE_OPEN_API", value)
    assert build_parser().parse_args(["serve"]).open_api is on
