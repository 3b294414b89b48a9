"""Run an API-format workflow in-process, without ComfyUI, on the pack's own nodes.

The whole workflow is checked first, as ComfyUI's validation does (node types, links and their types, required
inputs, widget types and ranges, each node's VALIDATE_INPUTS, cycles, output nodes): a malformed one is refused
with one line naming the node and the fix before any model loads. The core ComfyUI nodes our example workflows
end in (SaveImage, PreviewImage) and start from (LoadImage) get small stand-ins that, like ComfyUI's own, write
only inside the output folder and read only inside the input folder. Each node's run time is reported through
``on_node``.
"""
from __future__ import annotations

import inspect
import os
import re
import time

import numpy as np
import torch
from PIL import Image

from ..core.host import interrupts
from ..core.runtime import checks
from ..nodes.common import check_widget_value
from .workflow_format import CORE_NODES, all_inputs, input_types, is_widget, output_types

OUTPUT_TYPES = ("SaveImage", "PreviewImage")


class WorkflowError(ValueError):
    """A workflow the executor refuses, before running anything: one line naming the node and the fix."""


class NodeFailed(RuntimeError):
    """A node raised while running; ``error`` is what it raised."""

    def __init__(self, node_id: str, class_type: str, error: BaseException):
        self.node_id, self.class_type, self.error = node_id, class_type, error
        super().__init__(f"node {node_id} ({class_type}) failed: {type(error).__name__}: {error}")


def inside(folder: str, name: str) -> str | None:
    """``folder/name`` when it stays inside ``folder`` (no absolute path, no ``..`` out of it), else None."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    return path if os.path.commonpath([root, path]) == root and path != root else None


def _next_number(base: str) -> int:
    """After the highest ``<base>_NNNNN.png`` already there (ComfyUI's counter): a run never overwrites an image."""
    folder, stem = os.path.split(base)
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})\.png")
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.fullmatch(name))]
    return max(numbers, default=-1) + 1


def _save_images(images: torch.Tensor, out_dir: str, prefix: str) -> list[str]:
    base = inside(out_dir, prefix + "_")[:-1]  # as validated; an empty prefix or "sub/" names files "_00000.png"
    os.makedirs(os.path.dirname(base), exist_ok=True)
    first = _next_number(base)
    paths = []
    for i, image in enumerate(images):
        path = f"{base}_{first + i:05d}.png"
        Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _load_image(path: str) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) \
        and isinstance(value[1], int) and not isinstance(value[1], bool)


