#!/usr/bin/env bash
# The GPU measurements in one command, on a bare GPU machine holding this repository: install what
# is missing, build the random checkpoint once, the CUDA and simulated-GPU tests, host->device
# bandwidth, the local disk's bandwidth, then bloom-7b1 fp16 (14 GB, random weights) streamed with a
# 4 GiB GPU budget against Accelerate's GPU + CPU and GPU + disk offload and the model fully on the
# GPU. Everything fits one 10-minute command, the install included; every part has its own time
# limit (printed at the top), and every measured row is written as it is measured (JSON lines and a
# markdown table, appended), so a part cut by its limit loses nothing it already measured.
#
#   bash benchmarks/gpu_suite.sh                                    # cuda, bloom-7b1, 540 s in all
#   bash benchmarks/gpu_suite.sh --plan                             # print the parts and budgets only
#   bash benchmarks/gpu_suite.sh --parts install,prepare,tests,h2d,disk --budget 400   # then, machine warm:
#   bash benchmarks/gpu_suite.sh --parts install,bench --budget 560  # two device commands under 10 min each
#   bash benchmarks/gpu_suite.sh --device cpu --model tiny-bloom \
#        --venv /tmp/gpu-suite-venv --torch torch==2.13.0           # the dry run (CPU, fresh venv)
#
# Options: --device cpu|cuda|cuda:N (default cuda); --model NAME (an `offload bench --random` name,
# default bloom-7b1); --new-tokens N (4); --gpu-memory BYTES (4GiB); --budget SECONDS (whole suite,
# default 540: a 600 s device command with room to spare); --python PY (use this interpreter, install
# only what it lacks); --venv DIR (create or reuse a venv there and install into it); --torch SPEC
# (default torch==2.9.1: PyPI's default Linux wheel, CUDA 12.8); --parts P[,P...] (which of install, prepare,
# tests, h2d, disk, bench to run; default all; install always runs, quickly when nothing is missing);
# --plan (print and exit).
# Without --python/--venv: python3 if it already has torch (with CUDA for --device cuda) and the other
# packages, else a venv in the offload cache. Wheels in .whl/ (git-ignored) are offered to pip too
# (a machine without PyPI). Results: $OUT when set, else ./gpu-suite-out. Big files go to the
# offload cache ($OFFLOAD_CACHE, default ~/.cache/offload), never to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

DEVICE=cuda
MODEL=bloom-7b1
NEW_TOKENS=4
GPU_MEMORY=4GiB
BUDGET=540
PY=""
VENV=""
TORCH_SPEC="torch==2.9.1"
PLAN_ONLY=0
PARTS=install,prepare,tests,h2d,disk,bench
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --new-tokens) NEW_TOKENS="$2"; shift 2 ;;
        --gpu-memory) GPU_MEMORY="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --torch) TORCH_SPEC="$2"; shift 2 ;;
        --plan) PLAN_ONLY=1; shift ;;
        --parts) PARTS="install,$2"; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
PACKAGES=(transformers accelerate safetensors psutil numpy tqdm pytest crc32c)
IMPORTS="torch, transformers, accelerate, safetensors, psutil, numpy, tqdm, pytest"
CACHE="${OFFLOAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/offload}"
export OFFLOAD_CACHE="$CACHE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1  # never wait on the hub
case "$DEVICE" in cuda*) CUDA=1 ;; *) CUDA=0 ;; esac

# Which interpreter, and so how long the install may take.
has_all() {  # has_all PY: the packages import (and torch sees CUDA when the suite needs it)
    "$1" - "$CUDA" <<EOF >/dev/null 2>&1
import sys
import $IMPORTS
sys.exit(0 if sys.argv[1] == "0" or torch.cuda.is_available() else 1)
EOF
}
if [ -z "$PY" ] && [ -z "$VENV" ]; then
    if command -v python3 >/dev/null && has_all python3; then PY=python3; else VENV="$CACHE/gpu-suite-venv"; fi
fi
if [ -n "$VENV" ]; then
    INSTALL="venv $VENV: $TORCH_SPEC ${PACKAGES[*]}, then pip install -e . (the native reader)"
    T_INSTALL=240
else
    INSTALL="$PY as it is (missing packages from PyPI or .whl/), then pip install -e . (the native reader)"
    T_INSTALL=60
