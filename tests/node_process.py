"""A node in its own process, for tests that must kill one (`kill -9`) the way a crash would.

python -m tests.node_process MODEL_DIR DATA_DIR   → prints the node's URL, serves until killed

DATA_DIR holds the node's keys and enrollment (see tests.support.certify_node); the node heartbeats to the
scheduler named there.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from node.app import start_node
from node.settings import ModelSettings, NodeSettings


async def main(model_dir: Path, data_dir: Path) -> None:
    settings = NodeSettings(
        data_dir=data_dir,
        advertise=False,
        heartbeat_interval=0.2,
        models=[ModelSettings(path=model_dir, id="hearth-demo")],
    )
    _, url, _ = await start_node(settings)
    print(url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
