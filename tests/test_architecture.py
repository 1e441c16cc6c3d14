"""The module graph: no import cycles, data flowing one way, the study outside the core."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "gsae"
# Modules the core (everything but these) must never import: they sit on top of it.
ON_TOP = ("gsae.cli", "gsae.__main__", "gsae.study", "gsae.browser", "gsae.pipeline")
# Modules at the bottom, pure Python: the only gsae modules each may import (and nothing outside
# the standard library), so that reading and writing results needs no torch.
BOTTOM = {"gsae.errors": set(), "gsae.records": {"gsae.errors"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The gsae modules a file imports, anywhere in it (also inside functions): `from a import
    b` imports the module a.b if there is one, else the module a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path, set(paths)) if m in paths and m != name}
            for name, path in paths.items()}


def test_the_graph_is_read_from_the_sources():
    edges = graph()
    assert "gsae.source" in edges["gsae.pipeline"] and "gsae.config" in edges["gsae.cli"]


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(name, path):
        state[name] = 1
        for nxt in edges[name]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in edges:
        if name not in state:
            visit(name, [name])


def test_the_core_does_not_reach_up():
    for name, targets in graph().items():
        if name.startswith(ON_TOP) or name == "gsae":
            continue
        upward = sorted(t for t in targets if t.startswith(ON_TOP))
        assert not upward, f"{name} imports {upward}, which sit on top of it"


def test_the_bottom_modules_import_only_the_standard_library_and_each_other():
    edges = graph()
    for name, allowed in BOTTOM.items():
        assert edges[name] <= allowed, f"{name} imports {sorted(edges[name] - allowed)}"
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        outside = {m.split(".")[0] for m in imports_of(path, set())} - {"gsae", "__future__"}
        assert outside <= set(sys.stdlib_module_names), f"{name} imports {sorted(outside)}"


def test_the_core_trains_and_evaluates_without_the_plotting_extra(corpus, tmp_path):
    """With matplotlib and pillow made unimportable, `gsae train` and `gsae eval` still run,
    and `gsae compare` says which extra it needs."""
    script = f"""
import sys
sys.modules["matplotlib"] = None
sys.modules["PIL"] = None
from gsae.cli import main
common = ["--model", "tiny-llama", "--dataset", {corpus!r}, "--context_size", "32"]
assert main(["train", *common, "--hooks", "1", "--tokens", "512", "--batch_tokens", "256",
             "--expansion_factor", "2", "--k", "4", "--out", {str(tmp_path / "r")!r}]) == 0
assert main(["eval", {str(tmp_path / "r" / "model.layers.1" / "k4-beta100-z-x2-s0")!r},
             "--eval_tokens", "64"]) == 0
assert main(["compare", "--help"]) == 2
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gsae compare needs the plotting extra" in done.stderr
