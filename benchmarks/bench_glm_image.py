"""GLM-Image speed, side by side: the pack against transformers ``generate`` + diffusers ``GlmImagePipeline``.

Both sides run the real configs (``--size full``, copies in ``benchmarks/configs/full``) or small ones
(``--size tiny``) with the same random weights. Each tensor is drawn in place, on the target device and in
the target dtype, from a generator seeded by its checkpoint key, so the two sides get identical weights
without both being resident and without an fp32 copy on the CPU. Only one side is resident at a time: its
AR model is built, checked and timed, then freed; then its decoder, glyph encoder and VAE; for the
end-to-end chain the AR model joins them. The sides' outputs on fixed inputs are compared (``sanity``).

Timing: a warm-up run, then synchronized ``perf_counter`` timestamps. The pack's loops report every token
and every step through ``Progress`` (replaced here by a counting stand-in); the reference's ``generate``
calls a stopping criterion per token and the pipeline a step-end callback. ``--ar-tokens N`` and
``--decoder-steps-timed K`` stop a run after N tokens / K steps and extrapolate the stage:
prefill + (tokens - 1) / decode rate, setup + steps x seconds per step.

    python benchmarks/bench_glm_image.py --sizes 1024x1024 --ar-tokens 128 --decoder-steps-timed 5
    python benchmarks/bench_glm_image.py --size tiny --device cpu --steps 2 --ar-tokens 4   # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from standalone import register_pack  # noqa: E402

register_pack()
os.environ.setdefault("GLMIMAGE_NO_PROGRESS", "1")

import torch  # noqa: E402
from glm_image_nodes.core.host import progress  # noqa: E402
from glm_image_nodes.core.models.glm_ar import HEAD, PREFIX, ARConfig, GlmImageAR  # noqa: E402
from glm_image_nodes.core.models.glm_image_dit import GlmImageDiT, GlmImageDiTConfig  # noqa: E402
from glm_image_nodes.core.models.t5_encoder import T5Config, T5Encoder  # noqa: E402
from glm_image_nodes.core.models.vae import AutoencoderKL, GlmVAE, VAEConfig  # noqa: E402
from glm_image_nodes.core.runtime.attention import BACKENDS  # noqa: E402
from glm_image_nodes.core.runtime.options import RunOptions  # noqa: E402
from glm_image_nodes.core.stages import decoder_sampling  # noqa: E402
from glm_image_nodes.core.stages.ar_prompt import ARInputs, build_ar_inputs, load_text_tokenizer  # noqa: E402
from glm_image_nodes.core.stages.ar_sampling import generate_token_grid  # noqa: E402
from glm_image_nodes.core.stages.flow_schedule import read_shift_settings  # noqa: E402
from glm_image_nodes.core.stages.glyph import glyph_conditioning, tokenize_glyph_texts  # noqa: E402
from glm_image_nodes.core.stages.handles import TokenGrid  # noqa: E402
from glm_image_nodes.core.stages.settings import DECODE_STEPS, ARSampling, DecoderRun  # noqa: E402
from glm_image_nodes.testing.tiny_glm_image_tokenizer import write_tiny_glm_image_tokenizer  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
STAGES = ("ar", "decoder", "vae", "e2e")
CODEBOOK = 16384
EOS_ID, PAD_ID = 16385, 167841
SAMPLING = {"temperature": 0.9, "top_p": 0.75, "top_k": 16512}  # the release's generation_config
AR_WARMUP_TOKENS = 4
PROMPT_HEAD = 'A neon sign that says "GLM-Image" above a wet street at night, '
PROMPT_FILLER = "cinematic light, soft reflections, fine detail, "


# ---- devices, memory, building ---------------------------------------------------------------------------------
def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def weights_gib(*modules: torch.nn.Module) -> float:
    tensors = {t.data_ptr(): t.numel() * t.element_size()
               for m in modules for t in itertools.chain(m.parameters(), m.buffers())}
    return sum(tensors.values()) / 2**30


@contextlib.contextmanager
def building(device: torch.device | str, dtype: torch.dtype):
    """New modules are created on ``device`` in ``dtype`` (no fp32 copy anywhere)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def randomize_(module: torch.nn.Module, seed: int, key=lambda name: name) -> torch.nn.Module:
    """Overwrite the module's floating tensors in place: N(0, 1/fan_in) for matrices, ~1 for norm scales,
    N(0, 0.02) otherwise, each from a generator seeded by ``key(name)`` (its checkpoint key), so a module of
    the other side with the same keys and shapes gets the same values on the same device and dtype."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            k = key(name)
            generator = torch.Generator(tensor.device).manual_seed(zlib.crc32(f"{seed}:{k}".encode()))
            if tensor.ndim >= 2:
                tensor.normal_(0, tensor[0].numel() ** -0.5, generator=generator)
            elif "norm" in k:
                tensor.normal_(1, 0.1, generator=generator)
            else:
                tensor.normal_(0, 0.02, generator=generator)
    return module.eval().requires_grad_(False)


def build_pack_module(make, device: torch.device, dtype: torch.dtype, seed: int, key=lambda name: name):
    """The pack's modules hold no buffers, so meta + ``to_empty`` + in-place random init is exact."""
    with building("meta", dtype):
        module = make()
    return randomize_(module.to_empty(device=device), seed, key)


