#!/usr/bin/env bash
# What needs a GPU, checked in one go (under 8 minutes on one GPU), with RESULT lines:
#   1. tests/gpu (pytest -m gpu): the fast decoders and the torch engine on CUDA
#   2. an NCCL learner step: DeepSpeed ZeRO-3, two ranks where there are two GPUs (else one),
#      the bucketed gather of the full state; trained tokens/s
#   3. a collective broadcast into a CUDA vLLM engine serving tiny-hybrid-moe: the engine swaps
#      the published version in and its log-probs must be the published weights' (NCCL with two
#      GPUs; gloo with one, since NCCL cannot put two ranks on one GPU)
#   4. the engine benchmark on CUDA (torch engine vs transformers generate, vs vLLM)
# and the rollout benchmarks on CUDA (part `rollout`, about 4 more minutes):
#   5. MTP drafts on vs off (`bench.mtp_bench`) on the tiny preset's warm start (built on the
#      spot: ~1 min; the README's 100M figures need its 11-minute build, or `--policy`)
#   6. adaptive drafting on a rollout round (`bench.draft_round_bench`) on the same policy
#   7. multi-turn tool_use episodes/s, turn-level scheduler vs lockstep (`bench.multiturn_bench`)
#
#   bash scripts/gpu_check.sh            # on a machine with CUDA, vllm and a CUDA torch installed
#   bash scripts/gpu_check.sh --dry-run  # here: the same steps' plumbing on CPU, small and quick
#   bash scripts/gpu_check.sh --part core      # steps 1-4 only (under 8 minutes)
#   bash scripts/gpu_check.sh --part rollout   # steps 5-7 only (a lent GPU's calls run 10 minutes at most)
#
# Every step runs under its own time limit, so a hung step fails alone; the exit status is the
# number of failed steps. Nothing of it has passed on a GPU yet (see the README).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DRY=0
PART=all
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --part) PART=${2:-}; shift ;;
        *) echo "gpu_check: unknown argument $1 (use --dry-run, --part core|rollout)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $PART != all && $PART != core && $PART != rollout ]]; then
    echo "gpu_check: --part $PART: choose core (tests, learner step, broadcast, engine bench) or rollout (the MTP, draft-round and multi-turn benchmarks)" >&2
    exit 2
fi
if [[ $DRY == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run to check the plumbing" >&2
    exit 2
fi
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
LOG=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
START=$SECONDS
FAILED=0
SUMMARY=()

# step NAME LIMIT_S COMMAND...: run with a time limit, keep its output, pass its RESULT lines on.
step() {
    local name=$1 limit=$2 began=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    grep -E '^RESULT ' "$LOG/$name.log"
    if [[ $rc == 0 ]]; then
        SUMMARY+=("PASS $name $((SECONDS - began))s")
    else
        FAILED=$((FAILED + 1))
        SUMMARY+=("FAIL $name $((SECONDS - began))s (exit $rc$([[ $rc == 124 ]] && echo ': time limit'); log $LOG/$name.log)")
        tail -n 25 "$LOG/$name.log"
    fi
}

if [[ $PART != rollout && $DRY == 1 ]]; then
    step gpu-tests 120 "$PY" -m pytest -q -m gpu tests/gpu --collect-only -p no:cacheprovider
    step learner-step 300 "$PY" scripts/gpu_check.py learner --cpu
    step vllm-broadcast 300 "$PY" scripts/gpu_check.py broadcast --cpu
    step engine-bench 300 "$PY" -m bench.engine_bench --batch 8 --new-tokens 8
elif [[ $PART != rollout ]]; then
    step gpu-tests 100 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
    step learner-step 90 "$PY" scripts/gpu_check.py learner
    step vllm-broadcast 170 "$PY" scripts/gpu_check.py broadcast
    step engine-bench 100 "$PY" -m bench.engine_bench --device cuda --vllm
fi
if [[ $PART != core ]]; then
    # the rollout benchmarks: on CUDA, or on the CPU for the dry run (their RESULT names say cuda)
    DEV=(--device cuda)
    [[ $DRY == 1 ]] && DEV=()
    step mtp-bench 180 "$PY" -m bench.mtp_bench --preset tiny-hybrid-moe --batch 1,4 --draft-dtype float32 --adaptive "${DEV[@]}"
    HEADS=$("$PY" -c "from bench.mtp_bench import warm_policy; print(warm_policy('tiny-hybrid-moe', say=lambda *a: None))" 2>/dev/null | tail -n 1)
    step draft-round-bench 90 "$PY" -m bench.draft_round_bench --policy "$HEADS" --rounds tail,even,tail1 --repeats 6 "${DEV[@]}"
    step multiturn-bench 180 "$PY" -m bench.multiturn_bench --groups 24 --repeats 2 "${DEV[@]}"
fi
# tests/gpu: passed over run (the dry run only collects them: collected over collected)
[[ $PART != rollout ]] && "$PY" - "$LOG/gpu-tests.log" "$DRY" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
count = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", text))
ran = count("passed") + count("failed") + count("errors?")
passed = count("passed")
if sys.argv[2] == "1":
    passed = ran = count("tests? collected")
print(f"RESULT gpu_check_tests_passed ours={passed} baseline={ran} ratio={passed / max(1, ran):.2f}")
PY
total=$((SECONDS - START))
echo "RESULT gpu_check_seconds ours=$total baseline=480 ratio=$("$PY" -c "print(f'{480 / max(1, $total):.2f}')")"
printf '%s\n' "${SUMMARY[@]}"
echo "gpu_check: $FAILED failed step(s) in ${total}s$([[ $DRY == 1 ]] && echo ' (dry run: CPU plumbing only)'); logs in $LOG"
exit "$FAILED"
