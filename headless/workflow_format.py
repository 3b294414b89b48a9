"""Convert between ComfyUI's API-format and UI-format workflows, using the nodes' INPUT_TYPES.

Widgets (INT, FLOAT, STRING, BOOLEAN, combos) are stored positionally in the UI format's
``widgets_values``; a seed widget with ``control_after_generate`` adds one more value after itself.
"""
from __future__ import annotations

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


def has_control_widget(spec: tuple) -> bool:
    return len(spec) > 1 and bool(spec[1].get("control_after_generate"))


def _widget_values(spec: tuple, value) -> list:
    """The ``widgets_values`` entries of one widget: its value, plus the seed control's when it has one."""
    return [value, "fixed"] if has_control_widget(spec) else [value]


def api_to_ui(graph: dict, node_classes: dict) -> dict:
    nodes, links = [], []
    ids = {node_id: int(node_id) for node_id in graph}
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = ids[value[0]], value[1]
                src_type = output_types(node_classes, graph[value[0]]["class_type"])[slot]
                links.append([link_id, src, slot, ids[node_id], None, src_type, name])
                outgoing.setdefault((src, slot), []).append(link_id)
    for order, (node_id, node) in enumerate(graph.items()):
        types = all_inputs(input_types(node_classes, node["class_type"]))
        ui_inputs, widgets = [], []
        for name, spec in types.items():
            value = node["inputs"].get(name)
            default = spec[1].get("default") if len(spec) > 1 else None
            if isinstance(value, list):
                link = next(link for link in links if link[3] == ids[node_id] and link[6] == name)
                link[4] = len(ui_inputs)
                ui_inputs.append({"name": name, "type": link[5], "link": link[0]})
                if is_widget(spec):  # a widget turned into an input keeps its (unused) value
                    ui_inputs[-1]["widget"] = {"name": name}
                    widgets += _widget_values(spec, default)
            elif is_widget(spec):
                widgets += _widget_values(spec, value if name in node["inputs"] else default)
            else:
                ui_inputs.append({"name": name, "type": spec[0], "link": None})
        outputs = [{"name": t, "type": t, "slot_index": i, "links": outgoing.get((ids[node_id], i), [])}
                   for i, t in enumerate(output_types(node_classes, node["class_type"]))]
        ui_node = {"id": ids[node_id], "type": node["class_type"],
                   "pos": [60 + 380 * (order % 4), 80 + 320 * (order // 4)], "size": [340, 180], "flags": {},
                   "order": order, "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                   "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets}
        if node.get("_meta", {}).get("title"):
            ui_node["title"] = node["_meta"]["title"]
        nodes.append(ui_node)
    return {"last_node_id": max(ids.values()), "last_link_id": len(links), "nodes": nodes,
            "links": [link[:6] for link in links], "groups": [], "config": {}, "extra": {}, "version": 0.4}


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
                if has_control_widget(spec):
                    values.pop(0)
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            graph[str(node["id"])]["_meta"] = {"title": node["title"]}
    return graph
