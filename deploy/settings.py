"""The model server's settings: stated once, here, for params.yaml's `serving` section, `graft serve` and
`python -m deploy.server` (pydantic only: the serving image has no training code)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ProviderName = Literal["auto", "tensorrt", "cuda", "cpu"]


class ServingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str = "champion"
    providers: list[ProviderName] = Field(default=["auto"], min_length=1)
    variant: Literal["auto", "fp32", "int8", "fp16"] = "auto"  # auto: INT8 on CPU, FP16 on CUDA, when published
    strict: bool = False  # refuse to serve on CPU when a GPU provider was asked for
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    max_body_bytes: int = Field(default=10_000_000, ge=1024)
    poll_seconds: float = Field(default=5.0, gt=0)
    threads: int = Field(default=0, ge=0)  # ONNX Runtime intra-op threads; 0: its default
