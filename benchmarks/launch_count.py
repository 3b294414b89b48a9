"""Launch counts on CPU: aten ops and GPU kernels-to-be-launched per AR decode token and per DiT block, for the
pack's eager path (torch references), its fused-kernel path (custom ops), its compiled path, and the
reference (transformers ``generate`` / diffusers ``GlmImageTransformer2DModel``), with CPU time per token /
per block of the pack against the reference, measured interleaved in this one run.

- AR: 40 layers of the release's text structure (32 query / 2 KV heads of 128, partial M-RoPE, sandwich
  norms, the 16512-id head) at a narrow width (``--width``), sampling with the release's settings. The pack's
  figure is one ``decode_step``; the reference's is the difference between ``generate`` runs of N and N + K
  new tokens, divided by K (so its per-token sampling, cache and stopping-criteria work is in).
- DiT: the difference between a 2-block and a 1-block forward of the same random model (``--dit-width``, real
  head_dim 128), with a 1024-patch image (512x512) and a 16-token glyph stream, CFG-batched (batch 2).

Counting: every aten op dispatched (``TorchDispatchMode``) is an op; a kernel launch is an op that is not a
view/alias or a bare allocation; a ``glm_image_nodes::*`` custom op is its own kernel count
(``dispatch.LAUNCHES``); ``_local_scalar_dense`` is a host sync. Compiled: ops still dispatched by the
inductor code (GEMMs, custom ops) plus the kernels inductor generated for the step (its CPU code; Triton on a
GPU). On CUDA the compiled/"cuda graph" decode step is one graph replay per token (``StepRunner``).

    python benchmarks/launch_count.py                        # the table of docs/performance.md
    python benchmarks/launch_count.py --layers 2 --tokens 2 --repeats 1 --skip-compiled   # smoke run
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]
from standalone import register_pack  # noqa: E402

register_pack()
os.environ.setdefault("GLMIMAGE_NO_PROGRESS", "1")

import torch  # noqa: E402
from bench_glm_image import CONFIGS, EOS_ID, PAD_ID, SAMPLING, build_pack_module, building, randomize_  # noqa: E402
from glm_image_nodes.core.cuda.dispatch import LAUNCHES, NAMESPACE  # noqa: E402
from glm_image_nodes.core.models.glm_ar import HEAD, PREFIX, ARConfig, GlmImageAR, mrope_cos_sin  # noqa: E402
from glm_image_nodes.core.models.glm_image_dit import GlmImageDiT, GlmImageDiTConfig  # noqa: E402
from glm_image_nodes.core.runtime.options import RunOptions  # noqa: E402
from glm_image_nodes.core.stages import ar_sampling  # noqa: E402
from glm_image_nodes.core.stages.ar_prompt import build_ar_inputs, load_text_tokenizer  # noqa: E402
from glm_image_nodes.core.stages.ar_sampling import DecodeState, SamplingNoise, decode_step  # noqa: E402
from glm_image_nodes.core.stages.settings import ARSampling  # noqa: E402
from glm_image_nodes.testing.tiny_glm_image_tokenizer import write_tiny_glm_image_tokenizer  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
PROMPT = 'a neon sign that says "GLM-Image" above a wet street at night, cinematic light'


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    def figures(self) -> dict:
        ops = launches = syncs = custom = 0
        for func, n in self.ops.items():
            ops += n
            name = func._schema.name
            if name.startswith(NAMESPACE + "::"):
                launches += n * LAUNCHES.get(name.split("::")[1], 1)
                custom += n
                continue
            base = name.split("::")[-1]
            if base == "_local_scalar_dense":
                syncs += n
            view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
            if not view and base not in ALLOCATIONS and base != "_local_scalar_dense":
                launches += n
        # Python-level dispatches of the fused path: each custom op (CPU) is, eagerly on CUDA, one direct call of
        # its Triton launcher instead (dispatch._fused), which issues LAUNCHES[op] kernels from Python
        return {"aten_ops": ops, "launches": launches, "host_syncs": syncs, "custom_op_calls": custom}


def counted(fn) -> dict:
    with OpCounter() as counter:
        fn()
    return counter.figures()


VIEW_NAMES = {"view", "as_strided", "_reinterpret_tensor", "alias", "reshape", "expand", "slice", "select", "t",
              "transpose", "permute", "unsqueeze", "squeeze", "resolve_conj", "resolve_neg"}


def compiled_figures(fn) -> dict:
    """What a compiled call runs, from the profiler (a dispatch mode cannot watch compiled code): the ops the
    generated code still dispatches and the kernels it calls (``enable_kernel_profile`` names them)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    calls = [e for e in prof.events() if e.name.startswith("## Call CompiledFxGraph")]
    ops = launches = generated = 0
    for call in calls:
        for child in call.cpu_children:
            name = child.name
            if name.startswith(("aten::", NAMESPACE + "::")):
                ops += 1
                base = name.split("::")[1]
                launches += (LAUNCHES.get(base, 1) if name.startswith(NAMESPACE)
                             else base not in VIEW_NAMES | ALLOCATIONS)
            elif "cpp_fused" in name or "triton_" in name:
                generated += 1
    return {"aten_ops": ops, "launches": launches + generated, "host_syncs": 0, "generated_kernels": generated}


