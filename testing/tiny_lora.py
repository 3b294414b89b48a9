"""Random LoRA files in the layouts trainers save (no peft or diffusers needed), for tests, the demo and the
integration test: a PEFT adapter folder, a diffusers ``pytorch_lora_weights.safetensors`` and a kohya file.

``factors`` map a module name, as the reference names it, to ``(down [rank, in], up [out, rank])``.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..core.formats.lora_targets import AR, GLM_IMAGE_DIT, LoraTarget, linear_shapes
from ..core.models.glm_ar import load_ar_model
from ..core.models.glm_image_dit import load_decoder

AR_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DIT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")


def lora_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0, std: float = 0.1):
    generator = torch.Generator().manual_seed(seed)
    return {name: ((torch.randn(rank, n_in, generator=generator) * std).contiguous(),
                   (torch.randn(n_out, rank, generator=generator) * std).contiguous())
            for name, (n_out, n_in) in shapes.items()}


def target_shapes(model: torch.nn.Module, target: LoraTarget, suffixes: tuple[str, ...]) -> dict:
    """The reference names and shapes of ``model``'s linear layers ending in one of ``suffixes``."""
    return {target.reference_names(name)[0]: shape for name, shape in linear_shapes(model).items()
            if name.endswith(suffixes)}


def write_peft_adapter(folder: str, factors: dict, *, r: int, alpha: float, **config) -> str:
    """``adapter_model.safetensors`` + ``adapter_config.json`` as ``PeftModel.save_pretrained`` writes them."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = down
        tensors[f"base_model.model.{name}.lora_B.weight"] = up
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "use_dora": False,
                   "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", **config}, f)
    return folder


def write_diffusers_lora(path: str, factors: dict, *, r: int | None = None, alpha: float | None = None,
                         prefix: str = "transformer.") -> str:
    """A ``save_lora_weights`` file: ``<prefix><module>.lora_A/B.weight``, the LoRA config in the header (none
    when ``r`` is None)."""
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = down
        tensors[f"{prefix}{name}.lora_B.weight"] = up
    metadata = {"format": "pt"}
    if r is not None:
        config = {"r": r, "lora_alpha": alpha, "peft_type": "LORA", "use_dora": False, "use_rslora": False,
                  "target_modules": sorted({n.rsplit(".", 1)[-1] for n in factors})}
        metadata["lora_adapter_metadata"] = json.dumps({f"{prefix}{k}": v for k, v in config.items()})
    save_file(tensors, path, metadata=metadata)
    return path


def write_kohya_lora(path: str, factors: dict, *, alpha: float | None, prefix: str = "lora_unet_") -> str:
    """kohya / ai-toolkit keys: ``lora_unet_<module_with_underscores>.lora_down/lora_up.weight`` and ``.alpha``."""
    tensors = {}
    for name, (down, up) in factors.items():
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, path)
    return path


def write_tiny_loras(release: str, folder: str, seed: int = 0, ar_name: str = "tiny_ar_lora",
                     dit_name: str = "tiny_dit_lora.safetensors") -> dict[str, str]:
    """An AR LoRA (PEFT adapter folder ``ar_name``) and a DiT LoRA (diffusers file ``dit_name``) for the tiny
    release, in ``folder``; returns their paths by name (``ar``, ``dit``)."""
    ar_shapes = target_shapes(load_ar_model(release, "fp32", "cpu"), AR, AR_TARGETS)
    dit_shapes = target_shapes(load_decoder(release, "fp32", "cpu"), GLM_IMAGE_DIT, DIT_TARGETS)
    return {
        "ar": write_peft_adapter(os.path.join(folder, ar_name), lora_factors(ar_shapes, 4, seed), r=4, alpha=8),
        "dit": write_diffusers_lora(os.path.join(folder, dit_name), lora_factors(dit_shapes, 4, seed + 1),
                                    r=4, alpha=4),
    }
