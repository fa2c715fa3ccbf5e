"""The shape of the code base (docs/DESIGN.md, "The code"): checked, so that it stays.

  layers        ``lint-imports`` keeps the layers contract of setup.cfg (every import, function-local ones too,
                runs down: cli > services > measure > engine > pool > workers > ipc > format > base > model).
  cycles        no module imports itself through other modules, function-local imports included (model/,
                runtime/, workers/).
  argparse      only the CLI layer and launch.py read the command line.
  defaults      every flag's default is its config field's default, and every flag belongs to a config.
  the model     model/ holds the architecture only: no CUDA copies, host stores or offload; llama.py < 350 lines.
  self-contained  no docstring or comment points outside the repository.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("model", "runtime", "workers")


def _sources(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (ROOT / r).rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_lint_imports_keeps_the_layers():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere: at module level and inside functions (a function-local import
    defers the import, it does not untangle the modules), not under TYPE_CHECKING (never executed)."""
    tree = ast.parse(path.read_text())
    me = _module(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m in known and m != me}


def test_imports_under_type_checking_and_in_functions_are_told_apart(tmp_path):
    """The graph the cycle test walks: a function-local import counts, one under TYPE_CHECKING does not."""
    src = ROOT / "runtime" / "services" / "server.py"
    found = _imports(src, {"runtime.engine.generate", "runtime.engine.weights", "runtime.env"})
    assert "runtime.env" in found  # imported inside a function (api key)
    assert "runtime.engine.weights" not in found  # only under TYPE_CHECKING


def test_no_import_cycle():
    paths = _sources(*PACKAGES)
    known = {_module(p) for p in paths}
    graph = {_module(p): _imports(p, known) for p in paths}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    # a package's __init__ importing its own submodules is not a cycle worth the name; none do here
    assert not cycles, f"import cycles (function-local imports included): {cycles}"


def test_argparse_only_in_the_cli():
    users = [str(p.relative_to(ROOT)) for p in _sources(*PACKAGES)
             if re.search(r"^\s*(import argparse|from argparse import)", p.read_text(), re.M)]
    assert all(u.startswith("runtime/cli/") for u in users), users


def _actions(parser, path=""):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}".strip())
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_default_is_its_configs():
    from runtime.cli.parser import CONFIGS, build_parser

    seen = set()
    for path, action in _actions(build_parser()):
        if not path:
            continue
        owners = [c for c in CONFIGS[path] if action.dest in c.flags()]
        assert owners, f"{path}: --{action.dest} belongs to none of {[c.__name__ for c in CONFIGS[path]]}"
        for cls in owners:
            want = cls.flag_default(action.dest)
            if want is dataclasses.MISSING:
                assert action.required or action.nargs is None, (path, action.dest)
                continue
            assert action.default == want, f"{path}: --{action.dest} defaults to {action.default!r}, " \
                                           f"{cls.__name__} to {want!r}"
        seen.add(path)
    assert seen == set(CONFIGS)


@pytest.mark.parametrize("argv,given", [(["run"], {}), (["bench"], {}), (["perplexity", "--text-file", "t"], {}),
                                        (["pool", "serve", "p"], {}), (["probe"], {}),
                                        (["pack", "--out", "o", "--synthetic", "tiny"], {"synthetic": "tiny"})])
def test_parsed_defaults_build_the_default_configs(argv, given):
    """A command line without flags builds exactly the configs the classes' defaults make."""
    from runtime.cli.parser import build_parser, configs
    from runtime.engine.config import EngineConfig

    built = configs(build_parser().parse_args(argv))
    for cls, cfg in built.items():
        required = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        mine = {k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(cls)}}
        assert cfg == cls(**required, **mine), cls.__name__
    if EngineConfig in built:
        assert built[EngineConfig] == EngineConfig()


def test_the_model_is_the_model():
    text = {p.name: p.read_text() for p in _sources("model")}
    for name, src in text.items():
        for needle in ("cudaMemcpy", "cudaHostRegister", "pin_memory", "copy_stream", "offload", "HostStore"):
            assert needle not in src, f"model/{name} mentions {needle}"
    assert len(text["llama.py"].splitlines()) < 350


def test_nothing_points_outside_the_repository():
    bad = []
    for p in _sources(*PACKAGES, "tests", "benchmarks") + [ROOT / "launch.py"]:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"(?<!docs/)DESIGN\.md|STYLE\.md|\bseeds\b|\.\./shared", line):
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)
