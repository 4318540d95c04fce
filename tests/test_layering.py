"""The import graph runs one way (processing -> model -> engine -> API -> server/CLI, with train/ and
eval/ beside; docs/architecture.md) and no module outgrows its job. Every module has a rule."""

import ast
from pathlib import Path

PKG = Path(__file__).parent.parent / "lfm2vl"

# module (or package) -> lfm2vl modules it may import ("lfm2vl" = the package's public face)
ALLOWED = {
    "config": set(),
    "sampling": set(),
    "textstream": set(),
    "hub": set(),
    "bundled": set(),
    "processing": {"config"},
    "model": {"config", "cpu"},
    "memory": set(),
    "cpu": set(),
    "weights": {"config", "memory", "model", "quant"},
    "engine": {"cpu", "memory", "model", "sampling", "textstream"},
    "completion": {"engine", "sampling"},
    "native": {"cpu"},
    "quant": {"cpu", "model", "native"},  # model/linear.py: the float32 matmul of widened weights
    "budget": {"cpu", "processing"},
    "api": {"budget", "bundled", "completion", "config", "engine", "hub", "model", "processing", "quant", "sampling", "weights"},
    "__init__": {"api", "config", "engine", "memory", "processing"},
    "eval": set(),
    "train": {"lfm2vl", "api", "config", "eval", "model", "weights"},
    "server": {"lfm2vl", "api", "budget", "completion", "engine", "processing", "sampling"},
    "cli": {"lfm2vl", "api", "bench", "budget", "bundled", "config", "engine", "eval", "processing", "quant", "sampling", "server", "train",
            "weights"},
    "bench": {"lfm2vl", "api", "bundled", "config", "cpu", "memory", "model", "native", "processing", "quant", "weights"},
    "__main__": {"cli"},
}
FORBIDDEN_EVERYWHERE = {"transformers", "torchvision"}
# The one exception: the reference side of `lfm2vl bench --compare transformers`, which runs only as a
# process of its own (bench/side.py) and is imported by nothing else (checked below).
REFERENCE_RUNNER = ("bench", "reference")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG).with_suffix("").parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(rel[: len(rel) - node.level])
                mod = ".".join(["lfm2vl", *base] + ([node.module] if node.module else []))
                if node.module is None:
                    found |= {f"{mod}.{a.name}" for a in node.names}
                else:
                    found.add(mod)
            else:
                found.add(node.module)
    return found


def test_import_rules():
    problems = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("").parts
        if rel[0] not in ALLOWED:
            problems.append(f"lfm2vl/{'/'.join(rel)}.py has no layering rule: add one to ALLOWED")
        for imp in _imports(path):
            top = imp.split(".")[0]
            if top in FORBIDDEN_EVERYWHERE and rel != REFERENCE_RUNNER:
                problems.append(f"{path.name} imports {imp} (test-only dependency)")
            rule = ALLOWED.get(rel[0])
            if rule is None or top != "lfm2vl":
                continue
            target = "lfm2vl" if imp == "lfm2vl" else imp.split(".")[1]
            if target not in rule and target != rel[0]:
                problems.append(f"lfm2vl/{'/'.join(rel)}.py may not import lfm2vl.{target}")
    assert not problems, "\n".join(problems)


def test_only_the_benchmark_process_imports_the_reference_runner():
    importers = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if any(i.endswith("bench.reference") for i in _imports(p))]
    assert importers == ["bench/side.py"], importers


def test_model_files_do_no_io():
    for path in (PKG / "model").glob("*.py"):
        imports = _imports(path)
        assert not imports & {"json", "pathlib", "PIL", "huggingface_hub", "os"}, path.name


def test_module_line_budget():
    too_long = [f"{p.relative_to(PKG)}: {n}" for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500]
    assert not too_long, too_long


def test_engine_mock_tests_run_without_transformers():
    """The mock-model engine tests need no checkpoint and no reference: run them with transformers blocked."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_engine_mock.py']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PKG.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
