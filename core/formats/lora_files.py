"""Reading LoRA files into one neutral form: per module, the low-rank factors and the scale of their product.

Formats read:
- **PEFT adapters**: ``adapter_model.safetensors`` (or ``.bin``) + ``adapter_config.json``, as ``peft`` saves
  them (keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``). The config's ``r``,
  ``lora_alpha``, ``rank_pattern`` / ``alpha_pattern`` (peft's own matching), ``use_rslora`` and
  ``target_modules`` / ``exclude_modules`` are honoured; DoRA and the other LoRA variants are refused with
  the reason.
- **diffusers LoRA files** (``pytorch_lora_weights.safetensors``): what ``save_lora_weights`` of a pipeline
  (keys ``transformer.<module>.lora_A.weight``) or ``save_lora_adapter`` of a model writes, with the LoRA
  config in the ``lora_adapter_metadata`` header; older ``.lora.down`` / ``.lora.up`` keys too. Without
  metadata, alpha = rank (scale 1), as diffusers assumes.
- **kohya / ai-toolkit / ComfyUI** keys: ``lora_unet_<module_with_underscores>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` (scale alpha / rank; 1 without alpha), and ``diffusion_model.`` prefixes.

``LoraFile.layers`` keys are module names as the file writes them (wrapper prefixes removed); kohya names keep
their underscores (``underscored``) and are resolved against a model's module names by ``lora_targets``.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .reading import CheckpointError, open_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"   # diffusers' LoRA config in the safetensors header

# (down suffix, up suffix) of each key convention
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
         (".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
ALPHA = ".alpha"
WRAPPERS = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")

# Tensors of other adapter types or LoRA variants: the key part that marks them, and what they are.
REFUSED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora: a learned magnitude rescales every weight column)",
    "dora_scale": "DoRA (dora_scale: a learned magnitude rescales every weight column)",
    "lora_embedding_A": "a LoRA on an embedding table (lora_embedding_A/B)",
    "lora_mid": "a LoCon/Tucker LoRA (lora_mid) for convolutions",
    "hada_w1": "a LoHa (Hadamard product) adapter",
    "lokr_w1": "a LoKr (Kronecker product) adapter",
    "oft_": "an OFT adapter",
    "boft_": "a BOFT adapter",
}
# adapter_config.json fields that change how the adapter is applied (beyond W + scale * B @ A)
REFUSED_CONFIG = {
    "use_dora": "DoRA (a learned magnitude rescales every weight column)",
    "lora_bias": "a trained bias on lora_B (lora_bias)",
    "modules_to_save": "whole modules replaced by trained copies (modules_to_save)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "layer_replication": "replicated layers (layer_replication)",
    "trainable_token_indices": "trained embedding rows (trainable_token_indices)",
    "alora_invocation_tokens": "an activated LoRA that switches on after invocation tokens (aLoRA)",
    "use_qalora": "QA-LoRA (group-pooled inputs)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing between several LoRAs (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
ADVICE = ("The pack applies plain LoRA deltas (weight + scale * B @ A): merge this adapter into the model with "
          "peft's merge_and_unload() and save the full weights, or train a plain LoRA.")


@dataclass(frozen=True)
class LoraLayer:
    """One layer's LoRA: ``scale * up @ down`` is added to the weight ``[out, in]``."""
    down: torch.Tensor   # [rank, in]   (lora_A, lora_down)
    up: torch.Tensor     # [out, rank]  (lora_B, lora_up)
    scale: float         # alpha / rank, or alpha / sqrt(rank) with rsLoRA

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight it patches."""
        return self.up.shape[0], self.down.shape[1]


@dataclass
class LoraFile:
    """A LoRA as read from disk. ``layers``: module name (as the file writes it, wrappers removed) -> layer;
    ``outside_targets``: modules with weights that the adapter's ``target_modules`` exclude (never applied);
    ``other_keys``: tensors of no LoRA convention (never applied); ``hints``: what the file says about the model
    it was trained on."""
    path: str
    format: str
    layers: dict[str, LoraLayer]
    underscored: bool = False
    outside_targets: list[str] = field(default_factory=list)
    other_keys: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip(os.sep)) or self.path


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT ``LoraConfig`` that decide the scale of each module and which modules count."""
    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "AdapterConfig":
        peft_type = raw.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise CheckpointError(f"{source}: this is a {peft_type} adapter, not a LoRA. {ADVICE}")
        for key, what in REFUSED_CONFIG.items():
            if raw.get(key):
                raise CheckpointError(f"{source}: the adapter uses {what} ({key}={raw[key]!r}). {ADVICE}")
        return cls(r=raw.get("r"), lora_alpha=raw.get("lora_alpha"), rank_pattern=raw.get("rank_pattern") or {},
                   alpha_pattern=raw.get("alpha_pattern") or {}, use_rslora=bool(raw.get("use_rslora")),
                   fan_in_fan_out=bool(raw.get("fan_in_fan_out")), target_modules=raw.get("target_modules"),
                   exclude_modules=raw.get("exclude_modules"))

    def targets(self, module: str) -> bool:
        """peft's ``check_target_module_exists`` for names and regexes (the layer filters are already in the keys)."""
        def matches(spec) -> bool:
            if isinstance(spec, str):
                return re.fullmatch(spec, module) is not None
            return module in spec or any(module.endswith(f".{name}") for name in spec)
        if self.exclude_modules and matches(self.exclude_modules):
            return False
        return self.target_modules is None or matches(self.target_modules)

    def scale(self, module: str, rank: int, alpha_tensor: float | None, source: str) -> float:
        """peft's scaling for ``module``: its alpha (pattern, config, the file's ``.alpha``, else the rank) over
        its rank (over sqrt(rank) with rsLoRA)."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r) if self.r is not None else rank
        if r != rank:
            raise CheckpointError(f"{source}: {module} has rank {rank} in the weights but {r} in the adapter "
                                  f"config; the config and the weights disagree (re-save the adapter).")
        if alpha_tensor is not None:
            alpha = alpha_tensor
        elif self.lora_alpha is not None:
            alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)
        else:
            alpha = rank
        return float(alpha) / (math.sqrt(rank) if self.use_rslora else rank)


def pattern_key(patterns: dict, module: str) -> str:
    """peft's ``get_pattern_key``: the first pattern that ends ``module`` at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a LoRA file and its safetensors header metadata."""
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read as a tensor file with weights_only=True ({e}). Use the "
                                  f"safetensors version of this LoRA.") from e
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
    with open_safetensors(path) as sf:
        return {k: sf.get_tensor(k) for k in sf.keys()}, dict(sf.metadata() or {})


