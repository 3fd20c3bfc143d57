"""Record what NVML reports on this GPU machine as probe fixtures for the CPU tests (tests/fixtures/nodes/):
once idle, and once while another process (standing in for the owner's game or render) holds 2 GiB.

    python -m tests.gpu.record_probe OUT_DIR
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hardware.probe import probe

OWNER = "import torch, time; x = torch.empty(2 << 30, dtype=torch.uint8, device='cuda'); print('ready', flush=True); time.sleep(60)"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    idle = probe()
    if not idle.gpus:
        sys.exit(f"no GPU: {idle.reason}")
    name = idle.gpus[0].name.lower().replace("nvidia ", "").replace(" ", "-")
    (out / f"{name}-idle-recorded.json").write_text(idle.to_json())
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        time.sleep(1)
        busy = probe()
        (out / f"{name}-owner-process-recorded.json").write_text(busy.to_json())
        print("processes seen:", [(p.pid, p.name, p.used_bytes) for g in busy.gpus for p in g.processes])
    finally:
        owner.kill()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
