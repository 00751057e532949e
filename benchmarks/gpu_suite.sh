#!/usr/bin/env bash
# The GPU measurements of issue 12 in one go, on a fresh GPU machine holding this repository (no
# internet needed): install, the CUDA and simulated-GPU tests, host->device bandwidth, the local
# disk's bandwidth, then bloom-7b1 fp16 (14 GB, random weights) streamed with a 4 GiB GPU budget
# against Accelerate's GPU + CPU and GPU + disk offload and the model fully on the GPU, in one run.
# Writes JSON, the tables, one trace (and its PNG when matplotlib is there) and a log into
# $OUT when set, else ./gpu-suite-out.
#
#   bash benchmarks/gpu_suite.sh                                   # one GPU (cuda), bloom-7b1
#   bash benchmarks/gpu_suite.sh --device cpu --model tiny-bloom   # dry run of the same path on a CPU
#
# Options: --device cpu|cuda|cuda:N (default cuda), --model NAME (an `offload bench --random` name,
# default bloom-7b1), --new-tokens N (default 4), --gpu-memory BYTES (default 4GiB),
# --budget SECONDS (the bench step stops at this many seconds since the start, default 470).
# Big files go to the offload cache ($OFFLOAD_CACHE, default ~/.cache/offload), never to $OUT.
#
# Time on one H100 (16 cores, local NVMe at 3-6 GB/s, 128 GiB RAM): under 8 minutes in all.
#   install (native reader build)                          ~15 s
#   tests: test_cuda.py + the simulated-GPU tests           ~30 s (21 s on a 2-core VM)
#   bench_h2d.py 1 GiB x 10 pairs                           ~5 s
#   bench-disk 1 GiB, 1 repeat: ~20 passes of 1 GiB          ~15 s
#   bench, once per machine: the random checkpoint, 7.07e9 values drawn and cast on the CPU
#     (0.2e9/s per 2 cores here) and 14.1 GB written             ~40-60 s
#   bench, the store: 12.1 GB of blocks read and rewritten (the first offload row's enable)  ~15-25 s
#   bench rows (30 blocks = 12.1 GB, resident 2.06 GB on the GPU, N = --new-tokens forwards each,
#   the prefill included, the decode N-1 of them timed, N = 4 gives 3 samples, the README minimum):
#     fully on the GPU: load 14 GB + N x ~20 ms                                        ~15 s
#     Accelerate GPU + CPU (blocks in RAM): load + N x ~1 s (12 GB over PCIe, unpinned) ~15 s
#     Accelerate GPU + disk: load, warm N x ~1-2 s, cold N x 12 GB at disk speed (~4 s) ~30 s
#     disk floor: fio (2 x 4 GiB) or the readers' grid (9 passes of 4 GiB) at the first cold row,
#       one pass per later cold row                                                     ~15 s
#     offload, prefetch 1/2/4 cold: 3 x (load + N x ~2-4 s)                             ~45 s
#     offload, prefetch 1/2/4 warm: 3 x (RAM tier 12 GB read once ~3 s + N x ~0.3 s)    ~15 s
#   => ~270-330 s; a disk at 2 GB/s adds ~60 s. Each cold forward reads 12.1 GB, so every extra
#   token costs ~4 x (12.1 GB / disk GB/s): --new-tokens 6 would add ~40 s at 3 GB/s.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
MODEL=bloom-7b1
NEW_TOKENS=4
GPU_MEMORY=4GiB
BUDGET=470
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --new-tokens) NEW_TOKENS="$2"; shift 2 ;;
        --gpu-memory) GPU_MEMORY="$2"; shift 2 ;;
        --budget) BUDGET="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
RESULTS="${OUT:-./gpu-suite-out}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
exec > >(tee -a "$RESULTS/suite.log") 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1  # no internet there: never wait on the hub
START=$SECONDS
FAILED=()
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }
run() {  # run NAME CMD...: a failing step is recorded, the suite goes on (never in a pipeline: FAILED is ours)
    local name="$1"; shift
    "$@"
    local rc=$?
    [ $rc -eq 0 ] || { FAILED+=("$name (exit $rc)"); echo "--- $name failed: exit $rc"; }
    return 0
}

