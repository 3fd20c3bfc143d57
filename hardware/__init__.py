"""Hardware knowledge: what a GPU box has, what a model needs, and how fast it will run there.

- `hardware.estimator`: memory footprint and speed of decoder-only transformers (pure arithmetic).
- `hardware.catalog`: GPUs and popular open models with their published figures.
- `hardware.probe`: what a node's GPUs report through NVML, as JSON that travels to the scheduler.

Nothing here imports torch, aiohttp or pynvml at import time, so the scheduler, the planner and the tests
can use it on a machine with none of them. This package file imports no submodule for the same reason:
each caller pays only for what it uses.
"""
