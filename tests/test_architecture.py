"""The module graph: no import cycles, data flowing one way, the study outside the core."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

PACKAGE = Path(__file__).parent.parent / "src" / "gsae"
# Modules the core (everything but these) must never import: they sit on top of it.
ON_TOP = ("gsae.cli", "gsae.__main__", "gsae.study", "gsae.browser", "gsae.pipeline")
# The core's layers: a module imports only from its own layer and the layers below it, so the
# SAE side and the language-model side, side by side, know nothing of each other.
LAYERS = {
    "base": ("gsae.errors", "gsae.version", "gsae.io", "gsae.config", "gsae.distributed",
             "gsae.batch", "gsae.names", "gsae.records"),
    "sae": ("gsae.private_ops", "gsae.topk", "gsae.screen", "gsae.kernels", "gsae.sae",
            "gsae.formats", "gsae.store", "gsae.train"),
    "language model": ("gsae.tiny", "gsae.models", "gsae.hooks", "gsae.registers", "gsae.text",
                       "gsae.source", "gsae.states"),
    "both": ("gsae.caching", "gsae.evaluate", "gsae.steer", "gsae.finetune", "gsae.saebench"),
}
BELOW = {"base": (), "sae": ("base",), "language model": ("base",),
         "both": ("base", "sae", "language model")}

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


def test_every_core_module_imports_only_its_layer_and_those_below():
    edges = graph()
    layer_of = {name: layer for layer, names in LAYERS.items() for name in names}
    core = {name for name in edges if not name.startswith(ON_TOP) and name != "gsae"}
    assert core == set(layer_of), f"unplaced: {sorted(core - set(layer_of))}, " \
        f"gone: {sorted(set(layer_of) - core)}"
    for name in sorted(core):
        allowed = {layer_of[name], *BELOW[layer_of[name]]}
        wrong = sorted(t for t in edges[name] if layer_of.get(t) not in allowed)
        assert not wrong, f"{name} (layer {layer_of[name]!r}) imports {wrong}"


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


def test_training_from_a_store_does_not_import_transformers(tmp_path):
    """The SAE, the trainer and the store's reading side stand without the language-model
    stack: a fresh process trains an SAE from a store, as `gsae train --store` does, and has
    not imported transformers."""
    from gsae.batch import Batch
    from gsae.store import StoreWriter

    gen = torch.Generator().manual_seed(0)
    identity = {"model": {"model": "m"}, "hooks": ["h"], "d_in": 8, "corpus": {"dataset": "c"},
                "context_size": 8, "skip_first": 1, "outlier_factor": 5.0, "autocast": "none"}
    writer = StoreWriter(tmp_path / "store", identity, "float32", 1)
    for _ in range(2):
        writer.write_shard([{"h": Batch(torch.randn(64, 8, generator=gen),
                                        torch.randn(64, 8, generator=gen), "h")}])
    writer.finish()
    script = f"""
import sys
import gsae.sae, gsae.store, gsae.train
from gsae.sae import SAE, SAEConfig
from gsae.store import StoreReader
from gsae.train import TrainConfig, Trainer
reader = StoreReader({str(tmp_path / "store")!r})
sae = SAE(SAEConfig(n_latents=16, k=2, beta=1.0), reader.d_in, provenance=reader.provenance("h"))
cfg = TrainConfig(out={str(tmp_path / "run")!r}, tokens=96, batch_tokens=32, shuffle_tokens=64)
records = Trainer.create([(sae, "h")], cfg).fit(reader.chunks())
assert records[0]["tokens"] >= 96, records
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
assert not loaded, loaded[:5]
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
