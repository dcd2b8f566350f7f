"""Write a draft model for a GGUF by keeping only its first layers (the
model's own embeddings, first blocks and output head: a layer-skip draft).
It shares the model's vocabulary by construction, is cheaper to run, and
guesses worse than the model, so tests see drafts rejected as well as
accepted.

    python make_draft.py MODEL.gguf OUT.gguf --layers 6
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import gguf


def truncate(src: Path, dst: Path, layers: int) -> None:
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == f"{arch}.block_count":
            value = layers
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, kind)
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= layers:
            continue
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    truncate(args.model, args.out, args.layers)


if __name__ == "__main__":
    main()
