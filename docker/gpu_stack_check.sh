#!/usr/bin/env bash
# `make gpu-stack-check`: the GPU image's Python stack (docker/gpu.lock) on this machine, no GPU
# needed. Builds the venv $1 with uv ($2) from the lock, with --no-deps (the lock is the whole
# resolution), adds the project and its test tools, then runs:
#   1. pip check: only vLLM's wants that the lock leaves out on purpose (torchaudio, torchcodec)
#      may be reported;
#   2. no installed package built for another torch (a wheel pinning another torch version);
#   3. every module of sppo/, actors/, cluster/ imports, and every vLLM name the code imports
#      exists (tests/test_imports.py, tests/test_vllm_names.py);
#   4. every test that runs without a GPU and without starting vLLM's engine (vLLM's GPU build
#      cannot start one here: tests marked vllm are deselected).
# Its last line is the summary: the stack, and what passed.
set -euo pipefail
venv=${1:-.venv-gpu-stack}
uv=${2:-uv}
cd "$(dirname "$0")/.."
python3 -m venv "$venv"
py="$venv/bin/python"
export VIRTUAL_ENV="$PWD/$venv"
"$uv" pip install -q --python "$py" --no-deps -r docker/gpu.lock
# The test tools, held to the lock's versions of what they share with the stack (the optional
# metric sinks, wandb and mlflow, are not: mlflow's protobuf range excludes the lock's; their
# tests skip, naming them).
"$uv" pip install -q --python "$py" -c docker/gpu.lock \
    "pytest>=8" "pytest-timeout>=2.3" "httpx>=0.27" "jsonschema>=4.20" "schemathesis>=3.30"
"$uv" pip install -q --python "$py" --no-deps -e .

echo "== pip check"
check=$("$py" -m pip check 2>&1 || true)
unexpected=$(echo "$check" | grep -v -E "^No broken requirements|requires (torchaudio|torchcodec), which is not installed" || true)
echo "$check"
if [ -n "$unexpected" ]; then echo "unexpected: $unexpected"; exit 1; fi

echo "== packages built for another torch"
"$py" - <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement
torch = md.version("torch").split("+")[0]
bad = []
for dist in md.distributions():
    for r in dist.requires or []:
        req = Requirement(r)
        if req.name == "torch" and req.specifier and not req.specifier.contains(torch):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                bad.append(f"{dist.metadata['Name']} {dist.version} requires {req}")
print("\n".join(bad) or f"none (torch {md.version('torch')})")
raise SystemExit(1 if bad else 0)
EOF

echo "== imports, vLLM names and the tests that need neither a GPU nor vLLM's engine"
set +e
"$py" -m pytest -q -p no:cacheprovider -m "not vllm" --durations=10 tests | tee /tmp/gpu-stack-check.log
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" /tmp/gpu-stack-check.log | tail -1)
stack=$("$py" -c "import torch, vllm, ray, transformers; print(f'torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')" 2>/dev/null | tail -1)
echo "gpu-stack-check: $stack: pip check ok, no package built for another torch, tests: $summary"
exit $rc
