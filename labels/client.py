"""TeacherClient: what trainers use to talk to the teacher service.

Bulk `lookup` (store only) and `label` (cache-through) with timeouts. Connection errors and 503s
are retried (tenacity) with jittered exponential backoff, waiting at least what Retry-After asks,
for up to `retry_for` seconds: longer than the service takes to restart, so a trainer rides
through a restart instead of failing. Results come back as the same LabelBatch the stores
return, so a trainer does not care where labels came from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import httpx
import numpy as np
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from .store import LabelBatch

log = logging.getLogger(__name__)

_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.TimeoutException)


class ServiceError(RuntimeError):
    """The service answered with an error that retrying will not fix, or retries ran out."""


class _Unavailable(Exception):
    """A 503: retried, and returned as it is when the retries run out."""

    def __init__(self, response: httpx.Response):
        self.response = response
        try:
            self.retry_after = float(response.headers.get("retry-after", 0) or 0)
        except ValueError:
            self.retry_after = 0.0


class _WaitRetryAfter:
    """Backoff, but never shorter than the server's Retry-After."""

    def __init__(self, backoff):
        self.backoff = backoff

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return max(self.backoff(state), getattr(exc, "retry_after", 0.0))


class TeacherClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 30.0,
        retry_for: float = 90.0,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.retry_for = retry_for
        self._wait = _WaitRetryAfter(wait_random_exponential(multiplier=backoff, max=max_backoff))
        self._info: dict | None = None

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        def attempt() -> httpx.Response:
            r = self.http.request(method, path, **kw)
            if r.status_code == 503:
                raise _Unavailable(r)
            return r

        retrying = Retrying(
            retry=retry_if_exception_type((_Unavailable, *_TRANSPORT_ERRORS)),
            stop=stop_after_delay(self.retry_for),
            wait=self._wait,
            before_sleep=lambda s: log.debug("%s %s: retrying after %r", method, path, s.outcome.exception()),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Unavailable as e:
            return e.response  # still 503 after retry_for seconds: the caller reports its body
        except _TRANSPORT_ERRORS as e:
            raise ServiceError(f"{method} {path}: {e!r} (retried for {self.retry_for:.0f}s)") from e

    def _json(self, r: httpx.Response, ok=(200,)) -> dict:
        if r.status_code not in ok:
            try:
                detail = r.json().get("error", r.text)
            except ValueError:
                detail = r.text
            raise ServiceError(f"{r.request.method} {r.request.url.path} -> {r.status_code}: {detail}")
        return r.json()

    def info(self) -> dict:
        if self._info is None:
            self._info = self._json(self._request("GET", "/v1/teacher"))
        return self._info

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while not self.ready():
            if time.time() > deadline:
                raise ServiceError(f"service {self.http.base_url} not ready after {timeout}s")
            time.sleep(0.25)

    @staticmethod
    def _batch(body: dict) -> tuple[LabelBatch, list]:
        labels = body["labels"]
        present = np.array([x is not None for x in labels], dtype=bool)
        topk = body.get("topk")
        if topk is not None:
            k = max((len(t) for t in topk if t), default=1)
            classes = np.array([t if t else [-1] * k for t in topk], dtype=np.int64).reshape(len(labels), k)
            probs = np.array([p if p else [0.0] * k for p in body["probs"]], dtype=np.float32).reshape(len(labels), k)
        else:
            classes = np.array([-1 if x is None else x for x in labels], dtype=np.int64).reshape(-1, 1)
            probs = None
        batch = LabelBatch(classes=classes, present=present, probs=probs, unstored=int(body.get("unstored", 0)))
        return batch, body.get("errors") or [None] * len(labels)

    def lookup(self, keys: Sequence[str], seeds: Sequence[int]) -> LabelBatch:
        """Store-only labels (missing where not precomputed): one request per batch."""
        r = self._request("POST", "/v1/labels/lookup", json={"keys": list(keys), "seeds": [int(s) for s in seeds]})
        return self._batch(self._json(r))[0]

    def label(self, keys: Sequence[str], seeds: Sequence[int]) -> tuple[LabelBatch, list[str | None]]:
        """Cache-through labels; per-item errors (e.g. unknown key) come back beside them."""
        r = self._request("POST", "/v1/labels", json={"keys": list(keys), "seeds": [int(s) for s in seeds]})
        return self._batch(self._json(r, ok=(200, 404)))

    def label_image(self, data: bytes, seeds: Sequence[int], filename: str = "image") -> tuple[str, LabelBatch]:
        r = self._request(
            "POST",
            "/v1/labels/upload",
            files={"image": (filename, data)},
            data={"seeds": ",".join(str(int(s)) for s in seeds)},
        )
        body = self._json(r)
        return body["key"], self._batch(body)[0]

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
