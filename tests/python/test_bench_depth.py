"""`hearth bench --depths`: prefill and decode at context depths through the
engine, written as CSV (a row per engine and depth) and an SVG plot."""

from __future__ import annotations

import csv
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import HEARTH_BIN, SMOLLM2

SVG_NS = "{http://www.w3.org/2000/svg}"


def test_depths_write_a_row_per_depth_and_a_valid_svg(tmp_path: Path):
    # llama-bench's JSON shape, for the figures drawn beside hearth's.
    llama = tmp_path / "llama-bench.json"
    llama.write_text(json.dumps([
        {"n_prompt": 32, "n_gen": 0, "n_depth": 0, "avg_ts": 900.0, "stddev_ts": 5.0},
        {"n_prompt": 0, "n_gen": 8, "n_depth": 0, "avg_ts": 80.0, "stddev_ts": 1.0},
        {"n_prompt": 32, "n_gen": 0, "n_depth": 256, "avg_ts": 700.0, "stddev_ts": 4.0},
        {"n_prompt": 0, "n_gen": 8, "n_depth": 256, "avg_ts": 60.0, "stddev_ts": 1.0},
    ]))
    out_csv, out_svg = tmp_path / "depth.csv", tmp_path / "depth.svg"
    r = subprocess.run(
        [str(HEARTH_BIN), "bench", "-m", str(SMOLLM2), "--depths", "0,256", "-p", "32", "-n", "8",
         "-r", "1", "--csv", str(out_csv), "--svg", str(out_svg), "--llama-bench-json", str(llama)],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(out_csv.open()))
    hearth = [row for row in rows if row["engine"] == "hearth"]
    assert [int(row["depth"]) for row in hearth] == [0, 256]
    for row in hearth:
        assert (int(row["pp_tokens"]), int(row["tg_tokens"])) == (32, 8)
        assert float(row["pp_ts"]) > 0 and float(row["tg_ts"]) > 0, row
    assert [(row["depth"], float(row["pp_ts"])) for row in rows if row["engine"] == "llama.cpp"] == [
        ("0", 900.0), ("256", 700.0)]
    # The table on stdout has the same rows.
    assert len([line for line in r.stdout.splitlines() if "| d" in line]) == 4, r.stdout
    root = ET.parse(out_svg).getroot()
    assert root.tag == f"{SVG_NS}svg"
    text = " ".join(t.text or "" for t in root.iter(f"{SVG_NS}text"))
    assert "prefill" in text and "decode" in text and "hearth" in text and "llama.cpp" in text
    # A line per engine in each panel.
    assert len(list(root.iter(f"{SVG_NS}polyline"))) >= 4


def test_depths_refuse_mistakes(tmp_path: Path):
    r = subprocess.run([str(HEARTH_BIN), "bench", "--csv", str(tmp_path / "x.csv")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--depths" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = subprocess.run([str(HEARTH_BIN), "bench", "-m", str(SMOLLM2), "--depths", "0",
                        "--llama-bench-json", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not llama-bench JSON" in r.stderr
