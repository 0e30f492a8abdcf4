"""Service settings: flags, or DISTILL_* environment variables (pydantic-settings); flags win.

The teacher's settings are the shared `TeacherSettings`, nested; their variables keep the flat
names (DISTILL_CHECKPOINT, DISTILL_MODEL, ...) that the flags have (--checkpoint, --model, ...).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from distill_core import Nested, NotAFlag, read_secret
from distill_core.secrets import SecretURL
from labels.namespace import MAX_SEED
from labels.teacher import TeacherSettings
from shards.flags import DecoderFlag, RendererFlag

ENV_PREFIX = "DISTILL_"


class _TeacherEnv(PydanticBaseSettingsSource):
    """DISTILL_<FIELD> of TeacherSettings' fields, nested under `teacher`."""

    def get_field_value(self, field, field_name):  # required by the interface; __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {
            name: os.environ[ENV_PREFIX + name.upper()]
            for name in TeacherSettings.model_fields
            if ENV_PREFIX + name.upper() in os.environ
        }
        return {"teacher": found} if found else {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    teacher: Annotated[TeacherSettings, Nested(title="teacher")] = Field(
        default_factory=TeacherSettings, description="the teacher"
    )
    # data and labels
    shards: str | None = Field(None, description="shard directory whose images the service can label by key")
    splits: str = Field("train,val", description="comma-separated splits of --shards to index")
    store: SecretURL = Field(
        "runs/labels.db",
        description="label store URL (a file path, file://, redis://, rediss://; with a password, DISTILL_STORE, "
        "env:NAME or @FILE)",
    )
    format: str = Field("top1", description="record format: top1 (hard labels) or topKp, e.g. top5p")
    seed_limit: int | None = Field(
        None,
        ge=1,
        le=MAX_SEED + 1,
        description="the namespace serves seeds 0..N-1; larger seeds get 422 (default: the namespace's "
        "own, set by precompute; 1024 for a namespace the service creates). A larger N extends it",
    )
    policy: dict = Field(default_factory=dict, description="JSON of augmentation policy overrides (as the trainer's)")
    renderer: RendererFlag = None
    decoder: DecoderFlag = None
    # label engines: one process per device, Triton-style batching
    devices: str = Field(
        "auto",
        description="engine devices: auto (each visible GPU, else the CPU) or a list such as cuda:0,cuda:1; "
        "one engine process per device",
    )
    max_batch_size: int = Field(64, ge=1, description="crops per teacher batch")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="how long a batch waits for more crops")
    max_queue_size: int = Field(
        4096, ge=1, description="items an engine holds; a full queue: 503 + Retry-After; more misses than this: 413"
    )
    augment_workers: int = Field(
        0, ge=0, description="augmentation processes per engine (0: the CPU cores divided among the engines, at most 8)"
    )
    engine_buffers: int = Field(4, ge=2, description="shared batch buffers per engine")
    http_workers: int = Field(1, ge=1, description="uvicorn worker processes (HTTP, lookups and waiting)")
    http_header_timeout: float = Field(
        10.0, gt=0, description="seconds a connection has to send its request headers; then it is closed"
    )
    http_body_timeout: float = Field(
        10.0, gt=0, description="seconds a request body has from its request head to be complete; then closed"
    )
    http_max_connections_per_client: int = Field(
        256,
        ge=0,
        description="connections one client address may hold per HTTP worker (0: no bound; behind a proxy every "
        "client has its address: raise it or set 0)",
    )
    http_max_header_bytes: int = Field(
        64 * 1024, ge=4096, description="largest request line + headers (400 beyond; bounds the header count too)"
    )
    http_max_connections: int = Field(
        2048, ge=1, description="connections (and requests in progress) per HTTP worker; 503 beyond"
    )
    # request limits and security
    max_items: int = Field(4096, ge=1, description="(key, seed) items per request")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest uploaded image (413 beyond)")
    max_upload_work: int = Field(
        2**28,
        ge=1,
        description="an upload's pixels x seeds to compute (its augmentation cost; 413 beyond): 268M is a 12 MP "
        "photo x 22 seeds or a 500x375 one x 1,431",
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="largest request body, an upload's (413 beyond, before it is read)"
    )
    upload_cache: int = Field(
        65536,
        ge=0,
        description="uploads' labels each HTTP worker remembers (least recently used go first); uploads are "
        "never written to the label store, which any client could otherwise grow",
    )
    token: Annotated[str | None, NotAFlag()] = Field(
        None, description="bearer token required on /v1 when set: DISTILL_TOKEN (never a flag: ps shows flags)"
    )
    token_file: str | None = Field(None, description="file holding the bearer token required on /v1")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 makes the service reachable from others")
    port: int = Field(8000, description="HTTP port")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="uvicorn log level")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return init_settings, env_settings, _TeacherEnv(settings_cls), dotenv_settings, file_secret_settings

    @property
    def json_body_limit(self) -> int:
        """The largest JSON body: `max_items` items of the longest key (512 characters, JSON-quoted)
        and a seed, plus room; 2.3 MB at 4,096 items. A larger one is refused before parsing."""
        return self.max_items * 560 + 65536

    def bearer_token(self) -> str | None:
        """The token from DISTILL_TOKEN, else from --token-file (read once, at start-up)."""
        if self.token:
            return self.token
        return read_secret(self.token_file, "--token-file") if self.token_file else None

    def to_env(self) -> dict[str, str]:
        """These settings as DISTILL_* variables (how `serve` hands them to its uvicorn workers)."""
        flat = {k: v for k, v in self.model_dump(exclude={"teacher"}).items()}
        flat.update(self.teacher.model_dump())

        def text(value) -> str:
            if isinstance(value, bool):
                return str(value).lower()
            return json.dumps(value) if isinstance(value, dict) else str(value)

        return {ENV_PREFIX + name.upper(): text(value) for name, value in flat.items() if value is not None}
