"""Convert between ComfyUI's API-format and UI-format workflows, using the nodes' INPUT_TYPES.

Widgets (INT, FLOAT, STRING, BOOLEAN, combos) are stored positionally in the UI format's
``widgets_values``. The frontend adds a control widget ("control after generate": fixed, increment...) after an
INT widget whose ``control_after_generate`` option is true, or, when the option is absent, that is named
``seed`` or ``noise_seed`` (its legacy rule, ComfyUI_frontend ``useIntWidget``); its value follows the INT's.
"""
from __future__ import annotations

import json
import os

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")

# The core ComfyUI nodes our workflows use, with the inputs the frontend shows.
CORE_NODES = {
    "SaveImage": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
    "PreviewImage": {"required": {"images": ("IMAGE",)}},
    "LoadImage": {"required": {"image": ([], {"image_upload": True})}},
}
CORE_OUTPUTS = {"SaveImage": (), "PreviewImage": (), "LoadImage": ("IMAGE", "MASK")}


def input_types(node_classes: dict, class_type: str) -> dict:
    if class_type in node_classes:
        return node_classes[class_type].INPUT_TYPES()
    if class_type in CORE_NODES:
        return CORE_NODES[class_type]
    raise KeyError(f"unknown node type {class_type!r}")


def output_types(node_classes: dict, class_type: str) -> tuple:
    if class_type in node_classes:
        return tuple(node_classes[class_type].RETURN_TYPES)
    return CORE_OUTPUTS[class_type]


def is_widget(spec: tuple) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def all_inputs(types: dict) -> dict:
    return {**types.get("required", {}), **types.get("optional", {})}


CONTROL_WIDGET_NAMES = ("seed", "noise_seed")  # INT inputs the frontend gives a control widget unflagged


def has_control_widget(name: str, spec: tuple) -> bool:
    """Whether the frontend puts a control widget after this input's widget."""
    if spec[0] != "INT":
        return False
    flag = spec[1].get("control_after_generate") if len(spec) > 1 else None
    return bool(flag) if flag is not None else name in CONTROL_WIDGET_NAMES


def _widget_values(name: str, spec: tuple, value) -> list:
    """The ``widgets_values`` entries of one widget: its value, plus the control's when it has one."""
    return [value, "fixed"] if has_control_widget(name, spec) else [value]


# The frontend's node geometry (LiteGraph computeSize, frontend 1.27): the body is max(input sockets, outputs)
# rows of 20 px plus 24 px per widget (54 per multiline text) plus a 14 px margin (6 without widgets); the
# 30 px title sits above ``pos``. A stored size below that is enlarged on load, so the layout uses it.
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT = 30, 20, 24, 54
NODE_WIDTH, COLUMN_GAP, ROW_GAP, ORIGIN = 340, 60, 30, (60, 80)
EXTRA_WIDGETS = {"LoadImage": 1}          # its upload button
MIN_BODY = {"LoadImage": 320}             # room for the preview of the chosen image


def node_height(name_specs: dict, outputs: int, class_type: str) -> int:
    """The body height the frontend gives a node with these inputs and outputs."""
    sockets = sum(not is_widget(spec) for spec in name_specs.values())
    widgets = EXTRA_WIDGETS.get(class_type, 0) * WIDGET_HEIGHT
    for name, spec in name_specs.items():
        if is_widget(spec):
            multiline = spec[0] == "STRING" and len(spec) > 1 and spec[1].get("multiline")
            widgets += MULTILINE_HEIGHT if multiline else WIDGET_HEIGHT
            widgets += WIDGET_HEIGHT if has_control_widget(name, spec) else 0
    height = max(sockets, outputs) * SLOT_HEIGHT + widgets + (14 if widgets else 6)
    return max(height, MIN_BODY.get(class_type, 0))


