"""The FastAPI application: `create_app(settings)`, an HTTP worker.

In the lifespan it connects to the label engines `serve` started (their sockets are in the
environment), or starts its own when run without `serve`. The teacher never runs in this process.
"""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill_core.process import exit_with_parent

from .config import Settings
from .routes import health, v1
from .state import ServiceState, build_state

log = logging.getLogger(__name__)

FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit, declared (Content-Length) or streamed
    (chunked: the app is cut off at the limit and its answer replaced by the 413), before any of
    it is parsed. Uploads (multipart) may reach `limit` bytes; every other body (JSON, parsed on
    the event loop) only `json_limit`, what `max_items` items can take."""

    def __init__(self, app, limit: int, json_limit: int):
        self.app = app
        self.limit = limit
        self.json_limit = json_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.limit if multipart else self.json_limit
        too_large = {"error": f"request body larger than {limit} bytes"}
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _json(send, 413, too_large)
        seen, over = 0, False

        async def limited():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}  # the app stops reading here
            return msg

        async def unless_over(message):
            if not over:
                await send(message)

        try:
            await self.app(scope, limited, unless_over)
        except Exception:
            if not over:
                raise
        if over:
            await _json(send, 413, too_large)


class RequestMetrics:
    """Pure ASGI middleware: each HTTP request's latency (to its last byte sent) and its success or
    failure by status code, by route, in the metrics; an exception out of the app counts as a 500.
    (`@app.middleware("http")` would make Starlette's BaseHTTPMiddleware, which runs the app in a
    task of its own and passes the response through a memory stream: a cost on every request.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            svc = getattr(scope["app"].state, "svc", None)
            if svc is not None:
                observe_request(getattr(scope.get("route"), "path", "unmatched"), svc, start, status)


async def _json(send, status: int, body: dict):
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; with no settings, from DISTILL_* variables (how `serve`'s uvicorn workers get them)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        exit_with_parent()  # a uvicorn worker of `serve`: gone with its supervisor
        svc = app.state.svc = build_state(settings)
        log.info(
            "serving namespace %s (teacher %s, %d indexed images, engines on %s)",
            svc.namespace.id,
            svc.info["teacher_id"],
            len(svc.index or []),
            ", ".join(e.info["device"] for e in svc.engines.engines),
        )
        yield
        svc.close()

    app = FastAPI(
        title="teacher_service",
        version="1",
        lifespan=lifespan,
        description="DeiT teacher labels, cached by (namespace, image key, seed).",
        # Swagger UI and ReDoc load their assets from a CDN, which air-gapped clusters cannot
        # reach: the contract is served as /openapi.json only.
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(health)
    app.include_router(v1)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"error": "invalid request", "detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # ours, FastAPI's and Starlette's (404, 405)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR:
            # FastAPI answers 400 for a body json.loads cannot take (not UTF-8, nested too deep);
            # to a client that is a refused body like any other: 422
            detail = [{"loc": ["body"], "msg": "not valid JSON (UTF-8, nested at most a few hundred levels)"}]
            return JSONResponse({"error": "invalid request", "detail": detail}, status_code=422)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(RequestMetrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, json_limit=settings.json_body_limit)
    return app


def observe_request(endpoint: str, svc: ServiceState, start: float, code: int) -> None:
    """A request's latency, and its success or failure (by status code), in the metrics."""
    svc.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - start)
    if code < 400:
        svc.metrics.request_success.labels(endpoint).inc()
    else:
        svc.metrics.request_failure.labels(endpoint, str(code)).inc()
