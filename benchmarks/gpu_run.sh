#!/usr/bin/env bash
# On a machine with a GPU: the whole test suite with the GPU tests active, then the benchmark.
# Raw output goes to DIR (default: $OUT if set, else benchmarks/results), each file named by
# device and date. Runs from the source tree (PYTHONPATH), so nothing needs to be installed
# beyond CuPy, NumPy, pytest, pytest-benchmark and (optionally) PyTorch and matplotlib.
#   bash benchmarks/gpu_run.sh [DIR] [extra bench options...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
device=$(python3 -c "import cupy; n = cupy.cuda.runtime.getDeviceProperties(0)['name']; \
print(n.decode() if isinstance(n, bytes) else n)" | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
stamp="${device:-unknown-gpu}-$(date -u +%Y-%m-%d)"
nvidia-smi > "$out/$stamp-nvidia-smi.txt" 2>&1
python3 -m pytest -q -rs -p no:cacheprovider 2>&1 | tee "$out/$stamp-pytest.txt"
tests=${PIPESTATUS[0]}
python3 -m gpuopt bench --json "$out/$stamp-bench.json" --plot "$out/$stamp-bench.png" "$@" 2>&1 \
    | tee "$out/$stamp-bench.txt"
bench=${PIPESTATUS[0]}
python3 -m gpuopt bench --host --host-launches --json "$out/$stamp-host.json" 2>&1 | tee "$out/$stamp-host.txt"
python3 -m gpuopt bench --host --json "$out/$stamp-host-noop.json" 2>&1 | tee "$out/$stamp-host-noop.txt"
echo "pytest exit $tests, bench exit $bench; results in $out/$stamp-*"
exit $(( tests || bench ))
