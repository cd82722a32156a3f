#!/usr/bin/env bash
# On a machine with a GPU: the test suite with the GPU tests active, then the benchmark, from an
# empty kernel cache. Raw output goes to DIR (default: $OUT if set, else benchmarks/results),
# each file named by device and date, and a one-screen summary of the targets ends the run.
# Runs from the source tree (PYTHONPATH): nothing needs installing beyond CuPy, NumPy, pytest,
# pytest-benchmark, cuda-bindings or CuPy's NVRTC, and (optionally) PyTorch and matplotlib.
#   bash benchmarks/gpu_run.sh [--quick] [DIR] [extra bench options...]
# Full: every test and the whole benchmark (sized for 8 minutes on an H100).
# --quick: the GPU tests, ADAM at 2^28 against copy bandwidth and torch's fused Adam, and the
#          GPT-2 model (sized for 3 minutes). Neither has been timed on a GPU yet.
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
{ date -u; nvidia-smi; } > "$out/$stamp-nvidia-smi.txt" 2>&1
start=$SECONDS
steps=() failed=0
# step NAME LOG COMMAND...: run it with its output shown and kept in LOG; a failure is noted,
# and the run goes on (the later steps' results are still worth having).
step() {
    local name=$1 log=$2
    shift 2
    "$@" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    steps+=("$name: exit $status")
    [ "$status" = 0 ] || failed=1
}
if [ "$quick" = 1 ]; then
    step tests "$out/$stamp-pytest.txt" python3 -m pytest -q -rs -p no:cacheprovider -m gpu
    bench_options=(--rules ADAM --sizes 28 --no-baselines "$@")
else
    step tests "$out/$stamp-pytest.txt" python3 -m pytest -q -rs -p no:cacheprovider
    bench_options=("$@")
fi
step bench "$out/$stamp-bench.txt" \
    python3 -m gpuopt bench --json "$out/$stamp-bench.json" --plot "$out/$stamp-bench.png" "${bench_options[@]}"
step "host time, real launches" "$out/$stamp-host.txt" \
    python3 -m gpuopt bench --host --host-launches --json "$out/$stamp-host.json"
step "host time, nothing launched" "$out/$stamp-host-noop.txt" \
    python3 -m gpuopt bench --host --json "$out/$stamp-host-noop.json"
echo
echo "== summary: $stamp, $((SECONDS - start)) s =="
printf '%s\n' "${steps[@]}"
tail -n 1 "$out/$stamp-pytest.txt"
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