def _weights_in_folder(folder: str) -> str:
    for name in (*ADAPTER_WEIGHTS, DIFFUSERS_WEIGHTS):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if len(found) == 1:
        return os.path.join(folder, found[0])
    raise CheckpointError(f"{folder}: no LoRA weights found (expected {ADAPTER_WEIGHTS[0]} with {ADAPTER_CONFIG}, "
                          f"or {DIFFUSERS_WEIGHTS}); choose the LoRA file itself.")


def _config_and_format(weights: str, metadata: dict[str, str]) -> tuple[AdapterConfig, str, list[str]]:
    beside = os.path.join(os.path.dirname(os.path.abspath(weights)), ADAPTER_CONFIG)
    if os.path.basename(weights) in ADAPTER_WEIGHTS and os.path.isfile(beside):
        with open(beside, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{beside} is not valid JSON ({e}); re-save the adapter.") from e
        base = raw.get("base_model_name_or_path")
        hints = [f"base_model_name_or_path {base!r}"] if base else []
        auto = raw.get("auto_mapping") or {}
        if auto.get("base_model_class"):
            hints.append(f"trained on a {auto['base_model_class']}")
        return AdapterConfig.from_dict(raw, beside), "PEFT adapter", hints
    hints = [f"{key} {metadata[key]!r}" for key in ("modelspec.architecture", "ss_base_model_version",
                                                    "ss_sd_model_name") if metadata.get(key)]
    if METADATA_KEY in metadata:
        try:
            raw = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{weights}: its {METADATA_KEY} header is not valid JSON ({e}).") from e
        # a pipeline's save_lora_weights prefixes every field with the component ("transformer.r")
        raw = {k.removeprefix("transformer."): v for k, v in raw.items()
               if "." not in k or k.startswith("transformer.")}
        return AdapterConfig.from_dict(raw, weights), "diffusers LoRA", hints
    return AdapterConfig(), "LoRA", hints


def _split(key: str) -> tuple[str, str] | None:
    """(module, "down"/"up"/"alpha") of a LoRA key; None for keys of no LoRA convention."""
    for down, up in PAIRS:
        if key.endswith(down):
            return key[:-len(down)], "down"
        if key.endswith(up):
            return key[:-len(up)], "up"
    if key.endswith(ALPHA):
        return key[:-len(ALPHA)], "alpha"
    return None


def _unwrap(module: str) -> tuple[str, bool]:
    """The module name without trainer wrappers; True for kohya's underscored names."""
    for prefix in KOHYA_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):], True
    for prefix in WRAPPERS:
        if module.startswith(prefix):
            return module[len(prefix):], False
    return module, False


