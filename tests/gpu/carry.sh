#!/usr/bin/env bash
# Here, before a GPU run: download into .whl/ the wheels the GPU machine's image lacks (it has torch, CUDA,
# transformers, aiohttp, pytest and more, no package index): exllamav2 and what Hearth and its GPU tests need
# beyond that image, for its Python (3.12, x86-64 Linux). tests/gpu/run.sh installs them there.
#
#   bash tests/gpu/carry.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${1:-3.12}"
pip=("${PIP:-.venv/bin/pip}" download -q --no-deps -d .whl --only-binary=:all: --python-version "$py"
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64)
# Pure-Python and binary wheels alike; each without its dependencies (those listed here, or on the image).
"${pip[@]}" exllamav2==0.3.2 websockets fastparquet cramjam \
  pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types \
  cryptography cffi pycparser sqlite-utils sqlite-fts4 click-default-group zeroconf ifaddr \
  openai jiter distro sniffio httpx2 httpcore2 truststore pytest-asyncio \
  llguidance hypothesis sortedcontainers attrs jsonschema jsonschema-specifications referencing rpds-py
ls .whl
