#!/usr/bin/env bash
# GPU checks, on a machine with an NVIDIA GPU: install Hearth over the machine's own torch stack (plus any
# wheels carried in .whl/ for packages it lacks), then run tests/gpu. CI has no GPU and never runs this.
#
#   bash tests/gpu/run.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
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
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
PYTHONUNBUFFERED=1 /tmp/hearth-gpu/bin/python -m pytest -q -p no:cacheprovider tests/gpu "$@"
