"""The import graph runs one way (STYLE §5.2) and no module outgrows its job."""

import ast
from pathlib import Path

PKG = Path(__file__).parent.parent / "lfm2vl"

# module (or package prefix) -> lfm2vl modules it may import
ALLOWED = {
    "config": set(),
    "model": {"config"},
    "cache": {"config"},
    "sampling": set(),
    "processing": {"config", "processing"},
    "hub": set(),
    "weights": {"config", "model"},
    "generate": {"config", "model", "cache", "sampling"},
    "textstream": set(),
    "completion": {"generate", "sampling", "textstream"},
}
FORBIDDEN_EVERYWHERE = {"transformers", "torchvision"}


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
        for imp in _imports(path):
            top = imp.split(".")[0]
            if top in FORBIDDEN_EVERYWHERE:
                problems.append(f"{path.name} imports {imp} (test-only dependency)")
            rule = ALLOWED.get(rel[0])
            if rule is None or top != "lfm2vl" or imp == "lfm2vl":
                continue
            target = imp.split(".")[1]
            if target not in rule and target != rel[0]:
                problems.append(f"lfm2vl/{'/'.join(rel)}.py may not import lfm2vl.{target}")
    assert not problems, "\n".join(problems)


def test_model_files_do_no_io():
    for path in (PKG / "model").glob("*.py"):
        imports = _imports(path)
        assert not imports & {"json", "pathlib", "PIL", "huggingface_hub", "os"}, path.name


def test_module_line_budget():
    too_long = [f"{p.relative_to(PKG)}: {n}" for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500]
    assert not too_long, too_long