fi
if [ $CUDA = 1 ]; then T_PREPARE=120 T_TESTS=120 T_H2D=30 T_DISK=30 DISK_SIZE=1GiB
else T_PREPARE=60 T_TESTS=300 T_H2D=0 T_DISK=30 DISK_SIZE=64MiB; fi  # a 2-core CPU runs the tests slowly
want() { case ",$PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
for p in prepare tests h2d disk; do want $p || eval "T_${p^^}=0"; done
T_BENCH=$((BUDGET - T_INSTALL - T_PREPARE - T_TESTS - T_H2D - T_DISK))
[ $T_BENCH -ge 60 ] || T_BENCH=60

RESULTS="${OUT:-./gpu-suite-out}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
cat <<EOF
gpu_suite.sh: device $DEVICE, model $MODEL fp16, --new-tokens $NEW_TOKENS, --gpu-memory $GPU_MEMORY, budget $BUDGET s
results in $RESULTS (rows appended as measured: bench-rows.jsonl, bench-rows.md, h2d-rows.jsonl); cache $CACHE
parts, each stopped at its limit (SIGINT, then SIGKILL 20 s later); a part that ends early leaves its time to the bench:
  1. install   ${T_INSTALL} s  $INSTALL
  2. prepare   ${T_PREPARE} s  the random $MODEL fp16 checkpoint in the cache (kept: built once per machine)
  3. tests     ${T_TESTS} s  pytest tests/test_cuda.py tests/test_cuda_routes.py tests/test_gpu_sim.py tests/test_staging.py tests/test_trace.py
  4. h2d       ${T_H2D} s  benchmarks/bench_h2d.py --size 1GiB (registered ring slot vs pin_memory tensor.to)$([ $CUDA = 1 ] || echo ': skipped on cpu')
  5. disk      ${T_DISK} s  offload bench-disk on the cache's disk, $DISK_SIZE, 1 repeat
  6. bench     the rest (${T_BENCH} s if every part uses all of its time; at least 60)
               offload bench --random $MODEL --dtype fp16 --device $DEVICE --gpu-memory $GPU_MEMORY, in two:
               3/5 of it: in GPU memory, offload prefetch 2/4 cold and with the RAM tier, one trace (prefetch 2 cold);
               the rest: Accelerate GPU + CPU, Accelerate GPU + disk (warm, cold)
parts asked for: $PARTS (a part not asked for gets 0 s)
EOF
[ $PLAN_ONLY = 1 ] && exit 0

exec > >(tee -a "$RESULTS/suite.log") 2>&1
START=$SECONDS
FAILED=()
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }
part() {  # part NAME SECONDS CMD...: run under its limit; a failing part is recorded and the suite goes on
    local name="$1" limit="$2"; shift 2
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then
        FAILED+=("$name (stopped at its ${limit} s limit)"); echo "--- $name stopped at its ${limit} s limit"
    elif [ $rc -ne 0 ]; then
        FAILED+=("$name (exit $rc)"); echo "--- $name failed: exit $rc"
    fi
    return 0
}
left() {  # seconds left of the whole budget, at least $1
    local l=$((BUDGET - (SECONDS - START)))
    [ $l -ge "$1" ] && echo $l || echo "$1"
}