def per_unit(big: dict, small: dict, units: int) -> dict:
    return {k: (big[k] - small[k]) / units for k in big}


def cpu_seconds(fn) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


# ---- AR --------------------------------------------------------------------------------------------------------
def ar_configs(layers: int, width: int) -> dict:
    with open(os.path.join(CONFIGS, "full", "vision_language_encoder", "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    text = config["text_config"]
    text.update(num_hidden_layers=layers, head_dim=text["hidden_size"] // text["num_attention_heads"],
                hidden_size=width, intermediate_size=2 * width)
    # the vision tower is not used to write tokens; keep it tiny
    config["vision_config"].update(depth=1, hidden_size=32, num_heads=2, intermediate_size=64)
    config["vq_config"].update(embed_dim=16, latent_channels=32)
    return config


class PackAR:
    """One prefilled static cache and decode state; ``step`` runs one decode token."""

    def __init__(self, config: dict, tokenizer, seed: int, height: int, width: int):
        cfg = ARConfig.from_text_config(config["text_config"])
        self.model = build_pack_module(lambda: GlmImageAR(cfg), torch.device("cpu"), torch.float32, seed,
                                       key=lambda n: n if n.startswith(HEAD) else PREFIX + n)
        self.inputs = build_ar_inputs(tokenizer, [PROMPT], height, width)
        self.codebook_size = tokenizer.codebook_size

    @torch.inference_mode()
    def reset(self):
        inputs, model = self.inputs, self.model
        length, total = inputs.input_ids.shape[1], inputs.num_new_tokens
        self.cache = model.new_cache(1, length + total - 1, inputs.attention_mask)
        noise = SamplingNoise(torch.Generator().manual_seed(0), 1, torch.device("cpu"), greedy=False,
                              codebook_size=self.codebook_size)
        noise.refill_for(0)
        cos, sin = mrope_cos_sin(model.config, inputs.decode_position_ids, model.dtype)
        self.state = DecodeState(tokens=torch.zeros(1, 1, dtype=torch.long), index=torch.tensor(length),
                                 step=torch.tensor(1), cos=cos, sin=sin, out=torch.zeros(1, total, dtype=torch.long),
                                 noise=noise)
        model(inputs.input_ids, inputs.position_ids, self.cache, 0, last_only=True)

    @torch.inference_mode()
    def step(self, fn=decode_step, mode: str = "reference"):
        fn(self.model, self.cache, self.state, ARSampling(**SAMPLING), self.codebook_size, RunOptions(kernels=mode))


class ReferenceAR:
    def __init__(self, config: dict, seed: int, inputs):
        import transformers
        from transformers import GlmImageConfig, GlmImageForConditionalGeneration
        transformers.logging.set_verbosity_error()
        with building("cpu", torch.float32):
            model = GlmImageForConditionalGeneration._from_config(GlmImageConfig.from_dict(config),
                                                                  dtype=torch.float32)
        self.model = randomize_(model, seed)
        t = inputs.target
        self.kwargs = dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                           image_grid_thw=torch.tensor([[1, t.th, t.tw], [1, t.ph, t.pw]]))

    def generate(self, tokens: int, cache: str):
        from transformers import GenerationConfig
        config = GenerationConfig(do_sample=True, **SAMPLING, max_new_tokens=tokens, min_new_tokens=tokens,
                                  eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                  cache_implementation="static" if cache == "static" else None)
        torch.manual_seed(0)
        with torch.inference_mode():
            self.model.generate(**self.kwargs, generation_config=config)


def measure_ar(args, tokenizer) -> dict:
    config = ar_configs(args.layers, args.width)
    pack = PackAR(config, tokenizer, args.seed, 256, 256)
    ref = ReferenceAR(config, args.seed, pack.inputs)
    n, k = args.tokens, args.tokens
    rows = {}

    def pack_figures(mode: str, fn=decode_step) -> dict:
        pack.reset()
        pack.step(fn, mode)  # warm-up (and the compile)
        return counted(lambda: pack.step(fn, mode))

    rows["pack eager"] = pack_figures("reference")
    rows["pack fused"] = pack_figures("fused")
    compiled = None
    if not args.skip_compiled:
        compiled = ar_sampling.compiled_decode_step()
        pack.reset()  # kernel mode reference: inductor fuses the references itself
        pack.step(compiled)  # the compile
        rows["pack compiled"] = compiled_figures(lambda: pack.step(compiled))
    for cache in args.reference_caches:
        ref.generate(1, cache)  # warm-up
        rows[f"transformers ({cache} cache)"] = per_unit(counted(lambda: ref.generate(n + k, cache)),
                                                        counted(lambda: ref.generate(n, cache)), k)

    # CPU time per token, interleaved: pack eager / fused (each K steps) and the reference's N vs N + K runs
    times = collections.defaultdict(list)
    for _ in range(args.repeats):
        for label, mode in (("pack eager", "reference"), ("pack fused", "fused")):
            pack.reset()
            times[label].append(cpu_seconds(lambda: [pack.step(decode_step, mode) for _ in range(k)]) / k)
        if compiled is not None:
            pack.reset()
            times["pack compiled"].append(cpu_seconds(lambda: [pack.step(compiled) for _ in range(k)]) / k)
        for cache in args.reference_caches:
            big = cpu_seconds(lambda: ref.generate(n + k, cache))
            small = cpu_seconds(lambda: ref.generate(n, cache))
            times[f"transformers ({cache} cache)"].append((big - small) / k)
    for label, values in times.items():
        rows[label]["cpu_ms"] = 1000 * statistics.median(values)
    return rows


# ---- DiT -------------------------------------------------------------------------------------------------------
def dit_config(layers: int, width: int) -> dict:
    with open(os.path.join(CONFIGS, "full", "transformer", "config.json"), encoding="utf-8") as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    config.update(num_layers=layers, num_attention_heads=width // config["attention_head_dim"])
    return config


def measure_dit(args) -> dict:
    from diffusers import GlmImageTransformer2DModel
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    packs, refs = {}, {}
    for layers in (1, 2):
        config = dit_config(layers, args.dit_width)
        packs[layers] = build_pack_module(lambda: GlmImageDiT(GlmImageDiTConfig.from_dict(config)), torch.device("cpu"),
                                          torch.float32, args.seed)
        with building("cpu", torch.float32):
            refs[layers] = randomize_(GlmImageTransformer2DModel.from_config(config), args.seed)
    g = torch.Generator().manual_seed(1)
    b, h, w = 2, 64, 64
    latents = torch.randn(b, 16, h, w, generator=g)
    glyph = torch.randn(b, 16, packs[1].config.text_embed_dim, generator=g)
    ids = torch.randint(0, 16384, (b, (h // 2) * (w // 2)), generator=g)
    drop = torch.tensor([False, True])
    t, size, crop = torch.tensor([500.0, 500.0]), torch.tensor([[512.0, 512.0]] * b), torch.zeros(b, 2)

    def run_pack(layers, compiled=False, mode="reference"):
        with torch.inference_mode():
            packs[layers](latents, glyph, ids, drop, t, size, crop, options=RunOptions(kernels=mode, compile=compiled))

    def run_ref(layers):
        with torch.inference_mode():
            refs[layers](latents, glyph, ids, drop[:, None].expand_as(ids), t, size, crop, return_dict=False)

    variants = {"pack eager": ("reference", False), "pack fused": ("fused", False)}
    if not args.skip_compiled:
        variants["pack compiled"] = ("reference", True)
    rows = {}
    for label, (mode, compiled) in variants.items():
        for layers in (1, 2):
            run_pack(layers, compiled, mode)  # warm-up (and the compile)
        count = compiled_figures if compiled else counted
        rows[label] = per_unit(count(lambda: run_pack(2, compiled, mode)), count(lambda: run_pack(1, compiled, mode)),
                               1)
    for layers in (1, 2):
        run_ref(layers)
    rows["diffusers"] = per_unit(counted(lambda: run_ref(2)), counted(lambda: run_ref(1)), 1)
    times = collections.defaultdict(list)
    for _ in range(args.repeats):
        for label, (mode, compiled) in variants.items():
            two = cpu_seconds(lambda: run_pack(2, compiled, mode))
            times[label].append(two - cpu_seconds(lambda: run_pack(1, compiled, mode)))
        times["diffusers"].append(cpu_seconds(lambda: run_ref(2)) - cpu_seconds(lambda: run_ref(1)))
    for label, values in times.items():
        rows[label]["cpu_ms"] = 1000 * statistics.median(values)
    return rows


# ---- report ----------------------------------------------------------------------------------------------------
def table(title: str, unit: str, rows: dict, reference: str) -> list[str]:
    ref_ms = rows[reference]["cpu_ms"]
    lines = [f"| {title} | aten ops {unit} | kernel launches {unit} | custom-op calls {unit} | host syncs | "
             f"CPU ms {unit} | / {reference} |", "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['aten_ops']:.0f} | {r['launches']:.0f} | {r.get('custom_op_calls', 0):.0f} | "
                     f"{r['host_syncs']:.0f} | {r['cpu_ms']:.2f} | {r['cpu_ms'] / ref_ms:.3f} |")
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=40, help="AR layers (the release has 40)")
    p.add_argument("--width", type=int, default=64, help="AR hidden size (the release has 4096)")
    p.add_argument("--dit-width", type=int, default=256, help="DiT width, a multiple of 128 (the release has 4096)")
    p.add_argument("--tokens", type=int, default=8, help="K: decode tokens per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reference-caches", default="dynamic,static")
    p.add_argument("--skip-compiled", action="store_true")
    p.add_argument("--skip-dit", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    args.reference_caches = [c for c in args.reference_caches.split(",") if c]
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config
    inductor_config.cpp.enable_kernel_profile = True  # generated kernels show in the profiler (set before compiling)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_glm_image_tokenizer(tmp)
        tokenizer = load_text_tokenizer(tmp)
    import transformers
    result = {"meta": {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "args": vars(args)}}
    result["ar"] = measure_ar(args, tokenizer)
    lines = table(f"AR decode, {args.layers} layers", "per token", result["ar"],
                  f"transformers ({args.reference_caches[0]} cache)") if args.reference_caches else []
    if not args.skip_dit:
        result["dit"] = measure_dit(args)
        lines += [""] + table(f"DiT block, width {args.dit_width}", "per block", result["dit"], "diffusers")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print("\n".join(lines))
    print(f"AR decode: {result['ar']['pack fused']['aten_ops']:.0f} aten ops per token (fused eager path)")
    return result


if __name__ == "__main__":
    main()
