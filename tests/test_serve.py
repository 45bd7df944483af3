"""The process lifecycle (SPEC §4) with the real ``cartrack-relay serve`` in a subprocess.

Signals, exit statuses, restarts and ``kill -9`` are about a process, so a process is
what these tests run: the daemon delivers to a FakeCartrack served from the test's own
event loop, and the tests look at what an operator would: exit codes, stderr, the JSON
log, the outbox file, and the events Cartrack received.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import time
import weakref
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TOKEN, VIN, VIN2, batch, position, rows, wait_until
from proc import RelayProcess, console_script

from relay import frotcom
from relay.config import ConfigError, ServerConfig
from relay.devtools.fake_cartrack import FakeCartrack, Response, validate_event
from relay.outbox import connection
from relay.outbox.schema import connect
from relay.serve import GC_YOUNG_THRESHOLD, tls_context, tune_gc

pytestmark = pytest.mark.slow

MAPPED = "9876543"  # VIN in the default vehicle map
OTHER = "1111111"  # VIN2 in the default vehicle map


def positions(n: int, minute: int = 0) -> list[dict[str, Any]]:
    """n positions of one vehicle, one second apart (distinct provider_event_ids)."""
    return [position(ts=f"2023-10-25T16:{minute:02d}:{i:02d}.000Z") for i in range(n)]


def statuses(db: Path) -> Counter[str]:
    return Counter(row["status"] for row in rows(db))


def ids_at(fake: FakeCartrack) -> Counter[str]:
    """How many times Cartrack accepted each provider_event_id."""
    return Counter(fake.ids())


# -- stopping ----------------------------------------------------------------------------


STOP_CASES = [
    pytest.param(signal.SIGTERM, None, id="SIGTERM"),
    pytest.param(signal.SIGINT, None, id="SIGINT"),
    pytest.param(signal.SIGTERM, "console-script", id="SIGTERM-console-script"),
]


@pytest.mark.parametrize(("signum", "launcher"), STOP_CASES)
async def test_stop_signal_exits_0_after_delivering(
    spawn: Callable[..., RelayProcess],
    cartrack: FakeCartrack,
    signum: signal.Signals,
    launcher: str | None,
) -> None:
    command = None
    if launcher is not None:
        script = console_script()
        if script is None:
            pytest.skip("cartrack-relay console script not installed (pip install -e .)")
        command = [str(script)]
    relay = spawn(command=command, server={"shutdown_timeout_seconds": 3})
    await relay.start()
    status, body = await relay.post(batch((MAPPED, positions(3))))
    assert (status, body["accepted"]) == (200, 3)
    await cartrack.wait_for(lambda f: len(f.accepted) == 3)
    await wait_until(lambda: statuses(relay.db_path) == {"sent": 3})

    relay.send_signal(signum)
    began = time.monotonic()
    assert await relay.wait(timeout=10) == 0
    assert time.monotonic() - began < 3, "stop took longer than shutdown_timeout_seconds"

    names = [e["event"] for e in relay.events()]
    order = ["signal_received", "relay_stopping", "forwarder_stopped", "outbox_closed"]
    assert [n for n in names if n in order] == order
    assert names[-1] == "relay_stopped"
    assert relay.events("signal_received")[0]["signal"] == signum.name
    assert relay.events("relay_stopped")[0]["exit_code"] == 0
    assert relay.stderr() == ""


async def test_sigterm_lets_an_in_flight_delivery_finish(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    relay = spawn(server={"shutdown_timeout_seconds": 5})
    await relay.start()
    # Cartrack takes a while to answer: the request is in flight when SIGTERM comes.
    cartrack.script(Response(202, {"status": "accepted"}, delay=0.8))
    status, _ = await relay.post(batch((MAPPED, positions(1))))
    assert status == 200
    await cartrack.wait_for(lambda f: len(f.requests) == 1)

    relay.send_signal(signal.SIGTERM)
    # An impatient operator (or a second Ctrl-C, a reload) must not cut the drain short.
    await relay.wait_event("relay_stopping")
    relay.send_signal(signal.SIGINT)
    relay.send_signal(signal.SIGHUP)
    assert await relay.wait() == 0

    assert [r["status"] for r in rows(relay.db_path)] == ["sent"]
    assert len(cartrack.requests) == 1
    ignored = relay.events("signal_ignored")
    assert sorted(e["signal"] for e in ignored) == ["SIGHUP", "SIGINT"]
    assert relay.events("shutdown_timeout") == []
    assert relay.events("forwarder_stopped")[0]["sent"] == 1
    assert validate_event(cartrack.accepted[0], datetime.now(UTC)) == []


async def test_shutdown_is_bounded_by_one_timeout_and_loses_nothing(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    """A hung delivery and a hung webhook upload share one shutdown deadline."""
    timeout = 1.5
    relay = spawn(server={"shutdown_timeout_seconds": timeout}, cartrack={"timeout_seconds": 60})
    await relay.start()
    cartrack.script(Response(202, {"status": "accepted"}, delay=60))
    assert (await relay.post(batch((MAPPED, positions(1)))))[0] == 200
    await cartrack.wait_for(lambda f: len(f.requests) == 1)
    # A webhook request whose body never comes. "100 Continue" is aiohttp's proof that
    # the request is being handled, so the HTTP drain has to wait for it.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(
        f"POST /webhooks/frotcom HTTP/1.1\r\nHost: relay\r\nAuthorization: {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 100")

    relay.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert await relay.wait() == 0
    elapsed = time.monotonic() - began
    # Sequential drains (HTTP, then the forwarder) would take two timeouts.
    assert elapsed < timeout * 1.6, f"shutdown took {elapsed:.2f}s"
    assert b" 200 " not in await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    assert relay.events("shutdown_timeout")[0]["task"] == "forwarder"
    # The cut delivery is not acknowledged: the row is still pending ...
    assert statuses(relay.db_path) == {"pending": 1}

    # ... and goes out after a restart; Cartrack, which did get it, answers 409.
    await relay.start()
    await wait_until(lambda: statuses(relay.db_path) == {"sent": 1})
    assert cartrack.duplicates == 1
    assert len(ids_at(cartrack)) == 1
    assert await relay.stop() == 0


# -- SIGHUP ------------------------------------------------------------------------------


async def test_sighup_releases_held_vehicles(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    relay = spawn(vehicles={MAPPED: VIN})
    await relay.start()
    status, body = await relay.post(batch((OTHER, positions(2)), (MAPPED, positions(1))))
    assert (status, body["accepted"], body["held"]) == (200, 3, 2)
    # The mapped vehicle's event is delivered; the unmapped one's rows wait, unsent.
    await cartrack.wait_for(lambda f: len(f.accepted) == 1)
    await wait_until(lambda: statuses(relay.db_path) == {"sent": 1, "held": 2})
    assert {e["chassis_number"] for e in cartrack.accepted} == {VIN}

    # The retry change needs a restart; the vehicle map applies now.
    relay.write_config(vehicles={MAPPED: VIN, OTHER: VIN2}, retry={"max_seconds": 0.2})
    relay.send_signal(signal.SIGHUP)
    await cartrack.wait_for(lambda f: len(f.accepted) == 3)
    await wait_until(lambda: statuses(relay.db_path) == {"sent": 3})

    assert Counter(e["chassis_number"] for e in cartrack.accepted) == {VIN: 1, VIN2: 2}
    reloaded = relay.events("vehicles_reloaded")
    assert len(reloaded) == 1
    assert reloaded[0] | {"added": 1, "released_rows": 2} == reloaded[0]
    assert [e["changed"] for e in relay.events("reload_partial")] == [["retry"]]
    assert await relay.stop() == 0


BROKEN_CONFIGS: list[tuple[Callable[[RelayProcess], None], str]] = [
    (lambda r: r.write_config(vehicles={MAPPED: VIN, OTHER: "not-a-vin"}), "vehicles.1111111"),
    (lambda r: r.write_config(vehicles={MAPPED: VIN}, server={"bogus": 1}), "server.bogus"),
    (lambda r: r.write_config_text(r.config_path.read_text() + "[vehicles\n"), ""),  # not TOML
]


async def test_sighup_with_a_broken_config_keeps_running(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    relay = spawn(vehicles={MAPPED: VIN})
    await relay.start()
    for n, (break_config, key) in enumerate(BROKEN_CONFIGS, start=1):
        break_config(relay)
        relay.send_signal(signal.SIGHUP)
        failed = await relay.wait_event("reload_failed", count=n)
        assert failed["key"] == key, failed
        assert failed["level"] == "error"

    # Still serving, still delivering, with the map it had.
    status, body = await relay.post(batch((MAPPED, positions(1)), (OTHER, positions(1))))
    assert (status, body["held"]) == (200, 1)
    await cartrack.wait_for(lambda f: len(f.accepted) == 1)
    assert relay.returncode() is None
    assert relay.events("vehicles_reloaded") == []
    assert await relay.stop() == 0


async def test_sighup_storage_failure_is_logged_not_fatal(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    """Releasing held rows fails for real (a trigger vetoes it); the relay carries on."""
    relay = spawn(vehicles={MAPPED: VIN})
    conn = connect(relay.db_path, create=True)
    conn.execute(
        "CREATE TRIGGER keep_held BEFORE UPDATE OF status ON positions"
        " WHEN old.status = 'held' BEGIN SELECT RAISE(ABORT, 'held rows are frozen'); END"
    )
    conn.close()
    await relay.start()
    assert (await relay.post(batch((OTHER, positions(1)))))[0] == 200
    relay.write_config(vehicles={MAPPED: VIN, OTHER: VIN2})
    relay.send_signal(signal.SIGHUP)

    failed = await relay.wait_event("reload_failed")
    assert failed["key"] == "vehicles"
    assert "held rows are frozen" in failed["error"]
    # The new map is in force for new positions; the vetoed rows wait for a restart.
    assert (await relay.post(batch((OTHER, positions(1, minute=5)))))[0] == 200
    await cartrack.wait_for(lambda f: len(f.accepted) == 1)
    assert cartrack.accepted[0]["chassis_number"] == VIN2
    assert await relay.stop() == 0
    assert "Task exception was never retrieved" not in relay.log_text()


# -- restart -----------------------------------------------------------------------------


async def test_restart_resumes_pending_and_never_resends_sent(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    relay = spawn()
    await relay.start()
    assert (await relay.post(batch((MAPPED, positions(2, minute=1)))))[0] == 200
    await wait_until(lambda: statuses(relay.db_path) == {"sent": 2})
    first_ids = set(ids_at(cartrack))

    # Cartrack goes down; the next batch is stored and retried, never delivered.
    cartrack.set_default(lambda event: 503)
    status, _ = await relay.post(batch((MAPPED, positions(2, minute=2)), (OTHER, positions(1))))
    assert status == 200
    await cartrack.wait_for(lambda f: f.stats[503] >= 3)
    assert await relay.stop() == 0
    assert statuses(relay.db_path) == {"sent": 2, "pending": 3}

    cartrack.set_default(None)
    await relay.start()
    await wait_until(lambda: statuses(relay.db_path) == {"sent": 5})
    assert await relay.stop() == 0

    accepted = ids_at(cartrack)
    assert len(accepted) == 5
    assert set(accepted.values()) == {1}, "an event reached Cartrack twice"
    assert cartrack.duplicates == 0
    # Rows sent before the restart were not even offered to Cartrack again.
    offered = Counter(r.event["source"]["provider_event_id"] for r in cartrack.requests if r.event)
    assert {offered[i] for i in first_ids} == {1}


async def test_kill_9_after_a_200_loses_nothing(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    relay = spawn()
    await relay.start()
    cartrack.set_default(lambda event: 503)
    status, body = await relay.post(batch((MAPPED, positions(3)), (OTHER, positions(2))))
    assert (status, body["accepted"]) == (200, 5)
    relay.kill()
    assert await relay.wait() == -signal.SIGKILL

    cartrack.set_default(None)
    await relay.start()
    await cartrack.wait_for(lambda f: len(f.accepted) == 5)
    await wait_until(lambda: statuses(relay.db_path) == {"sent": 5})
    assert sorted(ids_at(cartrack)) == sorted(r["provider_event_id"] for r in rows(relay.db_path))
    assert await relay.stop() == 0


# -- failing starts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("break_config", "expected"),
    [
        (
            lambda r: r.write_config(cartrack={"region": "us"}),
            "config error: cartrack.region: must be one of af, as, eu",
        ),
        (lambda r: r.write_config(frotcom={"tokens": []}), "config error: frotcom.tokens: "),
        (
            lambda r: r.write_config(vehicles={MAPPED: "WDB963403"}),
            f"config error: vehicles.{MAPPED}: 'WDB963403' is not a VIN",
        ),
        (lambda r: r.write_config_text("[server\n"), "config error: "),
        (lambda r: r.config_path.unlink(), "config error: cannot read "),
    ],
    ids=["bad-region", "empty-tokens", "bad-vin", "not-toml", "missing-file"],
)
async def test_config_error_exits_2_with_one_line(
    spawn: Callable[..., RelayProcess],
    break_config: Callable[[RelayProcess], None],
    expected: str,
) -> None:
    relay = spawn()
    break_config(relay)
    relay.spawn()
    assert await relay.wait() == 2
    lines = relay.stderr().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines[0]
    assert not relay.db_path.exists()


def _foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "make_file",
    [
        pytest.param(lambda p: p.write_bytes(b"this is not a database\n" * 100), id="garbage"),
        pytest.param(_foreign_sqlite, id="someone-elses-sqlite"),
    ],
)
async def test_unusable_outbox_exits_3_and_leaves_the_file_alone(
    spawn: Callable[..., RelayProcess], make_file: Callable[[Path], None]
) -> None:
    relay = spawn()
    make_file(relay.db_path)
    before = relay.db_path.read_bytes()
    relay.spawn()
    assert await relay.wait() == 3
    lines = relay.stderr().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("outbox error: ")
    assert str(relay.db_path) in lines[0]
    assert relay.db_path.read_bytes() == before
    assert sorted(p.name for p in relay.directory.glob("outbox.sqlite3*")) == ["outbox.sqlite3"]


async def test_port_in_use_exits_1_with_one_line(spawn: Callable[..., RelayProcess]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = spawn(server={"port": port})
        relay.spawn()
        assert await relay.wait() == 1
    lines = relay.stderr().splitlines()
    assert lines == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert relay.events("relay_started") == []
    assert relay.events("outbox_closed"), "the outbox was not closed on the way out"


async def test_background_task_crash_exits_1(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    """A supervised task dying of a bug ends the process, so systemd restarts it.

    The purge task is made to fail for real: a trigger in the outbox file aborts the
    DELETE of an old sent row, which purge cannot classify and must not ignore.
    """
    relay = spawn(outbox={"keep_sent_days": 1})
    conn = connect(relay.db_path, create=True)
    conn.execute(
        "INSERT INTO positions (provider_event_id, vehicle_id, event_ts, event_type, status,"
        " next_attempt_at, received_at, updated_at, payload, source) VALUES"
        " ('frotcom:1:old', '1', '2000-01-01T00:00:00.000Z', 'PERIODIC', 'sent',"
        " '2000-01-01T00:00:00.000Z', '2000-01-01T00:00:00.000Z', '2000-01-01T00:00:00.000Z',"
        " '{}', '{}')"
    )
    conn.execute(
        "CREATE TRIGGER no_delete BEFORE DELETE ON positions"
        " BEGIN SELECT RAISE(ABORT, 'deleting is forbidden here'); END"
    )
    conn.close()
    relay.spawn()
    assert await relay.wait() == 1

    crashed = relay.events("task_crashed")
    assert [e["task"] for e in crashed] == ["purge"]
    assert "deleting is forbidden here" in crashed[0]["exception"]
    assert relay.events("relay_failed")
    assert relay.events("relay_stopped")[0]["exit_code"] == 1
    assert relay.events("outbox_closed")
    assert relay.stderr() == ""
    assert statuses(relay.db_path) == {"sent": 1}


# -- systemd readiness -------------------------------------------------------------------


async def _datagram(sock: socket.socket, timeout: float = 20.0) -> str:
    loop = asyncio.get_running_loop()
    return (await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)).decode()


async def test_notify_ready_only_once_listening_then_stopping(
    spawn: Callable[..., RelayProcess], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    relay = spawn(env={"NOTIFY_SOCKET": path})
    relay.spawn()

    ready = await _datagram(sock)
    assert ready.splitlines()[0] == "READY=1"
    # relay_started is logged before READY=1 is sent, so the port is known by now, and
    # it must already accept connections.
    started = relay.events("relay_started")
    assert started, "READY=1 came before relay_started was logged"
    port = int(started[0]["listen"][0].rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    await writer.wait_closed()

    relay.send_signal(signal.SIGHUP)
    reloading = await _datagram(sock)
    assert reloading.splitlines()[0] == "RELOADING=1"
    assert reloading.splitlines()[1].startswith("MONOTONIC_USEC=")
    assert (await _datagram(sock)).splitlines()[0] == "READY=1"

    relay.send_signal(signal.SIGTERM)
    assert await _datagram(sock) == "STOPPING=1"
    assert await relay.wait() == 0


# -- HTTPS -------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"),
        *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real self-signed pair for 127.0.0.1, a second key, an encrypted key, junk."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(directory, "relay")
    _, other_key = _self_signed(directory, "other")
    encrypted = directory / "encrypted.key"
    _openssl(
        *("pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted))
    )
    junk = directory / "junk.pem"
    junk.write_text("not PEM at all\n")
    return {"cert": cert, "key": key, "other_key": other_key, "encrypted": encrypted, "junk": junk}


def test_tls_context_serves_tls_1_2_or_newer(tls_files: dict[str, Path]) -> None:
    context = tls_context(
        ServerConfig(tls_cert_file=tls_files["cert"], tls_key_file=tls_files["key"])
    )
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls_context(ServerConfig()) is None


@pytest.mark.parametrize(
    ("cert", "key", "at_fault", "message"),
    [
        ("cert", "other_key", "server.tls_key_file", "is not the private key of the certificate"),
        ("cert", "encrypted", "server.tls_key_file", "holds no unencrypted PEM private key"),
        ("cert", "junk", "server.tls_key_file", "holds no unencrypted PEM private key"),
        ("cert", "cert", "server.tls_key_file", "holds no unencrypted PEM private key"),
        ("junk", "key", "server.tls_cert_file", "holds no PEM certificate"),
        ("key", "key", "server.tls_cert_file", "holds no PEM certificate"),
    ],
    ids=["mismatched-key", "encrypted-key", "junk-key", "cert-as-key", "junk-cert", "key-as-cert"],
)
def test_a_bad_tls_pair_is_a_config_error_naming_the_key(
    tls_files: dict[str, Path], cert: str, key: str, at_fault: str, message: str
) -> None:
    server = ServerConfig(tls_cert_file=tls_files[cert], tls_key_file=tls_files[key])
    with pytest.raises(ConfigError) as caught:
        tls_context(server)
    assert caught.value.key == at_fault
    assert message in caught.value.message


async def test_https_webhook_stores_and_delivers(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack, tls_files: dict[str, Path]
) -> None:
    cert = tls_files["cert"]
    relay = spawn(server={"tls_cert_file": cert, "tls_key_file": tls_files["key"]})
    started = await relay.start()
    assert started["tls"] is True
    url = f"https://127.0.0.1:{relay.port}/webhooks/frotcom"
    # The client verifies the relay's certificate against the test's own CA: a real
    # handshake, not verification switched off.
    client_tls = ssl.create_default_context(cafile=str(cert))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url,
            json=batch((MAPPED, positions(2))),
            headers={"Authorization": TOKEN},
            ssl=client_tls,
        ) as response,
    ):
        assert response.status == 200
        assert (await response.json())["accepted"] == 2
    assert len(rows(relay.db_path)) == 2
    await cartrack.wait_for(lambda f: len(f.accepted) == 2)
    # Plain HTTP on the TLS port gets no webhook answer.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(
                relay.url,
                json=batch((MAPPED, positions(1, minute=9))),
                headers={"Authorization": TOKEN},
            ) as response:
                await response.read()
    assert len(rows(relay.db_path)) == 2
    assert await relay.stop() == 0


async def test_mismatched_tls_pair_exits_2_with_one_line_before_the_outbox(
    spawn: Callable[..., RelayProcess], tls_files: dict[str, Path]
) -> None:
    relay = spawn(
        server={"tls_cert_file": tls_files["cert"], "tls_key_file": tls_files["other_key"]}
    )
    relay.spawn()
    assert await relay.wait() == 2
    lines = relay.stderr().splitlines()
    assert lines == [
        f"config error: server.tls_key_file: {tls_files['other_key']} is not the private key"
        f" of the certificate in {tls_files['cert']}"
    ]
    assert not relay.db_path.exists()


async def test_the_started_event_names_the_hot_path(
    spawn: Callable[..., RelayProcess], cartrack: FakeCartrack
) -> None:
    # An operator reading "python" here knows relay/_rows.c was not built at install.
    started = await spawn().start()
    assert started["hot_path"] == ("python" if frotcom._rows is None else "compiled")
    assert started["hot_path"] == frotcom.hot_path()
    # ... and "compiled" here that the writer's WAL and statements go through _sqlrun.c.
    assert started["outbox_writer"] == connection.native()
    assert started["outbox_writer"] == "compiled" or "python (" in started["outbox_writer"]


def test_gc_after_start_leaves_startup_objects_out_and_collects_less_often() -> None:
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
        # Still collected: a cycle made after tuning goes at the next full collection.
        ring: list[Any] = []
        ring.append(ring)
        ref = weakref.ref(_Cycle(ring))
        assert gc.collect() > 0
        assert ref() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class _Cycle:
    def __init__(self, ring: list[Any]) -> None:
        self.me = self
        self.ring = ring
