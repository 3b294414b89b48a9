"""A tiny GLM-Image release with random weights, in the official diffusers folder layout.

Built from the pack's own modules (no transformers or diffusers needed), with the official config
files and key names, so the demo and the integration tests exercise the real loading paths. The
images it makes are noise.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..core.models.glm_ar import HEAD, PREFIX, ARConfig, GlmImageAR
from ..core.models.glm_image_dit import GlmImageDiT, GlmImageDiTConfig
from ..core.models.semantic_tokenizer import UNUSED_PREFIX, VQ_PREFIX, SemanticTokenizer, SemanticTokenizerConfig
from ..core.models.t5_encoder import T5Config, T5Encoder
from ..core.models.vae import AutoencoderKL, VAEConfig
from .tiny_glm_image_tokenizer import TINY_VOCAB_SIZE, write_tiny_glm_image_tokenizer

REFERENCE_VAE = {
    "latents_mean": [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875, -0.9453125,
                     0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125, -1.59375, -0.81640625,
                     -0.255859375],
    "latents_std": [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875, 2.71875,
                    2.390625, 2.390625, 2.453125, 2.25, 2.15625],
}
TEXT_CONFIG = {
    "model_type": "glm_image_text", "vocab_size": TINY_VOCAB_SIZE, "vision_vocab_size": 16512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 128, "rms_norm_eps": 1e-5, "attention_bias": True, "max_position_embeddings": 131072,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                        "mrope_section": [8, 12, 12]},
    "pad_token_id": 167841, "eos_token_id": 16385,
}
VISION_CONFIG = {"model_type": "glm_image_vision", "depth": 1, "hidden_size": 32, "hidden_act": "gelu",
                 "attention_bias": True, "num_heads": 2, "in_channels": 3, "image_size": 2048, "patch_size": 16,
                 "spatial_merge_size": 1, "intermediate_size": 64, "layer_norm_eps": 1e-6}
VQ_CONFIG = {"model_type": "glm_image_vqmodel", "embed_dim": 16, "num_embeddings": 16384, "latent_channels": 32,
             "in_channels": 3}
GLYPH_CONFIG = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8,
                "num_heads": 4, "num_layers": 2, "vocab_size": 384, "feed_forward_proj": "gated-gelu",
                "is_gated_act": True, "dense_act_fn": "gelu_new", "relative_attention_num_buckets": 32,
                "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "pad_token_id": 0,
                "eos_token_id": 1}
DIT_CONFIG = {"_class_name": "GlmImageTransformer2DModel", "patch_size": 2, "in_channels": 16, "out_channels": 16,
              "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "text_embed_dim": 32,
              "time_embed_dim": 32, "condition_dim": 16, "prior_vq_quantizer_codebook_size": 16384}
VAE_CONFIG = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
              "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              "act_fn": "silu", "norm_num_groups": 8, "mid_block_add_attention": False, "use_quant_conv": False,
              "use_post_quant_conv": False, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.18215,
              "shift_factor": None, **REFERENCE_VAE}
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                    "use_dynamic_shifting": True, "time_shift_type": "linear", "base_shift": 0.25, "max_shift": 0.75,
                    "base_image_seq_len": 256, "max_image_seq_len": 4096}
MODEL_INDEX = {
    "_class_name": "GlmImagePipeline",
    "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"],
    "processor": ["transformers", "GlmImageProcessor"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "ByT5Tokenizer"],
    "transformer": ["diffusers", "GlmImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}
PREPROCESSOR_CONFIG = {"image_processor_type": "GlmImageImageProcessor", "patch_size": 16, "temporal_patch_size": 1,
                       "merge_size": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
                       "min_pixels": 262144, "max_pixels": 4194304}


def semantic_tokenizer_from_configs(vision_config: dict, vq_config: dict) -> SemanticTokenizer:
    """Build from the ``vision_config`` and ``vq_config`` dicts of ``vision_language_encoder/config.json``."""
    config = {"vision_config": vision_config, "vq_config": vq_config}
    return SemanticTokenizer(SemanticTokenizerConfig.from_release_config(config, "vision_config/vq_config"))


def state_dict_for_release(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tokenizer state dict as the release's ``vision_language_encoder`` stores it: with the
    ``post_quant_conv`` the tokenizer does not use (zeros), so transformers loads the file without gaps."""
    embed_dim, latent_channels = state_dict[VQ_PREFIX + "quant_conv.weight"].shape[:2]
    out = dict(state_dict)
    out[UNUSED_PREFIX + "weight"] = torch.zeros(latent_channels, embed_dim, 1, 1)
    out[UNUSED_PREFIX + "bias"] = torch.zeros(latent_channels)
    return out


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights of a sensible scale: ~N(0, 1/fan_in) for matrices, near 1 for norm scales."""
    state = {}
    for name, tensor in module.state_dict().items():
        if tensor.ndim >= 2:
            value = torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5
        elif "norm" in name:
            value = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            value = 0.02 * torch.randn(tensor.shape, generator=generator)
        state[name] = value.contiguous()
    return state


def _vision_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The ``model.visual.*`` and ``model.vqmodel.*`` tensors of the AR checkpoint (semantic tokenizer)."""
    tokenizer = semantic_tokenizer_from_configs(VISION_CONFIG, VQ_CONFIG)
    return state_dict_for_release(_randomize(tokenizer, generator))