step "environment"
echo "device $DEVICE, model $MODEL, --new-tokens $NEW_TOKENS, --gpu-memory $GPU_MEMORY, results in $RESULTS"
if [ -d .whl ]; then  # wheels brought along for what the machine lacks (no internet there)
    python -m pip install -q --disable-pip-version-check --no-index --find-links .whl .whl/*.whl || FAILED+=("pip install .whl")
fi
python -c "import torch, transformers, accelerate, safetensors, pytest" || { echo "gpu_suite.sh: torch, transformers, accelerate, safetensors and pytest must be installed (or brought as wheels in .whl/)"; exit 2; }
case "$DEVICE" in
    cuda*) python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
               || { echo "gpu_suite.sh: --device $DEVICE but torch sees no CUDA device; pass --device cpu for a dry run"; exit 2; }
           nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true ;;
esac
python - <<'EOF' | tee "$RESULTS/versions.txt"
import platform, torch, transformers, accelerate
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), transformers "
      f"{transformers.__version__}, accelerate {accelerate.__version__}, gpu {gpu}, cpus {__import__('os').cpu_count()}")
EOF
CACHE="${OFFLOAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/offload}"
mkdir -p "$CACHE"
df -h "$CACHE" | tail -1 | awk '{print "cache disk: " $4 " free (bloom-7b1 needs ~35 GB: checkpoint 14 GB, store 14 GB, test files 8 GiB)"}'

step "install (pip install -e . --no-deps --no-build-isolation: builds the native reader)"
run install python -m pip install -q --disable-pip-version-check -e . --no-deps --no-build-isolation
python -c "from offload import _native; e = _native.load_error(); print('native reader: ' + ('built' if e is None else f'NOT available ({e})'))"

step "tests: CUDA (skipped without a GPU) and simulated GPU (test_staging.py, test_trace.py)"
run tests python -m pytest -q tests/test_cuda.py tests/test_staging.py tests/test_trace.py --junitxml="$RESULTS/tests.xml"

step "host -> device copies (benchmarks/bench_h2d.py)"
case "$DEVICE" in
    cuda*) run bench_h2d python benchmarks/bench_h2d.py --size 1GiB --device "$DEVICE" --json "$RESULTS/h2d.json" \
               > "$RESULTS/h2d.md"
           cat "$RESULTS/h2d.md" ;;
    *) echo "skipped: --device $DEVICE has no host -> device copy" | tee "$RESULTS/h2d.md" ;;
esac

step "disk: offload bench-disk on the cache's disk ($CACHE)"
case "$DEVICE" in cuda*) DISK_SIZE=1GiB ;; *) DISK_SIZE=64MiB ;; esac
run bench-disk offload bench-disk "$CACHE" --size "$DISK_SIZE" --repeats 1 --json "$RESULTS/disk.json" > "$RESULTS/disk.md"
cat "$RESULTS/disk.md"

step "bench: $MODEL fp16 on $DEVICE, --gpu-memory $GPU_MEMORY, vs Accelerate GPU + CPU / GPU + disk and in GPU memory"
LEFT=$((BUDGET - (SECONDS - START)))
[ $LEFT -gt 60 ] || LEFT=60
echo "time left for the bench: $LEFT s (--budget $BUDGET)"
BENCH=(offload bench --random "$MODEL" --dtype fp16 --device "$DEVICE" --gpu-memory "$GPU_MEMORY"
       --runs memory,accelerate,offload --prefetch 1,2,4 --batch-sizes 1 --new-tokens "$NEW_TOKENS"
       --json "$RESULTS/bench.json" --trace "$RESULTS/trace.json")
echo "${BENCH[*]}" > "$RESULTS/bench-command.txt"
run bench timeout --signal=INT --kill-after=30 "$LEFT" "${BENCH[@]}" > "$RESULTS/bench-table.md"
cat "$RESULTS/bench-table.md"
if [ -f "$RESULTS/trace.json" ]; then
    python -c "import sys; from offload.trace import plot; print('timeline:', plot(sys.argv[1], sys.argv[2]))" \
        "$RESULTS/trace.json" "$RESULTS/trace.png" 2>/dev/null || echo "no trace.png: matplotlib is not installed"
fi

step "done in $((SECONDS - START)) s; results in $RESULTS"
ls -l "$RESULTS"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all steps passed"
