"""Write a tiny GGUF with seeded random weights for an architecture whose real
models are too big to test with.

    python scripts/tiny_gguf.py --arch deepseek4 --out /tmp/dsv4.gguf [--seed 0]
    python scripts/tiny_gguf.py --arch mamba2    --out /tmp/mamba2.gguf

The real DeepSeek V4 Flash GGUF is over 80 GB. This one is under 2 MB and loads
in well under a second on one CPU thread, yet runs llama.cpp's real
`deepseek4` graph: hyper-connections (4 streams, Sinkhorn mixing), grouped
low-rank output projection, attention sinks, one layer of each compression
ratio (0: sliding window only; 4: compressed attention with the lightning
indexer; 128: heavily compressed attention), hash-routed and score-routed
MoE layers with a shared expert, and the hybrid KV/compressor-state memory
that goes with them. `mamba2` is the small purely recurrent model, for tests
of recurrent memory.

The output is gibberish, but greedy decoding of a given file is
deterministic, and grammars (tool calls, JSON) still force the syntax.

Both files share one byte-level BPE vocabulary (every byte is a token, plus a
few merges) and differ in their special tokens and chat templates:

- deepseek4: DeepSeek's control tokens (`<｜begin▁of▁sentence｜>`,
  `<｜end▁of▁sentence｜>`, `<｜User｜>`, `<｜Assistant｜>`, `<think>`,
  `</think>`, `｜DSML｜`) and a template in DeepSeek V4's layout
  (`<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{reply}
  <｜end▁of▁sentence｜>`), with tools described in the system part and calls
  written as `<｜DSML｜tool_calls>` blocks.
- mamba2: ChatML (`<|im_start|>`, `<|im_end|>`).

Dimensions are the smallest the vendored llama.cpp accepts where it has a
floor: the hyper-connection count must be 4, and the lightning indexer's head
size must be a multiple of 64 (it is multiplied by a Hadamard rotation of at
least 64x64). Everything else is just small.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter

# --- vocabulary -------------------------------------------------------------


def byte_symbols() -> list[str]:
    """The printable stand-in for each byte that byte-level BPE vocabularies
    use (GPT-2's table): printable Latin-1 bytes stand for themselves, the
    rest are shifted to U+0100 and up, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shifted = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + shifted))
            shifted += 1
    return out


# Pieces the merges build, so common words and the markup around tool calls
# are not all single bytes. Spaces are written as they are; `vocab` maps them.
PIECES = [
    " the", " a", " to", " of", " and", " is", " in", "in", "er", "on", "at", "ing",
    " you", " I", "Hello", " hello", "\n\n", "  ", " name", "=\"", "\">", "string",
    "true", "false", "invoke", "parameter", "tool_calls", "</", "{\"", "\":", "\",",
    " {", "}", "0", "1", " weather", " city", " Paris", "get_weather",
]


