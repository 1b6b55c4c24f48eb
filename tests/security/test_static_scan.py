"""No unsafe deserialisation or code execution in the product (AST scan, not grep).

Pickle-family loaders, ``eval``/``exec``, ``yaml.load`` without a safe loader and
``subprocess`` with ``shell=True`` turn a tampered IPC message, cache value, control message
or model file into code execution. Comments and strings do not count: only real imports and
calls do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.procs import ROOT

PACKAGES = ("app", "workers", "telemetry", "training")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "jsonpickle"}
BANNED_CALLS = {"eval", "exec"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def findings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every banned construct in a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}")
                for a in node.names
                if a.name.split(".")[0] in BANNED_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            BANNED_MODULES
        ):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.ImportFrom) and node.module == "marshal":
            found += [
                (node.lineno, "from marshal import loads")
                for a in node.names
                if a.name in ("loads", "load")
            ]
        elif isinstance(node, ast.Call):
            found += call_findings(node)
    return found


def call_findings(node: ast.Call) -> list[tuple[int, str]]:
    name = dotted(node.func)
    keywords = {k.arg: k.value for k in node.keywords}
    if name in BANNED_CALLS or name in {"builtins.eval", "builtins.exec"}:
        return [(node.lineno, f"{name}()")]
    if name in {"marshal.loads", "marshal.load"}:
        return [(node.lineno, f"{name}()")]
    if name.split(".")[-1] in {"loads", "load", "Unpickler"} and name.split(".")[0] in (
        BANNED_MODULES
    ):
        return [(node.lineno, f"{name}()")]
    if name in {"yaml.load", "yaml.load_all"}:
        loader = keywords.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
        if loader is None or dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
            return [(node.lineno, f"{name}() without a safe Loader")]
    if name.startswith("subprocess.") or name in {"os.system", "os.popen"}:
        shell = keywords.get("shell")
        if (
            name in {"os.system", "os.popen"}
            or (isinstance(shell, ast.Constant) and shell.value is True)
            or (shell is not None and not isinstance(shell, ast.Constant))
        ):
            return [(node.lineno, f"{name}(shell=...)")]
    return []


def test_the_scanner_catches_what_it_looks_for() -> None:
    bad = ast.parse(
        "import pickle\nfrom dill import loads\nimport marshal\nmarshal.loads(b'')\n"
        "eval('1')\nexec('x=1')\nimport yaml\nyaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\n"
        "import subprocess\nsubprocess.run('ls', shell=True)\nos.system('ls')\n"
    )
    good = ast.parse(
        "# pickle.loads(x) in a comment\ns = 'eval(1)'\nyaml.load(s, Loader=yaml.SafeLoader)\n"
        "yaml.safe_load(s)\nsubprocess.run(['ls'], check=True)\nmodel.eval()\n"
    )
    assert len(findings(bad)) == 9, findings(bad)
    assert findings(good) == []


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation_or_code_execution(path: Path) -> None:
    found = findings(ast.parse(path.read_text(), filename=str(path)))
    assert not found, [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in found]