def read_lora(path: str) -> LoraFile:
    """Read a LoRA file (``.safetensors``; ``.bin``/``.pt`` with ``weights_only=True``) or a PEFT adapter folder."""
    if not os.path.exists(path):
        raise CheckpointError(f"LoRA {path} does not exist.")
    weights = _weights_in_folder(path) if os.path.isdir(path) else path
    tensors, metadata = _read_tensors(weights)
    config, fmt, hints = _config_and_format(weights, metadata)
    for key in tensors:
        for marker, what in REFUSED_KEYS.items():
            if marker in key:
                raise CheckpointError(f"{weights}: the key {key} belongs to {what}. {ADVICE}")
        if ".lora_B.bias" in key or ".lora_up.bias" in key:
            raise CheckpointError(f"{weights}: the key {key} is a trained bias on lora_B (lora_bias). {ADVICE}")

    parts: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            others.append(key)
            continue
        parts.setdefault(split[0], {})[split[1]] = tensor
    if not parts:
        shown = ", ".join(others[:5])
        raise CheckpointError(f"{weights} holds no LoRA weights (no *.lora_A/lora_B, *.lora_down/lora_up keys; "
                              f"found {shown}{' ...' if len(others) > 5 else ''}). Choose a LoRA file.")
    layers, outside, underscored = {}, [], False
    for raw_module, part in parts.items():
        if "down" not in part or "up" not in part:
            missing = "up (lora_B)" if "up" not in part else "down (lora_A)"
            raise CheckpointError(f"{weights}: {raw_module} has no {missing} weight; the file is incomplete.")
        module, kohya = _unwrap(raw_module)
        underscored |= kohya
        if not config.targets(module):
            outside.append(module)
            continue
        down, up = part["down"], part["up"]
        if config.fan_in_fan_out:  # Conv1D-style weights store [in, out]
            down, up = up.T, down.T
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise CheckpointError(f"{weights}: {raw_module} has LoRA factors of shapes {tuple(down.shape)} and "
                                  f"{tuple(up.shape)}, not [rank, in] and [out, rank] of a linear layer.")
        alpha = float(part["alpha"].item()) if "alpha" in part else None
        layers[module] = LoraLayer(down, up, config.scale(module, down.shape[0], alpha, weights))
    if underscored:
        fmt = "kohya LoRA"
    return LoraFile(path=weights, format=fmt, layers=layers, underscored=underscored, outside_targets=outside,
                    other_keys=others, hints=hints)
