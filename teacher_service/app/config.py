"""Service settings: flags or DISTILL_* environment variables (pydantic-settings)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    # teacher
    model: str | None = Field(None, description="timm model name (default: checkpoint metadata, else regnety_160)")
    checkpoint: str | None = Field(None, description="teacher weights (.safetensors or torch state dict)")
    pretrained: bool = Field(False, description="timm hub weights (needs internet)")
    random_init: bool = Field(False, description="random weights: speed benchmarks only")
    num_classes: int | None = Field(
        None, description="classifier size for --pretrained/--random-init (default: the model's)"
    )
    amp: str = Field("auto", description="autocast on CUDA: auto (bf16) | bf16 | fp16 | none")
    # data and labels
    shards: str | None = Field(None, description="shard directory whose images the service can label by key")
    splits: str = Field("train,val", description="comma-separated splits of --shards to index")
    store: str = Field("runs/labels.db", description="label store URL")
    format: str = Field("top1", description="record format: top1 or topKp")
    policy: str | None = Field(None, description="JSON augmentation policy overrides")
    # label engines: one process per device, Triton-style batching
    devices: str = Field(
        "auto",
        description="engine devices: auto (each visible GPU, else the CPU) or a list "
        "such as cuda:0,cuda:1; one engine process per device",
    )
    max_batch_size: int = Field(64, ge=1, description="crops per teacher batch")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="how long a batch waits for more crops")
    max_queue_size: int = Field(4096, ge=1, description="items an engine holds; beyond: 503 + Retry-After")
    augment_workers: int = Field(
        0,
        ge=0,
        description="augmentation processes per engine (0: one per CPU core divided among the engines, at most 8)",
    )
    engine_buffers: int = Field(4, ge=2, description="shared batch buffers per engine")
    http_workers: int = Field(1, ge=1, description="uvicorn worker processes (HTTP, lookups and waiting)")
    # request limits and security
    max_items: int = Field(4096, ge=1, description="(key, seed) items per request")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest uploaded image (413 beyond)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest request body (413 beyond)")
    token: str | None = Field(None, description="bearer token required on /v1 when set")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 makes the service reachable from others")
    port: int = Field(8000, description="HTTP port")
    log_level: str = Field("info", description="uvicorn log level: critical | error | warning | info | debug")