# ---- timing ------------------------------------------------------------------------------------------------------
class Stop(Exception):
    """A run reached its token or step budget."""


class Clock:
    """Synchronized timestamps of one run: its start, where the per-step work begins (first DiT forward),
    the first counted unit (token or step) and the unit that reaches the budget."""

    def __init__(self, device: torch.device, budget: int):
        self.device, self.budget = device, budget
        self.count = 0
        self.begin = self.first = self.last = None
        self.start = now(device)

    def mark_begin(self, *_args) -> None:
        if self.begin is None:
            self.begin = now(self.device)

    def tick(self, n: int = 1) -> bool:
        """Count ``n`` units; True once the budget is reached."""
        self.count += n
        if self.first is None:
            self.first = (self.count, now(self.device))
        if self.count >= self.budget and self.last is None:
            self.last = (self.count, now(self.device))
        return self.count >= self.budget


class BudgetProgress:
    """Stands in for the pack's ``Progress``: counts the loop's updates on a Clock, stops the loop at the budget."""

    def __init__(self, clock: Clock, total: int, desc: str = "", enabled: bool = True):
        self.clock, self.total = clock, total

    def update(self, n: int = 1, preview=None) -> None:  # previews are off in benchmarks
        if self.clock.tick(n) and self.clock.count < self.total:
            raise Stop

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@contextlib.contextmanager
def counting(clock: Clock):
    """Every loaded pack module that reports through ``host.progress.Progress`` reports to ``clock`` instead."""
    original = progress.Progress
    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("glm_image_nodes.") and getattr(m, "Progress", None) is original]
    for m in modules:
        m.Progress = functools.partial(BudgetProgress, clock)
    try:
        yield
    finally:
        for m in modules:
            m.Progress = original


def ar_figures(clock: Clock, end: float, total: int, batch: int) -> dict:
    if clock.first is None or clock.last is None or clock.last[0] <= clock.first[0]:
        raise RuntimeError("the AR run reported fewer than 2 tokens; the pack's AR loop must report each token "
                           "through Progress (the reference: through its stopping criteria).")
    (c1, t1), (cn, tn) = clock.first, clock.last
    prefill = t1 - clock.start
    rate = (cn - c1) / (tn - t1)
    projected = cn < total
    time_s = prefill + (total - 1) / rate if projected else end - clock.start
    return {"batch": batch, "tokens_per_image": total, "tokens_timed": cn, "prefill_s": prefill,
            "decode_steps_per_s": rate, "time_s": time_s, "tokens_per_s": batch * total / time_s,
            "projected": projected}


def decoder_figures(clock: Clock, end: float, steps: int) -> dict:
    if clock.begin is None or clock.last is None:
        raise RuntimeError("the decoder run reported no step; the pack's sampler must report each step through "
                           "Progress (the reference: through callback_on_step_end).")
    count, t_last = clock.last
    setup = clock.begin - clock.start
    per_step = (t_last - clock.begin) / count
    projected = count < steps
    return {"steps": steps, "steps_timed": count, "setup_s": setup, "s_per_step": per_step,
            "time_s": setup + steps * per_step if projected else end - clock.start, "projected": projected}


# ---- the work ------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One AR run: ``batch`` copies of the prompt at height x width."""
    prompt: str
    height: int
    width: int
    inputs: ARInputs
    seed: int

    @property
    def batch(self) -> int:
        return self.inputs.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.inputs.num_new_tokens

    @property
    def image_grid_thw(self) -> torch.Tensor:
        t = self.inputs.target
        return torch.tensor([[1, t.th, t.tw], [1, t.ph, t.pw]])  # the processor's order: target, then preview

    def prior_ids(self, generated: torch.Tensor) -> torch.Tensor:
        """Generated ids [B, tokens] (preview, then target) -> the decoder's prior ids [B, (H/16)(W/16)]."""
        t = self.inputs.target
        ids = generated[:, t.ph * t.pw:t.ph * t.pw + t.th * t.tw].cpu() % CODEBOOK  # the reference may emit 16384+
        return TokenGrid(ids=ids.reshape(-1, t.th, t.tw), height=t.height, width=t.width).upsampled()


