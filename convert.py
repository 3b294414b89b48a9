"""Convert GLM-Image / CogView4 weights to FP8 safetensors or GGUF files the pack's loaders read.

    python convert.py /models/GLM-Image --format q4_k --out /models/converted/       # every component of a release
    python convert.py /models/GLM-Image --format q4_k --comfyui-models ComfyUI/models  # where the workflows look
    python convert.py /models/GLM-Image/transformer --format fp8_e4m3fn --out glm_image_dit_fp8_e4m3fn.safetensors

SRC is a release folder (model_index.json; every convertible component is written into the --out folder) or
one component (its folder or a single .safetensors file; --out is the file). Put the files where the README's
"Where the weights go" says, or let --comfyui-models DIR do it: each file goes into the folder its loader lists,
under the name the example workflows choose (Glyph-ByT5 stays q8_0 below 8 bits), the tokenizer beside the AR.
Formats: fp8_e4m3fn (.safetensors, ComfyUI's scaled-FP8 layout; --fp8-scale channel: per-channel scales only
this pack reads), q8_0, q6_k, q5_k, q4_k, q4_0, f16, bf16 (.gguf). SRC may also be a file other tools made:
unscaled FP8, ComfyUI-prefixed, a city96 GGUF.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

try:  # a checkout: this folder, registered as the package glm_image_nodes
    from standalone import ROOT, register_pack
except ImportError:  # installed with pip (glm-image-convert): the package is importable as it is
    ROOT = os.path.dirname(os.path.abspath(__file__))

    def register_pack():
        pass

COMPONENT_NAMES = {"ar": "glm_image_ar", "decoder": "glm_image_dit", "glyph": "glyph_byt5",
                   "cogview4_text_encoder": "cogview4_text_encoder", "cogview4_decoder": "cogview4_dit"}
# the text tokenizer a single AR / text-encoder file needs beside it, from the release
TOKENIZERS = {"glm_image_ar": "processor", "cogview4_text_encoder": "tokenizer"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def copy_tokenizer(release: str, architecture: str, out_folder: str) -> list[str]:
    """Copy the release's text tokenizer beside a converted text model (its loader looks there)."""
    copied = []
    for name in TOKENIZER_FILES if architecture in TOKENIZERS else ():
        src = os.path.join(release, TOKENIZERS[architecture], name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_folder, name))
            copied.append(name)
    return copied


def templates_naming(name: str) -> list[str]:
    """The example workflows (and their loader) that choose the model file ``name``."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "example_workflows", "api", "*.json"))):
        with open(path, encoding="utf-8") as f:
            graph = json.load(f)
        found += [f"{os.path.basename(path)} ({node['class_type']})" for node in graph.values()
                  if node.get("inputs", {}).get("checkpoint") == name]
    return found


def comfyui_jobs(release: str, fmt: str, models_dir: str) -> list:
    """(spec, output path, placement) of every component of ``release``, laid out in ComfyUI's models folder."""
    from glm_image_nodes.core.convert import comfyui_layout, conversion

    name = os.path.basename(os.path.normpath(release))
    jobs = []
    for spec in conversion.release_components(release):
        where = comfyui_layout.placement(spec.architecture, spec.subfolder, name, fmt)
        jobs.append((spec, where.path(models_dir), where))
    return jobs


def report_placement(where) -> None:
    templates = templates_naming(where.name)
    print(f"  -> models/{where.folder}/{where.name}: "
          + (f"used by {', '.join(templates)}" if templates else "no example workflow names it; choose it in its "
                                                                 "loader"))


def report_release_folder(release: str, models_dir: str) -> None:
    """The VAE (and the semantic tokenizer for editing) still load from the release folder in models/glm_image."""
    name = os.path.basename(os.path.normpath(release))
    folder = os.path.join(models_dir, "glm_image", name)
    state = ("present" if os.path.isfile(os.path.join(folder, "model_index.json"))
             else f"missing: move or link {release} there")
    print(f"the VAE loads from the release folder models/glm_image/{name} ({state})")


def main(argv=None) -> int:
    register_pack()
    from glm_image_nodes.core.convert import conversion
    from glm_image_nodes.core.formats.reading import CheckpointError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a release folder, a component folder or a .safetensors file")
    parser.add_argument("--format", required=True, choices=conversion.FORMATS)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output file (one component) or folder (a release)")
    where.add_argument("--comfyui-models", metavar="DIR",
                       help="ComfyUI's models folder: each component of the release where its loader and the "
                            "example workflows look for it")
    parser.add_argument("--component", choices=sorted(COMPONENT_NAMES),
                        help="which component SRC holds (default: recognised from its tensor names)")
    parser.add_argument("--fp8-scale", choices=("tensor", "channel"), default="tensor",
                        help="one FP8 scale per layer (default: ComfyUI's scaled-FP8 layout, loads in ComfyUI's own "
                             "loaders too) or one per output channel (more accurate, read by this pack only)")
    args = parser.parse_args(argv)

    try:
        is_release = os.path.isfile(os.path.join(args.src, "model_index.json"))
        if args.comfyui_models and not is_release:
            parser.error(f"--comfyui-models lays out a whole release, but {args.src} has no model_index.json: give "
                         f"the release folder, or use --out FILE for one component.")
        folder = args.comfyui_models or (args.out if is_release else None)
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            parser.error(f"{folder} is a file: a release is written into a folder; give a folder (it is created).")
        if args.comfyui_models:
            jobs = comfyui_jobs(args.src, args.format, args.comfyui_models)
        elif is_release:
            name = os.path.basename(os.path.normpath(args.src))
            jobs = [(spec, os.path.join(args.out, f"{name}_{spec.architecture}_{args.format}"
                                                  f"{conversion.extension(args.format)}"), None)
                    for spec in conversion.release_components(args.src)]
        else:
            spec = (conversion.specs_by_architecture()[COMPONENT_NAMES[args.component]] if args.component
                    else conversion.detect_component(args.src))
            if not args.out.endswith(conversion.extension(args.format)):
                parser.error(f"--format {args.format} writes a {conversion.extension(args.format)} file; "
                             f"--out {args.out} has another extension.")
            jobs = [(spec, args.out, None)]
        for spec, out, where in jobs:
            start = time.perf_counter()
            fmt = where.fmt if where else args.format
            if fmt != args.format:
                print(f"{spec.name}: {fmt} instead of {args.format} (below 8 bits its text rendering drifts)")
            report = conversion.convert_component(spec, args.src, fmt, out, fp8_scale=args.fp8_scale)
            kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(report.kinds.items()))
            print(f"{spec.name}: {out}  {report.source_bytes / 1e9:.2f} GB -> {report.bytes / 1e9:.2f} GB "
                  f"({kinds}) in {time.perf_counter() - start:.1f} s")
            if len(jobs) > 1:
                copied = copy_tokenizer(args.src, spec.architecture, os.path.dirname(os.path.abspath(out)))
                if copied:
                    print(f"  beside it: {', '.join(copied)} (keep them with the file in models/text_encoders/)")
            if where:
                report_placement(where)
        if args.comfyui_models:
            report_release_folder(args.src, args.comfyui_models)
    except (CheckpointError, ValueError) as e:
        print(f"convert.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be made or written, a full disk
        print(f"convert.py: {e.filename or 'a file'}: {e.strerror or e}.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
