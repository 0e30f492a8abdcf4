"""Label stores behind one interface, picked by URL: redis:// / rediss:// or a file path / file://."""

from __future__ import annotations

from collections.abc import Callable

from distill_core.secrets import resolve_url

from ..namespace import Namespace, NamespaceMismatch
from .base import DEFAULT_SEED_LIMIT, LabelBatch, LabelStore, SeedOutOfRange, StoreError, StoreUnavailable, redact
from .file_store import FileStore
from .file_store import list_namespaces as _file_namespaces
from .redis_store import RedisStore
from .redis_store import list_namespaces as _redis_namespaces

BACKENDS: dict[str, tuple[type[LabelStore], Callable[[str], list[dict]]]] = {
    "redis": (RedisStore, _redis_namespaces),
    "rediss": (RedisStore, _redis_namespaces),
    "file": (FileStore, _file_namespaces),
}


def resolved(url: str) -> str:
    """The URL itself, or the one `env:NAME` / `@FILE` names (distill_core.secrets)."""
    return resolve_url(url, "store")


def _scheme(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in BACKENDS:
        raise ValueError(f"unsupported store URL {redact(url)!r}: use redis://, rediss://, file:// or a path")
    return scheme


def open_store(url: str, namespace: Namespace, create: bool = True, seed_limit: int | None = None) -> LabelStore:
    """Open `namespace` in the store at `url` (created unless create=False). The namespace serves
    seeds 0 .. seed_limit - 1: `seed_limit` raises the stored limit (DEFAULT_SEED_LIMIT for a new
    namespace when not given); it is never lowered."""
    url = resolved(url)
    return BACKENDS[_scheme(url)][0](url, namespace, create=create, seed_limit=seed_limit)


def list_namespaces(url: str) -> list[dict]:
    """Metadata of every namespace stored at `url`."""
    url = resolved(url)
    return BACKENDS[_scheme(url)][1](url)


def open_existing(url: str, namespace_id: str | None = None, policy_id: str | None = None) -> LabelStore:
    """Open a stored namespace without knowing its teacher: the one whose id starts with
    `namespace_id`, else the only one, else the only one made with augmentation policy `policy_id`
    (a store that holds the labels of several policies serves a run of each without --namespace)."""
    url = resolved(url)
    metas = list_namespaces(url)
    if namespace_id:
        metas = [m for m in metas if m["id"].startswith(namespace_id)]
    elif policy_id and len(metas) > 1:
        metas = [m for m in metas if m["policy_id"] == policy_id] or metas
    if len(metas) != 1:
        have = ", ".join(f"{m['id']} (policy {m['policy_id']})" for m in list_namespaces(url)) or "none"
        wanted = namespace_id or (f"policy {policy_id}" if policy_id else "*")
        raise StoreError(
            f"{redact(url)}: need exactly one namespace matching {wanted} (have: {have}); pass --namespace"
        )
    return open_store(url, Namespace.from_meta(metas[0]), create=False)


__all__ = [
    "DEFAULT_SEED_LIMIT",
    "LabelBatch",
    "SeedOutOfRange",
    "LabelStore",
    "StoreError",
    "StoreUnavailable",
    "NamespaceMismatch",
    "open_store",
    "list_namespaces",
    "open_existing",
    "redact",
    "resolved",
    "FileStore",
    "RedisStore",
]
