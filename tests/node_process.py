"""A node in its own process, for tests that must kill one (`kill -9`) the way a crash would.

python -m tests.node_process MODEL_DIR SECRET   → prints the node's URL, serves until killed
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pydantic import SecretStr

from node.app import create_app
from node.settings import ModelSettings, NodeSettings
from protocol.web import start_site


async def main(model_dir: Path, secret: str) -> None:
    settings = NodeSettings(
        secret=SecretStr(secret), models=[ModelSettings(path=model_dir, id="hearth-demo")]
    )
    _, url = await start_site(create_app(settings), "127.0.0.1", 0)
    print(url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