def vocab(specials: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges: 256 byte tokens, the merges that spell
    PIECES left to right, then `specials` as control tokens."""
    sym = byte_symbols()
    tokens = list(sym)
    merges: list[str] = []
    seen = set(tokens)
    for piece in PIECES:
        s = [sym[b] for b in piece.encode("utf-8")]
        acc = s[0]
        for nxt in s[1:]:
            merged = acc + nxt
            if merged not in seen:
                merges.append(f"{acc} {nxt}")
                tokens.append(merged)
                seen.add(merged)
            acc = merged
    types = [1] * len(tokens)  # NORMAL
    for t in specials:
        tokens.append(t)
        types.append(3)  # CONTROL
    return tokens, types, merges


def write_vocab(
    w: GGUFWriter, specials: list[str], pre: str, bos: str, eos: str, template: str, add_bos: bool
) -> int:
    tokens, types, merges = vocab(specials)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", tokens.index(bos))
    w.add_uint32("tokenizer.ggml.eos_token_id", tokens.index(eos))
    w.add_uint32("tokenizer.ggml.padding_token_id", tokens.index(eos))
    w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_string("tokenizer.chat_template", template)
    return len(tokens)


# --- chat templates -----------------------------------------------------------

DSV4_SPECIALS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜▁pad▁｜>",
]

# DeepSeek V4's layout: BOS, the system text (with the tools section), then
# `<｜User｜>`/`<｜Assistant｜>` turns. An assistant turn opens with `<think>`
# when thinking and with a bare `</think>` when not; past turns keep only
# their content. Calls are DSML blocks; tool results go back in a user turn.
DSV4_TEMPLATE = (
    "{%- set dsml = '｜DSML｜' -%}"
    "{{- bos_token -}}"
    "{%- if messages and messages[0].role == 'system' -%}{{- messages[0].content -}}{%- endif -%}"
    "{%- if tools -%}"
    "{%- if messages and messages[0].role == 'system' -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{{- '## Tools\\n\\nYou can call the tools below. To call tools, write one block:\\n\\n' -}}"
    "{{- '<' ~ dsml ~ 'tool_calls>\\n<' ~ dsml ~ 'invoke name=\"TOOL_NAME\">\\n' -}}"
    "{{- '<' ~ dsml ~ 'parameter name=\"NAME\" string=\"true\">text</' ~ dsml ~ 'parameter>\\n' -}}"
    "{{- '<' ~ dsml ~ 'parameter name=\"NAME\" string=\"false\">JSON</' ~ dsml ~ 'parameter>\\n' -}}"
    "{{- '</' ~ dsml ~ 'invoke>\\n</' ~ dsml ~ 'tool_calls>\\n\\n' -}}"
    "{{- 'string=\"true\" marks a raw text value, string=\"false\" a JSON value. ' -}}"
    "{{- 'Results come back as <tool_result> blocks.\\n\\n### Tool schemas\\n\\n' -}}"
    "{%- for t in tools -%}{{- (t.function if t.function is defined else t) | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{%- if not loop.first -%}{{- m.content -}}{%- endif -%}"
    "{%- elif m.role == 'user' -%}"
    "{{- '<｜User｜>' ~ m.content -}}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<｜User｜>' -}}{%- endif -%}"
    "{{- '<tool_result>' ~ m.content ~ '</tool_result>' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<｜Assistant｜></think>' ~ m.content -}}"
    "{%- if m.tool_calls -%}"
    "{%- if m.content -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{{- '<' ~ dsml ~ 'tool_calls>\\n' -}}"
    "{%- for tc in m.tool_calls -%}"
    "{{- '<' ~ dsml ~ 'invoke name=\"' ~ tc.function.name ~ '\">\\n' -}}"
    "{%- if tc.function.arguments is mapping -%}"
    "{%- for k, v in tc.function.arguments | items -%}"
    "{{- '<' ~ dsml ~ 'parameter name=\"' ~ k ~ '\" string=\"' -}}"
    "{%- if v is string -%}{{- 'true\">' ~ v -}}{%- else -%}{{- 'false\">' ~ (v | tojson) -}}{%- endif -%}"
    "{{- '</' ~ dsml ~ 'parameter>\\n' -}}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{- '<' ~ dsml ~ 'parameter name=\"arguments\" string=\"true\">' ~ tc.function.arguments ~ '</' ~ dsml ~ 'parameter>\\n' -}}"
    "{%- endif -%}"
    "{{- '</' ~ dsml ~ 'invoke>\\n' -}}"
    "{%- endfor -%}"
    "{{- '</' ~ dsml ~ 'tool_calls>' -}}"
    "{%- endif -%}"
    "{{- '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<｜Assistant｜>' -}}"
    "{%- if thinking -%}{{- '<think>' -}}{%- else -%}{{- '</think>' -}}{%- endif -%}"
    "{%- endif -%}"
)

# No `<|endoftext|>`: llama.cpp would count it as a second end-of-generation
# token, and a reply ended by it would not read back as the `<|im_end|>` the
# template writes.
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' ~ m.role ~ '\\n' ~ m.content ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# --- weights --------------------------------------------------------------------


class Weights:
    """Adds seeded random tensors. Shapes are given in ggml order (ne0 first,
    the fastest-moving dimension), as llama.cpp's loader states them."""

    def __init__(self, w: GGUFWriter, seed: int):
        self.w = w
        self.rng = np.random.default_rng(seed)

    def add(self, name: str, ne: tuple[int, ...], std: float | None = None) -> None:
        shape = tuple(reversed(ne))
        if std is None:  # scaled to the input width, so activations stay O(1)
            std = 1.0 / np.sqrt(ne[0])
        self.w.add_tensor(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def const(self, name: str, ne: tuple[int, ...], value: float) -> None:
        self.w.add_tensor(name, np.full(tuple(reversed(ne)), value, dtype=np.float32))

    def ints(self, name: str, rows: np.ndarray) -> None:
        self.w.add_tensor(name, rows.astype(np.int32))


def u32_array(w: GGUFWriter, key: str, values: list[int]) -> None:
    w.add_key_value(key, values, GGUFValueType.ARRAY, GGUFValueType.UINT32)


# --- deepseek4 ------------------------------------------------------------------

DSV4 = dict(
    n_embd=64,
    n_head=4,
    head_dim=128,  # key = value length; must differ from the indexer's to keep
    n_rot=64,  #     the raw cache unrotated, as in the real model (512 vs 128)
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=32,
    hc=4,  # the graph asserts 4
    n_expert=4,
    n_expert_used=2,
    n_ff_exp=32,
    indexer_heads=4,
    indexer_dim=64,  # Hadamard rotation: a multiple of 64
    indexer_top_k=16,
    n_swa=128,
    compress_ratios=[0, 4, 128],  # one layer of each kind llama.cpp supports
    hash_layers=1,  # the first layer routes by token id (ffn_gate_tid2eid)
    n_ctx_train=4096,
)


def write_deepseek4(out: Path, seed: int) -> None:
    d = DSV4
    arch = "deepseek4"
    w = GGUFWriter(str(out), arch)
    w.add_string("general.name", "tiny-deepseek4")
    n_vocab = write_vocab(
        w, DSV4_SPECIALS, "deepseek-v3", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DSV4_TEMPLATE, True
    )
    n_layer = len(d["compress_ratios"])
    k = lambda s: f"{arch}.{s}"  # noqa: E731
    w.add_uint32(k("context_length"), d["n_ctx_train"])
    w.add_uint32(k("embedding_length"), d["n_embd"])
    w.add_uint32(k("block_count"), n_layer)
    w.add_uint32(k("attention.head_count"), d["n_head"])
    w.add_uint32(k("attention.head_count_kv"), 1)
    w.add_uint32(k("attention.key_length"), d["head_dim"])
    w.add_uint32(k("attention.value_length"), d["head_dim"])
    w.add_uint32(k("rope.dimension_count"), d["n_rot"])
    w.add_float32(k("rope.freq_base"), 10000.0)
    w.add_float32(k("attention.layer_norm_rms_epsilon"), 1e-6)
    w.add_uint32(k("attention.q_lora_rank"), d["q_lora_rank"])
    w.add_uint32(k("attention.sliding_window"), d["n_swa"])
    w.add_uint32(k("attention.output_group_count"), d["o_groups"])
    w.add_uint32(k("attention.output_lora_rank"), d["o_lora_rank"])
    w.add_float32(k("attention.compress_rope_freq_base"), 160000.0)
    u32_array(w, k("attention.compress_ratios"), d["compress_ratios"])
    w.add_uint32(k("attention.indexer.head_count"), d["indexer_heads"])
    w.add_uint32(k("attention.indexer.key_length"), d["indexer_dim"])
    w.add_uint32(k("attention.indexer.top_k"), d["indexer_top_k"])
    w.add_uint32(k("expert_count"), d["n_expert"])
    w.add_uint32(k("expert_used_count"), d["n_expert_used"])
    w.add_uint32(k("expert_shared_count"), 1)
    w.add_uint32(k("expert_feed_forward_length"), d["n_ff_exp"])
    w.add_float32(k("expert_weights_scale"), 1.5)
    w.add_bool(k("expert_weights_norm"), True)
    w.add_uint32(k("expert_gating_func"), 4)  # sqrtsoftplus, the only one accepted
    w.add_float32(k("swiglu_clamp_exp"), 10.0)
    w.add_uint32(k("hyper_connection.count"), d["hc"])
    w.add_uint32(k("hyper_connection.sinkhorn_iterations"), 20)
    w.add_float32(k("hyper_connection.epsilon"), 1e-6)
    w.add_uint32(k("hash_layer_count"), d["hash_layers"])

    t = Weights(w, seed)
    E, H, D, hc = d["n_embd"], d["n_head"], d["head_dim"], d["hc"]
    mix = (2 + hc) * hc
    ne, ff, di = d["n_expert"], d["n_ff_exp"], d["indexer_dim"]
    t.add("token_embd.weight", (E, n_vocab), std=1.0)
    t.const("output_norm.weight", (E,), 1.0)
    t.add("output.weight", (E, n_vocab))
    t.add("output_hc_fn.weight", (hc * E, hc), std=0.01)
    t.const("output_hc_base.weight", (hc,), 0.0)
    t.const("output_hc_scale.weight", (1,), 1.0)
    for i, ratio in enumerate(d["compress_ratios"]):
        b = f"blk.{i}."
        t.const(b + "attn_norm.weight", (E,), 1.0)
        t.const(b + "attn_sinks.weight", (H,), 0.0)
        t.add(b + "attn_q_a.weight", (E, d["q_lora_rank"]))
        t.const(b + "attn_q_a_norm.weight", (d["q_lora_rank"],), 1.0)
        t.add(b + "attn_q_b.weight", (d["q_lora_rank"], H * D))
        t.add(b + "attn_kv.weight", (E, D))
        t.const(b + "attn_kv_a_norm.weight", (D,), 1.0)
        # stored 2-D; the loader views it as (H*D/groups, rank, groups)
        t.add(b + "attn_output_a.weight", (H * D // d["o_groups"], d["o_lora_rank"] * d["o_groups"]))
        t.add(b + "attn_output_b.weight", (d["o_groups"] * d["o_lora_rank"], E))
        for part in ("attn", "ffn"):
            t.add(b + f"hc_{part}_fn.weight", (hc * E, mix), std=0.01)
            t.const(b + f"hc_{part}_base.weight", (mix,), 0.0)
            t.const(b + f"hc_{part}_scale.weight", (3,), 1.0)
        if ratio:
            coff = 2 if ratio == 4 else 1  # ratio 4 compresses overlapping windows
            t.add(b + "attn_compressor_kv.weight", (E, coff * D))
            t.add(b + "attn_compressor_gate.weight", (E, coff * D))
            t.add(b + "attn_compressor_ape.weight", (coff * D, ratio), std=0.1)
            t.const(b + "attn_compressor_norm.weight", (D,), 1.0)
        if ratio == 4:
            t.add(b + "indexer.proj.weight", (E, d["indexer_heads"]))
            t.add(b + "indexer.attn_q_b.weight", (d["q_lora_rank"], d["indexer_heads"] * di))
            t.add(b + "indexer_compressor_kv.weight", (E, 2 * di))
            t.add(b + "indexer_compressor_gate.weight", (E, 2 * di))
            t.add(b + "indexer_compressor_ape.weight", (2 * di, ratio), std=0.1)
            t.const(b + "indexer_compressor_norm.weight", (di,), 1.0)
        t.add(b + "ffn_gate_inp.weight", (E, ne))
        if i < d["hash_layers"]:
            # each token id picks n_expert_used distinct experts
            rows = np.stack([t.rng.permutation(ne)[: d["n_expert_used"]] for _ in range(n_vocab)])
            t.ints(b + "ffn_gate_tid2eid.weight", rows)
        else:
            t.const(b + "exp_probs_b.bias", (ne,), 0.0)
        t.const(b + "ffn_norm.weight", (E,), 1.0)
        t.add(b + "ffn_gate_exps.weight", (E, ff, ne))
        t.add(b + "ffn_up_exps.weight", (E, ff, ne))
        t.add(b + "ffn_down_exps.weight", (ff, E, ne))
        t.add(b + "ffn_gate_shexp.weight", (E, ff))
        t.add(b + "ffn_up_shexp.weight", (E, ff))
        t.add(b + "ffn_down_shexp.weight", (ff, E))
    finish(w)


# --- mamba2 -----------------------------------------------------------------------

MAMBA2 = dict(n_embd=64, n_layer=2, d_inner=128, d_state=16, n_group=1, n_heads=4, d_conv=4)


def write_mamba2(out: Path, seed: int) -> None:
    d = MAMBA2
    arch = "mamba2"
    w = GGUFWriter(str(out), arch)
    w.add_string("general.name", "tiny-mamba2")
    n_vocab = write_vocab(w, CHATML_SPECIALS, "default", "<|im_start|>", "<|im_end|>", CHATML_TEMPLATE, False)
    k = lambda s: f"{arch}.{s}"  # noqa: E731
    w.add_uint32(k("context_length"), 4096)
    w.add_uint32(k("embedding_length"), d["n_embd"])
    w.add_uint32(k("block_count"), d["n_layer"])
    w.add_uint32(k("ssm.conv_kernel"), d["d_conv"])
    w.add_uint32(k("ssm.inner_size"), d["d_inner"])
    w.add_uint32(k("ssm.state_size"), d["d_state"])
    w.add_uint32(k("ssm.time_step_rank"), d["n_heads"])
    w.add_uint32(k("ssm.group_count"), d["n_group"])
    w.add_float32(k("attention.layer_norm_rms_epsilon"), 1e-5)

    t = Weights(w, seed)
    E, di, ds, g, nh = d["n_embd"], d["d_inner"], d["d_state"], d["n_group"], d["n_heads"]
    conv_dim = di + 2 * g * ds
    t.add("token_embd.weight", (E, n_vocab), std=1.0)
    t.const("output_norm.weight", (E,), 1.0)
    t.add("output.weight", (E, n_vocab))
    for i in range(d["n_layer"]):
        b = f"blk.{i}."
        t.const(b + "attn_norm.weight", (E,), 1.0)
        t.add(b + "ssm_in.weight", (E, di + conv_dim + nh))
        t.add(b + "ssm_conv1d.weight", (d["d_conv"], conv_dim), std=0.5)
        t.const(b + "ssm_conv1d.bias", (conv_dim,), 0.0)
        # a small step (softplus(-3) = 0.05) and A = -exp(A_log) near 0: the
        # state decays slowly, so replies depend on more than the last tokens
        t.const(b + "ssm_dt.bias", (nh,), -3.0)
        w.add_tensor(b + "ssm_a", -np.linspace(0.02, 0.2, nh, dtype=np.float32).reshape(nh, 1))
        t.const(b + "ssm_d", (1, nh), 1.0)
        t.const(b + "ssm_norm.weight", (di // g, g), 1.0)
        t.add(b + "ssm_out.weight", (di, E))
    finish(w)


def finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


WRITERS = {"deepseek4": write_deepseek4, "mamba2": write_mamba2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(WRITERS), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    WRITERS[a.arch](a.out, a.seed)


if __name__ == "__main__":
    main()
