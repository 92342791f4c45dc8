"""Every module of `sppo/`, `actors/` and `cluster/` imports on its own, without vLLM.

Each module is imported in a fresh interpreter, so an import that only works because another
module was imported first (a circular import, a missing dependency hidden by test order) fails
here. The modules are found by walking the folders, so new ones are covered without editing this
file. `__main__` modules are left out: importing one runs it. The interpreters run two at a time
(`imported`, for the modules this session selected; each mostly imports torch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sppo", "actors", "cluster")

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
              if getattr(item, "originalname", None) == "test_module_imports_alone_without_vllm"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(wanted, pool.map(_import_alone, wanted)))


@pytest.mark.parametrize("module", _modules())
def test_module_imports_alone_without_vllm(module, imported):
    rc, stderr, loaded = imported[module]
    assert rc == 0, f"import {module} failed:\n{stderr[-3000:]}"
    heavy = sorted(m for m in loaded if m == "vllm" or m.startswith("vllm."))
    assert not heavy, f"importing {module} imported {heavy[:5]}"
