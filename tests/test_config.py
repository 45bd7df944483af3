"""Configuration: defaults, the SPEC example, and one error per way a key can be wrong."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from relay.config import (
    API_KEY_ENV,
    Config,
    ConfigError,
    cartrack_url,
    load_config,
    parse_config,
)

TOKEN = "1234-5678-9097-8466"
KEY = "cartrack-secret-key-0123456789"
VIN = "WDB9634031L123456"

# SPEC §5, verbatim (only the commented-out url line is left out).
SPEC_EXAMPLE = """\
[server]
host = "0.0.0.0"
port = 8080
path = "/webhooks/frotcom"
max_body_bytes = 16777216
shutdown_timeout_seconds = 10

[frotcom]
tokens = ["1234-5678-9097-8466"]   # accepted Authorization values (rotation: several)
max_future_seconds = 86400         # positions further ahead than this are quarantined

[cartrack]
region = "eu"                      # af | as | eu
api_key = "change-me"              # or api_key_file, or env CARTRACK_RELAY_API_KEY
provider = "frotcom"
timeout_seconds = 10
concurrency = 32

[outbox]
path = "outbox.sqlite3"
keep_sent_days = 7

[retry]
initial_seconds = 1.0
max_seconds = 300.0

[vehicles]                         # Frotcom VehicleID = VIN
"9876543" = "WDB9634031L123456"
"""


def minimal() -> dict[str, Any]:
    return {"frotcom": {"tokens": [TOKEN]}, "cartrack": {"api_key": KEY}}


def with_(section: str, key: str, value: Any) -> dict[str, Any]:
    data = minimal()
    if key == "api_key_file":  # the two key sources exclude each other
        del data["cartrack"]["api_key"]
    data.setdefault(section, {})[key] = value
    return data


def error_of(data: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={} if env is None else env, cwd=tmp_path)
    return str(info.value)


def test_defaults(tmp_path: Path) -> None:
    config = parse_config(minimal(), env={}, cwd=tmp_path)
    assert (config.server.host, config.server.port, config.server.path) == (
        "0.0.0.0",
        8080,
        "/webhooks/frotcom",
    )
    assert config.server.max_body_bytes == 16 * 1024 * 1024
    assert config.server.shutdown_timeout_seconds == 10.0
    assert config.frotcom.tokens == (TOKEN,)
    assert config.frotcom.max_future_seconds == 86400.0
    assert config.cartrack.region == "eu"
    assert config.cartrack.url == cartrack_url("eu")
    assert config.cartrack.url == "https://eu-webhooks-prod.cartrack.com/api/data/ingest/telematics"
    assert (config.cartrack.provider, config.cartrack.timeout_seconds) == ("frotcom", 10.0)
    assert config.cartrack.concurrency == 32
    assert config.outbox.path == tmp_path / "outbox.sqlite3"
    assert config.outbox.keep_sent_days == 7.0
    assert (config.retry.initial_seconds, config.retry.max_seconds) == (1.0, 300.0)
    assert dict(config.vehicles) == {}


def test_spec_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(SPEC_EXAMPLE)
    config = load_config(path, env={}, cwd=tmp_path)
    assert config.source == path.resolve()
    assert config.cartrack.api_key == "change-me"
    assert config.cartrack.url == cartrack_url("eu")
    assert dict(config.vehicles) == {"9876543": VIN}
    assert config.frotcom.tokens == (TOKEN,)
    # Integers in the TOML become the float fields they configure.
    assert config.server.shutdown_timeout_seconds == 10.0
    assert isinstance(config.cartrack.timeout_seconds, float)


@pytest.mark.parametrize("region", ["af", "as", "eu"])
def test_region_picks_the_cartrack_host(tmp_path: Path, region: str) -> None:
    config = parse_config(with_("cartrack", "region", region), env={}, cwd=tmp_path)
    assert config.cartrack.url == (
        f"https://{region}-webhooks-prod.cartrack.com/api/data/ingest/telematics"
    )


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000/api/data/ingest/telematics", "https://example.com"]
)
def test_url_overrides_region(tmp_path: Path, url: str) -> None:
    data = with_("cartrack", "url", url)
    data["cartrack"]["region"] = "af"
    assert parse_config(data, env={}, cwd=tmp_path).cartrack.url == url


INT_KEYS = [
    ("server", "port"),
    ("server", "max_body_bytes"),
    ("cartrack", "concurrency"),
]
NUM_KEYS = [
    ("server", "shutdown_timeout_seconds"),
    ("frotcom", "max_future_seconds"),
    ("cartrack", "timeout_seconds"),
    ("outbox", "keep_sent_days"),
    ("retry", "initial_seconds"),
    ("retry", "max_seconds"),
]
STR_KEYS = [
    ("server", "host"),
    ("server", "path"),
    ("cartrack", "region"),
    ("cartrack", "url"),
    ("cartrack", "api_key"),
    ("cartrack", "api_key_file"),
    ("cartrack", "provider"),
    ("outbox", "path"),
]
SECTIONS = ["server", "frotcom", "cartrack", "outbox", "retry"]

ERRORS: list[Any] = [
    # unknown keys, at the top and in every section
    pytest.param({**minimal(), "servr": {}}, "servr: unknown key", id="unknown-top"),
    *[
        pytest.param(with_(s, "colour", 1), f"{s}.colour: unknown key", id=f"unknown-{s}")
        for s in SECTIONS
    ],
    # sections that are not tables
    *[
        pytest.param({**minimal(), s: 5}, f"{s}: must be a table", id=f"not-table-{s}")
        for s in SECTIONS
    ],
    pytest.param(
        {**minimal(), "vehicles": ["x"]}, "vehicles: must be a table", id="vehicles-not-table"
    ),
    # wrong types, every key
    *[
        pytest.param(with_(s, k, "8080"), f"{s}.{k}: must be an integer", id=f"int-str-{s}.{k}")
        for s, k in INT_KEYS
    ],
    *[
        pytest.param(with_(s, k, True), f"{s}.{k}: must be an integer", id=f"int-bool-{s}.{k}")
        for s, k in INT_KEYS
    ],
    *[
        pytest.param(with_(s, k, 1.5), f"{s}.{k}: must be an integer", id=f"int-float-{s}.{k}")
        for s, k in INT_KEYS
    ],
    *[
        pytest.param(with_(s, k, "10"), f"{s}.{k}: must be a number", id=f"num-str-{s}.{k}")
        for s, k in NUM_KEYS
    ],
    *[
        pytest.param(with_(s, k, False), f"{s}.{k}: must be a number", id=f"num-bool-{s}.{k}")
        for s, k in NUM_KEYS
    ],
    *[
        pytest.param(with_(s, k, -1), f"{s}.{k}: must be a finite number", id=f"num-neg-{s}.{k}")
        for s, k in NUM_KEYS
    ],
    *[
        pytest.param(
            with_(s, k, math.nan), f"{s}.{k}: must be a finite number", id=f"num-nan-{s}.{k}"
        )
        for s, k in NUM_KEYS
    ],
    *[
        pytest.param(
            with_(s, k, math.inf), f"{s}.{k}: must be a finite number", id=f"num-inf-{s}.{k}"
        )
        for s, k in NUM_KEYS
    ],
    *[
        pytest.param(
            with_(s, k, 10**400), f"{s}.{k}: must be a finite number", id=f"num-huge-{s}.{k}"
        )
        for s, k in NUM_KEYS
    ],
    *[
        pytest.param(with_(s, k, 5), f"{s}.{k}: must be a string", id=f"str-{s}.{k}")
        for s, k in STR_KEYS
    ],
    # ranges
    pytest.param(with_("server", "port", -1), "server.port: must be between 0 and 65535", id="port-neg"),
    pytest.param(with_("server", "port", 65536), "server.port: must be between 0 and 65535", id="port-big"),
    pytest.param(with_("server", "max_body_bytes", 100), "server.max_body_bytes: must be >= 1024", id="body-small"),
    pytest.param(with_("cartrack", "concurrency", 0), "cartrack.concurrency: must be between 1 and 1024", id="concurrency-0"),
    pytest.param(with_("cartrack", "timeout_seconds", 0), "cartrack.timeout_seconds: must be a finite number >= 0.001", id="timeout-0"),
    pytest.param(with_("retry", "initial_seconds", 0), "retry.initial_seconds: must be a finite number >= 0.001", id="initial-0"),
    pytest.param(
        {**minimal(), "retry": {"initial_seconds": 10, "max_seconds": 5}},
        "retry.max_seconds: must be >= retry.initial_seconds",
        id="max-below-initial",
    ),
    # strings with rules
    pytest.param(with_("server", "path", "webhooks"), "server.path: must start with '/'", id="path-relative"),
    pytest.param(with_("server", "host", ""), "server.host: must not be empty", id="host-empty"),
    pytest.param(with_("outbox", "path", ""), "outbox.path: must not be empty", id="outbox-empty"),
    pytest.param(with_("cartrack", "provider", " "), "cartrack.provider: must not be empty", id="provider-empty"),
    *[
        pytest.param(
            with_("cartrack", "region", region),
            "cartrack.region: must be one of af, as, eu",
            id=f"region-{region or 'empty'}",
        )
        for region in ["us", "EU", "", "eu "]
    ],
    *[
        pytest.param(
            with_("cartrack", "url", url),
            "cartrack.url: must be an http:// or https:// URL",
            id=f"url-{i}",
        )
        for i, url in enumerate(
            [
                "ftp://example.com",
                "example.com/api",
                "http://",
                "http:///path",
                "http://host name/",
                "http://host/path with space",
                "http://host:99999/",
                "",
            ]
        )
    ],
    # tokens
    pytest.param(
        {"cartrack": {"api_key": KEY}}, "frotcom.tokens: is required", id="tokens-missing"
    ),
    pytest.param(with_("frotcom", "tokens", TOKEN), "frotcom.tokens: must be a list of strings", id="tokens-str"),
    pytest.param(with_("frotcom", "tokens", [1]), "frotcom.tokens: must be a list of strings", id="tokens-int"),
    pytest.param(with_("frotcom", "tokens", []), "frotcom.tokens: must hold at least one", id="tokens-empty"),
    pytest.param(with_("frotcom", "tokens", [TOKEN, " "]), "frotcom.tokens: must hold at least one", id="tokens-blank"),
    pytest.param(with_("frotcom", "tokens", [f" {TOKEN}"]), "frotcom.tokens: tokens must not start or end with whitespace", id="tokens-padded"),
    # api key
    pytest.param(
        {**minimal(), "cartrack": {"api_key": KEY, "api_key_file": "key.txt"}},
        "cartrack.api_key_file: set either api_key or api_key_file, not both",
        id="key-both",
    ),
    pytest.param(with_("cartrack", "api_key", "  "), "cartrack.api_key: must not be empty", id="key-blank"),
    # tls, metrics, free-space guard
    pytest.param(with_("server", "tls_cert_file", "missing.pem"), "server.tls_cert_file: cannot read ", id="tls-cert-missing"),
    pytest.param(with_("server", "tls_key_file", ""), "server.tls_key_file: must not be empty", id="tls-key-empty"),
    pytest.param(with_("metrics", "port", 70000), "metrics.port: must be between 0 and 65535", id="metrics-port"),
    pytest.param(with_("metrics", "host", ""), "metrics.host: must not be empty", id="metrics-host"),
    pytest.param(with_("metrics", "path", "/m"), "metrics.path: unknown key", id="metrics-unknown"),
    pytest.param(with_("outbox", "min_free_bytes", -1), "outbox.min_free_bytes: must be >= 0", id="min-free-negative"),
    pytest.param(with_("outbox", "min_free_bytes", 1.5), "outbox.min_free_bytes: must be an integer", id="min-free-float"),
    # vehicles
    *[
        pytest.param(
            {**minimal(), "vehicles": {"42": vin}},
            "vehicles.42: ",
            id=f"vin-{name}",
        )
        for name, vin in [
            ("16-chars", VIN[:16]),
            ("18-chars", VIN + "1"),
            ("letter-I", "I" + VIN[1:]),
            ("letter-O", "O" + VIN[1:]),
            ("letter-Q", "Q" + VIN[1:]),
            ("lowercase", VIN.lower()),
            ("int", 12345678901234567),
            ("table", {"vin": VIN}),
            ("space", VIN[:16] + " "),
        ]
    ],
    pytest.param({**minimal(), "vehicles": {" 42": VIN}}, "vehicles. 42: ", id="vehicle-id-padded"),
    pytest.param({**minimal(), "vehicles": {"": VIN}}, "vehicles.: ", id="vehicle-id-empty"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "expected"), ERRORS)
def test_errors_name_their_key(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    assert error_of(copy.deepcopy(data), tmp_path).startswith(expected)


def test_region_error_is_exact(tmp_path: Path) -> None:
    assert error_of(with_("cartrack", "region", "us"), tmp_path) == (
        "cartrack.region: must be one of af, as, eu"
    )


def test_config_error_carries_key_and_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_("server", "port", "x"), env={}, cwd=tmp_path)
    assert (info.value.key, info.value.message) == ("server.port", "must be an integer")


# -- the API key -----------------------------------------------------------------------


def test_api_key_from_toml_wins_over_env(tmp_path: Path) -> None:
    config = parse_config(minimal(), env={API_KEY_ENV: "from-env"}, cwd=tmp_path)
    assert config.cartrack.api_key == KEY


def test_api_key_file_relative_to_cwd_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "key").write_text(f"  {KEY}\n\n")
    data = {**minimal(), "cartrack": {"api_key_file": "secrets/key"}}
    config = parse_config(data, env={API_KEY_ENV: "from-env"}, cwd=tmp_path)
    assert config.cartrack.api_key == KEY


def test_api_key_file_absolute(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    data = {**minimal(), "cartrack": {"api_key_file": str(key_file)}}
    assert parse_config(data, env={}, cwd=Path("/")).cartrack.api_key == KEY


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (None, "No such file or directory"),
        ("", "is empty"),
        (" \n", "is empty"),
        (b"\xff\xfe", "cannot read"),
    ],
)
def test_api_key_file_problems_name_the_key(
    tmp_path: Path, setup: str | bytes | None, expected: str
) -> None:
    key_file = tmp_path / "key"
    if isinstance(setup, bytes):
        key_file.write_bytes(setup)
    elif setup is not None:
        key_file.write_text(setup)
    data = {**minimal(), "cartrack": {"api_key_file": "key"}}
    message = error_of(data, tmp_path, env={API_KEY_ENV: "from-env"})
    assert message.startswith("cartrack.api_key_file: ")
    assert expected in message
    assert str(key_file) in message


def test_api_key_from_env_stripped(tmp_path: Path) -> None:
    data = {"frotcom": {"tokens": [TOKEN]}}
    config = parse_config(data, env={API_KEY_ENV: f" {KEY}\n"}, cwd=tmp_path)
    assert config.cartrack.api_key == KEY


@pytest.mark.parametrize("env", [{}, {API_KEY_ENV: ""}, {API_KEY_ENV: "   "}])
def test_missing_api_key(tmp_path: Path, env: dict[str, str]) -> None:
    message = error_of({"frotcom": {"tokens": [TOKEN]}}, tmp_path, env=env)
    assert message.startswith("cartrack.api_key: is required")
    assert API_KEY_ENV in message


def test_load_config_reads_env_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[frotcom]\ntokens = ["t"]\n')
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert load_config(path).cartrack.api_key == KEY


# -- paths -----------------------------------------------------------------------------


def test_relative_outbox_path_resolves_against_cwd(tmp_path: Path) -> None:
    data = with_("outbox", "path", "state/outbox.db")
    assert parse_config(data, env={}, cwd=tmp_path).outbox.path == tmp_path / "state/outbox.db"


def test_absolute_outbox_path_kept(tmp_path: Path) -> None:
    data = with_("outbox", "path", "/var/lib/relay/outbox.db")
    assert parse_config(data, env={}, cwd=tmp_path).outbox.path == Path("/var/lib/relay/outbox.db")


def test_load_config_paths_follow_the_working_directory_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "state").mkdir()
    path = tmp_path / "etc" / "config.toml"
    path.write_text('[frotcom]\ntokens = ["t"]\n[cartrack]\napi_key = "k"\n')
    monkeypatch.chdir(tmp_path / "state")
    assert load_config(path).outbox.path == tmp_path / "state" / "outbox.sqlite3"


# -- redaction -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["short", KEY])
def test_redacted_never_contains_secrets(tmp_path: Path, key: str) -> None:
    tokens = ["frotcom-token-number-one", "tok2"]
    data = {"frotcom": {"tokens": tokens}, "cartrack": {"api_key": key}}
    config = parse_config(data, env={}, cwd=tmp_path)
    for text in (json.dumps(config.redacted(), default=str), repr(config), str(config)):
        assert key not in text
        for token in tokens:
            assert token not in text
    assert config.redacted()["frotcom"]["tokens"] == ["fr***ne", "***"]


def test_redacted_is_a_copy(tmp_path: Path) -> None:
    config = parse_config(minimal(), env={}, cwd=tmp_path)
    view = config.redacted()
    view["server"]["port"] = 1
    view["retry"]["max_seconds"] = 1
    assert config.server.port == 8080
    assert config.retry.max_seconds == 300.0


def test_vehicles_are_read_only(tmp_path: Path) -> None:
    config = parse_config({**minimal(), "vehicles": {"1": VIN}}, env={}, cwd=tmp_path)
    with pytest.raises(TypeError):
        config.vehicles["2"] = VIN  # type: ignore[index]


# -- files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"[server\nport = 1\n", "is not valid TOML: "),
        (b"port = = 1\n", "is not valid TOML: "),
        (b"\xff\xfe[server]", "is not UTF-8 text"),
        (b"a = " + b"1" * 5000 + b"\n", "is not valid TOML: "),
        (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "is not valid TOML: "),
    ],
    ids=["unclosed-table", "double-equals", "not-utf8", "huge-int", "deep-nesting"],
)
def test_unreadable_toml_is_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={API_KEY_ENV: KEY}, cwd=tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path} ")
    assert expected in message
    assert "\n" not in message


def test_toml_syntax_error_says_where(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[frotcom]\ntokens = ["a"]\n[cartrack]\napi_key = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, cwd=tmp_path)
    assert "line 4" in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "config.toml"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, cwd=tmp_path)
    assert str(info.value).startswith(f"cannot read {path}: ")


def test_config_is_frozen(tmp_path: Path) -> None:
    config = parse_config(minimal(), env={}, cwd=tmp_path)
    assert isinstance(config, Config)
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_api_key_from_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "cartrack_api_key").write_text(f"{KEY}\n")
    data = minimal()
    del data["cartrack"]["api_key"]
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), API_KEY_ENV: "from-env"}
    assert parse_config(data, env=env, cwd=tmp_path).cartrack.api_key == KEY


def test_missing_credential_falls_back_to_env(tmp_path: Path) -> None:
    data = minimal()
    del data["cartrack"]["api_key"]
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), API_KEY_ENV: "from-env"}
    assert parse_config(data, env=env, cwd=tmp_path).cartrack.api_key == "from-env"


def test_tls_needs_both_files(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    assert error_of(with_("server", "tls_cert_file", "cert.pem"), tmp_path) == (
        "server.tls_key_file: set both tls_cert_file and tls_key_file, or neither"
    )
    data = minimal()
    data["server"] = {"tls_cert_file": "cert.pem", "tls_key_file": str(tmp_path / "key.pem")}
    server = parse_config(data, env={}, cwd=tmp_path).server
    assert (server.tls_cert_file, server.tls_key_file) == (
        tmp_path / "cert.pem",
        tmp_path / "key.pem",
    )


def test_metrics_listener_is_opt_in(tmp_path: Path) -> None:
    assert parse_config(minimal(), env={}, cwd=tmp_path).metrics.port is None
    config = parse_config(with_("metrics", "port", 9108), env={}, cwd=tmp_path)
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9108)
    assert config.redacted()["metrics"] == {"host": "127.0.0.1", "port": 9108}


def test_admin_commands_do_not_need_the_api_key(tmp_path: Path) -> None:
    # Under systemd the key is a credential only the service sees; status/requeue/purge
    # read the outbox and never talk to Cartrack.
    data = {**minimal(), "cartrack": {"api_key_file": "/nonexistent/api_key"}}
    assert parse_config(data, env={}, cwd=tmp_path, require_api_key=False).cartrack.api_key == ""
    assert error_of(data, tmp_path).startswith("cartrack.api_key_file: cannot read")


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_event_loop_choice(tmp_path: Path, name: str) -> None:
    assert parse_config(minimal(), env={}, cwd=tmp_path).server.event_loop == "asyncio"
    config = parse_config(with_("server", "event_loop", name), env={}, cwd=tmp_path)
    assert config.server.event_loop == name
    # The loop serve() then runs on.
    from relay.serve import loop_factory

    factory = loop_factory(name)
    loop = factory() if factory is not None else None
    try:
        assert (type(loop).__module__ if loop else "asyncio") == name
    finally:
        if loop is not None:
            loop.close()


@pytest.mark.parametrize("value", ["trio", "", "UVLOOP"])
def test_event_loop_error_names_the_key(tmp_path: Path, value: str) -> None:
    assert error_of(with_("server", "event_loop", value), tmp_path) == (
        "server.event_loop: must be one of asyncio, uvloop"
    )
