"""Test-only access to lmms-eval 0.7.3's scoring functions (the peer our task scorers must agree with).

lmms-eval is installed without its dependencies (.ci/run: pip install --no-deps lmms-eval==0.7.3), as
transformers is for the model. Its `lmms_eval.tasks` package imports the whole framework on import, so
that package is replaced by an empty one pointing at the same folder, and each task's utils.py is
loaded on its own, with the framework pieces it names at import time (loguru, the LLM-judge client,
filters, verifiers, pandas) stubbed. Only the judge stub is ever called, and tests give it its replies.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


class _Logger:
    def __getattr__(self, name: str):
        return lambda *a, **k: None


class FakeServer:
    """Stands in for lmms_eval.llm_judge's server: replies come from `replies` (a callable on the prompt)."""

    replies = staticmethod(lambda prompt: "")

    def evaluate(self, request: Any) -> Any:
        content = FakeServer.replies(request.messages[-1]["content"])
        return types.SimpleNamespace(success=True, content=content, model_used="fake", error=None)


def _stub(name: str, **attrs: Any) -> types.ModuleType:
    mod = sys.modules.get(name) or types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


class _Frame(list):  # the two pandas calls mmvet's module makes at import: DataFrame(list).squeeze().tolist()
    def squeeze(self):
        return self

    def tolist(self):
        return list(self)


@functools.cache
def root() -> Path:
    try:
        import lmms_eval
    except ImportError as e:
        raise ImportError("the scorer parity tests need lmms-eval: pip install --no-deps lmms-eval==0.7.3") from e
    base = Path(lmms_eval.__file__).parent
    if not isinstance(sys.modules.get("lmms_eval.tasks"), types.ModuleType) or not getattr(
            sys.modules.get("lmms_eval.tasks"), "_lfm2vl_stub", False):
        pkg = _stub("lmms_eval.tasks", __path__=[str(base / "tasks")], _lfm2vl_stub=True)
        sys.modules["lmms_eval"].tasks = pkg

    class _Dummy:
        def __init__(self, *a, **k):
            pass

    _stub("lmms_eval.llm_judge", Request=lambda messages, config: types.SimpleNamespace(messages=messages, config=config),
          ServerConfig=lambda **k: types.SimpleNamespace(**k), get_server=lambda server_name, config: FakeServer())
    _stub("lmms_eval.filters")
    _stub("lmms_eval.filters.extraction", ExtendedRegexFilter=_Dummy)
    _stub("lmms_eval.filters.transformation", MapFilter=_Dummy)
    _stub("lmms_eval.verifiers", VerificationPipeline=_Dummy)
    _stub("lmms_eval.verifiers.openai", OpenAIVerifier=_Dummy)
    return base


@functools.cache
def task_utils(task: str) -> types.ModuleType:
    """lmms_eval/tasks/<task>/utils.py (imported as lmms_eval.tasks.<task>.utils).

    pandas and loguru are stubbed only while the module imports (it keeps what it took from them): a
    stub left in sys.modules would mislead other libraries' checks for pandas (pyarrow, transformers)."""
    base = root()
    _stub(f"lmms_eval.tasks.{task}", __path__=[str(base / "tasks" / task)])
    saved = {name: sys.modules.get(name) for name in ("pandas", "loguru")}
    try:
        if importlib.util.find_spec("pandas") is None:
            _stub("pandas", DataFrame=_Frame)
        _stub("loguru", logger=_Logger())
        return importlib.import_module(f"lmms_eval.tasks.{task}.utils")
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def mcq_mmmu() -> types.ModuleType:
    root()
    return importlib.import_module("lmms_eval.tasks._task_utils.mmmu_mcq_utils")


def mcq_extract() -> types.ModuleType:
    root()
    return importlib.import_module("lmms_eval.tasks._task_utils.mcq_extract")


@functools.cache
def metrics_functions(*names: str) -> dict[str, Any]:
    """Functions from lmms_eval/api/metrics.py, lifted out by name (the module itself needs sacrebleu,
    numpy and the registry; the ANLS functions need nothing)."""
    source = (root() / "api" / "metrics.py").read_text()
    tree = ast.parse(source)
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    for n in wanted:
        n.decorator_list = []
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "lmms_eval/api/metrics.py", "exec"), namespace)
    return {n: namespace[n] for n in names}
