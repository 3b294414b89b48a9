"""Run the text-to-image example workflow in-process, without ComfyUI, and print the time of each stage.

    python demo.py                                   # tiny random weights: the image is noise
    python demo.py --weights /models/GLM-Image --prompt 'a poster that says "hello"' --width 1024 --height 1024
    python demo.py --weights /models/GLM-Image --dtype fp8_e4m3fn          # AR, glyph and DiT quantized at load
    python demo.py --weights /models/GLM-Image --ar GLM-Image_glm_image_ar_q4_k.gguf \
        --glyph GLM-Image_glyph_byt5_q8_0.gguf --dit GLM-Image_glm_image_dit_q4_k.gguf   # convert.py's files
    python demo.py --previews previews/              # also write the live previews (AR token grid, decoder steps)

Images are numbered like ComfyUI's (GLMImage_00000.png, GLMImage_00001.png, ...): a run never overwrites one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:  # a checkout: this folder, registered as the package glm_image_nodes
    from standalone import ROOT, register_pack
except ImportError:  # installed with pip (glm-image-demo): the package is importable as it is
    ROOT = os.path.dirname(os.path.abspath(__file__))

    def register_pack():
        pass

WORKFLOW = os.path.join(ROOT, "example_workflows", "api", "glm_image_text_to_image.json")
# each loader of the workflow, and the option that gives it its own file (else --weights' release folder)
LOADERS = {"GLMImageARLoader": "ar", "GLMImageGlyphEncoderLoader": "glyph", "GLMImageDecoderLoader": "dit",
           "GLMImageVAELoader": "vae"}
NO_FP8 = ("GLMImageVAELoader",)  # loaders without an fp8_e4m3fn choice: they take auto


def build_graph(weights: str, args) -> dict:
    with open(WORKFLOW, encoding="utf-8") as f:
        graph = json.load(f)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] in LOADERS:
            dtype = "auto" if args.dtype == "fp8_e4m3fn" and node["class_type"] in NO_FP8 else args.dtype
            inputs.update(checkpoint=getattr(args, LOADERS[node["class_type"]]) or weights, dtype=dtype)
        elif node["class_type"] == "GLMImageARSampler":
            inputs.update(prompt=args.prompt, width=args.width, height=args.height, seed=args.seed)
        elif node["class_type"] == "GLMImageDecoderSampler":
            inputs.update(seed=args.seed, steps=args.steps)
    return graph


def cache_folder() -> str:
    """The per-user cache folder for the tiny release (XDG_CACHE_HOME or ~/.cache; LOCALAPPDATA on Windows)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.environ.get("LOCALAPPDATA") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glm_image_nodes", "tiny_release")


