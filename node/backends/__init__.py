"""Generation backends (see base.py for the contract) and the choice between them."""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

from node.settings import ModelSettings, NodeSettings
from protocol.errors import ConfigError

log = logging.getLogger("hearth.node")

BackendName = Literal["exllamav2", "transformers"]


@functools.cache
def _gpu_backend_missing() -> str | None:
    from node.backends.exllamav2_backend import available

    return available()


def resolve(settings: NodeSettings, model: ModelSettings | None = None) -> BackendName:
    """The backend a model loads with: its own, the node's, or for `auto` exllamav2 where it can run
    (blocking the first time: importing exllamav2 builds its extension)."""
    chosen = model.backend if model is not None and model.backend is not None else settings.backend
    if chosen == "exllamav2":
        missing = _gpu_backend_missing()
        if missing is not None:
            raise ConfigError(
                f'the exllamav2 backend cannot run here: {missing} (or choose backend = "transformers")'
            )
    if chosen != "auto":
        return chosen
    missing = _gpu_backend_missing()
    if missing is None:
        return "exllamav2"
    log.info("models run on transformers (exllamav2 cannot run here: %s)", missing)
    return "transformers"


def load_backend(model: ModelSettings, settings: NodeSettings) -> Any:
    """Load one model with the node's backend (blocking: the pool calls it in a thread)."""
    assert model.path is not None, "the pool gives loaders a local path"
    if resolve(settings, model) == "exllamav2":
        from node.backends.exllamav2_backend import ExLlamaV2Backend

        return ExLlamaV2Backend.load(
            model.path,
            cache_tokens=model.cache_tokens,
            cache_quant=model.cache_quant,
            max_sequences=model.max_sequences,
        )
    from node.backends.base import Sequential
    from node.backends.transformers_backend import TransformersBackend

    return Sequential(
        TransformersBackend.load(model.path, threads=settings.threads), max_sequences=model.max_sequences or 1
    )
