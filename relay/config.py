"""Configuration: one TOML file, parsed once at the boundary into frozen dataclasses.

Every problem is a :class:`ConfigError` that names the offending key, so the CLI can
print one line (``config error: cartrack.region: must be one of af, as, eu``) and exit 2.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

API_KEY_ENV = "CARTRACK_RELAY_API_KEY"
# systemd LoadCredential=cartrack_api_key:... puts the key in this file under
# $CREDENTIALS_DIRECTORY, readable only by the service.
API_KEY_CREDENTIAL = "cartrack_api_key"
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024
REGIONS = ("af", "as", "eu")
EVENT_LOOPS = ("asyncio", "uvloop")
# ISO 3779: 17 characters, digits and capital letters except I, O and Q.
VIN_RE = re.compile(r"[A-HJ-NPR-Z0-9]{17}")
# Same bound the webhook applies to Frotcom's VehicleID (relay.mapping).
MAX_VEHICLE_ID_LENGTH = 128


class ConfigError(Exception):
    """A configuration problem, always attributed to one key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    path: str = "/webhooks/frotcom"
    max_body_bytes: int = 16 * 1024 * 1024
    shutdown_timeout_seconds: float = 10.0
    # Both set: the webhook is served over HTTPS with this certificate chain and key.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # "uvloop": measured 0-20% less CPU per forwarded event (bench/README.md).
    event_loop: str = "asyncio"


@dataclass(frozen=True)
class MetricsConfig:
    """Where /healthz, /readyz and /metrics are served.

    ``port`` None: on the webhook's listener. Set: on their own listener at
    ``host:port`` only, so the webhook's public address does not expose them.
    """

    host: str = "127.0.0.1"
    port: int | None = None


@dataclass(frozen=True)
class FrotcomConfig:
    # Secrets: kept out of repr() like the API key, in case a Config is ever logged.
    tokens: tuple[str, ...] = field(default=(), repr=False)
    max_future_seconds: float = 86400.0


@dataclass(frozen=True)
class CartrackConfig:
    url: str
    api_key: str = field(repr=False)
    region: str = "eu"
    provider: str = "frotcom"
    timeout_seconds: float = 10.0
    concurrency: int = 32


@dataclass(frozen=True)
class OutboxConfig:
    path: Path = Path("outbox.sqlite3")
    keep_sent_days: float = 7.0
    # Below this much free space on the outbox's filesystem, webhooks get 500
    # before SQLite would hit the wall mid-transaction. 0 disables the guard.
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES


@dataclass(frozen=True)
class RetryConfig:
    initial_seconds: float = 1.0
    max_seconds: float = 300.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    frotcom: FrotcomConfig
    cartrack: CartrackConfig
    outbox: OutboxConfig
    retry: RetryConfig
    vehicles: Mapping[str, str]
    metrics: MetricsConfig = MetricsConfig()
    source: Path | None = None

    def redacted(self) -> dict[str, Any]:
        """A printable view with every secret masked (for ``check-config``)."""
        # Copies: the caller may change the view without touching the frozen config.
        return {
            "server": {
                **asdict(self.server),
                "tls_cert_file": _opt_path(self.server.tls_cert_file),
                "tls_key_file": _opt_path(self.server.tls_key_file),
            },
            "frotcom": {
                "tokens": [_mask(t) for t in self.frotcom.tokens],
                "max_future_seconds": self.frotcom.max_future_seconds,
            },
            "cartrack": {
                "url": self.cartrack.url,
                "region": self.cartrack.region,
                "api_key": _mask(self.cartrack.api_key),
                "provider": self.cartrack.provider,
                "timeout_seconds": self.cartrack.timeout_seconds,
                "concurrency": self.cartrack.concurrency,
            },
            "outbox": {
                "path": str(self.outbox.path),
                "keep_sent_days": self.outbox.keep_sent_days,
                "min_free_bytes": self.outbox.min_free_bytes,
            },
            "retry": asdict(self.retry),
            "metrics": asdict(self.metrics),
            "vehicles": len(self.vehicles),
        }


def _opt_path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _mask(secret: str) -> str:
    return "***" if len(secret) < 12 else f"{secret[:2]}***{secret[-2:]}"


