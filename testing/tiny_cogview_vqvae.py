"""Random CogView VQ-VAE checkpoints in the release layout, for tests and demos."""
from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.models.cogview_vqvae import CogViewVQVAE


def write_random_cogview_vqvae(path: str, format: str = "pt", seed: int = 0, *, channel: int = 512,
                               embed_dim: int = 256, n_embed: int = 8192) -> str:
    """Write a random checkpoint in the release layout (``module.`` prefix, EMA buffers included) for tests
    and demos; the defaults give the release's shapes."""
    if format not in ("pt", "safetensors"):
        raise ValueError(f"format must be 'pt' or 'safetensors'; got {format!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CogViewVQVAE(channel, embed_dim, n_embed)
        embed = torch.empty(embed_dim, n_embed)
        nn.init.xavier_uniform_(embed, gain=nn.init.calculate_gain("tanh"))  # the release's initialization
    model.quantize_t.embed.copy_(embed)
    sd = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["module.quantize_t.cluster_size"] = torch.zeros(n_embed)
    sd["module.quantize_t.embed_avg"] = embed.clone()
    if format == "pt":
        torch.save(sd, path)
    else:
        save_file(sd, path)
    return path
