"""The one config reader (``loading.configs.known_fields``) behind every typed config of the pack."""
import json
import os

from glm_image_nodes.core.loading.components import config_from_json, config_to_json
from glm_image_nodes.core.loading.configs import known_fields
from glm_image_nodes.core.models.cogview4_dit import CogView4DiTConfig
from glm_image_nodes.core.models.glm_text_encoder import GlmConfig
from glm_image_nodes.core.models.t5_encoder import T5Config
from glm_image_nodes.core.models.vae import VAEConfig

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "configs", "cogview4_6b")


def read(component: str) -> dict:
    with open(os.path.join(REFERENCE, component, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_known_fields_keeps_the_fields_and_makes_tuples_of_tuple_fields_only():
    data = {"latent_channels": 4, "block_out_channels": [32, 64], "_diffusers_version": "0.42.1",
            "latents_mean": None, "act_fn": "silu"}
    assert known_fields(VAEConfig, data) == {"latent_channels": 4, "block_out_channels": (32, 64),
                                             "latents_mean": None}
    assert known_fields(GlmConfig, {"hidden_size": 64, "vocab_size": [1]}) == {"hidden_size": 64, "vocab_size": [1]}


def test_every_release_config_reads_through_it():
    """The CogView4 release's own config.json files: unknown keys ignored, list fields typed as tuples."""
    dit = CogView4DiTConfig.from_dict(read("transformer"), "transformer")
    assert isinstance(dit.rope_axes_dim, tuple) and dit.rope_axes_dim == tuple(read("transformer")["rope_axes_dim"])
    vae = VAEConfig.from_dict(read("vae"), "vae")
    assert vae.block_out_channels == tuple(read("vae")["block_out_channels"])
    text = GlmConfig.from_dict(read("text_encoder"), "text_encoder")
    assert text.hidden_size == read("text_encoder")["hidden_size"]
    assert T5Config.from_dict({"d_model": 8, "unknown": 1, "feed_forward_proj": "gated-gelu"}).d_model == 8
    for config in (dit, vae, text):
        assert config_from_json(type(config), json.loads(config_to_json(config))) == config
