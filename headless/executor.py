"""Run an API-format workflow in-process, without ComfyUI, on the pack's own nodes.

The core ComfyUI nodes our example workflows end in (SaveImage, PreviewImage) and start from (LoadImage)
get small stand-ins here. Each node's run time is reported through ``on_node``.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from PIL import Image


def _save_images(images: torch.Tensor, out_dir: str, prefix: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(out_dir, f"{prefix}_{i:05d}.png")
        Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _load_image(path: str) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


class Executor:
    def __init__(self, node_classes: dict, out_dir: str, on_node=None):
        self.node_classes = node_classes
        self.out_dir = out_dir
        self.on_node = on_node or (lambda node_id, class_type, seconds: None)
        self.saved: list[str] = []

    def _builtin(self, class_type: str, inputs: dict):
        if class_type in ("SaveImage", "PreviewImage"):
            self.saved += _save_images(inputs["images"], self.out_dir, inputs.get("filename_prefix", "GLMImage"))
            return ()
        if class_type == "LoadImage":
            image = _load_image(inputs["image"])
            return (image, torch.zeros(image.shape[:3]))
        raise KeyError(f"unknown node type {class_type!r}: not a GLM-Image node nor a supported core node")

    def run(self, graph: dict) -> list[str]:
        results: dict[str, tuple] = {}

        def evaluate(node_id: str, chain=()):
            if node_id in results:
                return results[node_id]
            if node_id in chain:
                raise ValueError(f"the workflow has a cycle through node {node_id}")
            node = graph[node_id]
            inputs = {}
            for name, value in node["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    inputs[name] = evaluate(value[0], chain + (node_id,))[value[1]]
                else:
                    inputs[name] = value
            start = time.perf_counter()
            cls = self.node_classes.get(node["class_type"])
            if cls is None:
                out = self._builtin(node["class_type"], inputs)
            else:
                out = getattr(cls(), cls.FUNCTION)(**inputs)
            self.on_node(node_id, node["class_type"], time.perf_counter() - start)
            results[node_id] = out
            return out

        outputs = [i for i, n in graph.items() if n["class_type"] in ("SaveImage", "PreviewImage")
                   or getattr(self.node_classes.get(n["class_type"]), "OUTPUT_NODE", False)]
        if not outputs:
            raise ValueError("the workflow has no output node (e.g. SaveImage)")
        for node_id in outputs:
            evaluate(node_id)
        return self.saved
