"""Where a converted component goes in a ComfyUI ``models`` folder: the folder its loader lists, under the names
the example workflows choose (``<release>_<architecture>_<format>``; text models in ``text_encoders/<release>/``,
where their tokenizer goes beside them)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .conversion import extension

# the ComfyUI models folder each component's loader lists single files from (core/host/folders.py lists them)
LOADER_FOLDERS = {
    "transformer": "diffusion_models",
    "vision_language_encoder": "text_encoders",
    "text_encoder": "text_encoders",
    "vae": "vae",
}

# Glyph-ByT5 stays Q8_0 when the rest goes below 8 bits: its rows of 1472 cannot be K-quantized (Q4_K falls back
# to Q5_0), its embeddings drift 0.20-0.45 (relative, q5_k..q4_0) against 0.04 in Q8_0 on the tiny release
# (docs/performance.md), and Q8_0 costs 0.07 GB more than Q4_K at full size.
GLYPH = "glyph_byt5"
GLYPH_FORMAT = "q8_0"
BELOW_8_BITS = ("q5_k", "q4_k", "q4_0")


@dataclass(frozen=True)
class Placement:
    folder: str  # the ComfyUI models subfolder its loader lists
    name: str    # relative to that folder, as the loader's list (and a workflow) names it
    fmt: str     # the format it is written in

    def path(self, models_dir: str) -> str:
        return os.path.join(models_dir, self.folder, *self.name.split("/"))


def component_format(architecture: str, fmt: str) -> str:
    """The format a component is written in when the release is converted to ``fmt``."""
    return GLYPH_FORMAT if architecture == GLYPH and fmt in BELOW_8_BITS else fmt


def placement(architecture: str, subfolder: str, release_name: str, fmt: str) -> Placement:
    fmt = component_format(architecture, fmt)
    folder = LOADER_FOLDERS[subfolder]
    file = f"{release_name}_{architecture}_{fmt}{extension(fmt)}"
    return Placement(folder, f"{release_name}/{file}" if folder == "text_encoders" else file, fmt)