class Executor:
    def __init__(self, node_classes: dict, out_dir: str, on_node=None, input_dir: str | None = None):
        self.node_classes = node_classes
        self.out_dir = out_dir
        self.input_dir = input_dir if input_dir is not None else os.getcwd()
        self.on_node = on_node or (lambda node_id, class_type, seconds: None)

    # ---- checking ----------------------------------------------------------------------------------------
    def validate(self, graph) -> list[str]:
        """Check ``graph`` as a whole; return its output nodes' ids or raise WorkflowError."""
        if not isinstance(graph, dict):
            raise WorkflowError(f"The workflow must be a JSON object of node id -> {{class_type, inputs}} (ComfyUI's "
                                f"API format), got {type(graph).__name__}: export it with Workflow > Export (API).")
        if "nodes" in graph and "links" in graph:
            raise WorkflowError("This is a UI-format workflow (it has 'nodes' and 'links'): export it in API format "
                                "(Workflow > Export (API)), or convert it with headless.workflow_format.ui_to_api.")
        graph = {str(node_id): node for node_id, node in graph.items()}
        for node_id, node in graph.items():
            self._check_node(graph, node_id, node)
        self._check_cycles(graph)
        outputs = [i for i, n in graph.items() if n["class_type"] in OUTPUT_TYPES
                   or getattr(self.node_classes.get(n["class_type"]), "OUTPUT_NODE", False)]
        if not outputs:
            raise WorkflowError("The workflow has no output node: add a SaveImage or PreviewImage node, or nothing "
                                "would run.")
        return outputs

    def _check_node(self, graph: dict, node_id: str, node) -> None:
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f"node {node_id} has no class_type: each node must be {{\"class_type\": ..., "
                                f"\"inputs\": {{...}}}} (API format); export the workflow with Export (API).")
        class_type, inputs = node["class_type"], node.get("inputs", {})
        where = f"node {node_id} ({class_type})"
        if not isinstance(inputs, dict):
            raise WorkflowError(f"{where}: inputs must be an object of name -> value, got {type(inputs).__name__}.")
        try:
            types = input_types(self.node_classes, class_type)
        except KeyError:
            raise WorkflowError(f"{where}: unknown node type: not a GLM-Image node nor one of the core nodes this "
                                f"executor runs ({', '.join(CORE_NODES)}); run the workflow in ComfyUI.") from None
        specs = all_inputs(types)
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise WorkflowError(f"{where}: unknown input {unknown[0]!r}; its inputs are {', '.join(specs)}.")
        for name in types.get("required", {}):
            if name not in inputs:
                default = (specs[name][1] if len(specs[name]) > 1 else {}).get("default")
                hint = f" (its default is {default!r})" if default is not None else " (link it to a node's output)"
                raise WorkflowError(f"{where}: required input {name!r} is missing: add it{hint}.")
        validate = getattr(self.node_classes.get(class_type), "VALIDATE_INPUTS", None)
        # as in ComfyUI: the inputs VALIDATE_INPUTS takes are checked by it (the core's messages, then the ranges)
        validated = set(inspect.signature(validate).parameters) if validate is not None else set()
        for name, value in inputs.items():
            self._check_input(graph, where, name, specs[name], value, check_value=name not in validated)
        if validate is not None:
            answer = validate(**{k: (None if _is_link(v) else v) for k, v in inputs.items() if k in validated})
            if answer is not True:
                raise WorkflowError(f"{where}: {answer}")
        self._check_files(where, class_type, inputs)

    def _check_input(self, graph: dict, where: str, name: str, spec: tuple, value, check_value: bool) -> None:
        if isinstance(value, list):
            if not _is_link(value):
                raise WorkflowError(f"{where}: input {name!r} = {value!r} is neither a value nor a link "
                                    f"[node_id, output_index].")
            source_id, slot = str(value[0]), value[1]
            if source_id not in graph:
                raise WorkflowError(f"{where}: input {name!r} links to node {source_id}, which is not in the "
                                    f"workflow: link it to an existing node.")
            source = graph[source_id]
            source_type = source.get("class_type") if isinstance(source, dict) else None
            try:
                produced = output_types(self.node_classes, source_type)
            except KeyError:
                return  # the source node's own check names the problem
            if not 0 <= slot < len(produced):
                raise WorkflowError(f"{where}: input {name!r} links to output {slot} of node {source_id} "
                                    f"({source_type}), which has {len(produced)} output(s).")
            expected = spec[0] if not isinstance(spec[0], list) else "COMBO"
            if produced[slot] != expected:
                raise WorkflowError(f"{where}: input {name!r} takes {expected} but output {slot} of node {source_id} "
                                    f"({source_type}) gives {produced[slot]}: link a {expected} output.")
            return
        if not is_widget(spec):
            raise WorkflowError(f"{where}: input {name!r} is a {spec[0]} socket: link it to a node's output "
                                f"([node_id, output_index]) instead of giving a value.")
        if check_value:
            try:
                check_widget_value(name, spec, value)
            except ValueError as e:
                raise WorkflowError(f"{where}: {e}") from None

    def _check_files(self, where: str, class_type: str, inputs: dict) -> None:
        if class_type == "SaveImage" and isinstance(inputs.get("filename_prefix"), str):
            if inside(self.out_dir, inputs["filename_prefix"] + "_") is None:
                raise WorkflowError(f"{where}: filename_prefix {inputs['filename_prefix']!r} would write outside the "
                                    f"output folder {self.out_dir}: use a name or a subfolder inside it.")
        if class_type == "LoadImage" and isinstance(inputs.get("image"), str):
            path = inside(self.input_dir, inputs["image"])
            if path is None:
                raise WorkflowError(f"{where}: image {inputs['image']!r} is outside the input folder "
                                    f"{self.input_dir}: copy the image there and give its name.")
            if not os.path.isfile(path):
                raise WorkflowError(f"{where}: image {inputs['image']!r} is not in the input folder "
                                    f"{self.input_dir}: copy it there.")

    @staticmethod
    def _check_cycles(graph: dict) -> None:
        state: dict[str, str] = {}

        def visit(node_id: str, path: tuple) -> None:
            if state.get(node_id) == "done":
                return
            if state.get(node_id) == "open":
                cycle = path[path.index(node_id):] + (node_id,)
                raise WorkflowError(f"The workflow has a cycle: {' -> '.join(f'node {i}' for i in cycle)}: remove "
                                    f"one of these links.")
            state[node_id] = "open"
            for value in graph[node_id].get("inputs", {}).values():
                if _is_link(value):
                    visit(str(value[0]), path + (node_id,))
            state[node_id] = "done"

        for node_id in graph:
            visit(node_id, ())

    # ---- running -------------------------------------------------------------------------------------------
    def _builtin(self, class_type: str, inputs: dict, saved: list[str]):
        if class_type in OUTPUT_TYPES:
            images = checks.check_image_batch(inputs["images"], "images", max_batch=10 ** 6)
            saved += _save_images(images, self.out_dir, inputs.get("filename_prefix", "GLMImage"))
            return ()
        image = _load_image(inside(self.input_dir, inputs["image"]))
        return (image, torch.zeros(image.shape[:3]))

    def run(self, graph: dict) -> list[str]:
        """Check the workflow, then run what its output nodes need; returns the paths of the images saved."""
        outputs = self.validate(graph)
        graph = {str(k): v for k, v in graph.items()}
        results: dict[str, tuple] = {}
        saved: list[str] = []

        def evaluate(node_id: str):
            if node_id in results:
                return results[node_id]
            node = graph[node_id]
            inputs = {name: evaluate(str(value[0]))[value[1]] if _is_link(value) else value
                      for name, value in node.get("inputs", {}).items()}
            start = time.perf_counter()
            cls = self.node_classes.get(node["class_type"])
            try:
                out = self._builtin(node["class_type"], inputs, saved) if cls is None else \
                    getattr(cls(), cls.FUNCTION)(**inputs)
            except Exception as e:
                raise NodeFailed(node_id, node["class_type"], e) from e
            if isinstance(out, dict):  # ComfyUI's {"ui": ..., "result": outputs} of an output node
                out = tuple(out.get("result", ()))
            self.on_node(node_id, node["class_type"], time.perf_counter() - start)
            results[node_id] = out
            return out

        with interrupts.run_scope():  # a Stop requested while nothing ran must not abort this run
            for node_id in outputs:
                evaluate(str(node_id))
        return saved
