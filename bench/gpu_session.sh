#!/usr/bin/env bash
# One GPU session (one H100 80GB or H200 141GB, about 8 minutes of wall time in all). Steps in order of value,
# each under its own timeout and all under one deadline, so a hang, crash or out-of-memory costs only its step:
#   env.txt              GPU, driver, Python/torch/triton/transformers versions, commit, date
#   tests.log            every Triton kernel compiled on the GPU against its PyTorch reference, the bf16 decode
#                        attention included (NANOUFO_TEST_DEVICE=cuda: tests/kernel_device.py)
#   bench.log/.json      the kernel microbenchmarks (bench/bench_*.py) without the torch.compile rows
#   e2e.log              bench/rollout.py, train_step.py, onpolicy.py at 1.5b batch 64, then the 3b fit check,
#                        then bench/peers.py (TRL's GRPOTrainer beside nanoufo) at 1.5b
#   summary.txt          one line per step: status (ok, FAILED, TIMEOUT, skipped; OOM noted), seconds
#   results.jsonl        the final JSON line of each end-to-end script (for bench/RESULTS.md)
# The results printed at the end say, for every figure, whether CUDA graphs were really replayed: a rollout row
# counts the rollout's decode steps that were replays and says whether the alone-timed step was one (with
# --cuda-graphs a failed capture fails its step instead of timing eager steps under the graphs' label).
# Every log is written as it comes (tee), so what ran survives a kill.
#
#     make gpu-wheels                                                # here: .whl/ holds math-verify's wheels
#     OUT=/some/empty/dir bash bench/gpu_session.sh                  # on the GPU machine (carry .whl), repo root
#     OUT=$(mktemp -d) bash bench/gpu_session.sh --dry-run           # CPU dry run: every step, tiny shapes
#
# The GPU machines' image has neither datasets nor math-verify and installs nothing from the internet: the
# first step installs the wheels carried in .whl/ (make gpu-wheels; 0.4 MB), without dependencies. The dry run
# (make rehearsal runs it, so CI does) runs every step's Python on the CPU: the end-to-end scripts at the tiny
# preset, the test steps collected only (make test runs them), limits x20 for the interpreter; it fails unless
# every step is ok, so a GPU session cannot die on an import or a flag.
#
# Budget (limits estimated from the workload and the code before any GPU run; the first run, on an H200 on
# 2026-11-26, took 350 s in all, every step inside its limit; bench/RESULTS.md): a step runs under
# min(its limit, time left before the deadline) and is skipped when less than its minimum is left.
# Not run (no time): torch.compile microbenchmark rows (tens of seconds of compilation each, 18 rows), rollout
# batch 256, the 3b rollout and on-policy rows, the transformers baseline on the full workload (it re-prefills
# every turn and decodes 2,555 steps through eager generate: ~1.5 min on top of nanoufo's ~1 min).
set -uo pipefail

[[ ${1:-} == --dry-run ]] && export GPU_SESSION_DRY=1
: "${OUT:?set OUT to the (empty) folder whose files come back}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PY=${PY:-python3} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
BUDGET=${GPU_SESSION_BUDGET:-480}
[[ ${GPU_SESSION_DRY:-0} == 1 ]] && BUDGET=${GPU_SESSION_BUDGET:-3600}
DEADLINE=$((SECONDS + BUDGET))
STEP_LOG=$(mktemp)
trap 'rm -f "$STEP_LOG"' EXIT

if [[ ${GPU_SESSION_DRY:-0} == 1 ]]; then  # the CPU harness: Triton interpreted, the tiny preset everywhere
    export TRITON_INTERPRET=1
    TEST_DEVICE=cpu SMALL=tiny LARGE=tiny BATCH=4 NEW=6 MINIBATCH=2 SCALE=20 PEERS=tiny COLLECT=(--collect-only)
else
    unset TRITON_INTERPRET
    TEST_DEVICE=cuda SMALL=1.5b LARGE=3b BATCH=64 NEW=128 SCALE=1 PEERS=1.5b COLLECT=()
    GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n1 | tr -dc 0-9)
    # 1.5b update: 28 GB of weights (actor, critic, reference), gradients and AdamW moments, plus 3.1 MB of saved
    # activations per token for each of actor and critic (measured per layer on the CPU, x 28 layers), alive
    # together in one backward: minibatch 4 (11.3k tokens) needs ~100 GB (an H200), minibatch 2 ~63 GB.
    MINIBATCH=$((${GPU_MIB:-0} >= 120000 ? 4 : 2))
