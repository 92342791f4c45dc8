"""Every module of `sppo/`, `actors/` and `cluster/` imports on its own, without vLLM, and the
three packages are layers with imports only downward: `sppo/` (what SPPO is) <- `actors/` (the
processes) <- `cluster/` (how they are wired).

Each module is imported in a fresh interpreter, so an import that only works because another
module was imported first (a circular import, a missing dependency hidden by test order) fails
here, and what the import loaded is checked against the layers:
- no `sppo.*` module but the driver loads `ray`, `actors` or `cluster` (nor vLLM);
- no `actors.*` module loads `cluster`.
The source is checked too, for imports anywhere in a file (a function-level import loads
nothing until it runs): no `sppo` module but the driver names `ray`, `actors`, `cluster` or
`vllm`, no `actors` module names `cluster`. The modules are found by walking the folders, so
new ones are covered without editing this file. `__main__` modules are left out: importing one
runs it. The interpreters run two at a time (`imported`, for the modules this session selected;
each mostly imports torch).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sppo", "actors", "cluster")
ENTRY_POINT = "sppo.driver"  # the command line: the one module that hands over to `cluster`

# What a layer's modules may not load or name (top-level package names).
FORBIDDEN = {"sppo": {"ray", "actors", "cluster", "vllm"}, "actors": {"cluster"},
             "cluster": set()}

# What importing one module loaded, as JSON on the last line of stdout.
CHECK = """
import importlib, json, sys
importlib.import_module({module!r})
print(json.dumps(sorted(sys.modules)))
"""


def _modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__main__" or "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append(".".join(parts))
    return found


def _forbidden(module: str) -> set[str]:
    return set() if module == ENTRY_POINT else FORBIDDEN[module.split(".")[0]]


def _import_alone(module: str) -> tuple[int, str, list[str]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", CHECK.format(module=module)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    loaded = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else []
    return result.returncode, result.stderr, loaded


@pytest.fixture(scope="module")
def imported(request) -> dict:
    """module -> (return code, stderr, modules loaded), for every module this session's
    selected tests name, each imported in a fresh interpreter, two at a time."""
    wanted = [item.callspec.params["module"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_module_imports_alone_in_its_layer"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(wanted, pool.map(_import_alone, wanted)))


@pytest.mark.parametrize("module", _modules())
def test_module_imports_alone_in_its_layer(module, imported):
    rc, stderr, loaded = imported[module]
    assert rc == 0, f"import {module} failed:\n{stderr[-3000:]}"
    heavy = sorted(m for m in loaded if m == "vllm" or m.startswith("vllm."))
    assert not heavy, f"importing {module} imported {heavy[:5]}"
    upward = sorted(m for m in loaded if m.split(".")[0] in _forbidden(module))
    assert not upward, f"importing {module} loaded {upward[:5]}: above its layer"


def _named_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_no_module_names_a_package_above_its_layer():
    """Function-level imports included: the layers hold for code that has not run yet."""
    bad = []
    for module in _modules():
        path = REPO / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        bad += [f"{module}:{line} imports {name}" for line, name in _named_imports(path)
                if name in _forbidden(module)]
    assert not bad, "imports above the layer:\n  " + "\n  ".join(bad)


def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    """The checks above can fail: an `sppo` module that imports `cluster` inside a function,
    and one that loads `ray`, are both caught."""
    path = tmp_path / "bad.py"
    path.write_text("import json\n\ndef f():\n    from cluster.selfplay import SelfPlay\n")
    assert [n for _, n in _named_imports(path) if n in _forbidden("sppo.bad")] == ["cluster"]
    assert not _forbidden(ENTRY_POINT)
    rc, _, loaded = _import_alone("cluster.autoscale")  # loads ray: not allowed in `sppo`
    assert rc == 0 and {m.split(".")[0] for m in loaded} & _forbidden("sppo.journal") == {
        "ray", "cluster"}


def test_the_readme_layout_names_every_module():
    """README's layout table names every file of `sppo/`, `actors/` and `cluster/` (and of
    `actors/weights/`) in its folder's row; the engines are named as a folder."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("| `") and "/` |" in line:
            rows[line.split("`")[1].rstrip("/")] = line
    missing = []
    for folder, row_of in (("sppo", "sppo"), ("actors", "actors"), ("cluster", "cluster"),
                           ("actors/weights", "actors")):
        for path in sorted((REPO / folder).iterdir()):
            if path.name.startswith("__") or path.name == "py.typed" or \
                    (path.is_dir() and path.name in ("templates", "engines", "weights")):
                continue
            if f"`{path.name}`" not in rows.get(row_of, ""):
                missing.append(f"{folder}/{path.name}")
    assert not missing, f"README's layout table does not name: {missing}"


def test_a_long_module_says_why_at_its_top():
    """A module of `sppo/`, `actors/` or `cluster/` over ~400 lines names its reason in its
    docstring's first lines ("Over 400 lines: ..."), or is split."""
    long = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            lines = path.read_text().splitlines()
            if len(lines) > 400 and not any(l.startswith("Over 400 lines:") for l in lines[:4]):
                long.append(f"{path.relative_to(REPO)} ({len(lines)} lines)")
    assert not long, long