def _columns(graph: dict) -> dict[str, int]:
    """Each node's column: 0 for nodes without links in, else one right of its furthest source."""
    depth: dict[str, int] = {}

    def column(node_id: str) -> int:
        if node_id not in depth:
            depth[node_id] = 0  # a cycle stops here
            sources = [str(v[0]) for v in graph[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max(map(column, sources)) if sources else 0
        return depth[node_id]

    return {node_id: column(node_id) for node_id in graph}


def api_to_ui(graph: dict, node_classes: dict, name: str | None = None) -> dict:
    """The UI-format workflow of an API-format ``graph``: nodes in columns by dependency, left to right, each
    at the size the frontend gives it, none overlapping. ``name``: shown in the template browser."""
    nodes, links = [], []
    ids = {node_id: int(node_id) for node_id in graph}
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node_id, node in graph.items():
        for input_name, value in node["inputs"].items():
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = ids[value[0]], value[1]
                src_type = output_types(node_classes, graph[value[0]]["class_type"])[slot]
                links.append([link_id, src, slot, ids[node_id], None, src_type, input_name])
                outgoing.setdefault((src, slot), []).append(link_id)
    columns = _columns(graph)
    column_y = {}
    for order, (node_id, node) in enumerate(sorted(graph.items(), key=lambda item: (columns[item[0]], int(item[0])))):
        types = all_inputs(input_types(node_classes, node["class_type"]))
        ui_inputs, widgets = [], []
        for input_name, spec in types.items():
            value = node["inputs"].get(input_name)
            default = spec[1].get("default") if len(spec) > 1 else None
            if isinstance(value, list):
                link = next(link for link in links if link[3] == ids[node_id] and link[6] == input_name)
                link[4] = len(ui_inputs)
                ui_inputs.append({"name": input_name, "type": link[5], "link": link[0]})
                if is_widget(spec):  # a widget turned into an input keeps its (unused) value
                    ui_inputs[-1]["widget"] = {"name": input_name}
                    widgets += _widget_values(input_name, spec, default)
            elif is_widget(spec):
                widgets += _widget_values(input_name, spec, value if input_name in node["inputs"] else default)
            else:
                ui_inputs.append({"name": input_name, "type": spec[0], "link": None})
        outputs = [{"name": t, "type": t, "slot_index": i, "links": outgoing.get((ids[node_id], i), [])}
                   for i, t in enumerate(output_types(node_classes, node["class_type"]))]
        height = node_height(types, len(outputs), node["class_type"])
        x = ORIGIN[0] + columns[node_id] * (NODE_WIDTH + COLUMN_GAP)
        y = column_y.get(columns[node_id], ORIGIN[1])
        column_y[columns[node_id]] = y + height + TITLE_HEIGHT + ROW_GAP
        ui_node = {"id": ids[node_id], "type": node["class_type"], "pos": [x, y], "size": [NODE_WIDTH, height],
                   "flags": {},
                   "order": order, "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                   "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets}
        if node.get("_meta", {}).get("title"):
            ui_node["title"] = node["_meta"]["title"]
        nodes.append(ui_node)
    nodes.sort(key=lambda n: n["id"])
    return {"last_node_id": max(ids.values()), "last_link_id": len(links), "nodes": nodes,
            "links": [link[:6] for link in links], "groups": [], "config": {},
            "extra": {"info": {"name": name}} if name else {}, "version": 0.4}


def regenerate_ui_workflows(folder: str, node_classes: dict) -> list[str]:
    """Write every UI-format workflow of ``folder`` from its API-format twin in ``folder/api``; returns the
    files written. The name shown in the template browser is the file name in words."""
    written = []
    for file in sorted(os.listdir(os.path.join(folder, "api"))):
        if file.endswith(".json"):
            with open(os.path.join(folder, "api", file), encoding="utf-8") as f:
                graph = json.load(f)
            ui = api_to_ui(graph, node_classes, name=file[:-len(".json")].replace("_", " "))
            with open(os.path.join(folder, file), "w", encoding="utf-8") as f:
                json.dump(ui, f, indent=2, ensure_ascii=False)
                f.write("\n")
            written.append(file)
    return written


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        types = all_inputs(input_types(node_classes, node["type"]))
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, spec in types.items():
            if is_widget(spec):
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
                inputs[name] = values.pop(0)
                if has_control_widget(name, spec):
                    if not values:
                        raise ValueError(f"node {node['id']} ({node['type']}): no control widget value after {name!r}")
                    values.pop(0)
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            graph[str(node["id"])]["_meta"] = {"title": node["title"]}
    return graph


if __name__ == "__main__":  # python headless/workflow_format.py: rewrite example_workflows/*.json from api/
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from standalone import ROOT, register_pack

    register_pack()
    from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS

    for written in regenerate_ui_workflows(os.path.join(ROOT, "example_workflows"), NODE_CLASS_MAPPINGS):
        print(f"wrote example_workflows/{written}")