fi

# step NAME LOG LIMIT MIN CMD...: run CMD under timeout min(LIMIT, seconds left), its output appended to $OUT/LOG;
# skipped when fewer than MIN seconds are left. One line per step goes to $OUT/summary.txt.
step() {
    local name=$1 log=$2 limit=$(($3 * SCALE)) min=$4 left=$((DEADLINE - SECONDS)) start=$SECONDS rc status note
    shift 4
    ((left < limit)) && limit=$left
    if ((limit < min)); then
        printf '%-20s skipped: %ds left, needs %ds\n' "$name" "$left" "$min" | tee -a "$OUT/summary.txt"
        return
    fi
    printf '\n===== %s (limit %ds): %s\n' "$name" "$limit" "$*" | tee -a "$OUT/$log"
    : > "$STEP_LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log" "$STEP_LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT at ${limit}s" ;;
        *) status="FAILED rc=$rc" ;;
    esac
    grep -qE 'OutOfMemoryError|"error": "OOM"' "$STEP_LOG" && status+=" (OOM)"
    note=$(grep -E '[0-9]+ (passed|failed|errors?)' "$STEP_LOG" | tail -n1 | tr -d '=')
    grep '^{"bench"' "$STEP_LOG" | tail -n1 >> "$OUT/results.jsonl"
    printf '%-20s %-26s %4ds %s\n' "$name" "$status" $((SECONDS - start)) "$note" | tee -a "$OUT/summary.txt"
}

env_facts() {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv
    "$PY" -c 'import sys, torch, triton, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton",
      triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")'
    echo "commit $(git rev-parse --short HEAD 2>&1), uncommitted changes:"
    git status --short 2>&1
    date -u +%FT%TZ
}
export -f env_facts

echo "gpu_session $(date -u +%FT%TZ): budget ${BUDGET}s, GPU ${GPU_MIB:-none} MiB, dry ${GPU_SESSION_DRY:-0}," \
    "$SMALL minibatch $MINIBATCH" > "$OUT/summary.txt"
: > "$OUT/results.jsonl"
E2E=(--preset "$SMALL" --batch "$BATCH")

# Each step: LIMIT and MIN in seconds, and the estimate behind them.
step env env.txt 30 5 bash -c env_facts
# math-verify (grading) from the wheels carried in .whl/; without them grading falls back to comparing
# normalised spellings, and says so (nanoufo/grader.py).
step wheels env.txt 30 5 bash -c 'shopt -s nullglob; w=(.whl/*.whl); ((${#w[@]})) || { echo "no .whl/"; exit 0; }
    "$PY" -m pip install --no-deps --no-index -q "${w[@]}" && "$PY" -c "import math_verify" && echo "installed ${w[*]}"'

# ~100 kernel variants at 0.1-0.6 s of compilation each (timed compiling them for sm_90 on the CPU), tiny
# shapes, two spawned ranks for the vocab-parallel test: ~60 s. The decode file first: its bf16 cases are the
# ones no CPU run can check.
step kernel-tests tests.log 100 30 env NANOUFO_TEST_DEVICE="$TEST_DEVICE" "$PY" -m pytest -v --durations=10 "${COLLECT[@]}" \
    tests/test_kernels_decode.py tests/test_kernels_token_stats.py tests/test_kernels_linear.py \
    tests/test_kernels_ppo_loss.py tests/test_kernels_linear_ppo.py tests/test_kernel_counts.py
