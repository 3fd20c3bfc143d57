#!/usr/bin/env bash
# GPU checks, on a machine with an NVIDIA GPU: install Hearth over the machine's own torch stack (plus the
# wheels carried in .whl/ for what it lacks: exllamav2 and Hearth's own dependencies, from
# tests/gpu/carry.sh), build exllamav2's CUDA extension, run tests/gpu, and with --bench the GPU benchmark.
# flash-attn is not carried (no wheel matches an image's torch; building it takes an hour): where the
# machine lacks it, exllamav2 runs unpaged, one sequence at a time, and the tests check that mode.
# CI has no GPU and never runs this.
#
#   bash tests/gpu/carry.sh                            # here, before carrying .whl to the GPU machine
#   bash tests/gpu/run.sh                              # there, from the repository root
#   bash tests/gpu/run.sh --bench [--quick]            # also tests/bench/bench_exl2.py, figures into $OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
bench=()
if [[ "${1:-}" == "--bench" ]]; then
  shift
  bench=(--json "${OUT:-/tmp}/bench_exl2.json")
  if [[ "${1:-}" == "--quick" ]]; then shift; bench+=(--arch llama-3.2-1b --quick); fi
fi
# A virtual environment over the machine's packages; without ensurepip (Debian's python3-venv), one
# without pip of its own, installed into by the machine's pip.
if python3 -m venv --system-site-packages /tmp/hearth-gpu 2>/dev/null; then
  pip=(/tmp/hearth-gpu/bin/python -m pip)
else
  rm -rf /tmp/hearth-gpu
  python3 -m venv --without-pip --system-site-packages /tmp/hearth-gpu
  pip=(python3 -m pip --python /tmp/hearth-gpu/bin/python)
fi
# When python3 is itself a virtual environment (as on machines with a prepared torch stack), its packages
# are not "system" ones: point the new environment at them too.
outer=$(python3 -c 'import site; print(site.getsitepackages()[0])')
inner=$(/tmp/hearth-gpu/bin/python -c 'import site; print(site.getsitepackages()[0])')
echo "$outer" > "$inner/outer-environment.pth"
if compgen -G ".whl/*.whl" >/dev/null; then
  "${pip[@]}" install -q --no-index --no-deps .whl/*.whl
fi
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
# exllamav2 0.3.2 calls cudaGraphInstantiate with CUDA 11's five arguments, which CUDA 12 keeps only as an
# inline overload (and CUDA 13 may drop): give its build the three-argument form, valid from CUDA 12 on.
cuda=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p' || true)
ext=$(/tmp/hearth-gpu/bin/python -c 'import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("exllamav2").origin).parent / "exllamav2_ext")')
if [[ "${cuda:-0}" -ge 12 && -f "$ext/cuda/graph.cu" ]]; then
  sed -i 's/cudaGraphInstantiate(&graph_exec, graph, nullptr, nullptr, 0)/cudaGraphInstantiate(\&graph_exec, graph, 0)/' \
    "$ext/cuda/graph.cu"
fi
lscpu | grep -m1 'Model name' || true
# The first import of exllamav2 compiles its extension with the machine's nvcc and ninja (minutes, once).
# A GPU box where exllamav2 cannot run fails here, rather than skipping every test that needs it.
time /tmp/hearth-gpu/bin/python -c '
import sys
from node.backends.exllamav2_backend import available
why = available()
print("exllamav2:", why or "ready")
if why:
    sys.exit(1)
from exllamav2.attn import has_flash_attn_with_paged
print("paged attention (flash-attn >= 2.5.7):", has_flash_attn_with_paged)
'
# NVML as this machine reports it, idle and with an "owner" process, for the CPU tests' fixtures.
/tmp/hearth-gpu/bin/python -m tests.gpu.record_probe "${OUT:-/tmp}/probes" || true
HEARTH_GPU_RUN=1 PYTHONUNBUFFERED=1 /tmp/hearth-gpu/bin/python -m pytest -q -p no:cacheprovider tests/gpu "$@"
if (( ${#bench[@]} )); then
  PYTHONUNBUFFERED=1 /tmp/hearth-gpu/bin/python -m tests.bench.bench_exl2 "${bench[@]}"
fi
