"""Mapping a LoRA file onto one of the pack's models: which of its modules each LoRA layer patches.

A LoRA names modules the way its trainer saw the model: transformers' ``GlmImageForConditionalGeneration``
(``model.language_model.layers.0.self_attn.q_proj``), diffusers' DiTs (``transformer_blocks.0.attn1.to_q``),
or kohya's underscored form of either. Each ``LoraTarget`` says how the pack's module names read in the
reference, so every spelling resolves to the pack's own linear layer; shapes are checked against it. Modules that
match nothing are listed in one warning with their count; a LoRA of which nothing matches is an error that
says which model it seems to be for.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .lora_files import LoraFile, LoraLayer, read_lora
from .reading import CheckpointError

log = logging.getLogger("glm_image_nodes")

SHOWN = 8  # module names quoted in a message


@dataclass(frozen=True)
class LoraTarget:
    """A model LoRAs can be applied to. ``reference_names``: a pack module name -> the names trainers give it
    (the reference's full name first)."""
    name: str
    node: str
    reference_names: Callable[[str], tuple[str, ...]]


def _ar_names(module: str) -> tuple[str, ...]:
    """``GlmImageForConditionalGeneration`` names (and those of a LoRA trained on its inner ``GlmImageModel``)."""
    if module.startswith("lm_head"):
        return (module,)
    return ("model.language_model." + module, "language_model." + module)


AR = LoraTarget("the GLM-Image AR model", "GLM-Image AR LoRA Loader", _ar_names)
GLM_IMAGE_DIT = LoraTarget("the GLM-Image DiT decoder", "GLM-Image Decoder LoRA Loader", lambda module: (module,))
COGVIEW4_DIT = LoraTarget("the CogView4 DiT", "CogView4 LoRA Loader", lambda module: (module,))

# What a LoRA's module names say about the model it was trained for; the first that matches any name wins.
SIGNATURES = (
    (r"language_model[._]layers[._]\d+", f"{AR.name} ({AR.node})"),
    (r"prior_projector|glyph_projector|image_projector|prior_token_embedding",
     f"{GLM_IMAGE_DIT.name} ({GLM_IMAGE_DIT.node})"),
    (r"patch_embed[._]text_proj", f"{COGVIEW4_DIT.name} ({COGVIEW4_DIT.node})"),
    (r"transformer_blocks[._]\d+[._]attn1[._]to_[qkv]",
     f"a CogView4 or GLM-Image DiT ({COGVIEW4_DIT.node} or {GLM_IMAGE_DIT.node})"),
    (r"double_blocks|single_blocks|single_transformer_blocks", "FLUX"),
    (r"joint_blocks|context_block", "Stable Diffusion 3"),
    (r"input_blocks|output_blocks|down_blocks|up_blocks|mid_block", "a Stable Diffusion / SDXL UNet"),
    (r"transformer_blocks[._]\d+[._](img_mlp|txt_mlp|img_mod)", "Qwen-Image"),
    (r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn)[._]", "Wan"),
    (r"noise_refiner|context_refiner|layers[._]\d+[._]attention[._]qkv", "Lumina 2 / Z-Image"),
    (r"text_model[._]encoder|^te\d?[._]|^lora_te\d?_", "a CLIP text encoder"),
    (r"(^|[._])layers[._]\d+[._](self_attn[._][qkvo]_proj|mlp[._](gate_up|gate|up|down)_proj)",
     f"a GLM/LLaMA-style language model (for {AR.name}, use the {AR.node})"),
)


@dataclass(frozen=True)
class Lora:
    """A LoRA file mapped onto one model: the pack's module name -> its LoRA layer. ``ignored``: the file's
    modules that matched nothing."""
    name: str
    path: str
    format: str
    target: str
    layers: dict[str, LoraLayer]
    ignored: tuple[str, ...] = field(default_factory=tuple)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer of ``model`` and its (dequantized) weight shape ``(out, in)``."""
    return {name: tuple(getattr(m, "weight_shape", None) or m.weight.shape)
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def seems_for(names: list[str]) -> str | None:
    """The model a LoRA's module names point to, if they point anywhere."""
    for pattern, model in SIGNATURES:
        if any(re.search(pattern, name) for name in names):
            return model
    return None


def _listing(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (" ..." if len(names) > SHOWN else "")


def map_lora(file: LoraFile, target: LoraTarget, model: nn.Module) -> Lora:
    """Resolve every layer of ``file`` to a linear layer of ``model`` (see the module docstring)."""
    shapes = linear_shapes(model)
    lookup: dict[str, str] = {}
    for module in shapes:
        for alias in (module, *target.reference_names(module)):
            lookup[alias] = module
            lookup[alias.replace(".", "_")] = module  # kohya spells the path with underscores
    layers: dict[str, LoraLayer] = {}
    unmatched = []
    for name, layer in file.layers.items():
        module = lookup.get(name)
        if module is None:
            unmatched.append(name)
            continue
        if module in layers:
            raise CheckpointError(f"{file.path}: two of its LoRA layers patch {module} ({name} and another "
                                  f"spelling of it); the file is ambiguous.")
        if layer.shape != shapes[module]:
            raise CheckpointError(
                f"{file.path}: the LoRA layer {name} patches a {layer.shape[0]}x{layer.shape[1]} weight, but "
                f"{module} of {target.name} is {shapes[module][0]}x{shapes[module][1]}. The LoRA was trained on a "
                f"model of another size or architecture.")
        layers[module] = layer
    if not layers:
        names = unmatched + file.outside_targets
        guess = seems_for(names)
        said = f" The file says: {'; '.join(file.hints)}." if file.hints else ""
        where = (f" It seems to be for {guess}." if guess else
                 " Its names match no model this pack knows.")
        raise CheckpointError(f"{file.path}: none of its {len(names)} LoRA modules matches a layer of {target.name} "
                              f"({_listing(names)}).{where}{said} Choose a LoRA made for {target.name}.")
    ignored = unmatched + [f"{n} (not in the adapter's target_modules)" for n in file.outside_targets] + \
        [f"{k} (no LoRA tensor)" for k in file.other_keys]
    if ignored:
        log.warning("LoRA %s: %d of its keys match nothing in %s and are ignored: %s", file.name, len(ignored),
                    target.name, _listing(ignored))
    return Lora(name=file.name, path=file.path, format=file.format, target=target.name, layers=layers,
                ignored=tuple(ignored))


def load_lora(path: str, target: LoraTarget, model: nn.Module) -> Lora:
    """Read the LoRA at ``path`` (file or PEFT adapter folder) and map it onto ``model``."""
    return map_lora(read_lora(path), target, model)
