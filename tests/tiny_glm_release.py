"""Tiny random GLM-Image AR release for tests: the reference classes saved in the official layout.

root/model_index.json
root/vision_language_encoder/  GlmImageForConditionalGeneration.save_pretrained (sharded + index JSON)
root/processor/                GlmImageProcessor.save_pretrained with the tiny GLM-Image tokenizer
"""
from __future__ import annotations

import json
import os

import torch
from glm_image_nodes.testing.tiny_glm_image_tokenizer import CHAT_TEMPLATE, write_tiny_glm_image_tokenizer

TEXT_CONFIG = dict(vocab_size=168064, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                    "mrope_section": [2, 3, 3]})
VISION_CONFIG = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, image_size=64, patch_size=16)
VQ_CONFIG = dict(embed_dim=16, num_embeddings=16384, latent_channels=32)


def make_processor(folder: str):
    """Tiny tokenizer + GlmImageImageProcessor (16 px patches, no merge) saved as ``folder``, then reloaded."""
    from transformers import GlmImageProcessor, PreTrainedTokenizerFast
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    write_tiny_glm_image_tokenizer(folder + "_tok")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder + "_tok")
    image_processor = GlmImageImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=1,
                                             min_pixels=32 * 32, max_pixels=1024 * 1024,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer,
                      chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return GlmImageProcessor.from_pretrained(folder)


def make_model(text_config: dict = TEXT_CONFIG):
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = GlmImageConfig(text_config=text_config, vision_config=VISION_CONFIG, vq_config=VQ_CONFIG)
    model = GlmImageForConditionalGeneration(config).eval()
    with torch.no_grad():  # O(1) activations and logits, so the tolerances mean something
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 1)
            else:
                p.normal_(0, 0.15)
    return model


def make_release(root: str):
    """Write the tiny release under ``root``; return (hf_model, hf_processor)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "GlmImagePipeline"}, f)
    model = make_model()
    model.save_pretrained(os.path.join(root, "vision_language_encoder"), max_shard_size="20MB")
    processor = make_processor(os.path.join(root, "processor"))
    return model, processor


def rope_index_reference(processor_inputs: dict, image_start: int = 16384, image_end: int = 16385):
    """transformers' ``GlmImageModel.get_rope_index`` (it only reads the config): positions [3,B,L] and the
    cached decode positions [3,B,N+1]."""
    from types import SimpleNamespace

    from transformers.models.glm_image.modeling_glm_image import GlmImageModel

    fake = SimpleNamespace(config=SimpleNamespace(image_start_token_id=image_start, image_end_token_id=image_end))
    fake.get_vision_position_ids = lambda *a, **k: GlmImageModel.get_vision_position_ids(fake, *a, **k)
    positions, _ = GlmImageModel.get_rope_index(
        fake, processor_inputs["input_ids"], image_grid_thw=processor_inputs["image_grid_thw"],
        images_per_sample=processor_inputs.get("images_per_sample"),
        attention_mask=processor_inputs.get("attention_mask"))
    return positions, fake._cached_decode_position_ids.permute(1, 0, 2)
