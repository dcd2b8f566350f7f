"""Fixtures that run the real `hearth serve` binary with the real model.

Every server binds port 0, announces itself on stdout with one line
(`hearth listening on http://127.0.0.1:PORT`) and logs to stderr, which goes
to a file. When a test fails, the tail of every live server's log is attached
to the failure report.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEARTH_BIN = Path(os.environ.get("HEARTH_BIN", REPO / "target" / "release" / "hearth"))
MODELS_DIR = Path(os.environ.get("HEARTH_HOME", Path.home() / ".cache" / "hearth")) / "models"
SMOLLM2 = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS_DIR / "gemma-3-270m-q4_k_m.gguf"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LISTENING = re.compile(r"listening on (http://\S+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this test process dies first."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# Servers started by this session and not yet stopped, for failure reports.
_live: list["HearthServer"] = []


class HearthServer:
    """One `hearth serve` process on a free port."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.args = ["serve", "--port", "0", *args]
        self.log_path = log_path
        self.url = ""
        self.stdout_lines: list[str] = []
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_") or k == "HEARTH_HOME"}
        full_env["NO_COLOR"] = "1"  # plain logs
        # One sequence at a time unless a test asks for more (--parallel):
        # the suites written for one sequence check exact single-sequence
        # behaviour. HEARTH_TEST_PARALLEL=4 runs them with four.
        full_env["HEARTH_PARALLEL"] = os.environ.get("HEARTH_TEST_PARALLEL", "1")
        full_env.update(env)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(HEARTH_BIN), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=full_env,
            preexec_fn=_die_with_parent,
        )
        self._announced = threading.Event()
        # Keep draining stdout for the life of the process so it never blocks.
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        _live.append(self)
        self._wait_listening()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout_lines.append(line)
            m = LISTENING.search(line)
            if m and not self.url:
                self.url = m.group(1).rstrip("/")
                self._announced.set()
        self._announced.set()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._announced.wait(0.1):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"hearth did not print its listening line within {START_TIMEOUT_S:.0f} s\n"
                    f"command: {HEARTH_BIN} {' '.join(self.args)}\n{self.log_tail()}"
                )
        if not self.url:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
            self.stop()
            raise RuntimeError(
                f"hearth exited ({self.proc.returncode}) before listening\n"
                f"command: {HEARTH_BIN} {' '.join(self.args)}\n"
                f"stdout: {self.stdout_lines}\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError as e:
            return f"(no log: {e})"
        tail = "\n".join(ANSI.sub("", text).splitlines()[-lines:])
        return f"--- {self.log_path} (last {lines} lines) ---\n{tail}"

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._log.close()
        if self in _live:
            _live.remove(self)
        return self.proc.returncode


def _check_binary() -> None:
    if not HEARTH_BIN.exists():
        pytest.exit(f"{HEARTH_BIN} not found: run scripts/setup.sh (or cargo build --release)", returncode=2)
    if not SMOLLM2.exists():
        pytest.exit(f"{SMOLLM2} not found: run scripts/fetch-models.sh", returncode=2)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hearth-logs")


def _factory(logs: Path) -> tuple[Callable[..., HearthServer], list[HearthServer]]:
    started: list[HearthServer] = []

    def start(*args: str, env: dict[str, str] | None = None, model: Path = SMOLLM2) -> HearthServer:
        _check_binary()
        n = len(list(logs.iterdir()))
        srv = HearthServer(["--model", str(model), *args], env or {}, logs / f"hearth-{n:02d}.log")
        started.append(srv)
        return srv

    return start, started


@pytest.fixture
def start_hearth(server_logs: Path) -> Iterator[Callable[..., HearthServer]]:
    """Factory: start_hearth(*flags, env={...}, model=PATH) -> HearthServer,
    stopped when the test ends."""
    start, started = _factory(server_logs)
    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def hearth(server_logs: Path) -> Iterator[HearthServer]:
    """The shared default server: SmolLM2, heartbeat every second."""
    start, started = _factory(server_logs)
    srv = start("--heartbeat-secs", "1")
    yield srv
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def base_url(hearth: HearthServer) -> str:
    return hearth.url


@pytest.fixture(scope="session")
def small_ctx_url(server_logs: Path) -> Iterator[str]:
    """A server with a 256-token context, for prompts that cannot fit."""
    start, started = _factory(server_logs)
    srv = start("--ctx", "256", "--heartbeat-secs", "1")
    yield srv.url
    for s in started:
        s.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.failed:
        for srv in list(_live):
            report.sections.append((f"hearth stderr ({' '.join(srv.args)})", srv.log_tail()))
    return report
