"""The real ``cartrack-relay serve`` in a subprocess, for tests about the process itself.

``RelayProcess`` owns one working directory: it writes the TOML config there, starts the
daemon (``python -m relay serve``, or the console script), captures stdout (JSON log
lines) and stderr to files, and waits on conditions with deadlines: an event in the log,
the exit of the process. The listening port is 0 in the config; the daemon's
``relay_started`` event says which port it got, so two tests never race for a port.

Use it as an async context manager, or call ``close()`` in a finalizer: a process left
running would outlive the test.

    async with RelayProcess(tmp_path, cartrack.url) as relay:
        await relay.start()
        status, body = await relay.post(batch(...))
        relay.send_signal(signal.SIGTERM)
        assert await relay.wait() == 0
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from conftest import API_KEY, TOKEN, VIN, VIN2

START_TIMEOUT = 20.0
DEFAULT_VEHICLES = {"9876543": VIN, "1111111": VIN2}
# Environment variables that would change what the daemon does behind the test's back.
_SCRUBBED_ENV = ("NOTIFY_SOCKET", "CARTRACK_RELAY_API_KEY", "CARTRACK_RELAY_CONFIG")

Event = dict[str, Any]


def console_script() -> Path | None:
    """The installed ``cartrack-relay`` next to this interpreter, if there is one."""
    path = Path(sys.executable).parent / "cartrack-relay"
    return path if path.exists() else None


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


def render_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


class RelayExited(AssertionError):
    """The daemon exited while the test was waiting for something else."""


class RelayProcess:
    def __init__(
        self,
        directory: Path,
        cartrack_url: str,
        *,
        vehicles: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        **sections: Mapping[str, Any],
    ) -> None:
        self.directory = directory
        self.cartrack_url = cartrack_url
        self.config_path = directory / "relay.toml"
        self.db_path = directory / "outbox.sqlite3"
        self.extra_env = dict(env or {})
        self.command = list(command or [sys.executable, "-m", "relay"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.port: int | None = None
        self.log_paths: list[Path] = []
        self.stderr_paths: list[Path] = []
        self.write_config(vehicles=vehicles, **sections)

    # -- configuration -------------------------------------------------------------------

    def config_sections(
        self, vehicles: Mapping[str, str] | None = None, **sections: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout_seconds": 5},
            "frotcom": {"tokens": [TOKEN]},
            "cartrack": {
                "url": self.cartrack_url,
                "api_key": API_KEY,
                "timeout_seconds": 5,
                "concurrency": 8,
            },
            # Relative on purpose: SPEC §5 resolves it against the working directory.
            "outbox": {"path": self.db_path.name},
            "retry": {"initial_seconds": 0.02, "max_seconds": 0.1},
            "vehicles": dict(DEFAULT_VEHICLES if vehicles is None else vehicles),
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return data

    def write_config(
        self, vehicles: Mapping[str, str] | None = None, **sections: Mapping[str, Any]
    ) -> None:
        self.write_config_text(render_toml(self.config_sections(vehicles, **sections)))

    def write_config_text(self, text: str) -> None:
        # Written beside and renamed over, as an editor or config manager would: a SIGHUP
        # never reads half a file.
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.config_path)

    # -- process -------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.log_paths[-1]

    @property
    def stderr_path(self) -> Path:
        return self.stderr_paths[-1]

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def spawn(self, *extra_args: str) -> subprocess.Popen[bytes]:
        """Start ``serve`` without waiting for anything (for tests of failing starts)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the previous run is still going")
        self.runs += 1
        self.port = None
        log_path = self.directory / f"relay-{self.runs}.log"
        stderr_path = self.directory / f"relay-{self.runs}.stderr"
        self.log_paths.append(log_path)
        self.stderr_paths.append(stderr_path)
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        args = [*self.command, "serve", "--config", str(self.config_path), "--log-format", "json"]
        with log_path.open("wb") as out, stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*args, *extra_args],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return self.proc

    async def start(self, timeout: float = START_TIMEOUT) -> Event:
        """Spawn and wait until the daemon listens; returns its ``relay_started`` event."""
        self.spawn()
        started = await self.wait_event("relay_started", timeout=timeout)
        self.port = int(started["listen"][0].rsplit(":", 1)[1])
        return started

    @property
    def base_url(self) -> str:
        assert self.port is not None, "not listening"
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/webhooks/frotcom"

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed but what SQLite committed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    async def wait(self, timeout: float = 15.0) -> int:
        """The exit status, once the process has exited (negative: killed by that signal)."""
        assert self.proc is not None, "not started"
        proc = self.proc
        await _poll(lambda: proc.poll() is not None, timeout, f"relay pid {proc.pid} to exit")
        return int(proc.returncode)

    async def stop(self, timeout: float = 15.0) -> int:
        self.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    def close(self) -> None:
        """Finalizer: kill the process if it still runs and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)

    async def __aenter__(self) -> RelayProcess:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- what the daemon said ------------------------------------------------------------

    def log_text(self, run: int | None = None) -> str:
        path = self.log_path if run is None else self.log_paths[run - 1]
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def all_output(self) -> str:
        """stdout and stderr of every run so far (for assertions about secrets)."""
        return "".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in [*self.log_paths, *self.stderr_paths]
            if p.exists()
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None, run: int | None = None) -> list[Event]:
        """Parsed JSON log lines of one run (default: the current one), complete lines only."""
        found: list[Event] = []
        for line in self.log_text(run).splitlines(keepends=True):
            if not line.endswith("\n") or not line.strip():
                continue  # the writer is mid-line
            event = json.loads(line)  # a non-JSON line fails the test, loudly
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    async def wait_event(
        self,
        name: str,
        predicate: Callable[[Event], bool] = lambda e: True,
        timeout: float = 10.0,
        count: int = 1,
    ) -> Event:
        """The ``count``-th event called ``name`` that satisfies ``predicate``."""
        matches: list[Event] = []

        def seen() -> bool:
            matches[:] = [e for e in self.events(name) if predicate(e)]
            if len(matches) >= count:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                # One more read: the event may have been written just before the exit.
                matches[:] = [e for e in self.events(name) if predicate(e)]
                if len(matches) >= count:
                    return True
                raise RelayExited(
                    f"relay exited ({self.proc.returncode}) before logging {name!r};"
                    f" stderr: {self.stderr()[-2000:]!r}; log tail: {self.log_text()[-2000:]!r}"
                )
            return False

        await _poll(seen, timeout, f"log event {name!r}")
        return matches[count - 1]

    # -- talking to it -------------------------------------------------------------------

    async def post(self, body: Any, token: str = TOKEN) -> tuple[int, Any]:
        """POST a Frotcom batch to the daemon's webhook."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url, json=body, headers={"Authorization": token}) as response,
        ):
            return response.status, await response.json()


async def _poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    # Another process's files and exit status have no event to wait on: a short poll
    # with a deadline is the condition wait here.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {what}")
        await asyncio.sleep(0.02)
