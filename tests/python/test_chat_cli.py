"""`hearth chat` in a real terminal: tmux runs it in a pane, `send-keys`
types, `capture-pane` reads the screen. The default model, in-process
engine, and the chat's own data directory (history, saved conversations,
KV snapshots) under the test's temporary directory.

The evidence of cache reuse is what `/stats` prints about the last reply:
`prompt N tokens, C cached (SOURCE)`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HEARTH_BIN, SMOLLM2, HearthServer

TMUX = shutil.which("tmux")
STATS = re.compile(r"last reply: prompt (\d+) tokens, (\d+) cached \((\w[\w ]*)\)")
REPLY_TIMEOUT_S = 180.0


def chat_argv(data_dir: Path, *extra: str) -> list[str]:
    # One compute thread: on a small machine shared with other work, two
    # OpenMP threads that wait on each other decode many times slower.
    return [str(HEARTH_BIN), "chat", "--model", str(SMOLLM2), "--data-dir", str(data_dir),
            "--ctx", "2048", "--temperature", "0", "--threads", "1", *extra]


def clean_env() -> dict[str, str]:
    """This environment without hearth's settings (they would reach the chat)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_") or k == "HEARTH_HOME"}


class Pane:
    """One `hearth chat` in a detached tmux session on a private server."""

    def __init__(self, socket: str, name: str, argv: list[str], env: dict[str, str], status: Path):
        self.socket, self.name, self.status = socket, name, status
        # tmux 3.3a loses the exit status of a process that leaves with
        # many threads and much memory (a plain Python program that holds
        # 1.5 GB and eight threads shows it too: the pane is dead, the
        # process a zombie tmux never reaps). So a shell waits for the chat
        # and writes its status; its INT trap (reset to the default in the
        # chat at exec) keeps Ctrl-C for the chat alone.
        self.tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "50", "sleep 600")
        self.tmux("set-option", "-t", name, "remain-on-exit", "on")
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        script = (f"trap true INT; env {envs} {shlex.join(argv)}; "
                  f"echo $? > {shlex.quote(str(status))}.part && mv {shlex.quote(str(status))}.part {shlex.quote(str(status))}")
        self.tmux("respawn-pane", "-k", "-t", name, f"exec sh -c {shlex.quote(script)}")

    def tmux(self, *args: str) -> str:
        r = subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True,
                           timeout=30, env=clean_env())
        assert r.returncode == 0, f"tmux {args}: {r.stderr}"
        return r.stdout

    def screen(self, styles: bool = False) -> str:
        """The pane's text; with `styles`, its SGR attributes as escapes."""
        return self.tmux("capture-pane", "-p", "-J", *(["-e"] if styles else []),
                         "-t", self.name, "-S", "-3000")

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", self.name, "-l", text)
        if enter:
            self.tmux("send-keys", "-t", self.name, "Enter")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def wait_for(self, pattern: str, timeout: float = REPLY_TIMEOUT_S, after: int = 0) -> re.Match:
        """The first match of `pattern` in the screen text past offset `after`."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            m = rx.search(text, after)
            if m:
                return m
            if self.dead() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the screen (exit: {self.dead()}):\n{text[-4000:]}")
            time.sleep(0.1)

    def wait_idle(self, timeout: float = REPLY_TIMEOUT_S) -> str:
        """Until the prompt `> ` is back on the last line."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            lines = [line for line in text.splitlines() if line.strip()]
            if lines and lines[-1].rstrip() == ">":
                return text
            if self.dead() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the prompt did not come back (exit: {self.dead()}):\n{text[-4000:]}")
            time.sleep(0.1)

    def stats(self) -> tuple[int, int, str, str]:
        """Type /stats; the last reply's prompt tokens, cached tokens,
        source, and the whole /stats text."""
        before = len(self.screen())
        self.type("/stats")
        m = self.wait_for(r"^session: .*generated$", after=max(0, before - 200))
        text = self.screen()
        found = list(STATS.finditer(text))
        assert found, text[-3000:]
        last = found[-1]
        return int(last.group(1)), int(last.group(2)), last.group(3), text[last.start():]

    def dead(self) -> int | None:
        """The chat's exit status once it has exited."""
        try:
            return int(self.status.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_exit(self, timeout: float = 60.0) -> int:
        """The chat's exit status (128 + N for a signal N, as the shell says)."""
        deadline = time.monotonic() + timeout
        while (code := self.dead()) is None:
            assert time.monotonic() < deadline, f"the chat did not exit:\n{self.screen()[-2000:]}"
            time.sleep(0.1)
        return code


@pytest.fixture
def tmux_server(tmp_path: Path):
    if TMUX is None:
        pytest.fail("tmux is not installed: scripts/setup.sh installs it")
    if not HEARTH_BIN.exists() or not SMOLLM2.exists():
        pytest.fail(f"needs {HEARTH_BIN} and {SMOLLM2}: run scripts/setup.sh")
    socket = f"hearth-test-{os.getpid()}-{tmp_path.name}"
    panes: list[Pane] = []

    def start(name: str, argv: list[str], env: dict[str, str] | None = None, color: bool = False) -> Pane:
        full = {"HOME": str(tmp_path), "TERM": "xterm-256color"}
        if not color:
            full["NO_COLOR"] = "1"
        full.update(env or {})
        p = Pane(socket, name, argv, full, tmp_path / f"{name}.status")
        panes.append(p)
        return p

    yield start
    for p in panes:
        (tmp_path / f"{p.name}.screen.txt").write_text(p.screen())
    subprocess.run([TMUX, "-L", socket, "kill-server"], capture_output=True)


def words_after(text: str, marker: str) -> int:
    return len(text[text.rindex(marker) + len(marker):].split())


def test_stream_stop_keep_cache_save_and_load(tmux_server, tmp_path: Path):
    data = tmp_path / "chat"
    # Long replies: generation goes on past end-of-turn until Ctrl-C.
    pane = tmux_server("a", chat_argv(data, "--ignore-eos", "--max-tokens", "1500"))
    pane.wait_for(r"/help for commands")
    question = "Tell me a long story about a dragon who guards a library."
    pane.type(question)
    # Streamed: the reply grows on the screen while it is generated.
    pane.wait_for(re.escape(question) + r"\n.*\S+(\s+\S+){5}")
    first = words_after(pane.screen(), question)
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while words_after(pane.screen(), question) <= first + 3:
        assert time.monotonic() < deadline, pane.screen()[-2000:]
        time.sleep(0.1)
    pane.keys("C-c")
    pane.wait_for(r"^\[stopped\]$")
    pane.wait_idle()
    p1, c1, src1, text = pane.stats()
    assert (c1, src1) == (0, "none"), text
    assert "stopped" in text

    # The next question continues the same sequence: everything before it
    # (the story so far included) comes from the live KV.
    pane.type("Give the dragon a name.")
    pane.wait_for(r"Give the dragon a name\.\n.*\S")
    pane.keys("C-c")
    pane.wait_idle()
    p2, c2, src2, text = pane.stats()
    assert src2 == "live", text
    assert c2 > p1, f"cached {c2} of {p2}, first prompt {p1}:\n{text}"
    assert p2 - c2 < 64, f"only the new turn is prefilled: {p2 - c2} of {p2}"

    pane.type("/save dragon")
    m = pane.wait_for(r"saved dragon \(4 messages\) to .*; KV: (\d+) tokens written")
    assert int(m.group(1)) >= c2
    assert (data / "sessions" / "dragon.json").is_file()
    pane.type("/quit")
    assert pane.wait_exit() == 0

    # A new process: the conversation and its KV come back from disk.
    pane = tmux_server("b", chat_argv(data, "--max-tokens", "24"))
    pane.wait_for(r"/help for commands")
    pane.type("/load dragon")
    pane.wait_for(r"loaded dragon \(4 messages\)")
    pane.type("What colour is the dragon?")
    pane.wait_for(r"What colour is the dragon\?\n")
    pane.wait_idle()
    p3, c3, src3, text = pane.stats()
    assert src3 == "disk", text
    assert c3 >= c2, f"the saved prefix ({c2} tokens) comes back: {c3} of {p3}"
    assert p3 - c3 < 64, f"no prefill of the saved conversation: {p3 - c3} of {p3} computed"
    # Ctrl-D leaves.
    pane.keys("C-d")
    assert pane.wait_exit() == 0


def test_prefill_progress_bar_and_multi_line_input(tmux_server, tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("\n".join(f"Line {i}: the number {i} squared is {i * i}." for i in range(40)))
    # The second prefill chunk stalls 4 s: the bar is on the screen meanwhile.
    pane = tmux_server("c", chat_argv(tmp_path / "chat", "--batch", "128", "--max-tokens", "16"),
                       env={"HEARTH_FAULT": "prefill_stall:4:1"})
    pane.wait_for(r"/help for commands")
    pane.type(f"/file {notes}")
    pane.wait_for(r"attached .*notes\.txt \(\d+ bytes\)")
    # A line ending in a backslash continues on the next.
    pane.type("What is line 7 \\")
    pane.type("about?")
    m = pane.wait_for(r"prefill \[[=> ]+\] (\d+)/(\d+) tokens")
    (tmp_path / "progress.screen.txt").write_text(pane.screen())
    done, total = int(m.group(1)), int(m.group(2))
    assert 0 < done < total and total > 500, m.group(0)
    pane.wait_idle()
    assert not re.search(r"prefill \[", pane.screen().split("about?")[-1]), "the bar is cleared"
    p, c, _, text = pane.stats()
    assert p == total, text


THINK_TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "templates" / "qwen3_think.jinja"


def test_reasoning_is_dimmed_and_kept_out_of_the_answer(tmux_server, tmp_path: Path):
    # The template opens `<think>`: a short reply is all reasoning.
    argv = chat_argv(tmp_path / "chat", "--chat-template", str(THINK_TEMPLATE), "--max-tokens", "12")
    pane = tmux_server("d", argv, color=True)
    pane.wait_for(r"/help for commands")
    pane.type("Hi there")
    pane.wait_idle()
    styled = pane.screen(styles=True)
    after = styled[styled.index("Hi there") + len("Hi there"):]
    m = re.search(r"\x1b\[2m([^\x1b]*\w[^\x1b]*)", after)
    assert m, f"no dimmed reasoning after the question: {after!r}"
    # One-shot: the answer alone on stdout, the reasoning on stderr.
    r = subprocess.run([*argv, "-p", "Hi there"], capture_output=True, text=True,
                       timeout=REPLY_TIMEOUT_S, env=clean_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", r.stdout
    assert m.group(1).strip().split()[0] in r.stderr, (m.group(1), r.stderr)


def test_one_shot_prints_the_answer_and_exits(tmp_path: Path):
    env = clean_env()
    argv = chat_argv(tmp_path / "chat", "--max-tokens", "24")
    r = subprocess.run([*argv, "-p", "What is the capital of France?"], capture_output=True,
                       text=True, timeout=REPLY_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) >= 3, r.stdout
    assert "\x1b[" not in r.stdout, "no terminal styling in a pipe"
    # The prompt on stdin.
    r2 = subprocess.run(argv, input="What is the capital of France?\n", capture_output=True,
                        text=True, timeout=REPLY_TIMEOUT_S, env=env)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout, "greedy: the same answer either way"
    # Mistakes are clear errors.
    r3 = subprocess.run([*argv, "-p", "  "], capture_output=True, text=True, timeout=60, env=env)
    assert r3.returncode != 0 and "empty" in r3.stderr


def test_url_mode_talks_to_a_running_server(start_hearth, tmp_path: Path):
    srv: HearthServer = start_hearth("--api-key", "sekrit", "--ctx", "2048")
    env = clean_env()
    base = [str(HEARTH_BIN), "chat", "--url", srv.url, "--data-dir", str(tmp_path / "chat"),
            "--temperature", "0", "--max-tokens", "24"]
    r = subprocess.run([*base, "--api-key", "sekrit", "-p", "What is the capital of France?"],
                       capture_output=True, text=True, timeout=REPLY_TIMEOUT_S, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    # The same prompt rendering and the same greedy engine as in-process.
    local = subprocess.run([*chat_argv(tmp_path / "local", "--max-tokens", "24"), "-p",
                            "What is the capital of France?"], capture_output=True, text=True,
                           timeout=REPLY_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    assert local.returncode == 0, local.stderr
    assert r.stdout == local.stdout and len(r.stdout.split()) >= 3, (r.stdout, local.stdout)
    r = subprocess.run([*base, "-p", "hi"], capture_output=True, text=True, timeout=60, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "401" in r.stderr, r.stderr