@dataclass
class ImageJob:
    prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    prior_ids: torch.Tensor   # [1, (H/16)(W/16)]
    noise: torch.Tensor       # [1, 16, H/8, W/8] fp32, CPU


class PackSide:
    name = "pack"

    def __init__(self, configs: dict, device: torch.device, dtype: torch.dtype, seed: int, tokenizer,
                 decode_steps: str = "eager", compile_blocks: bool = False, attention: str = "auto"):
        self.configs, self.device, self.dtype, self.seed, self.tokenizer = configs, device, dtype, seed, tokenizer
        self.decode_steps, self.compile_blocks, self.attention = decode_steps, compile_blocks, attention
        self.ar = self.dit = self.glyph = self.vae = None

    def load_ar(self) -> float:
        cfg = ARConfig.from_text_config(self.configs["ar"]["text_config"])
        self.ar = build_pack_module(lambda: GlmImageAR(cfg), self.device, self.dtype, self.seed,
                                    key=lambda n: n if n.startswith(HEAD) else PREFIX + n)
        return weights_gib(self.ar)

    def unload_ar(self) -> None:
        self.ar = None

    @torch.inference_mode()
    def ar_logits(self, inputs: ARInputs) -> torch.Tensor:
        ids = inputs.input_ids.to(self.device)
        cache = self.ar.new_cache(ids.shape[0], ids.shape[1], inputs.attention_mask)
        return self.ar(ids, inputs.position_ids.to(self.device), cache, 0).float().cpu()

    def generate(self, job: Job, clock: Clock, variant: str) -> torch.Tensor | None:
        try:
            with counting(clock):
                grid = generate_token_grid(self.ar, self.tokenizer, job.prompt, job.height, job.width,
                                           ARSampling(seed=job.seed, num_images=job.batch,
                                                      decode_steps=self.decode_steps,
                                                      **SAMPLING), progress=False,
                                           options=RunOptions(attention=self.attention))
        except Stop:
            return None
        return grid.upsampled()

    def load_image(self) -> float:
        dit_config = GlmImageDiTConfig.from_dict(self.configs["dit"])
        self.dit = build_pack_module(lambda: GlmImageDiT(dit_config), self.device, self.dtype, self.seed)
        self.shift_settings = read_shift_settings(self.configs["scheduler_path"])
        glyph_config = T5Config.from_dict(self.configs["glyph"])
        self.glyph = build_pack_module(lambda: T5Encoder(glyph_config), self.device, self.dtype, self.seed)
        vae_config = VAEConfig.from_dict(self.configs["vae"])
        self.vae = GlmVAE(build_pack_module(lambda: AutoencoderKL(vae_config), self.device, self.dtype, self.seed))
        return weights_gib(self.dit, self.glyph, self.vae.model)

    def unload_image(self) -> None:
        self.dit = self.glyph = self.vae = None

    @torch.inference_mode()
    def probe(self, p: dict) -> dict:
        d, dt = self.device, self.dtype
        return {"dit": self.dit(p["latents"].to(d, dt), p["glyph"].to(d, dt), p["prior_ids"].to(d), False,
                                p["timestep"].to(d), p["size"].to(d), p["crop"].to(d)).float().cpu(),
                "glyph": self.glyph(p["glyph_ids"].to(d), p["glyph_mask"].to(d)).float().cpu(),
                "vae": self.vae.model.decode(p["vae_latents"].to(d, dt)).float().cpu()}

    def denoise(self, job: ImageJob, clock: Clock) -> torch.Tensor | None:
        hook = self.dit.register_forward_pre_hook(clock.mark_begin)
        try:
            with counting(clock):
                glyph = glyph_conditioning(self.glyph, job.prompt)
                settings = DecoderRun(steps=job.steps, guidance=job.guidance, shift_settings=self.shift_settings)
                return decoder_sampling.sample_latents(self.dit, job.prior_ids, glyph, job.height, job.width,
                                                       settings, noise=job.noise, progress=False,
                                                       options=RunOptions(attention=self.attention,
                                                                          compile=self.compile_blocks))
        except Stop:
            return None
        finally:
            hook.remove()

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