def cartrack_url(region: str) -> str:
    return f"https://{region}-webhooks-prod.cartrack.com/api/data/ingest/telematics"


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    *,
    require_api_key: bool = True,
) -> Config:
    """Read and validate the TOML file at ``path``.

    ``require_api_key=False`` is for the admin commands: they only read the outbox, and
    under systemd the key is a credential only the service can see.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer literal longer than Python converts
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError("", f"{path} is not valid TOML: nested too deeply") from None
    config = parse_config(
        data, env=os.environ if env is None else env, cwd=cwd, require_api_key=require_api_key
    )
    return replace(config, source=path.resolve())


def parse_config(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    *,
    require_api_key: bool = True,
) -> Config:
    env = {} if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    _only(data, "", {"server", "frotcom", "cartrack", "outbox", "retry", "metrics", "vehicles"})
    server = _section(data, "server")
    frotcom = _section(data, "frotcom")
    cartrack = _section(data, "cartrack")
    outbox = _section(data, "outbox")
    retry = _section(data, "retry")
    metrics = _section(data, "metrics")

    _only(
        server,
        "server",
        {
            "host",
            "port",
            "path",
            "max_body_bytes",
            "shutdown_timeout_seconds",
            "tls_cert_file",
            "tls_key_file",
            "event_loop",
        },
    )
    path = _str(server, "server", "path", "/webhooks/frotcom")
    if not path.startswith("/"):
        raise ConfigError("server.path", "must start with '/'")
    server_cfg = ServerConfig(
        host=_nonempty(server, "server", "host", "0.0.0.0"),
        port=_int(server, "server", "port", 8080, lo=0, hi=65535),
        path=path,
        max_body_bytes=_int(server, "server", "max_body_bytes", 16 * 1024 * 1024, lo=1024),
        shutdown_timeout_seconds=_num(server, "server", "shutdown_timeout_seconds", 10.0, lo=0),
        tls_cert_file=_readable_file(server, "server", "tls_cert_file", cwd),
        tls_key_file=_readable_file(server, "server", "tls_key_file", cwd),
        event_loop=_str(server, "server", "event_loop", "asyncio"),
    )
    if server_cfg.event_loop not in EVENT_LOOPS:
        raise ConfigError("server.event_loop", f"must be one of {', '.join(EVENT_LOOPS)}")
    if (server_cfg.tls_cert_file is None) != (server_cfg.tls_key_file is None):
        missing = "tls_key_file" if server_cfg.tls_key_file is None else "tls_cert_file"
        raise ConfigError(
            f"server.{missing}", "set both tls_cert_file and tls_key_file, or neither"
        )

    _only(metrics, "metrics", {"host", "port"})
    metrics_cfg = MetricsConfig(
        host=_nonempty(metrics, "metrics", "host", "127.0.0.1"),
        port=_int(metrics, "metrics", "port", 0, lo=0, hi=65535) if "port" in metrics else None,
    )

    _only(frotcom, "frotcom", {"tokens", "max_future_seconds"})
    tokens = frotcom.get("tokens")
    if tokens is None:
        raise ConfigError("frotcom.tokens", "is required (the Authorization values Frotcom sends)")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ConfigError("frotcom.tokens", "must be a list of strings")
    if not tokens or not all(t.strip() for t in tokens):
        raise ConfigError("frotcom.tokens", "must hold at least one non-empty token")
    if any(t != t.strip() for t in tokens):
        # HTTP strips header whitespace, so such a token could never match.
        raise ConfigError("frotcom.tokens", "tokens must not start or end with whitespace")
    frotcom_cfg = FrotcomConfig(
        tokens=tuple(tokens),
        max_future_seconds=_num(frotcom, "frotcom", "max_future_seconds", 86400.0, lo=0),
    )

    _only(
        cartrack,
        "cartrack",
        {"region", "url", "api_key", "api_key_file", "provider", "timeout_seconds", "concurrency"},
    )
    region = _str(cartrack, "cartrack", "region", "eu")
    if region not in REGIONS:
        raise ConfigError("cartrack.region", f"must be one of {', '.join(REGIONS)}")
    url = cartrack.get("url")
    if url is None:
        url = cartrack_url(region)
    else:
        url = _str(cartrack, "cartrack", "url", "")
        if not _is_http_url(url):
            raise ConfigError("cartrack.url", "must be an http:// or https:// URL")
    provider = _str(cartrack, "cartrack", "provider", "frotcom")
    if not provider.strip():
        raise ConfigError("cartrack.provider", "must not be empty")
    cartrack_cfg = CartrackConfig(
        url=url,
        api_key=_api_key(cartrack, env, cwd, required=require_api_key),
        region=region,
        provider=provider,
        timeout_seconds=_num(cartrack, "cartrack", "timeout_seconds", 10.0, lo=0.001),
        concurrency=_int(cartrack, "cartrack", "concurrency", 32, lo=1, hi=1024),
    )

    _only(outbox, "outbox", {"path", "keep_sent_days", "min_free_bytes"})
    outbox_path = Path(_nonempty(outbox, "outbox", "path", "outbox.sqlite3"))
    outbox_cfg = OutboxConfig(
        path=outbox_path if outbox_path.is_absolute() else cwd / outbox_path,
        keep_sent_days=_num(outbox, "outbox", "keep_sent_days", 7.0, lo=0),
        min_free_bytes=_int(outbox, "outbox", "min_free_bytes", DEFAULT_MIN_FREE_BYTES, lo=0),
    )

    _only(retry, "retry", {"initial_seconds", "max_seconds"})
    retry_cfg = RetryConfig(
        initial_seconds=_num(retry, "retry", "initial_seconds", 1.0, lo=0.001),
        max_seconds=_num(retry, "retry", "max_seconds", 300.0, lo=0.001),
    )
    if retry_cfg.max_seconds < retry_cfg.initial_seconds:
        raise ConfigError("retry.max_seconds", "must be >= retry.initial_seconds")

    return Config(
        server=server_cfg,
        frotcom=frotcom_cfg,
        cartrack=cartrack_cfg,
        outbox=outbox_cfg,
        retry=retry_cfg,
        vehicles=parse_vehicles(data.get("vehicles", {})),
        metrics=metrics_cfg,
    )


def parse_vehicles(vehicles: Any) -> Mapping[str, str]:
    if not isinstance(vehicles, dict):
        raise ConfigError("vehicles", "must be a table of VehicleID = VIN")
    result: dict[str, str] = {}
    for vehicle_id, vin in vehicles.items():
        key = f"vehicles.{vehicle_id}"
        if (
            not vehicle_id
            or vehicle_id != vehicle_id.strip()
            or len(vehicle_id) > MAX_VEHICLE_ID_LENGTH
            or not vehicle_id.isprintable()
        ):
            # Frotcom's VehicleID is stripped on arrival: such a key would never match.
            raise ConfigError(
                key,
                f"{vehicle_id!r} is not a VehicleID (printable, no surrounding spaces,"
                f" 1 to {MAX_VEHICLE_ID_LENGTH} characters)",
            )
        if not isinstance(vin, str):
            raise ConfigError(key, "must be a string (the 17-character VIN)")
        if not VIN_RE.fullmatch(vin):
            raise ConfigError(
                key, f"{vin!r} is not a VIN (17 characters: digits and A-Z except I, O, Q)"
            )
        result[vehicle_id] = vin
    return MappingProxyType(result)


def _api_key(section: Mapping[str, Any], env: Mapping[str, str], cwd: Path, required: bool) -> str:
    try:
        return _find_api_key(section, env, cwd)
    except ConfigError:
        if required:
            raise
        return ""  # an admin command: the key (a root-only file, a credential) is not its business


def _find_api_key(section: Mapping[str, Any], env: Mapping[str, str], cwd: Path) -> str:
    sources = [k for k in ("api_key", "api_key_file") if k in section]
    if len(sources) > 1:
        raise ConfigError("cartrack.api_key_file", "set either api_key or api_key_file, not both")
    if "api_key_file" in section:
        file = Path(_str(section, "cartrack", "api_key_file", ""))
        file = file if file.is_absolute() else cwd / file
        try:
            key = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError("cartrack.api_key_file", f"cannot read {file}: {reason}") from None
        if not key:
            raise ConfigError("cartrack.api_key_file", f"{file} is empty")
        return key
    if "api_key" in section:
        key = _str(section, "cartrack", "api_key", "").strip()
        if not key:
            raise ConfigError("cartrack.api_key", "must not be empty")
        return key
    credentials = env.get("CREDENTIALS_DIRECTORY", "")
    if credentials:
        file = Path(credentials) / API_KEY_CREDENTIAL
        try:
            key = file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            key = ""
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(
                "cartrack.api_key", f"cannot read credential {file}: {reason}"
            ) from None
        if key:
            return key
    key = env.get(API_KEY_ENV, "").strip()
    if not key:
        raise ConfigError(
            "cartrack.api_key",
            f"is required (or cartrack.api_key_file, the systemd credential"
            f" {API_KEY_CREDENTIAL}, or env {API_KEY_ENV})",
        )
    return key


def _readable_file(section: Mapping[str, Any], prefix: str, key: str, cwd: Path) -> Path | None:
    if key not in section:
        return None
    file = Path(_nonempty(section, prefix, key, ""))
    file = file if file.is_absolute() else cwd / file
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{prefix}.{key}", f"cannot read {file}: {exc.strerror or exc}") from None
    return file


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, "must be a table")
    return value


def _only(section: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    for key in section:
        if key not in allowed:
            name = f"{prefix}.{key}" if prefix else key
            raise ConfigError(name, "unknown key")


def _is_http_url(url: str) -> bool:
    if any(c.isspace() for c in url) or not url.isprintable():
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _nonempty(section: Mapping[str, Any], prefix: str, key: str, default: str) -> str:
    value = _str(section, prefix, key, default)
    if not value.strip():
        raise ConfigError(f"{prefix}.{key}", "must not be empty")
    return value


def _str(section: Mapping[str, Any], prefix: str, key: str, default: str) -> str:
    value = section.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{prefix}.{key}", "must be a string")
    return value


def _int(
    section: Mapping[str, Any], prefix: str, key: str, default: int, lo: int, hi: int | None = None
) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}.{key}", "must be an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{prefix}.{key}", f"must be {bound}")
    return value


def _num(section: Mapping[str, Any], prefix: str, key: str, default: float, lo: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{prefix}.{key}", "must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any double
        number = float("inf")
    if not math.isfinite(number) or number < lo:
        raise ConfigError(f"{prefix}.{key}", f"must be a finite number >= {lo:g}")
    return number
