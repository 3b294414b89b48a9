"""benchmarks/lora_cost.py: the full-size counts follow from the release configs' shapes. No timing is asserted."""

from benchmark_scripts import load_benchmark


def test_lora_cost_counts():
    module = load_benchmark("lora_cost")
    shapes = module.full_size_shapes()
    assert len([n for n in shapes["GLM-Image AR"] if n.endswith("q_proj")]) == 40
    assert shapes["GLM-Image AR"]["layers.0.self_attn.k_proj"] == (256, 4096)   # 2 KV heads of 128
    assert len([n for n in shapes["GLM-Image DiT"] if n.endswith("attn1.to_q")]) == 30
    assert len([n for n in shapes["CogView4 DiT"] if n.endswith("attn1.to_q")]) == 28
    rows = module.counts_table()
    attention = next(r for r in rows if r.startswith("| GLM-Image AR | attention"))
    # 40 layers x (q 4096x4096 + k, v 256x4096 + o 4096x4096) patched; rank 32 factors on each
    patched = 40 * (2 * 4096 * 4096 + 2 * 256 * 4096)
    lora = 40 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 256))
    assert f"| {lora / 1e6:.1f} M | {patched / 1e9:.2f} B |" in attention
    assert f"| {2 * patched * 2 / 2 ** 30:.2f} GiB |" in attention
