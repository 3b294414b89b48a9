"""Draw docs/previews_tiny.png: the live previews on the tiny random release.

    python docs/preview_figure.py [--out docs/previews_tiny.png]

Top row: what ComfyUI shows while the text-to-image workflow runs at 512x512 (4 decoder steps): the AR's token
grid after 4, 8, 12 and 16 of its rows (the full grid), each decoder step's preview, and the decoded image.
Bottom row: how well the fitted latent-to-RGB map follows the VAE: held-out structured latents, their real
decode, the decode averaged per 8x8 cell (what the map is fitted to), the map's preview, and a constant map.
The weights are random, so the pictures are noise: they show the mechanics, not GLM-Image.
"""
import argparse
import glob
import os
import shutil
import sys
import tempfile

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from standalone import register_pack  # noqa: E402

TILE = 160
LABEL = 18


def tile(image: Image.Image, label: str) -> Image.Image:
    out = Image.new("RGB", (TILE, TILE + LABEL), "white")
    out.paste(image.convert("RGB").resize((TILE, TILE), Image.NEAREST), (0, LABEL))
    ImageDraw.Draw(out).text((2, 3), label, fill="black")
    return out


def row(tiles: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (len(tiles) * (TILE + 6) - 6, TILE + LABEL), "white")
    for i, t in enumerate(tiles):
        out.paste(t, (i * (TILE + 6), 0))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "previews_tiny.png"))
    args = parser.parse_args(argv)
    register_pack()
    import torch
    from glm_image_nodes.core.models.vae import load_vae
    from glm_image_nodes.core.stages import latent_preview

    import demo

    work = tempfile.mkdtemp(prefix="glm_image_previews_")
    previews = os.path.join(work, "previews")
    tempfile.tempdir = work  # the demo writes its tiny release into gettempdir()
    demo.main(["--out", os.path.join(work, "out"), "--previews", previews, "--steps", "4"])
    ar = sorted(glob.glob(os.path.join(previews, "glm_image_ar_tokens_*.png")))
    steps = sorted(glob.glob(os.path.join(previews, "glm_image_decoder_*.png")))
    final = sorted(glob.glob(os.path.join(work, "out", "*.png")))[0]
    rows_written = [4, 8, 12, 16]
    top = [tile(Image.open(ar[16 + n - 1]), f"AR grid, {n}/16 rows") for n in rows_written]
    top += [tile(Image.open(p), f"decoder step {i + 1}/4") for i, p in enumerate(steps)]
    top.append(tile(Image.open(final), "VAE decode"))

    vae = load_vae(os.path.join(work, "glm_image_nodes_tiny_release"), dtype="fp32", device="cpu")
    factors = latent_preview.fit_latent_rgb(vae)
    latents = latent_preview.fitting_latents(16, count=1, seed=7)         # held out: the fit used seed 0
    decoded = vae.decode(latents)[0]
    cells = (latent_preview.cell_colours(vae, latents)[0].permute(1, 2, 0) + 1) / 2
    constant = latent_preview.LatentRGB(torch.zeros_like(factors.weights), factors.bias)

    def picture(pixels):
        return Image.fromarray((pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy())

    bottom = [tile(picture(latents[0, :3].permute(1, 2, 0) / 4 + 0.5), "latent (ch 0-2)"),
              tile(picture(decoded), "real decode"), tile(picture(cells), "decode, 8x8 means"),
              tile(factors.image(latents[0]), "fitted preview"), tile(constant.image(latents[0]), "constant map")]
    width = max(row(top).width, row(bottom).width)
    figure = Image.new("RGB", (width, 2 * (TILE + LABEL) + 10), "white")
    figure.paste(row(top), (0, 0))
    figure.paste(row(bottom), (0, TILE + LABEL + 10))
    figure.save(args.out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
