"""KV reuse through the API: live prefix, RAM snapshots, disk snapshots.

Each test starts its own server so that what it finds cached is what it put
there. Reported usage is the evidence: OpenAI's
`prompt_tokens_details.cached_tokens`, Anthropic's `cache_read_input_tokens`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import anthropic
import openai

from conftest import HEARTH_BIN

FACTS = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(60))


def oa(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, messages, max_tokens=24):
    r = client.chat.completions.create(model="any", messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content, r.usage


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_multi_turn_prefills_only_the_new_tokens(start_hearth):
    client = oa(start_hearth())
    messages = [{"role": "system", "content": "You answer questions about these facts. " + FACTS}]
    previous_total = None
    for turn in range(4):
        messages.append({"role": "user", "content": f"Question {turn}: what is fact {turn}?"})
        text, usage = chat(client, messages)
        messages.append({"role": "assistant", "content": text})
        if previous_total is not None:
            new = usage.prompt_tokens - previous_total
            prefilled = usage.prompt_tokens - cached(usage)
            # The previous prompt and all of its reply come from the cache,
            # the reply's last token too (decoded once the engine went
            # idle); only what the client added is computed.
            assert cached(usage) == previous_total, (turn, usage)
            assert prefilled == new, (turn, new, prefilled)
        previous_total = usage.prompt_tokens + usage.completion_tokens


def test_anthropic_usage_reports_cache_reads(start_hearth):
    srv = start_hearth()
    client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Remember these facts. " + FACTS}]
    first = client.messages.create(model="any", max_tokens=16, messages=messages, extra_body={"temperature": 0})
    assert first.usage.cache_read_input_tokens == 0
    total_first = first.usage.input_tokens
    messages += [{"role": "assistant", "content": first.content[0].text}, {"role": "user", "content": "And fact 3?"}]
    second = client.messages.create(model="any", max_tokens=16, messages=messages, extra_body={"temperature": 0})
    # As the real API does: input_tokens counts only what was not read from cache.
    assert second.usage.cache_read_input_tokens >= total_first
    assert 0 < second.usage.input_tokens < 64
    # The streamed message reports the same split at its end.
    messages[-1] = {"role": "user", "content": "And fact 4?"}
    with client.messages.stream(model="any", max_tokens=16, messages=messages, extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert final.usage.cache_read_input_tokens >= total_first


def test_two_interleaved_sessions_keep_their_prefixes(start_hearth):
    client = oa(start_hearth())
    sessions = {
        "a": [{"role": "system", "content": "Session A. " + FACTS}],
        "b": [{"role": "system", "content": "Session B, another task entirely. " + FACTS[::-1]}],
    }
    totals: dict[str, int] = {}
    for turn in range(3):
        for name, messages in sessions.items():
            messages.append({"role": "user", "content": f"Turn {turn} of session {name}."})
            text, usage = chat(client, messages)
            messages.append({"role": "assistant", "content": text})
            if name in totals:
                # The other session ran in between; this one's prefix came back
                # from a RAM snapshot instead of being prefilled again.
                assert cached(usage) >= totals[name] - 2, (name, turn, usage)
            totals[name] = usage.prompt_tokens + usage.completion_tokens


LONG = [{"role": "system", "content": "Keep these facts in mind. " + FACTS + " " + FACTS[::-1]},
        {"role": "user", "content": "Which fact mentions the number 7?"}]


def snapshot_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.kv"))


def test_disk_cache_survives_a_restart_with_identical_output(start_hearth, tmp_path):
    kv = tmp_path / "kv"
    srv = start_hearth("--kv-disk-dir", str(kv))
    cold_text, cold_usage = chat(oa(srv), LONG, max_tokens=32)
    assert cached(cold_usage) == 0
    assert srv.stop() == 0
    assert snapshot_files(kv), "no snapshot was written"

    srv = start_hearth("--kv-disk-dir", str(kv))
    warm_text, warm_usage = chat(oa(srv), LONG, max_tokens=32)
    assert cached(warm_usage) >= 512, warm_usage
    assert warm_usage.prompt_tokens == cold_usage.prompt_tokens
    assert warm_text == cold_text


def damage_and_restart(start_hearth, tmp_path, damage):
    kv = tmp_path / "kv"
    srv = start_hearth("--kv-disk-dir", str(kv))
    cold_text, _ = chat(oa(srv), LONG, max_tokens=32)
    srv.stop()
    files = snapshot_files(kv)
    assert files
    for f in files:
        damage(f)
    srv = start_hearth("--kv-disk-dir", str(kv))
    text, usage = chat(oa(srv), LONG, max_tokens=32)
    assert cached(usage) == 0, "a damaged snapshot was trusted"
    assert text == cold_text
    srv.stop()
    log = srv.log_path.read_text()
    removed = log.count("KV snapshot ignored and removed")
    return files, removed, log


def test_corrupt_snapshot_is_ignored_and_removed(start_hearth, tmp_path):
    def corrupt(f: Path):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    files, removed, log = damage_and_restart(start_hearth, tmp_path, corrupt)
    # The one the request tried failed its checksum and was removed.
    assert removed >= 1
    assert "checksum" in log


def test_truncated_snapshot_is_ignored_and_removed(start_hearth, tmp_path):
    def truncate(f: Path):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 1000])

    files, removed, log = damage_and_restart(start_hearth, tmp_path, truncate)
    assert removed == len(files)
    assert "truncated" in log


def test_snapshot_of_another_model_is_ignored_and_removed(start_hearth, tmp_path):
    def foreign(f: Path):
        data = bytearray(f.read_bytes())
        data[16:48] = bytes(32)  # the model fingerprint
        f.write_bytes(bytes(data))

    files, removed, log = damage_and_restart(start_hearth, tmp_path, foreign)
    assert removed == len(files)
    assert "another model" in log


def test_retry_after_a_disconnect_mid_prefill_resumes(start_hearth):
    # Chunks of 64 tokens; the first request stalls inside its second chunk.
    srv = start_hearth("--batch", "64", "--heartbeat-secs", "0.5", env={"HEARTH_FAULT": "prefill_stall:30:1"})
    prompt = [{"role": "user", "content": "Keep these facts in mind. " + FACTS[:1500]}]
    body = {"model": "any", "messages": prompt, "max_tokens": 8, "temperature": 0, "stream": True}

    payload = json.dumps(body).encode()
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        # Hang up once the first chunk is done (the second is stalled).
        deadline = time.monotonic() + 25
        while "prefill 64/" not in srv.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "prefill 64/" in srv.log_path.read_text()
        time.sleep(0.5)
    # The socket is closed: the client left in the middle of the prefill.
    text, usage = chat(oa(srv), prompt, max_tokens=8)
    # The chunk computed before the stall was kept and reused.
    assert cached(usage) >= 64, usage


def cache_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HEARTH_BIN), "cache", *args], capture_output=True, text=True, timeout=60)


def test_cache_cli_lists_shows_and_clears(start_hearth, tmp_path):
    """`hearth cache list`, `show NAME` (or a unique prefix) and `clear`
    on the snapshots a server left, and a server after `clear` finds none."""
    kv = tmp_path / "kv"
    srv = start_hearth("--kv-disk-dir", str(kv))
    _, usage = chat(oa(srv), LONG, max_tokens=8)
    assert srv.stop() == 0
    files = snapshot_files(kv)
    assert files, "no snapshot was written"
    name = files[0].name

    listed = cache_cli("list", "--kv-disk-dir", str(kv))
    assert listed.returncode == 0, listed.stderr
    assert f"{len(files)} snapshots" in listed.stdout, listed.stdout
    assert all(f.name in listed.stdout for f in files), listed.stdout

    shown = cache_cli("show", name[:8], "--kv-disk-dir", str(kv))
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(":", 1) for line in shown.stdout.splitlines()[:11] if ":" in line)
    assert fields["file"].strip() == str(files[0])
    tokens = int(fields["tokens"].split()[0])
    assert 0 < tokens <= usage.prompt_tokens + 8, shown.stdout
    assert int(fields["size"].split()[0]) == files[0].stat().st_size
    assert "Keep these facts in mind. Fact 0: the number 0 squared is 0." in shown.stdout, shown.stdout

    missing = cache_cli("show", "no-such-snapshot", "--kv-disk-dir", str(kv))
    assert missing.returncode != 0 and "no snapshot named no-such-snapshot" in missing.stderr, missing
    # A temporary file a crashed writer left is cleared too; other files are not.
    (kv / f".{name}.tmp-1234").write_bytes(b"partial")
    (kv / "notes.txt").write_text("mine")
    cleared = cache_cli("clear", "--kv-disk-dir", str(kv))
    assert cleared.returncode == 0, cleared.stderr
    assert f"removed {len(files) + 1} snapshot files" in cleared.stdout, cleared.stdout
    assert sorted(p.name for p in kv.iterdir()) == ["notes.txt"]
    assert "0 snapshots" in cache_cli("list", "--kv-disk-dir", str(kv)).stdout

    srv = start_hearth("--kv-disk-dir", str(kv))
    _, usage = chat(oa(srv), LONG, max_tokens=8)
    assert cached(usage) == 0, usage
