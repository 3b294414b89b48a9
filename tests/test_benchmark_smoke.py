"""The side-by-side benchmark (benchmarks/bench_glm_image.py) in its tiny mode on the CPU: every path runs.

No timing is asserted: only that every figure is there and is a finite positive number, that the pack and
the reference really got the same weights (their outputs on fixed inputs agree), and that the stage switches
and the out-of-memory recording work.
"""
import json
import math

import pytest
import torch
from benchmark_scripts import load_benchmark
from glm_image_nodes.core.host import progress
from glm_image_nodes.core.stages import ar_sampling, decoder_sampling

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SANITY_ATOL = 1e-4   # fp32, same weights and inputs; measured 0.0 for all four
TINY = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--ar-tokens", "4", "--ar-batch", "2",
        "--prompt-tokens", "16", "--vae-repeats", "1", "--seed", "1"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_glm_image")


def positive_numbers(record: dict, where: str) -> None:
    for key, value in record.items():
        if key == "peak_gib":
            assert value is None, f"{where}.{key}: no device memory figure on the CPU"
        elif isinstance(value, bool):
            continue
        else:
            assert isinstance(value, (int, float)), f"{where}.{key} = {value!r}"
            assert math.isfinite(value) and value > 0, f"{where}.{key} = {value!r}"


def test_tiny_run_has_every_figure_and_the_sides_agree(bench, tmp_path):
    out = tmp_path / "results.json"
    report = bench.main(TINY + ["--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert ar_sampling.Progress is decoder_sampling.Progress is progress.Progress  # the stand-ins are gone

    meta = report["meta"]
    for key in ("device_name", "torch", "transformers", "diffusers", "date", "dtype"):
        assert meta[key], key
    assert meta["dtype"] == "float32"

    sizes = report["results"]
    assert list(sizes) == ["64x64"]
    pack, ref = sizes["64x64"]["pack"], sizes["64x64"]["reference"]
    assert sorted(pack) == ["ar", "ar_batch", "decoder", "e2e", "vae"]
    assert sorted(ref) == ["ar_batch_default", "ar_batch_static", "ar_default", "ar_static", "decoder", "e2e", "vae"]
    for side, records in (("pack", pack), ("reference", ref)):
        for stage, record in records.items():
            assert isinstance(record, dict), f"{side}.{stage}: {record}"
            positive_numbers(record, f"{side}.{stage}")
    for record in (pack["ar"], ref["ar_default"], ref["ar_static"]):
        assert record["tokens_timed"] == 4 and record["tokens_per_image"] == 4 + 256 and record["projected"]
    assert pack["ar_batch"]["batch"] == ref["ar_batch_static"]["batch"] == 2
    for record in (pack["decoder"], ref["decoder"]):
        assert record["steps_timed"] == record["steps"] == 2 and not record["projected"]
    assert pack["e2e"]["projected"] and ref["e2e"]["projected"]

    ratios = report["ratios_pack_over_reference"]["64x64"]
    # every comparison but the peak-memory rows (none on the CPU)
    assert len(ratios) == sum(field != "peak_gib" for *_, field, _ in bench.comparisons(2)) == 9
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())

    sanity = report["sanity"]
    assert sorted(sanity) == ["ar_logits", "dit", "glyph", "vae"]
    for name, s in sanity.items():
        assert s["max_abs_reference"] > 0.1, name  # real outputs, not zeros that would trivially agree
        assert s["max_abs_diff"] <= SANITY_ATOL, (name, s)

    for side in ("pack", "reference"):
        assert report["weights_gib"][side]["ar_weights_gib"] > 0
        assert report["weights_gib"][side]["image_weights_gib"] > 0
    assert "| AR tokens/s, 1 image (ref: generate, default cache) |" in report["table"]
    assert "| End to end s (AR + glyph + decoder + VAE) |" in report["table"]


def test_same_key_same_weights_other_seed_other_weights(bench):
    def drawn(seed, key):
        return bench.randomize_(torch.nn.Linear(8, 4), seed, key=lambda name: key + name).weight.clone()

    assert torch.equal(drawn(0, "a."), drawn(0, "a."))
    assert not torch.equal(drawn(0, "a."), drawn(1, "a."))
    assert not torch.equal(drawn(0, "a."), drawn(0, "b."))


def test_stage_switches_and_out_of_memory_is_recorded(bench, tmp_path, monkeypatch):
    def out_of_memory(self, side, height, width):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench.Bench, "measure_vae", out_of_memory)
    report = bench.main(TINY + ["--stages", "decoder,vae", "--skip-reference", "--sizes", "64x64,64x96",
                                "--out", str(tmp_path / "r.json")])
    for size in ("64x64", "64x96"):
        assert list(report["results"][size]) == ["pack"]
        record = report["results"][size]["pack"]
        assert record["vae"] == "OOM"
        positive_numbers(record["decoder"], f"{size}.decoder")
    assert report["sanity"] == {}
    assert "| VAE decode s | OOM | - |  |" in report["table"]


def test_unbudgeted_end_to_end_feeds_the_generated_ids_to_the_decoder(bench, tmp_path):
    report = bench.main(["--size", "tiny", "--device", "cpu", "--steps", "2", "--stages", "e2e", "--sizes", "32x32",
                         "--prompt-tokens", "8", "--out", str(tmp_path / "e2e.json")])
    for side in ("pack", "reference"):
        record = report["results"]["32x32"][side]["e2e"]
        assert isinstance(record, dict), record
        assert not record["projected"]  # every token and step ran: the AR's own ids went to the decoder
        positive_numbers(record, f"{side}.e2e")
        assert record["time_s"] >= record["ar_s"]
    assert sorted(report["sanity"]) == ["ar_logits", "dit", "glyph", "vae"]
