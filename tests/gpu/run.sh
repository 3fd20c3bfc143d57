#!/usr/bin/env bash
# GPU checks, on a machine with an NVIDIA GPU: install Hearth over the machine's own torch stack (plus the
# wheels carried in .whl/ for what it lacks: exllamav2, and flash-attn for batching), build exllamav2's CUDA
# extension, run tests/gpu, and with --bench the GPU benchmark. CI has no GPU and never runs this.
#
#   pip download exllamav2==0.3.2 --no-deps -d .whl    # here, before carrying .whl to the GPU machine
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
python3 -m venv --system-site-packages /tmp/hearth-gpu
# When python3 is itself a virtual environment (as on machines with a prepared torch stack), its packages
# are not "system" ones: point the new environment at them too.
outer=$(python3 -c 'import site; print(site.getsitepackages()[0])')
inner=$(/tmp/hearth-gpu/bin/python -c 'import site; print(site.getsitepackages()[0])')
echo "$outer" > "$inner/outer-environment.pth"
if compgen -G ".whl/*.whl" >/dev/null; then
  /tmp/hearth-gpu/bin/pip install -q --no-index --no-deps .whl/*.whl
fi
/tmp/hearth-gpu/bin/pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
lscpu | grep -m1 'Model name' || true
# The first import of exllamav2 compiles its extension with the machine's nvcc and ninja (minutes, once).
time /tmp/hearth-gpu/bin/python -c '
from node.backends.exllamav2_backend import available
print("exllamav2:", available() or "ready")
try:
    from exllamav2.attn import has_flash_attn_with_paged
    print("paged attention (flash-attn >= 2.5.7):", has_flash_attn_with_paged)
except Exception as exc:
    print("paged attention: unknown,", exc)
'
# NVML as this machine reports it, idle and with an "owner" process, for the CPU tests' fixtures.
/tmp/hearth-gpu/bin/python -m tests.gpu.record_probe "${OUT:-/tmp}/probes" || true
PYTHONUNBUFFERED=1 /tmp/hearth-gpu/bin/python -m pytest -q -p no:cacheprovider tests/gpu "$@"
if (( ${#bench[@]} )); then
  PYTHONUNBUFFERED=1 /tmp/hearth-gpu/bin/python -m tests.bench.bench_exl2 "${bench[@]}"
fi
