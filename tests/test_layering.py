"""The import graph of finetune/ and recipes/, read statically (function-level imports included, so a lazy import
cannot hide a cycle): no cycles, export never imports training, and only the commands import the recipes."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"finetune.cli", "finetune.__main__", "finetune.demo"}  # the top layer: the CLI and the demo it runs


def module_files() -> dict[str, Path]:
    files = {}
    for path in [*(ROOT / "finetune").rglob("*.py"), *(ROOT / "recipes").rglob("*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imported(module, path, set(files)) for module, path in files.items()}


def cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one (depth-first)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_graph_is_read_whole():
    graph = import_graph()
    assert "finetune.training.loop" in graph["recipes.dreambooth_lora"]  # an absolute import
    assert "finetune.config" in graph["finetune.models"]                 # a relative one
    assert "recipes.dreambooth_lora" in graph["recipes.sdxl_dreambooth_lora"]


def test_no_module_imports_itself_back():
    toy = {"a": {"b"}, "b": {"a"}, "c": {"a"}}  # the search itself, on a graph whose answer is known
    assert cycle_from(toy, "a") == ["a", "b", "a"] and cycle_from(toy, "c") is None
    graph = import_graph()
    cycles = [cycle for module in graph if (cycle := cycle_from(graph, module))]
    assert cycles == []


def test_export_never_imports_training_and_only_the_commands_import_recipes():
    graph = import_graph()
    assert [(a, b) for a in graph if a.startswith("finetune.export") for b in graph[a]
            if b.startswith("finetune.training")] == []
    assert [(a, b) for a in graph if a.startswith("finetune") and a not in COMMANDS for b in graph[a]
            if b.startswith("recipes") or b in COMMANDS] == []
