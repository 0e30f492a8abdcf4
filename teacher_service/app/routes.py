"""REST routes: thin. Validate, call the LabelService, turn its errors into status codes."""

from __future__ import annotations

import contextlib
import hmac
import math
import re

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from labels.namespace import MAX_SEED
from labels.store import SeedOutOfRange, StoreError

from ..engine.contract import EngineError, QueueFull, RequestTooLarge
from .labeling import InvalidUpload, UploadTooCostly
from .schemas import Items, LabelsNotFound, LabelsOut, Ready, error
from .state import ServiceState

# ASCII digits only: int() also takes "1_0" and other scripts' digits
SEED_LIST = re.compile(r"^ *[0-9]{1,7} *(, *[0-9]{1,7} *)*$")


# The dependencies are coroutines: FastAPI runs a plain function in its thread pool, two thread
# hand-offs a request for an attribute read and a comparison.
async def state(request: Request) -> ServiceState:
    return request.app.state.svc


async def require_token(request: Request) -> None:
    token = request.app.state.svc.token
    if not token:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):  # constant time: no timing oracle
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


health = APIRouter()
v1 = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_token)],
    responses={
        **error(401, "missing or wrong bearer token"),
        **error(413, "too many items, more misses than the teacher's queue holds, or a body or upload over the limit"),
        **error(422, "invalid request: bad JSON, wrong types, a seed out of range, unknown fields"),
        **error(503, "label store or engine unavailable, or the teacher's queue full", retry_after=True),
    },
)


@contextlib.contextmanager
def service_errors():
    """The domain's failures as HTTP: store or engine down, or the engine's queue full -> 503."""
    try:
        yield
    except SeedOutOfRange as e:
        raise HTTPException(422, str(e)) from e
    except (RequestTooLarge, UploadTooCostly) as e:  # can never fit: not a 503 to retry
        raise HTTPException(413, str(e)) from e
    except InvalidUpload as e:
        raise HTTPException(400, str(e)) from e
    except StoreError as e:
        raise HTTPException(503, f"label store unavailable: {e}", headers={"Retry-After": "1"}) from e
    except QueueFull as e:
        raise HTTPException(
            503, f"teacher queue full: {e}", headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}
        ) from e
    except EngineError as e:
        raise HTTPException(503, f"label engine unavailable: {e}", headers={"Retry-After": "5"}) from e


@health.get("/healthz")
def healthz():
    return {"status": "ok"}


@health.get("/readyz", response_model=Ready, response_model_exclude_none=True, responses={503: {"model": Ready}})
def readyz(svc: ServiceState = Depends(state)):
    try:
        svc.store.get(["__readyz__"], [0])
    except StoreError as e:
        return JSONResponse({"status": "unavailable", "error": str(e)}, status_code=503)
    if not svc.engines.alive:
        return JSONResponse({"status": "unavailable", "error": "a label engine is gone"}, status_code=503)
    if not svc.labels.store_takes_writes():
        error = "the label store refuses writes: labels are computed but not kept (see `unstored`)"
        return JSONResponse({"status": "unavailable", "error": error}, status_code=503)
    return Ready(status="ready", teacher=svc.info["teacher_id"], engines=len(svc.engines.engines))


@health.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition, every process of the service"}},
)  # fmt: skip
def metrics(svc: ServiceState = Depends(state)):
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@v1.get("/teacher")
def teacher_info(svc: ServiceState = Depends(state)):
    info = svc.info
    with service_errors():
        fingerprint = svc.store.fingerprint()
    return {
        "model": info["model"],
        "teacher_id": info["teacher_id"],
        "num_classes": info["num_classes"],
        "classes": info["classes"],
        "input_size": [3, svc.policy.input_size, svc.policy.input_size],
        "policy": svc.policy.to_dict(),
        "fingerprint": fingerprint,
        "policy_id": svc.policy.policy_id,
        "format": svc.fmt.name,
        "namespace": svc.namespace.id,
        "seed_limit": svc.store.seed_limit,
        "indexed_images": len(svc.index) if svc.index else 0,
        "devices": [e.info["device"] for e in svc.engines.engines],
    }


def _check_size(svc: ServiceState, n: int) -> None:
    if n > svc.settings.max_items:
        raise HTTPException(413, f"{n} items > max_items {svc.settings.max_items}")


@v1.post("/labels/lookup", response_model=LabelsOut, response_model_exclude_none=True)
async def lookup(items: Items, svc: ServiceState = Depends(state)):
    """Labels from the store only; null where missing. The trainer's fast path."""
    _check_size(svc, len(items.keys))
    with service_errors():
        return await svc.labels.lookup(items.keys, items.seeds)


@v1.post(
    "/labels",
    response_model=LabelsOut,
    response_model_exclude_none=True,
    responses={404: {"model": LabelsNotFound, "description": "no item could be labeled"}},
)
async def labels(items: Items, svc: ServiceState = Depends(state)):
    """Cache-through: hits from the store; misses augmented, batched, labeled, stored.

    Items whose key is not in the service's shards get a per-item error; when every item fails,
    the answer is 404 with the same body.
    """
    _check_size(svc, len(items.keys))
    with service_errors():
        out = await svc.labels.label(items.keys, items.seeds)
    if items.keys and all(e is not None for e in out.errors):
        return JSONResponse(out.model_dump(exclude_none=True) | {"error": "no item could be labeled"}, status_code=404)
    return out


@v1.post(
    "/labels/upload",
    response_model=LabelsOut,
    response_model_exclude_none=True,
    responses=error(
        400,
        "empty or undecodable image, more pixels than the decompression-bomb limit, or a header that "
        "claims more pixels than the file holds",
    ),
)
async def labels_upload(
    image: UploadFile = File(..., description="encoded image (JPEG, PNG, ...)"),
    seeds: str = Form(..., description="comma-separated seeds, e.g. 0,1,2", pattern=SEED_LIST.pattern),
    svc: ServiceState = Depends(state),
):
    """Label an uploaded image under seeds; the key is upload/<sha256 of the bytes>."""
    seed_list = [int(s) for s in seeds.replace(" ", "").split(",")]
    if not seed_list or any(not 0 <= s <= MAX_SEED for s in seed_list):
        raise HTTPException(422, f"seeds must be 1+ integers in 0..{MAX_SEED}")
    _check_size(svc, len(seed_list))
    data = await image.read(svc.settings.max_upload_bytes + 1)
    if len(data) > svc.settings.max_upload_bytes:
        raise HTTPException(413, f"image larger than {svc.settings.max_upload_bytes} bytes")
    if not data:
        raise HTTPException(400, "empty image")
    with service_errors():
        key, out = await svc.labels.upload(data, seed_list)
    failed = next((e for e in out.errors if e is not None), None)
    if failed:
        raise HTTPException(400, failed)
    return JSONResponse(out.model_dump(exclude_none=True) | {"key": key})
