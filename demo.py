"""Run the text-to-image example workflow in-process, without ComfyUI, and print the time of each stage.

    python demo.py                                   # tiny random weights: the image is noise
    python demo.py --weights /models/GLM-Image --prompt 'a poster that says "hello"' --width 1024 --height 1024
    python demo.py --previews previews/              # also write the live previews (AR token grid, decoder steps)
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
LOADERS = ("GLMImageARLoader", "GLMImageGlyphEncoderLoader", "GLMImageDecoderLoader", "GLMImageVAELoader")


def build_graph(weights: str, args) -> dict:
    with open(WORKFLOW, encoding="utf-8") as f:
        graph = json.load(f)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] in LOADERS:
            inputs.update(checkpoint=weights, dtype=args.dtype)
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="GLM-Image release folder (diffusers layout); default: tiny random weights")
    parser.add_argument("--prompt", default='A bookshop sign that reads "Open Late"')
    parser.add_argument("--width", type=int, default=None, help="512..2048, a multiple of 32 (default 512 tiny, 1024)")
    parser.add_argument("--height", type=int, default=None, help="512..2048, a multiple of 32 (default 512 tiny, 1024)")
    parser.add_argument("--steps", type=int, default=None, help="decoder steps, 1..200 (default 4 tiny, 50)")
    parser.add_argument("--seed", type=int, default=42, help="0..2^64-1")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--previews", metavar="DIR",
                        help="write the live previews there as PNGs (what ComfyUI shows with --preview-method auto)")
    args = parser.parse_args(argv)

    register_pack()
    from glm_image_nodes.core.runtime import checks
    from glm_image_nodes.core.runtime.geometry import check_glm_image_size

    tiny = args.weights is None
    args.width = (512 if tiny else 1024) if args.width is None else args.width
    args.height = (512 if tiny else 1024) if args.height is None else args.height
    args.steps = (4 if tiny else 50) if args.steps is None else args.steps
    try:
        check_glm_image_size(args.height, args.width)
        checks.check_steps(args.steps, "--steps")
        checks.check_seed(args.seed, "--seed")
        checks.check_text(args.prompt, "--prompt")
        if not tiny and not os.path.isfile(os.path.join(args.weights, "model_index.json")):
            raise ValueError(f"--weights {args.weights} is not a GLM-Image release folder (no model_index.json): give "
                             f"the folder of zai-org/GLM-Image, or leave --weights out for tiny random weights.")
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from glm_image_nodes.core.runtime.comfy_compat import save_previews_to
    from glm_image_nodes.core.runtime.loading import CheckpointError
    from glm_image_nodes.headless.executor import Executor, NodeFailed, WorkflowError
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS

    save_previews_to(args.previews)

    tiny = args.weights is None
    weights = args.weights
    if tiny:
        import torch
        from glm_image_nodes.testing.tiny_release import write_tiny_release
        torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than they save
        weights = cache_folder()
        start = time.perf_counter()
        write_tiny_release(weights)
        print(f"tiny random GLM-Image release written to {weights} in {time.perf_counter() - start:.2f} s")
        print("NOTE: these are random weights, so the image is noise; pass --weights for the real model.")

    def report(node_id, class_type, seconds):
        print(f"  {class_type:<28} {seconds:8.2f} s")

    print(f"running {os.path.basename(WORKFLOW)} at {args.width}x{args.height}, {args.steps} steps")
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
