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
import logging
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..namespace import Namespace
from .base import LabelStore, StoreError, StoreUnavailable, redact, stored_seed_limit

RETRIES = 3
# Unreachable, or a cluster with a master gone (its slots uncovered): nothing was read or written.
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ClusterError, RedisClusterException, OSError)


log = logging.getLogger(__name__)


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


_warned: set[str] = set()


def warn_if_evicting(client, url: str) -> None:
    """Log once per process and URL when Redis may evict keys: a label store needs
    `maxmemory-policy noeviction` (an evicted row is work lost; an evicted namespace key hides the
    namespace). Managed Redis that disables CONFIG is not checked."""
    if url in _warned:
        return
    _warned.add(url)
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "")
    except (RedisError, RedisClusterException, AttributeError):
        return
    if policy and policy != "noeviction":
        log.warning(
            "redis store %s: maxmemory-policy is %s; a label store needs noeviction (evicted labels are "
            "computed again, an evicted namespace record hides its labels until a write restores it)",
            redact(url),
            policy,
        )


def _unavailable(url: str, e: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"redis store {redact(url)} unavailable after {RETRIES} retries: {e}")


# Raise the limit, never lower it, in one step: two writers extending at once keep the larger.
_EXTEND = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = tonumber(ARGV[1])
if wanted > current then redis.call('SET', KEYS[1], wanted) return wanted end
return current
"""


class RedisStore(LabelStore):
    def __init__(self, url: str, namespace: Namespace, create: bool = True, seed_limit: int | None = None):
        super().__init__(namespace)
        self.url = url
        self.client, self.cluster = connect(url)
        self.prefix = f"dl:{namespace.id}:r:"
        self.meta_key = f"dl:{{{namespace.id}}}:meta"
        self.seeds_key = f"dl:{{{namespace.id}}}:seeds"  # same hash slot as meta_key
        self.coverage_key = f"dl:{{{namespace.id}}}:coverage"  # a set of JSON records
        self.fingerprint_key = f"dl:{{{namespace.id}}}:fingerprint"  # the render fingerprint's JSON
        self.meta_json = json.dumps(namespace.meta())
        try:
            stored = self.client.get(self.meta_key)
            if stored is None:
                if not create:
                    raise StoreError(f"namespace {namespace.id} not found in {redact(url)}")
                # NX: two processes creating the namespace at once agree on one record.
                self.client.set(self.meta_key, self.meta_json, nx=True)
                stored = self.client.get(self.meta_key)
            namespace.check_against(json.loads(stored))
            self._init_seed_limit(create, seed_limit)
            warn_if_evicting(self.client, url)
        except UNAVAILABLE as e:
            raise _unavailable(url, e) from e

    def _read_seed_limit(self) -> int | None:
        return stored_seed_limit(self._call(self.client.get, self.seeds_key), self.namespace.id)

    def _extend_seed_limit(self, limit: int) -> int:
        return int(self._call(self.client.eval, _EXTEND, 1, self.seeds_key, limit))

    def probe_write(self) -> None:
        self._call(self.client.set, f"dl:{{{self.namespace.id}}}:probe", b"1", 60)

    def _add_coverage(self, record: str) -> None:
        self._call(self.client.sadd, self.coverage_key, record)

    def _claim_fingerprint(self, record: str) -> str:
        self._call(lambda: self.client.set(self.fingerprint_key, record, nx=True))  # NX: the first writer's stands
        return self._read_fingerprint() or record

    def _read_fingerprint(self) -> str | None:
        value = self._call(self.client.get, self.fingerprint_key)
        return value.decode() if value is not None else None

    def _read_coverage(self) -> list[str]:
        return sorted(r.decode() for r in self._call(self.client.smembers, self.coverage_key))

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except UNAVAILABLE as e:
            raise _unavailable(self.url, e) from e
        except RedisError as e:
            raise StoreError(f"redis store {redact(self.url)}: {e}") from e

    def _get_rows(self, keys: list[str]) -> list[bytes | None]:
        names = [self.prefix + k for k in keys]
        if self.cluster:
            return self._call(self.client.mget_nonatomic, names)
        return self._call(self.client.mget, names)

    def _put_runs(self, runs: dict[str, list[tuple[int, bytes]]]) -> None:
        def write():
            pipe = self.client.pipeline(transaction=False)
            # A Redis that lost its data (restarted without persistence) gets the namespace's
            # metadata back with the first write, instead of rows no namespace describes.
            pipe.set(self.meta_key, self.meta_json, nx=True)
            for key, parts in runs.items():
                for off, data in parts:
                    pipe.setrange(self.prefix + key, off, data)
            pipe.execute()
            # the seed range restored too, never lowered (a script: a cluster pipeline cannot carry it)
            self.client.eval(_EXTEND, 1, self.seeds_key, self.seed_limit)

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
        self._call(self.client.delete, self.seeds_key)
        self._call(self.client.delete, self.coverage_key)
        self._call(self.client.delete, self.fingerprint_key)
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


def orphaned_rows(url: str) -> dict[str, int]:
    """Label rows per namespace id whose namespace record is gone (evicted, deleted): rows that
    `labels stats` would otherwise not see."""
    client, _ = connect(url)
    try:
        described = {json.loads(client.get(k))["id"] for k in client.scan_iter(match="dl:{*}:meta", count=1000)}
        rows: dict[str, int] = {}
        for name in client.scan_iter(match="dl:*:r:*", count=1000):
            nsid = name.decode().split(":", 2)[1]
            if nsid not in described:
                rows[nsid] = rows.get(nsid, 0) + 1
        return rows
    except UNAVAILABLE as e:
        raise _unavailable(url, e) from e


def list_namespaces(url: str) -> list[dict]:
    client, _ = connect(url)
    try:
        return [json.loads(client.get(k)) for k in client.scan_iter(match="dl:{*}:meta", count=1000)]
    except UNAVAILABLE as e:
        raise _unavailable(url, e) from e
