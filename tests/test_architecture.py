"""Rules of the code base that no linter here checks (ruff and import-linter run in CI for the rest:
see pyproject.toml): no module imports another module's private names, and no module or function is
too long to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvray"


def _private_imports(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kvray")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {alias.name} "
                                 f"from {'.' * node.level}{node.module or ''}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert [line for path in sorted(PACKAGE.rglob("*.py")) for line in _private_imports(path)] == []


def test_every_module_of_the_package_is_in_the_layer_contract():
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    modules = {f"kvray.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    # Every subpackage holding code (a data-only package, e.g. the shipped weights, has nothing to layer).
    modules |= {f"kvray.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()
                and any(q.stem != "__init__" for q in p.glob("*.py"))}
    assert modules - named == set(), "add these to the layers contract in pyproject.toml"


def test_the_check_sees_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from kvray.sampling.loops import _guided\nfrom .stages import _groups\nfrom os import __all__\n")
    assert len(_private_imports(bad, tmp_path)) == 2


def test_the_public_api_resolves_without_loading_torch_or_ray_until_used():
    import subprocess
    import sys

    import kvray

    for name in kvray.__all__:
        assert getattr(kvray, name).__name__ == name
    probe = ("import sys, kvray; job = kvray.RenderJob(manifest='m.parquet', out='o'); "
             "print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_renders_driver_loads_no_torch():
    """The driver plans rows and starts pools; torch is for the stage actors (each render's start-up would
    pay for it: about 1.3 s). The stage classes it hands to Ray Data import their code in the actor."""
    import subprocess
    import sys

    probe = ("import sys; from kvray.commands import render; from kvray.distributed import render as distributed; "
             "from kvray.distributed.deferred_workers import DEFERRED_WORKERS; from kvray.config.models import ModelSource; "
             "from kvray.commands.common import checked_models; checked_models(ModelSource()); "
             "print('torch' in sys.modules, sorted(DEFERRED_WORKERS))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False ['decode', 'interpolate', 'keyframes', 'text']"


def test_every_list_of_stages_and_networks_is_the_registrys():
    """Stage and network names are spelled out in the job's deployment fields, the stage registry, the
    runtime's dtype settings and the weights' network table: they must agree."""
    from kvray.config.job import Deployment
    from kvray.config.runtime import NETWORKS, RuntimeConfig
    from kvray.config.stages import STAGE_NETWORKS, STAGES
    from kvray.weights.networks import NETWORKS as WEIGHT_NETWORKS

    stage_fields = tuple(Deployment.model_fields)[:len(STAGES)]  # then how the stages are pooled
    assert stage_fields == STAGES == tuple(STAGE_NETWORKS)
    assert set(Deployment.model_fields) - set(STAGES) == {"pools", "fused"}
    assert sorted(n for networks in STAGE_NETWORKS.values() for n in networks) == sorted(NETWORKS) == sorted(WEIGHT_NETWORKS)
    assert sorted(f[: -len("_dtype")] for f in RuntimeConfig.model_fields if f.endswith("_dtype")) == sorted(NETWORKS)


# Size limits that keep a module and a function readable in one sitting, and the exceptions, with why.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS = {
    # The dataset card is one Markdown document with its code examples: split, it could not be read as one.
    "kvray/io/dataset_card.py:dataset_card",
}


def test_no_module_or_function_is_too_long_to_read():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).as_posix()
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{name}:{node.name}" not in LONG_FUNCTIONS:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert too_long == [], f"split these (modules <= {MAX_MODULE_LINES} lines, functions <= {MAX_FUNCTION_LINES})"
