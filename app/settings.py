"""Service settings, read from ``FEATCODEC_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEATCODEC_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=256 * 2**20, ge=1,
                                description="largest request body accepted")
    max_elements: int = Field(default=2**28, ge=1,
                              description="largest tensor (in elements) accepted or decoded")
    log_level: LogLevel = "info"
