"""The import rules of docs/design.md, checked on every import statement of the project (module level and inside
functions): a layer imports only the layers below it."""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

# package prefix -> prefixes it must never import (module-level or lazy)
FORBIDDEN = {
    "sae": ("backend", "inspector", "cli"),
    "backend.errors": ("backend.", "sae", "inspector"),
    "backend.fileio": ("backend.run", "backend.models", "backend.demo", "backend.stages", "backend.analysis",
                       "backend.interventions", "sae", "inspector"),
    "backend.buffers": ("backend.run", "backend.models", "backend.demo", "backend.stages", "backend.analysis",
                        "backend.interventions", "sae", "inspector"),
    "backend.grid": ("backend.run", "backend.models", "backend.demo", "backend.stages", "backend.analysis",
                     "backend.interventions", "sae", "inspector"),
    "backend.models": ("backend.run", "backend.stages", "backend.analysis", "backend.interventions", "inspector"),
    "backend.run": ("backend.stages", "backend.analysis", "backend.interventions", "inspector"),
    "backend.analysis": ("backend.stages", "backend.interventions", "inspector"),
    "backend.interventions": ("backend.stages", "inspector"),
    "backend.stages": ("inspector",),
    "backend.sweep": ("inspector",),
    "backend.demo": ("backend.run", "backend.stages", "backend.analysis", "backend.interventions", "inspector"),
}
TORCH_FREE = ("backend.run.schema", "backend.run.manifest")
INSPECTOR_BACKEND = ("backend.run.schema", "backend.run.manifest", "backend.errors")


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted([*ROOT.glob("backend/**/*.py"), *ROOT.glob("sae/*.py"), *ROOT.glob("inspector/**/*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def imports(tree: ast.Module, module: str) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


MODULES = modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    used = imports(MODULES[module], module)
    for layer, forbidden in FORBIDDEN.items():
        if module == layer or module.startswith(layer + "."):
            bad = sorted(u for u in used if any(u == f.rstrip(".") or u.startswith(f if f.endswith(".") else f + ".")
                                               or u == f for f in forbidden))
            assert not bad, f"{module} imports {bad}, above its layer (docs/design.md)"
    if module in TORCH_FREE:
        assert not any(u.split(".")[0] in ("torch", "diffusers", "transformers", "sae") for u in used), module
    if module.startswith("inspector") and module != "inspector.live":
        backend = sorted(u for u in used if u.startswith("backend"))
        allowed = [u for u in backend if u.startswith(INSPECTOR_BACKEND)]
        assert backend == allowed, f"{module} reads the backend beyond the torch-free run format: {backend}"
