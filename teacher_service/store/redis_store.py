"""Redis backend: one string per (namespace, image) holding fixed-width per-seed slots.

- get: one MGET of the batch's distinct image keys (one round trip), slots sliced client-side.
  On Redis Cluster the rows spread over all slots (no hash tag on rows) and redis-py's
  `mget_nonatomic` splits the MGET by slot, pipelined per node.
- put: one SETRANGE per run of consecutive seeds of an image (precompute writes a whole seed range
  of an image in one command), all in one pipeline.
- metadata: `dl:{<ns>}:meta`, a hash-tagged key holding the namespace's JSON.
Failures: the client retries connection errors with bounded exponential backoff; what is left
surfaces as StoreUnavailable, never as labels that look present.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..namespace import Namespace
from .base import LabelStore, StoreError, StoreUnavailable

RETRIES = 3


def connect(url: str, socket_timeout: float = 5.0):
    """redis:// or rediss:// (password, db, TLS in the URL); `?cluster=1` for Redis Cluster."""
    parsed = urlparse(url)
    cluster = parse_qs(parsed.query).get("cluster", ["0"])[0] in ("1", "true", "yes")
    clean = url.split("?", 1)[0] if cluster else url
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES)
    kw = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    )
    if cluster:
        return redis.RedisCluster.from_url(clean, **kw), True
    return redis.Redis.from_url(clean, health_check_interval=30, **kw), False


def _unavailable(url: str, e: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"redis store {url} unavailable after {RETRIES} retries: {e}")


class RedisStore(LabelStore):
    def __init__(self, url: str, namespace: Namespace, create: bool = True):
        super().__init__(namespace)
        self.url = url
        self.client, self.cluster = connect(url)
        self.prefix = f"dl:{namespace.id}:r:"
        self.meta_key = f"dl:{{{namespace.id}}}:meta"
        try:
            stored = self.client.get(self.meta_key)
            if stored is None:
                if not create:
                    raise StoreError(f"namespace {namespace.id} not found in {url}")
                # NX: two processes creating the namespace at once agree on one record.
                self.client.set(self.meta_key, json.dumps(namespace.meta()), nx=True)
                stored = self.client.get(self.meta_key)
            namespace.check_against(json.loads(stored))
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise _unavailable(url, e) from e

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise _unavailable(self.url, e) from e
        except RedisError as e:
            raise StoreError(f"redis store {self.url}: {e}") from e

    def _get_rows(self, keys: list[str]) -> list[bytes | None]:
        names = [self.prefix + k for k in keys]
        if self.cluster:
            return self._call(self.client.mget_nonatomic, names)
        return self._call(self.client.mget, names)

    def _put_runs(self, runs: dict[str, list[tuple[int, bytes]]]) -> None:
        def write():
            pipe = self.client.pipeline(transaction=False)
            for key, parts in runs.items():
                for off, data in parts:
                    pipe.setrange(self.prefix + key, off, data)
            pipe.execute()

        self._call(write)

    def iter_rows(self, batch: int = 1000) -> Iterator[list[tuple[str, bytes]]]:
        n = len(self.prefix)
        buf: list[str] = []
        for name in self._call(lambda: list(self.client.scan_iter(match=self.prefix + "*", count=batch))):
            buf.append(name.decode()[n:])
            if len(buf) == batch:
                yield list(zip(buf, self._get_rows(buf)))
                buf = []
        if buf:
            yield list(zip(buf, self._get_rows(buf)))

    def num_keys(self) -> int:
        return self._call(lambda: sum(1 for _ in self.client.scan_iter(match=self.prefix + "*", count=1000)))

    def drop(self) -> int:
        deleted = 0
        for rows in self.iter_rows(500):
            names = [self.prefix + k for k, _ in rows]
            # one command per key: on a cluster the rows of a batch live in different slots
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.unlink(name)
            deleted += sum(self._call(pipe.execute))
        self._call(self.client.delete, self.meta_key)
        return deleted

    def bytes_used(self) -> int:
        """Server memory attributed to this namespace (MEMORY USAGE summed over its keys)."""
        total = 0
        try:
            for rows in self.iter_rows(500):
                pipe = self.client.pipeline(transaction=False)
                for k, _ in rows:
                    pipe.memory_usage(self.prefix + k, samples=0)
                total += sum(x or 0 for x in pipe.execute())
        except ResponseError:  # MEMORY USAGE disabled (some managed Redis): report payload bytes
            total = sum(len(r or b"") for rows in self.iter_rows(500) for _, r in rows)
        return total

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def list_namespaces(url: str) -> list[dict]:
    client, _ = connect(url)
    try:
        return [json.loads(client.get(k)) for k in client.scan_iter(match="dl:{*}:meta", count=1000)]
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        raise _unavailable(url, e) from e