class ReferenceSide:
    """transformers ``GlmImageForConditionalGeneration.generate`` and diffusers ``GlmImagePipeline`` (given the
    prior ids, as after its own ``generate_prior_tokens``)."""
    name = "reference"

    def __init__(self, configs: dict, device: torch.device, dtype: torch.dtype, seed: int):
        self.configs, self.device, self.dtype, self.seed = configs, device, dtype, seed
        self.ar = self.pipe = None

    def load_ar(self) -> float:
        import transformers
        from transformers import GlmImageConfig, GlmImageForConditionalGeneration
        transformers.logging.set_verbosity_error()
        config = GlmImageConfig.from_dict(self.configs["ar"])
        with building(self.device, self.dtype):
            model = GlmImageForConditionalGeneration._from_config(config, dtype=self.dtype)
        self.ar = randomize_(model, self.seed)
        return weights_gib(self.ar)

    def unload_ar(self) -> None:
        self.ar = None
        torch._dynamo.reset()  # generate compiles the static-cache decode on CUDA; its caches hold the weights

    @torch.inference_mode()
    def ar_logits(self, inputs: ARInputs) -> torch.Tensor:
        t = inputs.target
        out = self.ar(input_ids=inputs.input_ids.to(self.device), attention_mask=inputs.attention_mask.to(self.device),
                      image_grid_thw=torch.tensor([[1, t.th, t.tw], [1, t.ph, t.pw]], device=self.device))
        return out.logits.float().cpu()

    def generate(self, job: Job, clock: Clock, variant: str) -> torch.Tensor | None:
        from transformers import (
            GenerationConfig,
            StoppingCriteria,
            StoppingCriteriaList,
        )

        class Budget(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), clock.tick(), dtype=torch.bool, device=input_ids.device)

        config = GenerationConfig(do_sample=True, **SAMPLING, max_new_tokens=job.tokens, min_new_tokens=job.tokens,
                                  eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                  cache_implementation="static" if variant == "static" else None)
        torch.manual_seed(job.seed)
        out = self.ar.generate(input_ids=job.inputs.input_ids.to(self.device),
                               attention_mask=job.inputs.attention_mask.to(self.device),
                               image_grid_thw=job.image_grid_thw.to(self.device), generation_config=config,
                               stopping_criteria=StoppingCriteriaList([Budget()]))
        if clock.count < job.tokens:
            return None
        return job.prior_ids(out[:, job.inputs.input_ids.shape[1]:])

    def load_image(self) -> float:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
        from diffusers import (
            FlowMatchEulerDiscreteScheduler,
            GlmImagePipeline,
            GlmImageTransformer2DModel,
        )
        from diffusers.utils import logging as diffusers_logging
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
        diffusers_logging.set_verbosity_error()
        with building(self.device, self.dtype):
            transformer = GlmImageTransformer2DModel.from_config(self.configs["dit"])
            vae = DiffusersAutoencoderKL.from_config(self.configs["vae"])
            text_encoder = T5EncoderModel._from_config(T5Config.from_dict(self.configs["glyph"]), dtype=self.dtype)
        randomize_(transformer, self.seed)
        randomize_(vae, self.seed)
        randomize_(text_encoder, self.seed, key=lambda n: "shared.weight" if n == "encoder.embed_tokens.weight" else n)
        with open(self.configs["scheduler_path"], encoding="utf-8") as f:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.load(f))
        self.pipe = GlmImagePipeline(tokenizer=ByT5Tokenizer(), processor=None, text_encoder=text_encoder,
                                     vision_language_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        return weights_gib(transformer, text_encoder, vae)

    def unload_image(self) -> None:
        self.pipe = None

    @torch.inference_mode()
    def probe(self, p: dict) -> dict:
        d, dt, pipe = self.device, self.dtype, self.pipe
        ids = p["prior_ids"].to(d)
        dit = pipe.transformer(hidden_states=p["latents"].to(d, dt), encoder_hidden_states=p["glyph"].to(d, dt),
                               prior_token_id=ids, prior_token_drop=torch.zeros_like(ids, dtype=torch.bool),
                               timestep=p["timestep"].to(d), target_size=p["size"].to(d), crop_coords=p["crop"].to(d),
                               return_dict=False)[0]
        glyph = pipe.text_encoder(input_ids=p["glyph_ids"].to(d),
                                  attention_mask=p["glyph_mask"].to(d)).last_hidden_state
        vae = pipe.vae.decode(p["vae_latents"].to(d, dt), return_dict=False)[0]
        return {"dit": dit.float().cpu(), "glyph": glyph.float().cpu(), "vae": vae.float().cpu()}

    def denoise(self, job: ImageJob, clock: Clock) -> torch.Tensor | None:
        def on_step_end(pipe, i, t, kwargs):
            if clock.tick() and clock.count < job.steps:
                raise Stop
            return {}

        hook = self.pipe.transformer.register_forward_pre_hook(clock.mark_begin)
        try:
            with torch.inference_mode():
                return self.pipe(prompt=job.prompt, prior_token_ids=job.prior_ids.to(self.device), height=job.height,
                                 width=job.width, num_inference_steps=job.steps, guidance_scale=job.guidance,
                                 latents=job.noise.to(self.device), output_type="latent", return_dict=False,
                                 callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=[])[0]
        except Stop:
            return None
        finally:
            hook.remove()

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """What the pipeline does after its loop (de-normalize, decode), then 0..1 images on the CPU."""
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(z)
        x = vae.decode(z * std + mean, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


# ---- stages -------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, configs: dict, device: torch.device, dtype: torch.dtype, tokenizer, prompt: str):
        self.args, self.configs, self.device, self.dtype = args, configs, device, dtype
        self.tokenizer, self.prompt = tokenizer, prompt
        self.results = {f"{h}x{w}": {} for h, w in args.sizes}
        self.build = {}
        self.outputs = {}   # side -> probe outputs, for the sanity comparison

    def load(self, build: dict, key: str, fn) -> bool:
        """Build models; records their weights and the device memory allocated afterwards."""
        if not self.attempt(build, f"{key}_weights_gib", fn):
            return False
        if self.device.type == "cuda":
            build[f"{key}_allocated_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
        return True

    def attempt(self, record: dict, key: str, fn, *args) -> bool:
        """Run ``fn(*args)`` into ``record[key]``; out of memory or any failure is recorded and its memory freed."""
        ok, start = False, time.perf_counter()
        try:
            record[key] = fn(*args)
            ok = True
        except torch.OutOfMemoryError:
            record[key] = "OOM"
        except Exception as e:  # noqa: BLE001 - one broken stage must not lose the others
            traceback.print_exc()
            record[key] = f"error: {type(e).__name__}: {e}"
        free_memory(self.device)
        status = "ok" if ok else record[key]
        print(f"  {key}: {status} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        return ok

    def job(self, height: int, width: int, batch: int) -> Job:
        inputs = build_ar_inputs(self.tokenizer, [self.prompt] * batch, height, width)
        return Job(self.prompt, height, width, inputs, self.args.seed)

    def image_job(self, height: int, width: int) -> ImageJob:
        g = torch.Generator().manual_seed(self.args.seed + 1)
        prior = torch.randint(0, CODEBOOK, (1, (height // 16) * (width // 16)), generator=g)
        noise = torch.randn(1, 16, height // 8, width // 8, generator=g)
        return ImageJob(self.prompt, height, width, self.args.steps, self.args.guidance, prior, noise)

    # -- measurements
    def measure_ar(self, side, height: int, width: int, batch: int, variant: str) -> dict:
        job = self.job(height, width, batch)
        budget = min(max(2, self.args.ar_tokens or job.tokens), job.tokens)
        side.generate(job, Clock(self.device, min(AR_WARMUP_TOKENS, job.tokens)), variant)
        reset_peak(self.device)
        clock = Clock(self.device, budget)
        side.generate(job, clock, variant)
        return {**ar_figures(clock, now(self.device), job.tokens, job.batch),
                "prompt_tokens": job.inputs.input_ids.shape[1], "peak_gib": peak_gib(self.device)}

    def measure_decoder(self, side, height: int, width: int) -> dict:
        job = self.image_job(height, width)
        budget = min(self.args.decoder_steps_timed or job.steps, job.steps)
        side.denoise(job, Clock(self.device, 1))
        reset_peak(self.device)
        clock = Clock(self.device, budget)
        side.denoise(job, clock)
        return {**decoder_figures(clock, now(self.device), job.steps), "peak_gib": peak_gib(self.device)}

    def measure_vae(self, side, height: int, width: int) -> dict:
        job = self.image_job(height, width)
        side.vae_decode(job.noise)
        reset_peak(self.device)
        times = []
        for _ in range(self.args.vae_repeats):
            start = now(self.device)
            side.vae_decode(job.noise)
            times.append(now(self.device) - start)
        return {"s": statistics.median(times), "repeats": len(times), "peak_gib": peak_gib(self.device)}

    def measure_e2e(self, side, height: int, width: int) -> dict:
        """AR (default generate for the reference, as its pipeline calls it) -> glyph + decoder -> VAE, with
        every model resident; a stage stopped by its budget hands random ids / the noise to the next one."""
        job, image_job = self.job(height, width, 1), self.image_job(height, width)
        side.generate(job, Clock(self.device, min(AR_WARMUP_TOKENS, job.tokens)), "default")
        side.denoise(image_job, Clock(self.device, 1))
        side.vae_decode(image_job.noise)
        reset_peak(self.device)
        ar_clock = Clock(self.device, min(max(2, self.args.ar_tokens or job.tokens), job.tokens))
        prior = side.generate(job, ar_clock, "default")
        ar = ar_figures(ar_clock, now(self.device), job.tokens, 1)
        if prior is not None:
            image_job = dataclasses.replace(image_job, prior_ids=prior)
        dec_clock = Clock(self.device, min(self.args.decoder_steps_timed or image_job.steps, image_job.steps))
        latents = side.denoise(image_job, dec_clock)
        dec = decoder_figures(dec_clock, now(self.device), image_job.steps)
        vae_start = now(self.device)
        side.vae_decode(image_job.noise if latents is None else latents)
        end = now(self.device)
        projected = ar["projected"] or dec["projected"]
        return {"ar_s": ar["time_s"], "decoder_s": dec["time_s"], "vae_s": end - vae_start,
                "time_s": ar["time_s"] + dec["time_s"] + end - vae_start if projected else end - ar_clock.start,
                "projected": projected, "peak_gib": peak_gib(self.device)}

    # -- phases
    def run_side(self, side, stages: list[str]) -> None:
        args, name = self.args, side.name
        build = self.build.setdefault(name, {})
        out = self.outputs.setdefault(name, {})
        if "ar" in stages:
            print(f"[{name}] AR model", file=sys.stderr, flush=True)
            if self.load(build, "ar", side.load_ar):
                self.attempt(out, "ar_logits", side.ar_logits, self.probe_inputs)
                for h, w in args.sizes:
                    record = self.results[f"{h}x{w}"].setdefault(name, {})
                    for variant in args.reference_ar if name == "reference" else ("pack",):
                        suffix = "" if name == "pack" else f"_{variant}"
                        self.attempt(record, f"ar{suffix}", self.measure_ar, side, h, w, 1, variant)
                        if args.ar_batch > 1:
                            self.attempt(record, f"ar_batch{suffix}", self.measure_ar, side, h, w, args.ar_batch,
                                         variant)
            side.unload_ar()
            free_memory(self.device)
        if not {"decoder", "vae", "e2e"} & set(stages):
            return
        print(f"[{name}] decoder, glyph encoder, VAE", file=sys.stderr, flush=True)
        if self.load(build, "image", side.load_image):
            self.attempt(out, "probe", side.probe, self.probe_image)
            for h, w in args.sizes:
                record = self.results[f"{h}x{w}"].setdefault(name, {})
                for stage, measure in (("decoder", self.measure_decoder), ("vae", self.measure_vae)):
                    if stage in stages:
                        self.attempt(record, stage, measure, side, h, w)
            if "e2e" in stages and self.load(build, "e2e_ar", side.load_ar):
                if "ar_logits" not in out:
                    self.attempt(out, "ar_logits", side.ar_logits, self.probe_inputs)
                for h, w in args.sizes:
                    self.attempt(self.results[f"{h}x{w}"].setdefault(name, {}), "e2e", self.measure_e2e, side, h, w)
        side.unload_ar()
        side.unload_image()
        free_memory(self.device)

    @property
    def probe_inputs(self) -> ARInputs:
        h, w = self.args.sizes[0]
        return build_ar_inputs(self.tokenizer, [self.prompt], h, w)

    @functools.cached_property
    def probe_image(self) -> dict:
        """Fixed small inputs for comparing the decoder, glyph encoder and VAE of the two sides."""
        g = torch.Generator().manual_seed(self.args.seed + 2)
        dit = self.configs["dit"]
        ids, mask = tokenize_glyph_texts(["GLM-Image", "benchmark"])
        return {"latents": torch.randn(1, dit["in_channels"], 32, 32, generator=g),
                "glyph": torch.randn(1, 8, dit["text_embed_dim"], generator=g),
                "prior_ids": torch.randint(0, CODEBOOK, (1, 16 * 16), generator=g),
                "timestep": torch.tensor([500.0]), "size": torch.tensor([[256.0, 256.0]]), "crop": torch.zeros(1, 2),
                "glyph_ids": ids, "glyph_mask": mask,
                "vae_latents": torch.randn(1, self.configs["vae"]["latent_channels"], 16, 16, generator=g)}

    def sanity(self) -> dict:
        pack, ref = self.outputs.get("pack", {}), self.outputs.get("reference", {})
        pairs = {}
        if isinstance(pack.get("ar_logits"), torch.Tensor) and isinstance(ref.get("ar_logits"), torch.Tensor):
            pairs["ar_logits"] = (pack["ar_logits"], ref["ar_logits"])
        if isinstance(pack.get("probe"), dict) and isinstance(ref.get("probe"), dict):
            pairs.update({k: (pack["probe"][k], ref["probe"][k]) for k in ("dit", "glyph", "vae")})
        out = {}
        for k, (a, b) in pairs.items():
            if a.shape != b.shape:
                out[k] = {"error": f"pack {tuple(a.shape)} vs reference {tuple(b.shape)}"}
                continue
            diff, scale = float((a - b).abs().max()), float(b.abs().max())
            out[k] = {"max_abs_diff": diff, "max_abs_reference": scale, "relative": diff / scale}
        return out


# ---- report -------------------------------------------------------------------------------------------------------
def comparisons(batch: int) -> list[tuple[str, str, str, str, bool]]:
    """(label, pack figure, reference figure, field, higher is better)."""
    return [
        ("AR tokens/s, 1 image (ref: generate, default cache)", "ar", "ar_default", "tokens_per_s", True),
        ("AR tokens/s, 1 image (ref: generate, static cache)", "ar", "ar_static", "tokens_per_s", True),
        (f"AR tokens/s, batch {batch} (ref: default cache)", "ar_batch", "ar_batch_default", "tokens_per_s", True),
        (f"AR tokens/s, batch {batch} (ref: static cache)", "ar_batch", "ar_batch_static", "tokens_per_s", True),
        ("AR stage, 1 image, s (ref: default cache)", "ar", "ar_default", "time_s", False),
        ("AR peak GiB, 1 image", "ar", "ar_default", "peak_gib", False),
        ("Decoder s/step (CFG)", "decoder", "decoder", "s_per_step", False),
        ("Decoder stage s (glyph + all steps)", "decoder", "decoder", "time_s", False),
        ("Decoder peak GiB", "decoder", "decoder", "peak_gib", False),
        ("VAE decode s", "vae", "vae", "s", False),
        ("VAE peak GiB", "vae", "vae", "peak_gib", False),
        ("End to end s (AR + glyph + decoder + VAE)", "e2e", "e2e", "time_s", False),
        ("End to end peak GiB (all models resident)", "e2e", "e2e", "peak_gib", False),
    ]


def figure(record: dict, key: str, field: str):
    value = record.get(key)
    if isinstance(value, dict):
        return value.get(field)
    return value if isinstance(value, str) else None  # "OOM" / "error: ..."


def ratios_and_tables(results: dict, meta: dict, args) -> tuple[dict, str]:
    ratios, lines = {}, []
    for size, sides in results.items():
        pack, ref = sides.get("pack", {}), sides.get("reference", {})
        notes = []
        ar = pack.get("ar") if isinstance(pack.get("ar"), dict) else ref.get("ar_default")
        if isinstance(ar, dict) and ar["projected"]:
            notes.append(f"AR timed over {ar['tokens_timed']} of {ar['tokens_per_image']} tokens per image and "
                         f"extrapolated (prefill + tokens / decode rate)")
        dec = pack.get("decoder") if isinstance(pack.get("decoder"), dict) else ref.get("decoder")
        if isinstance(dec, dict) and dec["projected"]:
            notes.append(f"decoder timed over {dec['steps_timed']} of {dec['steps']} steps and extrapolated")
        lines += [f"#### {size}, {args.steps} steps, guidance {args.guidance}, {meta['dtype']}, {meta['device_name']}",
                  "", "Pack / Ref: above 1 is the pack ahead in tokens/s rows; below 1 is the pack ahead in seconds "
                  "and GiB rows.", "", "| Figure | Pack | Reference | Pack / Ref |", "|---|---|---|---|"]
        size_ratios = {}
        for label, pk, rk, field, _ in comparisons(args.ar_batch):
            p, r = figure(pack, pk, field), figure(ref, rk, field)
            if p is None and r is None:
                continue
            ratio = p / r if isinstance(p, float) and isinstance(r, float) and r > 0 else None
            if ratio is not None:
                size_ratios[f"{pk}/{rk}:{field}"] = ratio
            lines.append(f"| {label} | {fmt(p)} | {fmt(r)} | {'' if ratio is None else f'{ratio:.2f}x'} |")
        ratios[size] = size_ratios
        lines += [""] + [f"- {n}." for n in notes] + ([""] if notes else [])
    lines.append(f"Measured {meta['date']} with torch {meta['torch']}, transformers {meta['transformers']}, "
                 f"diffusers {meta['diffusers']}; random weights, {'real' if args.size == 'full' else 'tiny'} configs; "
                 f"the pack and the reference in the same run.")
    return ratios, "\n".join(lines)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def version(package: str) -> str | None:
    try:
        from importlib.metadata import version as v
        return v(package)
    except Exception:  # noqa: BLE001 - not installed
        return None


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        h, w = (int(x) for x in item.lower().split("x"))
        if h % 32 or w % 32:
            raise argparse.ArgumentTypeError(f"{item}: height and width must be multiples of 32")
        sizes.append((h, w))
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="real configs or tiny ones")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--sizes", type=parse_sizes, default=None, help="HxW list, e.g. 1024x1024,2048x2048")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--ar-batch", type=int, default=4)
    p.add_argument("--ar-tokens", type=int, default=None, help="time N tokens per AR run and extrapolate")
    p.add_argument("--decoder-steps-timed", type=int, default=None, help="time K steps and extrapolate")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 1000 full, 24 tiny)")
    p.add_argument("--vae-repeats", type=int, default=3)
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ",".join(STAGES))
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--reference-ar", default="default,static",
                   help="transformers generate caches to time: default (dynamic), static (compiled on CUDA)")
    p.add_argument("--pack-decode-steps", choices=DECODE_STEPS, default="eager",
                   help="the pack's AR decode step: eager, cuda graph or compiled (captured on CUDA)")
    p.add_argument("--pack-compile-blocks", action="store_true", help="regional torch.compile of the pack's DiT")
    p.add_argument("--attention", choices=BACKENDS, default="auto", help="the pack's attention backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results.json")
    args = p.parse_args(argv)
    if args.height or args.width:
        args.sizes = parse_sizes(f"{args.height or args.width}x{args.width or args.height}")
    args.sizes = args.sizes or parse_sizes("1024x1024" if args.size == "full" else "64x64")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    args.reference_ar = [v.strip() for v in args.reference_ar.split(",") if v.strip()]
    if not set(args.reference_ar) <= {"default", "static"}:
        p.error("--reference-ar takes default and/or static")
    if args.prompt_tokens is None:
        args.prompt_tokens = 1000 if args.size == "full" else 24
    if args.ar_tokens is not None and args.ar_tokens < 2:
        p.error("--ar-tokens must be at least 2 (the decode rate needs two timestamps)")
    return args


def benchmark_prompt(tokenizer, tokens: int) -> str:
    """A prompt of about ``tokens`` text tokens with one quoted text for the glyph encoder."""
    text = PROMPT_HEAD + PROMPT_FILLER * (tokens // 4 + 1)
    while len(text) > len(PROMPT_HEAD) and len(tokenizer.encode(text)) > tokens:
        text = text[:len(text) - max(1, len(tokenizer.encode(text)) - tokens)]
    return text


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.size == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread beats several busy ones
    folder = os.path.join(CONFIGS, args.size)

    def read(*parts):
        with open(os.path.join(folder, *parts), encoding="utf-8") as f:
            return json.load(f)

    configs = {"ar": read("vision_language_encoder", "config.json"), "dit": read("transformer", "config.json"),
               "glyph": read("text_encoder", "config.json"), "vae": read("vae", "config.json"),
               "scheduler_path": os.path.join(folder, "scheduler", "scheduler_config.json")}
    with tempfile.TemporaryDirectory() as tmp:  # the tiny tokenizer has the real ids of every special token
        tokenizer = load_text_tokenizer(write_tiny_glm_image_tokenizer(tmp))
    prompt = benchmark_prompt(tokenizer, args.prompt_tokens)

    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "transformers": version("transformers"), "diffusers": version("diffusers"),
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "args": {k: v for k, v in vars(args).items()}, "prompt": prompt}
    bench = Bench(args, configs, device, dtype, tokenizer, prompt)
    bench.run_side(PackSide(configs, device, dtype, args.seed, tokenizer, args.pack_decode_steps,
                            args.pack_compile_blocks, args.attention), args.stages)
    if not args.skip_reference:
        bench.run_side(ReferenceSide(configs, device, dtype, args.seed), args.stages)
    ratios, table = ratios_and_tables(bench.results, meta, args)
    report = {"meta": meta, "weights_gib": bench.build, "sanity": bench.sanity(), "results": bench.results,
              "ratios_pack_over_reference": ratios, "table": table}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    for name, s in report["sanity"].items():
        print(f"sanity {name}: " + (s["error"] if "error" in s else
                                    f"max |pack - reference| = {s['max_abs_diff']:.3g} (reference max |x| = "
                                    f"{s['max_abs_reference']:.3g}, relative {s['relative']:.2g})"))
    print(table)
    return report


if __name__ == "__main__":
    main()
