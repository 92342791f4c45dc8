"""Every module of `sppo/`, `actors/` and `cluster/` imports on its own, without vLLM.

Each module is imported in a fresh interpreter, so an import that only works because another
module was imported first (a circular import, a missing dependency hidden by test order) fails
here. The modules are found by walking the folders, so new ones are covered without editing this
file. `__main__` modules are left out: importing one runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sppo", "actors", "cluster")

CHECK = """
import importlib, sys
importlib.import_module({module!r})
heavy = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
assert not heavy, f"importing {module} imported {{heavy[:5]}}"
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


@pytest.mark.parametrize("module", _modules())
def test_module_imports_alone_without_vllm(module):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", CHECK.format(module=module)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"import {module} failed:\n{result.stderr[-3000:]}"
