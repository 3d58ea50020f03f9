#!/usr/bin/env bash
# What RL would have to sharpen: build the quick start's warm start with the given overrides (no
# cache), then score it on held-out instances with pass@1 and pass@8 per environment.
#
#   bash scripts/probe_warm_start.sh OUT_DIR [key=value ...]
#   bash scripts/probe_warm_start.sh /tmp/ws-copy2000 sft.copy_steps=2000
#
# RL lifts pass@1 toward pass@k; an environment whose pass@8 is near its pass@1 (near 0 or near 1)
# has nothing to sharpen. About 5 minutes on 2 cores (the build), and 20-60 s for the scores.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash scripts/probe_warm_start.sh OUT_DIR [key=value ...]" >&2; exit 2; }
out=$(realpath -m "$1")  # before the cd: a relative OUT_DIR is the caller's
shift
cd "$(dirname "$0")/.."
[ ! -e "$out" ] || { echo "probe_warm_start: $out exists; give a new folder (or delete it)" >&2; exit 2; }
start=$(date +%s)
.venv/bin/python - "$out" "$@" <<'PY'
import sys
from pathlib import Path

from configs import load_config
from estuary.warm_start import warm_start

cfg = load_config("tiny_cpu", ["sft.cache=false", *sys.argv[2:]])
warm_start(cfg, Path(sys.argv[1]))
PY
echo "warm start built in $(( $(date +%s) - start ))s: $out"
.venv/bin/estuary eval --instances 128 "$out" eval.samples_per_instance=8 eval.pass_k=8 eval.budgets=[] "$@"