# 42 rows x 12 timed calls of at most ~0.1 s (the 71-TFLOP fused head at N=16384, H=3584) + start-up and
# compilation: ~70 s. The JSON is written at the end only, hence the high minimum.
step microbench bench.log 150 60 "$PY" -m pytest -q bench --benchmark-only -k "not compile" "${COLLECT[@]}" \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,min,max,rounds --benchmark-sort=name
# The documented workload (5 turns x 512 tokens): 2,555 decode steps, likely launch-bound at ~15 ms each
# (28 layers x ~50 eager ops), so ~40 s, + model build, Triton compiles and the alone-timed decode step.
step "rollout-$SMALL" e2e.log 120 60 "$PY" bench/rollout.py "${E2E[@]}" --skip-transformers
# Issue 14: the sampler's decode step without host syncs (checked on the GPU) and as CUDA graph replays (graph
# steps equal eager ones, a failed capture failing the test), then the workload above with graphs (one capture
# of 9 buckets, 1 to 64, then ~2,555 replays). Issue 38: the capture bookkeeping on the GPU's tensors too.
step sampler-tests tests.log 60 20 env NANOUFO_TEST_DEVICE="$TEST_DEVICE" "$PY" -m pytest -q tests/test_batching.py \
    -k "sync or graph or capture" "${COLLECT[@]}"
step "rollout-$SMALL-graphs" e2e.log 100 45 "$PY" bench/rollout.py "${E2E[@]}" --skip-transformers --cuda-graphs
# ~5 PFLOP (9 forward-equivalents over 181k tokens) at 30-40% MFU: ~20 s, + three models and a warm-up.
step "train-$SMALL-fused" e2e.log 100 50 "$PY" bench/train_step.py "${E2E[@]}" --impl fused --minibatch "$MINIBATCH"
# Reduced: 3 turns x 128 tokens (contexts up to ~630, 3 decode splits), a bf16 and an fp32 rollout: ~35 s.
step "onpolicy-$SMALL" e2e.log 75 35 "$PY" bench/onpolicy.py "${E2E[@]}" --turns 3 --max-new-tokens "$NEW"
# Reduced: 5 turns x 128 tokens for both engines (the speed-up on this shorter workload): ~50 s.
step "rollout-hf-$SMALL" e2e.log 90 45 "$PY" bench/rollout.py "${E2E[@]}" --max-new-tokens "$NEW"
# The 3B fit goal (one H200): ~113 GB predicted, so an OOM on an H100; the warm-up line in the log says whether
# one minibatch fits even if the timed update is cut short.
step "train-$LARGE-fused" e2e.log 100 30 "$PY" bench/train_step.py --preset "$LARGE" --batch "$BATCH" --impl fused \
    --minibatch 2
# Expected OOM rows at batch 64 on any single GPU: build_batch's full bf16 logits alone are 55 GB.
step "train-$SMALL-baselines" e2e.log 75 45 "$PY" bench/train_step.py "${E2E[@]}" --impl reference transformers \
    --minibatch "$MINIBATCH"
# Issue 39, nanoufo against TRL's GRPOTrainer (needs `pip install -e ".[peers]"`): a random 1.5B checkpoint written
# (~30 s), the fp32 loss check, then 4 GRPO steps of 8 prompts x 8 samples x 256 tokens per system, each ~15-25 s
# (an estimate: HF generate at ~30 ms a token, a ~250 TFLOP update), plus two model loads: ~3 min.
step "peers-$SMALL" e2e.log 240 150 "$PY" bench/peers.py --preset "$PEERS"

echo
echo "===== results ($OUT/results.jsonl)"
"$PY" - "$OUT/results.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["bench"], r["preset"], r["device"], "turns", r.get("turns"), "max_new_tokens", r.get("max_new_tokens"))
    for row in r["rows"]:
        print("   ", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if "graph_replays" in row:  # what really ran, whatever the row was asked for
            step = "a graph replay" if row["decode_step_graph"] else "eager"
            print(f"    CUDA graphs (asked: {r.get('cuda_graphs')}): {row['graph_replays']} of {row['decode_steps']} "
                  f"rollout decode steps replayed; the alone-timed decode step {step}")
        else:
            print("    CUDA graphs: none (no decode step in this figure, or eager: only bench/rollout.py captures)")
EOF
echo "===== summary after ${SECONDS}s ($OUT/summary.txt)"
cat "$OUT/summary.txt"
# a dry run fails unless every step was ok (a real session reports and goes on: its steps are independent)
[[ ${GPU_SESSION_DRY:-0} != 1 ]] || ! grep -qE '(FAILED|TIMEOUT|skipped)' "$OUT/summary.txt"
