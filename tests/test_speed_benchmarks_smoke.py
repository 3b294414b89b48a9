"""benchmarks/launch_count.py and benchmarks/step_cache.py in small CPU runs: every row is there, the counts
behave as the fused and cached paths promise, and the launch count ends on its summary line. No timing is
asserted."""
import math

import pytest
from benchmark_scripts import load_benchmark

pytest.importorskip("diffusers")
pytest.importorskip("transformers")



def script(name):
    return load_benchmark(name)


def test_launch_count(capsys):
    result = script("launch_count").main(["--layers", "2", "--tokens", "2", "--repeats", "1", "--skip-compiled",
                                          "--reference-caches", "dynamic"])
    ar, dit = result["ar"], result["dit"]
    assert set(ar) == {"pack eager", "pack fused", "transformers (dynamic cache)"}
    assert set(dit) == {"pack eager", "pack fused", "diffusers"}
    for rows in (ar, dit):
        for row in rows.values():
            assert row["aten_ops"] > 0 and row["launches"] > 0 and row["cpu_ms"] > 0 and row["host_syncs"] == 0
        assert rows["pack fused"]["launches"] < rows["pack eager"]["launches"] / 2
    # the fused AR seam: per layer 6 GEMMs, 2 add+norm, 1 rope+cache write, 2 attention kernels, 1 silu*up
    per_layer = ar["pack eager"]["launches"] - ar["pack fused"]["launches"]
    assert per_layer > 0
    # Python-level fused calls per token: the first RMSNorm, then per layer 2 add+norm, silu*up, decode attention
    assert ar["pack fused"]["custom_op_calls"] == 1 + 4 * 2 and ar["pack eager"]["custom_op_calls"] == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"AR decode: {ar['pack fused']['aten_ops']:.0f} aten ops per token (fused eager path)"


def test_step_cache(capsys):
    result = script("step_cache").main(["--steps", "4", "--repeats", "1", "--height", "128", "--width", "128",
                                        "--thresholds", "0,100"])
    off, always = result["rows"]
    assert off["threshold"] == 0 and off["steps_skipped"] == 0 and math.isinf(off["psnr_db_vs_off"])
    assert always["steps_skipped"] == 0.75 and math.isfinite(always["psnr_db_vs_off"])  # all but the first step
    assert "| step_cache |" in capsys.readouterr().out
