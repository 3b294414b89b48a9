"""Tiny random diffusers DiTs (GLM-Image, CogView4) saved in the release layout, for parity tests."""
from __future__ import annotations

import json
import os

import torch

GLM_TINY = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=16,
                prior_vq_quantizer_codebook_size=64)
COGVIEW4_TINY = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                     num_attention_heads=2, text_embed_dim=48, time_embed_dim=32, condition_dim=16,
                     rope_axes_dim=(256, 256))
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
             "use_dynamic_shifting": True, "time_shift_type": "linear", "base_shift": 0.25, "max_shift": 0.75,
             "base_image_seq_len": 256, "max_image_seq_len": 4096}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """diffusers zero-initialises some layers; random weights everywhere make every path count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def write_release(root: str, model: torch.nn.Module, class_name: str) -> str:
    """``root/transformer`` (save_pretrained), ``root/scheduler`` and a model_index.json; returns root."""
    model.save_pretrained(os.path.join(root, "transformer"))
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": class_name, "transformer": ["diffusers", "X"],
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}, f)
    return root


def tiny_glm_image_dit(seed: int = 0, **overrides):
    from diffusers import GlmImageTransformer2DModel
    return randomize(GlmImageTransformer2DModel(**{**GLM_TINY, **overrides}), seed)


def tiny_cogview4_dit(seed: int = 0, **overrides):
    from diffusers import CogView4Transformer2DModel
    return randomize(CogView4Transformer2DModel(**{**COGVIEW4_TINY, **overrides}), seed)


def write_tiny_cogview4_release(root: str) -> str:
    """A tiny random CogView4-6B release: the DiT, GLM-4 text encoder (with a tiny GLM-4 tokenizer) and VAE saved
    by the reference classes in the official layout; returns root."""
    import transformers
    from diffusers import AutoencoderKL
    from glm_image_nodes.testing.tiny_glm4_tokenizer import write_tiny_glm4_tokenizer

    write_release(root, tiny_cogview4_dit(), "CogView4Pipeline")
    write_tiny_glm4_tokenizer(os.path.join(root, "tokenizer"))
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(os.path.join(root, "tokenizer"))
    encoder = transformers.GlmModel(transformers.GlmConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_size=48, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12, partial_rotary_factor=0.5,
        attention_bias=True)).eval()
    encoder.save_pretrained(os.path.join(root, "text_encoder"))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False, use_quant_conv=False,
                  use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0).save_pretrained(
        os.path.join(root, "vae"))
    return root


def single_thread():
    """Tiny matmuls run ~50x faster on one thread than on two contended ones (the CI box has 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