def write_tiny_release(folder: str, seed: int = 0) -> str:
    """Write the tiny release into ``folder`` (overwriting); returns ``folder``."""
    generator = torch.Generator().manual_seed(seed)
    _write_json(os.path.join(folder, "model_index.json"), MODEL_INDEX)

    ar = GlmImageAR(ARConfig.from_text_config(TEXT_CONFIG))
    state = {(k if k.startswith(HEAD) else PREFIX + k): v for k, v in _randomize(ar, generator).items()}
    state.update(_vision_state(generator))
    ar_folder = os.path.join(folder, "vision_language_encoder")
    _write_json(os.path.join(ar_folder, "config.json"), {
        "architectures": ["GlmImageForConditionalGeneration"], "model_type": "glm_image",
        "text_config": TEXT_CONFIG, "vision_config": VISION_CONFIG, "vq_config": VQ_CONFIG,
        "image_token_id": 167855, "image_start_token_id": 16384, "image_end_token_id": 16385,
        "tie_word_embeddings": False})
    _write_json(os.path.join(ar_folder, "generation_config.json"),
                {"do_sample": True, "temperature": 0.9, "top_p": 0.75, "top_k": 16512, "eos_token_id": 16385})
    save_file(state, os.path.join(ar_folder, "model.safetensors"))

    processor = os.path.join(folder, "processor")
    write_tiny_glm_image_tokenizer(processor)
    _write_json(os.path.join(processor, "preprocessor_config.json"), PREPROCESSOR_CONFIG)

    for name, model, config, file in (
            ("text_encoder", T5Encoder(T5Config.from_dict(GLYPH_CONFIG)), GLYPH_CONFIG, "model.safetensors"),
            ("transformer", GlmImageDiT(GlmImageDiTConfig.from_dict(DIT_CONFIG)), DIT_CONFIG,
             "diffusion_pytorch_model.safetensors"),
            ("vae", AutoencoderKL(VAEConfig.from_dict(VAE_CONFIG)), VAE_CONFIG, "diffusion_pytorch_model.safetensors")):
        _write_json(os.path.join(folder, name, "config.json"), config)
        save_file(_randomize(model, generator), os.path.join(folder, name, file))
    _write_json(os.path.join(folder, "tokenizer", "tokenizer_config.json"),
                {"tokenizer_class": "ByT5Tokenizer", "extra_ids": 0, "pad_token": "<pad>", "eos_token": "</s>",
                 "unk_token": "<unk>"})
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
    return folder
