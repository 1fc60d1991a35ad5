"""The layout of a field with many methods: every registered method lives in its family's package and imports
only the shared building blocks (``methods.base``, ``methods.parts``, a family's own ``base`` / ``parts``), never
another method; the package has no import circle (function-level imports included); the registry checks a name
against its class and lists methods by family."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "vlprompt"
FAMILY_BLOCKS = {"base", "parts"}  # a family package's shared modules (methods/ordinal/base.py, .../parts.py)


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def imports_of(name: str, *, top_level_only: bool = False) -> set[str]:
    """The vlprompt modules ``name`` imports (also inside functions unless ``top_level_only``)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                full = f"{target}.{a.name}"
                out.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in MODULES and m != name}


def _method_modules() -> dict[str, str]:
    """{registered method name: its module}."""
    from vlprompt.methods import _REGISTRY, method_class, method_names

    out = {}
    for name in method_names():
        target = _REGISTRY[name]
        out[name] = target.partition(":")[0] if isinstance(target, str) else method_class(name).__module__
    return out


def test_method_modules_import_building_blocks_never_another_method():
    modules = _method_modules()
    method_mods = set(modules.values())
    for name, mod in modules.items():
        assert mod.startswith("vlprompt.methods."), f"{name}: {mod} is outside vlprompt.methods"
        family = mod.split(".")[2]
        assert family not in ("base", "parts") and mod.count(".") == 3, f"{name}: {mod} is not in a family package"
        for imp in imports_of(mod):
            assert imp not in method_mods, f"{mod} ({name}) imports the method module {imp}"
            if imp.startswith("vlprompt.methods."):
                rest = imp[len("vlprompt.methods."):].split(".")
                ok = rest[0] in ("base", "parts") or (rest[0] == family and rest[-1] in FAMILY_BLOCKS)
                assert ok, f"{mod} ({name}) imports {imp}: methods import base, parts and their family's blocks"


def test_building_blocks_import_no_method():
    method_mods = set(_method_modules().values())
    blocks = [m for m in MODULES if m.startswith(("vlprompt.methods.parts", "vlprompt.methods.base"))
              or (m.startswith("vlprompt.methods.") and m.rsplit(".", 1)[-1] in FAMILY_BLOCKS)]
    assert "vlprompt.methods.parts.context" in blocks
    for mod in blocks:
        assert not imports_of(mod) & method_mods, f"the building block {mod} imports a method module"


def test_no_import_circle():
    """No cycle among vlprompt's modules, counting imports inside functions too (a circle that only works
    because one side imports late is still a circle)."""
    graph = {m: imports_of(m) for m in MODULES}
    index, low, stack, on, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_registry_checks_names_and_lists_families():
    from dataclasses import dataclass

    from vlprompt.errors import VLPromptError
    from vlprompt.methods import (Method, MethodConfig, method_class, method_families, register_method,
                                  unregister_method)

    families = method_families()
    assert {"baselines", "prompts", "ordinal"} <= set(families)
    assert "coop" in families["prompts"] and "zeroshot" in families["baselines"]
    for family, names in families.items():
        for name in names:
            assert method_class(name).name == name and method_class(name).family == family

    @dataclass
    class Cfg(MethodConfig):
        pass

    class Misnamed(Method):
        name = "something-else"
        config_class = Cfg

    with pytest.raises(VLPromptError, match="named 'something-else'"):
        register_method("misnamed", Misnamed)

    class ReadsUndeclared(Method):
        name = "reads-undeclared"
        config_class = Cfg

        def setup(self, train, val):
            return {}

    with pytest.raises(VLPromptError, match="setup_reads"):
        register_method("reads-undeclared", ReadsUndeclared)
    unregister_method("misnamed")
    unregister_method("reads-undeclared")


def test_methods_command_lists_every_method_by_family():
    env = {"PYTHONPATH": str(SRC)}
    import os

    out = subprocess.run([sys.executable, "-m", "vlprompt", "methods", "--json"], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120, check=True)
    rows = json.loads(out.stdout)
    from vlprompt.methods import method_names

    assert sorted(r["name"] for r in rows) == sorted(method_names())
    zs = next(r for r in rows if r["name"] == "zeroshot")
    assert zs["family"] == "baselines" and zs["trains"] is False and zs["setup_reads"] == []
    lp = next(r for r in rows if r["name"] == "linear-probe")
    assert lp["trains"] is False and lp["setup_reads"] == ["train", "val"]
