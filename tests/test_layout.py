"""The package's layering: every import (module-level or inside a function) points to the same layer or a lower
one, and there is no cycle. A new module must be given a layer here; the README's layout section lists them."""

import ast
import graphlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# lower numbers are lower layers; a module may import from its own layer or any below it
LAYERS = {
    0: ["stic.errors", "stic.progress", "stic.metrics", "stic.chair", "stic.tiny", "stic.locks"],
    1: ["stic.config", "corruptions"],
    2: ["stic.generation", "stic.images", "stic.prompts", "stic.models", "stic.serving", "stic.instructions",
        "stic.benchmarks", "stic.hf_benchmarks", "stic.judge", "stic.training", "stic.store", "stic.report",
        "stic.recipe_cache", "stic.self_questions"],
    3: ["stic.recipe", "stic.onpolicy"],
    4: ["stic.selfgen", "stic.dpo", "stic.infuse", "stic.evaluate", "stic.rounds"],  # the stages, in their order
    5: ["stic.shapes", "stic.bench", "stic.preflight", "stic.eval_fixtures", "stic.cli", "stic.__main__", "eval.run"],  # the toy world, tools, entry points
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def layer(module: str) -> int:
    if module == "stic":  # the package's __init__: warning filters only
        return 0
    for prefix in sorted(LAYER_OF, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYER_OF[prefix]
    raise AssertionError(f"{module} has no layer in tests/test_layout.py")


def project_imports() -> dict[str, set[str]]:
    files = [*REPO.glob("stic/**/*.py"), *REPO.glob("corruptions/**/*.py"), *REPO.glob("eval/*.py")]
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from stic import dpo` imports the module stic.dpo
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t not in (name, "stic")}
        graph[name] = deps
    return graph


def test_imports_point_down_the_layers_and_never_cycle():
    graph = project_imports()
    assert {"stic.selfgen", "stic.models", "stic.shapes.world", "eval.run"} <= set(graph)  # the scan sees the tree
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_the_core_does_not_import_the_toy_world():
    graph = project_imports()
    core = [m for m in graph if layer(m) < 5]
    assert not [(m, d) for m in core for d in graph[m] if d.startswith("stic.shapes")]
