#!/usr/bin/env bash
# On a machine with a GPU: the test suite with the GPU tests active, then the benchmark, from an
# empty kernel cache. Raw output goes to DIR (default: $OUT if set, else benchmarks/results),
# each file named by device and date, and a one-screen summary ends the run: each step's exit
# status and every target. A step that fails (or runs past its time limit) does not stop the
# later ones, and fails the script.
# Runs from the source tree (PYTHONPATH): nothing needs installing beyond CuPy, NumPy, pytest,
# pytest-benchmark, cuda-bindings or CuPy's NVRTC, and (optionally) PyTorch and matplotlib.
#   bash benchmarks/gpu_run.sh [--quick] [DIR] [extra bench options...]
# Full: every test and the whole benchmark (steps limited to 590 s in all).
# --quick: the GPU tests, ADAM at 2^28 against copy bandwidth and torch's fused Adam, and the
#          GPT-2 model (steps limited to 490 s in all). Neither has been timed on a GPU yet.
# The compute-sanitizer tests run last, as a step of their own: slow, they cannot crowd out
# the rest.
# Eight files, no more (a lent device returns at most eight): machine.txt, pytest.txt,
# bench.{txt,json,png}, host.txt (both host-time runs), host.json (real launches) and
# host-noop.json (nothing launched).
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
out=${1:-${OUT:-benchmarks/results}}
shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cache=$(mktemp -d)
export GPUOPT_CACHE_DIR="$cache/gpuopt" CUPY_CACHE_DIR="$cache/cupy" GPUOPT_EMULATION_CACHE="$cache/emulation"
trap 'rm -rf "$cache"' EXIT
device=$(python3 -c "import cupy; n = cupy.cuda.runtime.getDeviceProperties(0)['name']; \
print(n.decode() if isinstance(n, bytes) else n)" | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
stamp="${device:-unknown-gpu}-$(date -u +%Y-%m-%d)"
[ "$quick" = 1 ] && stamp="$stamp-quick"
# Time limits per step, in seconds: tests, benchmark, host time with real launches, host time
# with nothing launched, the sanitizer tests ($GPU_RUN_LIMITS: five numbers, to change them).
if [ "$quick" = 1 ]; then limits=(180 110 40 40 120); else limits=(250 150 40 40 110); fi
[ -n "${GPU_RUN_LIMITS:-}" ] && read -r -a limits <<< "$GPU_RUN_LIMITS"
{
    date -u
    nvidia-smi
    python3 - <<'PY'
import platform
from importlib.metadata import PackageNotFoundError, version
print("python", platform.python_version())
for name in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "torch", "cuda-bindings", "nvidia-cuda-nvrtc", "matplotlib",
             "pytest", "pytest-benchmark", "hypothesis"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "not installed")
from gpuopt.backends.nvrtc import cuda_include_options
print("CUDA headers for NVRTC:", cuda_include_options() or "none found (float16/bfloat16 modules cannot compile)")
PY
    compute-sanitizer --version
} > "$out/$stamp-machine.txt" 2>&1
for log in pytest bench host; do : > "$out/$stamp-$log.txt"; done  # (each step adds to its log)
start=$SECONDS
steps=() failed=0
# step NAME LIMIT LOG COMMAND...: run it for at most LIMIT seconds (then interrupted, so pytest
# still prints its summary), its output shown and added to LOG; a failure is noted.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    if [ "$status" = 124 ]; then steps+=("$name: stopped after its limit of $limit s"); else steps+=("$name: exit $status"); fi
    [ "$status" = 0 ] || failed=1
}
pytest=(python3 -m pytest -rs --durations=25 -p no:cacheprovider)
if [ "$quick" = 1 ]; then
    step tests "${limits[0]}" "$out/$stamp-pytest.txt" "${pytest[@]}" -v -m gpu -k "not compute_sanitizer"
    bench_options=(--rules ADAM --sizes 28 --no-baselines "$@")
else
    step tests "${limits[0]}" "$out/$stamp-pytest.txt" "${pytest[@]}" -q -k "not compute_sanitizer"
    bench_options=("$@")
fi
step bench "${limits[1]}" "$out/$stamp-bench.txt" \
    python3 -m gpuopt bench --json "$out/$stamp-bench.json" --plot "$out/$stamp-bench.png" "${bench_options[@]}"
step "host time, real launches" "${limits[2]}" "$out/$stamp-host.txt" \
    python3 -m gpuopt bench --host --host-launches --json "$out/$stamp-host.json"
step "host time, nothing launched" "${limits[3]}" "$out/$stamp-host.txt" \
    python3 -m gpuopt bench --host --json "$out/$stamp-host-noop.json"
step "sanitizer tests" "${limits[4]}" "$out/$stamp-pytest.txt" "${pytest[@]}" -v -m gpu -k compute_sanitizer
echo
echo "== summary: $stamp, $((SECONDS - start)) s =="
printf '%s\n' "${steps[@]}"
grep -E '(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$out/$stamp-pytest.txt"  # (both pytest runs)
python3 - "$out/$stamp"-{bench,host,host-noop}.json <<'PY' || true
import json, sys
from pathlib import Path
for path in map(Path, sys.argv[1:]):
    if not path.is_file():
        print(f"{path.name}: not written")
        continue
    print(f"{path.name}:")
    for t in json.loads(path.read_text())["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        print(f"{t['status']:>12}  {value:>8} (limit {t['limit']:g})  {t['description']}")
PY
echo "results in $out/$stamp-*"
exit $failed
