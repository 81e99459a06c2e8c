"""The package's shape: layers that import only downwards, no import circle, no import
hidden in a function without a reason, and a README that names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "platform" / "fewshot"

# Lowest first. A module may import its own layer or any below, never one above.
LAYERS = [
    {"errors", "streams", "safety"},
    {"data"},
    {"models"},
    {"methods"},
    {"config"},
    {"runtime", "ray_cluster", "run_dir", "tracking", "augment", "evaluate", "model_file"},
    {"train"},
    {"registry", "tune"},
    {"serve", "bench", "pipeline", "jobs", "recipes"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, members in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_architecture.py")


def imported(node: ast.AST, module: str) -> list[str]:
    """The package's modules an import statement names (a `from X import name` counts X.name
    when that is a module, else X)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("fewshot")]
    if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
        return []
    if not node.module.startswith("fewshot"):
        return []
    names = [f"{node.module}.{a.name}" for a in node.names]
    return [n for n in names if n in MODULES] or [node.module]


def imports(module: str, top_level: bool) -> list[tuple[int, str]]:
    """(line, imported module) of `module`: those run at import time, or those inside
    functions."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        inside = node not in tree.body and not _in_type_checking(tree, node)
        if isinstance(node, ast.Import | ast.ImportFrom) and inside != top_level:
            found.extend((node.lineno, name) for name in imported(node, module))
    return found


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(
        isinstance(top, ast.If)
        and node in ast.walk(top)
        and "TYPE_CHECKING" in ast.unparse(top.test)
        for top in tree.body
    )


def test_every_module_has_a_layer_and_imports_only_downwards():
    upward = [
        f"{module} imports {target}"
        for module in MODULES
        for _, target in imports(module, top_level=True)
        if target != "fewshot" and layer(target) > layer(module)
    ]
    assert upward == []


def test_the_import_graph_has_no_circle():
    graph = {m: {t for _, t in imports(m, top_level=True) if t in MODULES} for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            if (circle := visit(target, [*path, module])) is not None:
                return circle
        done.add(module)
        return None

    circles = [c for m in MODULES if (c := visit(m, []))]
    assert circles == []


def test_function_local_imports_of_the_package_say_why():
    """Outside cli/ (where they keep start-up fast), an import of the package's own modules
    inside a function needs a comment on its line or the line above saying why."""
    silent = []
    for module, path in MODULES.items():
        if module.startswith("fewshot.cli"):
            continue
        lines = path.read_text().splitlines()
        for line, target in imports(module, top_level=False):
            said = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            if not said:
                silent.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert silent == []


def test_readme_architecture_names_every_module():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Architecture\n+```\n(.*?)```", readme, re.S | re.M).group(1)
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and relative.parent.name not in ("cli",):
            continue
        folder = f"{relative.parent.as_posix()}/" if relative.parent.parts else ""
        named = relative.as_posix() in block or (
            (not folder or folder in block) and re.search(rf"\b{re.escape(path.name)}", block)
        )
        if not named:
            missing.append(relative.as_posix())
    assert missing == []


def architecture_entries() -> dict[str, str]:
    """The README's architecture block as top-level name -> its text (the name's line and
    the indented lines under it)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Architecture\n+```\n(.*?)```", readme, re.S | re.M).group(1)
    entries: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        if line and not line[0].isspace():
            name, _, line = line.partition(" ")
            entries[name] = ""
        entries[name] += line + "\n"
    return entries


def test_readme_architecture_names_every_job_and_nothing_missing():
    entries = architecture_entries()
    named = set(re.findall(r"\b(\w+\.py)\b", entries["jobs/"]))
    on_disk = {p.name for p in (ROOT / "jobs").glob("*.py")}
    assert sorted(on_disk - named) == []
    assert sorted(named - on_disk) == []
    assert (ROOT / "jobs" / "configs").is_dir() and "jobs/configs/" in entries


def test_readme_architecture_names_every_test_folder_and_nothing_missing():
    entries = architecture_entries()
    named = set(re.findall(r"\b([a-z_]+)/", entries["tests/"])) - {"platform", "fewshot"}
    on_disk = {p.parent.name for p in (ROOT / "tests").glob("*/test_*.py")}
    assert sorted(on_disk - named) == []
    assert sorted(named - on_disk) == []


def test_readme_architecture_top_level_entries_exist():
    missing = [name for name in architecture_entries() if not (ROOT / name).exists()]
    assert missing == []
