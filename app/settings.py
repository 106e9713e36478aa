"""Service settings, read from ``FEATCODEC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
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

    # --- security and resource limits (docs/SECURITY.md) ---
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="comma-separated API keys (Authorization: Bearer KEY); empty: no auth")
    metrics_public: bool = Field(default=True,
                                 description="/metrics answers without a key")
    open_layer_writes: bool = Field(
        default=False,
        description="with no API keys configured, allow PUT/DELETE /v1/layers/* anyway")
    body_timeout_s: float = Field(default=60.0, gt=0,
                                  description="the whole request body must arrive within this")
    header_timeout_s: float = Field(default=10.0, gt=0,
                                    description="request line and headers must arrive within "
                                                "this (featcodec serve only)")
    keep_alive_s: int = Field(default=5, ge=1,
                              description="idle keep-alive connections are closed after this")
    max_concurrency: int = Field(default=1, ge=1,
                                 description="worker threads for codec work, per process "
                                             "(scale with workers, not threads)")
    max_queue: int = Field(default=64, ge=0,
                           description="/v1 requests admitted beyond max_concurrency, per "
                                       "process, before answering 503")
    graceful_timeout_s: float = Field(default=30.0, ge=0,
                                      description="on SIGTERM, wait this long for in-flight "
                                                  "requests")

    # --- conv2d and registered layers (docs/SERVICE.md) ---
    layers_dir: Path | None = Field(
        default=None,
        description="directory of registered conv layers (shared by replicas); unset: "
                    "featcodec/layers under the platform's user data directory")
    layer_cache_bytes: int = Field(default=256 * 2**20, ge=0,
                                   description="prepared layers kept in memory, per process")
    conv_backend: Literal["auto", "numpy", "ort"] = Field(
        default="auto",
        description="conv2d compute: onnxruntime when installed (auto), numpy, or ort")

    @field_validator("layers_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def api_key_list(self) -> list[str]:
        """The configured keys, blanks dropped."""
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
