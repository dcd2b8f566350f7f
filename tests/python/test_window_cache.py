"""Gemma 3 with the sliding-window cache of normal size (the default; the
full-size one is `--swa-full`).

Its window layers keep each sequence's last 512 positions and a batch, so
the KV is a fraction of the full-size cache's. A sequence can then be cut
back only as far as its window still reaches, and prefixes are not shared
between sequences (llama.cpp never reuses a shared window cell), so
prompts keep state checkpoints the way recurrent models do. What is
checked: the memory saved, turns that extend the live sequence, cuts
inside the window, divergences before it that restart from a checkpoint,
greedy output equal to a cold server's, and four long sequences with
forks and a shared prefix decoding together (their text is not compared
with a run alone: a batch of several sequences may round differently).

Token-id prompts through the completions API, so matches are exact.
"""

from __future__ import annotations

import concurrent.futures
import re

import openai

from conftest import GEMMA
from hearth_http import post

FLAGS = ("--ctx", "4096", "--batch", "256")
FORCED = 2000  # a token id the bias makes the only greedy choice


def source(seed: int, lines: int = 400) -> str:
    """Code-like text: the model's greedy choices on it are clear ones
    (random token ids leave near ties that any change of batch shape can
    flip)."""
    out = []
    for n in range(lines):
        out.append(f"fn helper_{seed}_{n}(x: u32) -> u32 {{ x.wrapping_add({n + seed}) }}\n")
    return "".join(out)


def ids(srv, n: int, seed: int) -> list[int]:
    """`n` tokens of the server's own tokenization of `source(seed)`."""
    tokens = post(srv.url + "/tokenize", {"content": source(seed), "add_special": False}).json()["tokens"]
    assert len(tokens) >= n, len(tokens)
    return tokens[:n]


def oa(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client: openai.OpenAI, prompt: list[int], max_tokens: int = 12, **kw):
    return client.completions.create(model="any", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def kv_mib(srv) -> float:
    log = srv.log_path.read_text("utf-8", "replace")
    return float(re.search(r'KV cache: one unified buffer.*kv_mib="([0-9.]+)"', log).group(1))


def test_the_window_cache_takes_a_fraction_of_the_full_size_one(start_hearth):
    window = start_hearth("--ctx", "32768", "--parallel", "1", model=GEMMA)
    full = start_hearth("--ctx", "32768", "--parallel", "1", "--swa-full", model=GEMMA)
    log = window.log_path.read_text("utf-8", "replace")
    assert "sliding-window cache of normal size" in log and "n_swa=512" in log
    assert "sliding-window cache of normal size" not in full.log_path.read_text("utf-8", "replace")
    # 18 layers of 1 KiB a position, 15 of them windowed: the window cache
    # holds 1,024 positions of those instead of 32,768.
    assert kv_mib(window) < 0.25 * kv_mib(full), (kv_mib(window), kv_mib(full))


def test_turns_cuts_and_divergences_keep_their_reuse(start_hearth):
    """A first prompt of 1,800 tokens in chunks of 256 keeps checkpoints at
    1,536 (the last chunk end 32 tokens before its end) and 1,800; the next
    turn adds 1,200 tokens, and the window cache (768 cells for one
    sequence) then reaches back only some 750 positions."""
    srv = start_hearth(*FLAGS, model=GEMMA)
    a = ids(srv, 1800, 1)
    tail, other = ids(srv, 1200, 2), ids(srv, 60, 3)
    warm = oa(srv)
    first = complete(warm, a, max_tokens=5, logit_bias={str(FORCED): 100})
    assert cached(first.usage) == 0
    # The next turn extends the live sequence: all of it is reused.
    turn = a + [FORCED] * 5 + tail
    second = complete(warm, turn)
    assert cached(second.usage) == len(a) + 5
    # A retry with another last message leaves the sequence 50 + 12
    # positions before its end, inside the window: it is cut back there.
    retried = a + [FORCED] * 5 + tail[:1150] + other
    retry = complete(warm, retried)
    assert cached(retry.usage) == len(a) + 5 + 1150
    # An edit at 1,700 lies before the window: the sequence cannot be cut
    # back there, and the prompt restarts from the checkpoint at 1,536.
    edited = a[:1700] + other
    restarted = complete(warm, edited)
    assert cached(restarted.usage) == 1536
    log = srv.log_path.read_text("utf-8", "replace")
    assert re.search(r'source="ram" reused=1536', log), log[-3000:]
    # An edit before every checkpoint is computed whole.
    early = a[:1000] + other
    assert cached(complete(warm, early).usage) == 0

    cold = oa(start_hearth(*FLAGS, model=GEMMA))
    for prompt, warm_reply in [(turn, second), (edited, restarted), (retried, retry)]:
        fresh = complete(cold, prompt)
        assert cached(fresh.usage) == 0
        assert fresh.choices[0].text == warm_reply.choices[0].text, len(prompt)
        cold = oa(start_hearth(*FLAGS, model=GEMMA))

    off = oa(start_hearth(*FLAGS, "--ctx-checkpoints", "0", model=GEMMA))
    complete(off, a)
    complete(off, turn)
    assert cached(complete(off, edited).usage) == 0


def test_long_sequences_share_a_prefix_and_fork_without_running_out_of_cells(start_hearth):
    """Four sequences of 2,300 tokens each, with a common 1,500-token head,
    decode together with a two-choice request beside them: the window
    cache holds each sequence's window and one batch, and nothing is shared
    by reference, so every step finds its cells."""
    srv = start_hearth(*FLAGS, "--parallel", "4", model=GEMMA)
    client = oa(srv)
    head = ids(srv, 1500, 4)
    prompts = [head + ids(srv, 800, 10 + i) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        singles = [pool.submit(complete, client, p, 24) for p in prompts]
        pair = pool.submit(complete, client, head + ids(srv, 800, 20), 24, n=2)
        results = [f.result() for f in singles]
        forked = pair.result()
    for r in results:
        assert r.usage.completion_tokens == 24, r
    assert len(forked.choices) == 2
    assert forked.choices[0].text == forked.choices[1].text
    log = srv.log_path.read_text("utf-8", "replace")
    assert "engine step failed" not in log and "job failed" not in log and "refused" not in log
    # Each reply goes on with the code it was given: a window that lost
    # its cells, or attended to another sequence's, would not.
    for r in [*results, forked]:
        assert "u32" in r.choices[0].text, r.choices[0].text
