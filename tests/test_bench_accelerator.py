"""`bench/accelerator.py` (the GPU benchmark no machine here can run) still runs end to end: its tiny shape on
the CPU, both systems, interleaved rounds, the table built from what the workers measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_benchmark_runs_both_systems_interleaved(tmp_path):
    out = tmp_path / "acc.json"
    proc = subprocess.run(
        [sys.executable, "bench/accelerator.py", "--shapes", "tiny", "--steps", "1", "--rounds", "2",
         "--torch-on-cpu", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert [r["round"] for r in runs] == [0, 1]
    for r in runs:
        assert r["zhjax"]["tokens_per_s"] > 0 and r["torch"]["tokens_per_s"] > 0, r
        assert r["zhjax"]["rows"] == r["torch"]["rows"] == 2

    sys.path.insert(0, str(ROOT / "bench"))
    import accelerator

    arch, _ = accelerator.SHAPES["tiny"]
    assert runs[0]["zhjax"]["fpt"] > 6 * (accelerator.VOCAB * arch["hidden_size"])  # embed/head alone, trained
    table = proc.stdout[proc.stdout.index("| shape |"):].splitlines()
    zrow = next(x for x in table if x.startswith("| tiny | zhjax |")).split("|")
    ratios = sorted(r["zhjax"]["tokens_per_s"] / r["torch"]["tokens_per_s"] for r in runs)
    assert zrow[-2].strip() == f"{sum(ratios) / 2:.2f}x"  # median of the two per-round ratios
    assert next(x for x in table if x.startswith("| tiny | transformers+peft |"))


def test_accelerator_table_reports_medians_mfu_and_failures():
    sys.path.insert(0, str(ROOT / "bench"))
    import accelerator

    z = lambda tps, rows=8: dict(tokens_per_s=tps, rows=rows, fpt=1e12, peak=1e15, device="H100", memory_gib=40.0)  # noqa: E731
    t = lambda tps: dict(tokens_per_s=tps, rows=8, memory_gib=50.0)  # noqa: E731
    runs = [("7b", 8, 0, z(300.0), t(200.0)), ("7b", 8, 1, z(500.0), t(200.0)), ("7b", 8, 2, z(400.0), t(100.0)),
            ("1b", 16, 0, z(100.0, 16), {"error": "exit code 1"})]
    table = accelerator.format_table(runs, "none")
    assert "on H100" in table and "3 interleaved rounds" in table
    assert "| 7b | zhjax | 8 | 400 | 40.0% | 40.0 | 2.50x |" in table  # medians: 400 tok/s; ratios 1.5, 2.5, 4
    assert "| 7b | transformers+peft | 8 | 200 | 20.0% | 50.0 | 1.00x |" in table
    assert "| 1b | transformers+peft | - | exit code 1 | - | - | - |" in table
    assert "| 1b | zhjax | 16 | 100 | 10.0% | 40.0 | - |" in table
