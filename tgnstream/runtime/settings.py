"""Process settings from one TOML/JSON file plus environment overrides (the environment wins),
shared by every process kind's config (``ServeConfig``, ``TrainerConfig``)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

__all__ = ["FileSettings", "load_settings"]

S = TypeVar("S", bound="FileSettings")


class FileSettings(BaseSettings):
    """Settings whose file values arrive as init kwargs; environment variables override them."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings


def load_settings(cls: type[S], path: str | Path | None) -> S:
    """``cls`` from a TOML/JSON file (or none: defaults) with environment overrides; every
    problem is a ``ValueError`` that names the file."""
    if path is None:
        return cls()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ValueError(f"{path}: config must be .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        return cls(**data)
    except ValidationError as e:
        raise ValueError(f"{path}: {e}") from None