step "1. install"
FIND=()
[ -d .whl ] && FIND=(--find-links "$REPO/.whl")
install() {
    set -e
    if [ -n "$VENV" ]; then
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        PY="$VENV/bin/python"
        "$PY" -m pip install -q --disable-pip-version-check "${FIND[@]}" "$TORCH_SPEC" "${PACKAGES[@]}" setuptools wheel
    else
        for w in .whl/*.whl; do  # carried wheels first, without an index: a machine without PyPI
            [ -f "$w" ] && { "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps "$w" \
                             || echo "could not install $w here"; }
        done
        missing=$("$PY" - "${PACKAGES[@]}" <<'EOF'
import importlib.util, sys
print(" ".join(p for p in sys.argv[1:] if importlib.util.find_spec(p) is None))
EOF
)
        if [ -n "$missing" ]; then
            echo "installing what $PY lacks: $missing"
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --disable-pip-version-check --retries 1 --timeout 15 "${FIND[@]}" $missing \
                || echo "could not install $missing (no PyPI, no .whl/): the parts needing them will say so"
        fi
    fi
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
}
# a function cannot run under timeout(1): a watcher sends the same signals at the same limit
( install ) &
INSTALL_PID=$!
( sleep "$T_INSTALL"; kill -INT $INSTALL_PID 2>/dev/null; sleep 20; kill -KILL $INSTALL_PID 2>/dev/null ) &
WATCH_PID=$!
wait $INSTALL_PID
rc=$?
kill $WATCH_PID 2>/dev/null; wait $WATCH_PID 2>/dev/null
[ -n "$VENV" ] && PY="$VENV/bin/python"
[ $rc -eq 0 ] || { FAILED+=("install (exit $rc)"); echo "--- install failed: exit $rc"; }
if ! "$PY" -c "import $IMPORTS, offload" 2>/dev/null; then
    echo "gpu_suite.sh: after the install $PY still cannot import $IMPORTS and offload; stopping"
    exit 2
fi
if [ $CUDA = 1 ]; then
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_suite.sh: --device $DEVICE but $PY's torch sees no CUDA device (a CPU wheel?); pass --device cpu for a dry run"; exit 2; }
    nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
fi
"$PY" - <<'EOF' | tee "$RESULTS/versions.txt"
import os, platform, sys, torch, transformers, accelerate
from offload import _native
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
e = _native.load_error()
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, gpu {gpu}, cpus {os.cpu_count()}, "
      f"native reader: {'built' if e is None else f'NOT available ({e})'}")
EOF
mkdir -p "$CACHE"
df -h "$CACHE" | tail -1 | awk '{print "cache disk: " $4 " free (bloom-7b1 needs ~35 GB: checkpoint 14 GB, store 14 GB, test files 8 GiB)"}'

step "2. prepare: the random $MODEL fp16 checkpoint (reused when complete)"
want prepare && part prepare "$T_PREPARE" "$PY" -c "
import os, sys, torch
from offload.config import cache_dir
from offload.cli.models import random_checkpoint
print(random_checkpoint(sys.argv[1], torch.float16, os.path.join(cache_dir(), 'random', sys.argv[1] + '-fp16')))
" "$MODEL"

step "3. tests: CUDA (skipped without a GPU) and simulated GPU"
want tests && part tests "$T_TESTS" "$PY" -m pytest -q -p no:randomly -p no:cacheprovider --tb=short -rfEs \
    tests/test_cuda.py tests/test_cuda_routes.py tests/test_gpu_sim.py tests/test_staging.py tests/test_trace.py \
    --junitxml="$RESULTS/tests.xml"

step "4. host -> device copies (benchmarks/bench_h2d.py)"
if ! want h2d; then :
elif [ $CUDA = 1 ]; then
    part h2d "$T_H2D" "$PY" benchmarks/bench_h2d.py --size 1GiB --device "$DEVICE" --json "$RESULTS/h2d.json" \
        --jsonl "$RESULTS/h2d-rows.jsonl" > "$RESULTS/h2d.md"
    cat "$RESULTS/h2d.md"
else
    echo "skipped: --device $DEVICE has no host -> device copy" | tee "$RESULTS/h2d.md"
fi

step "5. disk: offload bench-disk on the cache's disk ($CACHE)"
want disk && part bench-disk "$T_DISK" "$PY" -m offload bench-disk "$CACHE" --size "$DISK_SIZE" --repeats 1 \
    --json "$RESULTS/disk.json" > "$RESULTS/disk.md"
[ -f "$RESULTS/disk.md" ] && cat "$RESULTS/disk.md"

if want bench; then
T=$(left 60)
step "6. bench: $MODEL fp16 on $DEVICE, --gpu-memory $GPU_MEMORY ($T s left)"
# this runtime's rows (and the model on the GPU, the compute floor) first, Accelerate's after: a part cut by
# its limit keeps the rows that matter most; the table is made from both reports
COMMON=(--random "$MODEL" --dtype fp16 --device "$DEVICE" --gpu-memory "$GPU_MEMORY" --batch-sizes 1
        --new-tokens "$NEW_TOKENS" --jsonl "$RESULTS/bench-rows.jsonl")
OURS=("$PY" -m offload bench "${COMMON[@]}" --runs memory,offload --prefetch 2,4 --json "$RESULTS/bench-offload.json"
      --trace "$RESULTS/trace.json")
THEIRS=("$PY" -m offload bench "${COMMON[@]}" --runs accelerate --json "$RESULTS/bench-accelerate.json")
printf '%s\n' "${OURS[*]}" "${THEIRS[*]}" > "$RESULTS/bench-command.txt"
part bench "$(( T * 3 / 5 ))" "${OURS[@]}"
part bench-accelerate "$(left 30)" "${THEIRS[@]}"
"$PY" - "$RESULTS" <<'EOF2' > "$RESULTS/bench-table.md"
import json, os, sys
from offload.cli.bench import summarize
reports = [json.load(open(p)) for p in (os.path.join(sys.argv[1], f"bench-{w}.json") for w in ("offload", "accelerate"))
           if os.path.exists(p)]
if reports:
    merged = dict(reports[0])
    merged["rows"] = [r for rep in reports for r in rep["rows"]]
    print(summarize(merged))
EOF2
cat "$RESULTS/bench-table.md"
if [ -f "$RESULTS/trace.json" ]; then
    "$PY" -c "import sys; from offload.trace import plot; print('timeline:', plot(sys.argv[1], sys.argv[2]))" \
        "$RESULTS/trace.json" "$RESULTS/trace.png" 2>/dev/null || echo "no trace.png: matplotlib is not installed"
fi
fi

step "done in $((SECONDS - START)) s; results in $RESULTS"
ls -l "$RESULTS"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all parts passed"
