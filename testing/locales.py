"""The nodes' text in the ComfyUI frontend's locale format, and the checks that keep the locales true.

``locales/<lang>/nodeDefs.json`` (docs.comfy.org, custom-nodes/i18n; the frontend's own ``nodeDefs.json``):
per node id ``display_name``, ``description``, ``inputs`` (``{input: {"name", "tooltip"}}``) and ``outputs`` by
index (``{"0": {"name", "tooltip"}}``). ``locales/<lang>/main.json``: ``nodeCategories``, one entry per segment
of the nodes' menu paths ("GLM-Image/loaders" -> "GLM-Image", "loaders"). ComfyUI serves every pack's locales at
``/i18n``. English is generated from the node definitions (``python locales/sync.py``); other languages are
translated by hand, and ``locale_problems`` lists what they miss or name wrongly.
"""
from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCALES = os.path.join(ROOT, "locales")
LANGUAGES = ("en", "zh")
NODE_FIELDS = {"display_name", "description", "inputs", "outputs"}
SOCKET_FIELDS = {"name", "tooltip"}


def node_inputs(cls) -> dict[str, dict]:
    """The inputs a user sees (required and optional, not hidden): name -> widget options."""
    types = cls.INPUT_TYPES()
    inputs = {**types.get("required", {}), **types.get("optional", {})}
    return {name: (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}) for name, spec in inputs.items()}


def node_outputs(cls) -> list[tuple[str, str | None]]:
    """(name, tooltip) of each output, by index."""
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    tooltips = getattr(cls, "OUTPUT_TOOLTIPS", None) or [None] * len(names)
    return list(zip(names, tooltips))


def english_node_defs(classes: dict, display_names: dict) -> dict:
    """``nodeDefs.json`` for English: exactly what the node definitions say."""
    defs = {}
    for node_id, cls in classes.items():
        inputs = {}
        for name, options in node_inputs(cls).items():
            inputs[name] = {"name": name, **({"tooltip": options["tooltip"]} if options.get("tooltip") else {})}
        outputs = {str(i): {"name": name, **({"tooltip": tip} if tip else {})}
                   for i, (name, tip) in enumerate(node_outputs(cls))}
        defs[node_id] = {"display_name": display_names.get(node_id, node_id),
                         "description": getattr(cls, "DESCRIPTION", ""), "inputs": inputs, "outputs": outputs}
    return defs


def category_segments(classes: dict) -> list[str]:
    return sorted({segment for cls in classes.values() for segment in cls.CATEGORY.split("/")})


def english_main(classes: dict) -> dict:
    return {"nodeCategories": {segment: segment for segment in category_segments(classes)}}


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_locale(lang: str) -> tuple[dict, dict]:
    """(nodeDefs, main) of ``lang``."""
    folder = os.path.join(LOCALES, lang)
    return read_json(os.path.join(folder, "nodeDefs.json")), read_json(os.path.join(folder, "main.json"))


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def _socket_problems(where: str, entry, wants_tooltip: bool) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where} is missing"]
    problems = [f"{where} has unknown field {key!r}" for key in entry if key not in SOCKET_FIELDS]
    if not str(entry.get("name", "")).strip():
        problems.append(f"{where} has no name")
    if wants_tooltip and not str(entry.get("tooltip", "")).strip():
        problems.append(f"{where} has no tooltip (the node defines one)")
    return problems


def locale_problems(lang: str, node_defs: dict, main: dict, classes: dict) -> list[str]:
    """Every node, input and output of ``classes`` without an entry in ``lang``, and every entry that names a node,
    input, output or category that does not exist."""
    problems = [f"{lang}: nodeDefs names node {node_id!r}, which does not exist"
                for node_id in node_defs if node_id not in classes]
    for node_id, cls in classes.items():
        entry = node_defs.get(node_id)
        if not isinstance(entry, dict):
            problems.append(f"{lang}: node {node_id} has no entry")
            continue
        where = f"{lang}: {node_id}"
        problems += [f"{where} has unknown field {key!r}" for key in entry if key not in NODE_FIELDS]
        for field in ("display_name", "description"):
            if not str(entry.get(field, "")).strip():
                problems.append(f"{where} has no {field}")
        inputs, entry_inputs = node_inputs(cls), entry.get("inputs", {})
        for name, options in inputs.items():
            tooltip = bool(options.get("tooltip"))
            problems += _socket_problems(f"{where} input {name!r}", entry_inputs.get(name), tooltip)
        problems += [f"{where} names input {name!r}, which the node does not have"
                     for name in entry_inputs if name not in inputs]
        outputs, entry_outputs = node_outputs(cls), entry.get("outputs", {})
        for i, (_, tooltip) in enumerate(outputs):
            problems += _socket_problems(f"{where} output {i}", entry_outputs.get(str(i)), bool(tooltip))
        indices = {str(i) for i in range(len(outputs))}
        problems += [f"{where} names output {key!r}, which the node does not have (outputs go by index 0.."
                     f"{len(outputs) - 1})" for key in entry_outputs if key not in indices]
    categories = main.get("nodeCategories", {})
    segments = category_segments(classes)
    problems += [f"{lang}: main.json nodeCategories has no entry for {s!r}" for s in segments if s not in categories]
    problems += [f"{lang}: main.json nodeCategories names {s!r}, which no node's category uses"
                 for s in categories if s not in segments]
    return problems


def texts(node_defs: dict) -> list[tuple[str, str]]:
    """(where, text) of every display name, description and tooltip."""
    found = []
    for node_id, entry in node_defs.items():
        found += [(f"{node_id} {field}", entry.get(field, "")) for field in ("display_name", "description")]
        for kind in ("inputs", "outputs"):
            found += [(f"{node_id} {kind} {name} tooltip", socket["tooltip"])
                      for name, socket in entry.get(kind, {}).items() if "tooltip" in socket]
    return found


def write_english(classes: dict, display_names: dict) -> None:
    folder = os.path.join(LOCALES, "en")
    write_json(os.path.join(folder, "nodeDefs.json"), english_node_defs(classes, display_names))
    write_json(os.path.join(folder, "main.json"), english_main(classes))
