"""Every import of the pack points down a floor, and no modules import each other in a circle.

The floors of ``core/``, from the ground up (a folder may import its own floor and those below it):

    cuda < runtime < formats < loading < models < convert < host < stages

- ``cuda``: the Triton kernels and their torch references;
- ``runtime``: the attention entry point, input checks, size rules, pixel formats, the compute device;
- ``formats``: finding and opening weight files, FP8/GGUF layouts and layers, LoRA files;
- ``loading``: the recipe that fills a model from its files, where weights live while a stage runs, LoRA patches;
- ``models``: the networks and their specs;
- ``convert``: writing a release's weights in FP8/GGUF (it uses every model's spec);
- ``host``: the ComfyUI boundary (folders, memory and the ModelPatcher, progress and previews, interrupts);
- ``stages``: what drives the networks, and the handles passed between nodes.

The ComfyUI boundary sits below the stages (they drive the networks and report to ComfyUI); the networks never
import it: progress and interrupt checks are passed in by the stage or node that drives them. Above core come
``nodes/`` and ``headless/`` (``headless`` may use ``nodes``; core imports neither); none of them imports
``testing/`` (fixtures and developer tooling).
Imports are read with ``ast`` from the source, those inside functions included, relative ones resolved.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_FLOORS = ["cuda", "runtime", "formats", "loading", "models", "convert", "host", "stages"]
TOP = ["core", "nodes", "headless"]  # the pack's folders, bottom-up
# The only modules that may import ComfyUI's own top-level modules (each import guarded or done lazily).
COMFYUI_MODULES = {"comfy", "comfy_extras", "folder_paths", "server", "execution", "nodes", "latent_preview"}
COMFYUI_BOUNDARY = ("core.host.", "core.runtime.devices")


def module_name(path: str) -> str:
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pack_modules() -> dict[str, str]:
    """Dotted module name (the repository root is the package) -> file, for core/, nodes/ and headless/."""
    found = {}
    for top in TOP:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    found[module_name(path)] = path
    return found


def imports(name: str, path: str, modules: dict[str, str]) -> tuple[set[str], set[str]]:
    """(the modules of core/, nodes/ and headless/ that ``name`` imports, the other top-level modules it imports:
    outside packages, or the pack's own ``testing``)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    inside, outside = set(), set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                outside.add(node.module.split(".")[0])
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                inside.add(sub if sub in modules else target)
    return {m for m in inside if m in modules}, outside | {m.split(".")[0] for m in inside if m not in modules}


def floor(module: str) -> tuple[int, int]:
    """(the pack folder's rank, the core floor's rank) of a module."""
    parts = module.split(".")
    top = TOP.index(parts[0])
    if parts[0] != "core" or len(parts) < 2:
        return top, 0 if parts[0] != "core" else -1
    return top, CORE_FLOORS.index(parts[1])


def import_graph() -> dict[str, set[str]]:
    modules = pack_modules()
    return {name: imports(name, path, modules)[0] for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_folder_of_core_is_a_known_floor():
    folders = {name for name in os.listdir(os.path.join(ROOT, "core"))
               if os.path.isfile(os.path.join(ROOT, "core", name, "__init__.py"))}
    assert folders == set(CORE_FLOORS), "add a new folder of core/ to CORE_FLOORS (and README's Layout)"


def test_every_import_points_down_a_floor():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 200  # the parse found the pack's imports
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if a.split(".")[:2] != b.split(".")[:2] and floor(b) > floor(a))
    assert not upward, "imports that point up a floor:\n" + "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    graph = import_graph()
    assert not cycles(graph), cycles(graph)
    folders = {}
    for a, targets in graph.items():
        for b in targets:
            if a.startswith("core.") and b.startswith("core.") and a.split(".")[1] != b.split(".")[1]:
                folders.setdefault(a.split(".")[1], set()).add(b.split(".")[1])
    assert not cycles(folders), cycles(folders)


def test_only_the_boundary_imports_comfyui():
    modules = pack_modules()
    offenders = sorted(name for name, path in modules.items() if name.startswith("core.")
                       and not name.startswith(COMFYUI_BOUNDARY)
                       and imports(name, path, modules)[1] & COMFYUI_MODULES)
    assert not offenders, offenders


def test_nothing_that_runs_imports_the_test_fixtures():
    modules = pack_modules()
    offenders = sorted(name for name, path in modules.items() if "testing" in imports(name, path, modules)[1])
    assert not offenders, offenders


def test_the_checks_catch_what_they_are_for():
    """The rules themselves: an upward import, a circle of modules and of folders are caught."""
    assert floor("core.stages.handles") > floor("core.host.memory") > floor("core.models.vae")
    assert floor("nodes.common") > floor("core.stages.handles") and floor("headless.executor") > floor("nodes.common")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