def cached_tiny_release() -> str:
    """The tiny release in the cache folder: reused when it is there and intact, else written (again)."""
    from glm_image_nodes.testing.tiny_release_cache import ensure_tiny_release

    folder = cache_folder()
    start = time.perf_counter()
    if ensure_tiny_release(folder):
        print(f"tiny random GLM-Image release written to {folder} in {time.perf_counter() - start:.2f} s")
    else:
        print(f"tiny random GLM-Image release reused from {folder}")
    return folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="GLM-Image release folder (diffusers layout); default: tiny random weights")
    for option, what in (("ar", "AR model"), ("glyph", "Glyph-ByT5"), ("dit", "DiT decoder"), ("vae", "VAE")):
        parser.add_argument(f"--{option}", metavar="PATH",
                            help=f"the {what} from this file (e.g. convert.py's FP8 / GGUF) instead of --weights")
    parser.add_argument("--prompt", default='A bookshop sign that reads "Open Late"')
    parser.add_argument("--width", type=int, default=None, help="512..2048, a multiple of 32 (default 512 tiny, 1024)")
    parser.add_argument("--height", type=int, default=None, help="512..2048, a multiple of 32 (default 512 tiny, 1024)")
    parser.add_argument("--steps", type=int, default=None, help="decoder steps, 1..200 (default 4 tiny, 50)")
    parser.add_argument("--seed", type=int, default=42, help="0..2^64-1")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp8_e4m3fn"],
                        help="fp8_e4m3fn: AR, glyph and DiT weights quantized to FP8 while loading (the VAE: auto)")
    parser.add_argument("--out", default="outputs", help="folder for the images (default: outputs/ here)")
    parser.add_argument("--previews", metavar="DIR",
                        help="write the live previews there as PNGs (what ComfyUI shows with --preview-method auto)")
    args = parser.parse_args(argv)
    print("GLM-Image demo: loading PyTorch and the nodes ...", flush=True)  # the imports take seconds

    register_pack()
    from glm_image_nodes.core.runtime import checks
    from glm_image_nodes.core.runtime.geometry import check_glm_image_size

    tiny = args.weights is None and not any(getattr(args, option) for option in LOADERS.values())
    args.width = (512 if tiny else 1024) if args.width is None else args.width
    args.height = (512 if tiny else 1024) if args.height is None else args.height
    args.steps = (4 if tiny else 50) if args.steps is None else args.steps
    try:
        check_glm_image_size(args.height, args.width)
        checks.check_steps(args.steps, "--steps")
        checks.check_seed(args.seed, "--seed")
        checks.check_text(args.prompt, "--prompt")
        if args.weights is not None and not os.path.isfile(os.path.join(args.weights, "model_index.json")):
            raise ValueError(f"--weights {args.weights} is not a GLM-Image release folder (no model_index.json): give "
                             f"the folder of zai-org/GLM-Image, or leave --weights out for tiny random weights.")
        check_component_paths(args)
        for option in ("out", "previews"):
            folder = getattr(args, option)
            if folder and os.path.exists(folder) and not os.path.isdir(folder):
                raise ValueError(f"--{option} {folder} is a file: give a folder for the images (it is created).")
    except ValueError as e:
        parser.error(str(e))
    return args


def check_component_paths(args) -> None:
    """Each --ar/--glyph/--dit/--vae names an existing path; given any, the others need --weights."""
    given = {option: getattr(args, option) for option in LOADERS.values() if getattr(args, option)}
    for option, path in given.items():
        if not os.path.exists(path):
            raise ValueError(f"--{option} {path} does not exist: give the file convert.py wrote (or a release folder).")
    missing = [f"--{option}" for option in LOADERS.values() if option not in given]
    if given and missing and args.weights is None:
        raise ValueError(f"{', '.join(missing)} not given: add --weights with the release folder they come from "
                         f"(the VAE is not converted), or give each of them.")


def main(argv=None) -> int:
    args = parse_args(argv)
    from glm_image_nodes.core.formats.reading import CheckpointError
    from glm_image_nodes.core.host.progress import save_previews_to
    from glm_image_nodes.headless.executor import Executor, NodeFailed, WorkflowError
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS

    save_previews_to(args.previews)

    tiny = args.weights is None and not any(getattr(args, option) for option in LOADERS.values())
    weights = args.weights
    if tiny:
        import torch
        torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than they save
        weights = cached_tiny_release()
        print("NOTE: these are random weights, so the image is noise; pass --weights for the real model.")

    def report(node_id, class_type, seconds):
        print(f"  {class_type:<28} {seconds:8.2f} s")

    print(f"running {os.path.basename(WORKFLOW)} at {args.width}x{args.height}, {args.steps} steps; images go to "
          f"{os.path.abspath(args.out)}")
    start = time.perf_counter()
    try:
        saved = Executor(NODE_CLASS_MAPPINGS, args.out, on_node=report).run(build_graph(weights, args))
    except (WorkflowError, NodeFailed, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"  {'total':<28} {time.perf_counter() - start:8.2f} s")
    for path in saved:
        print(f"wrote {path}" + (" (noise: tiny random weights)" if tiny else ""))
    if args.previews:
        print(f"live previews in {args.previews}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
