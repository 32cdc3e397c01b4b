"""An HTTP service that stores uploads and serves blobs by digest, with ``/metrics``.

The application's container (``Application``) takes its castore config from its own
``providers.Configuration`` (the ``castore`` key; by default ``containers/local.yaml``, or
the file ``CASTORE_CONFIG`` names). The castore services start and stop with the app's
lifespan through the container's ``init_resources()`` / ``shutdown_resources()``.
Endpoints receive ``blobservices.default`` via ``@inject`` and ``Provide``; every service
operation is recorded in a Prometheus registry served at ``GET /metrics``.
"""


import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import yaml
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from castore_di import B3Digest, BlobReader, BlobService
from castore_di.composition.host import castore_container, init_resources, shutdown_resources
from castore_di.metrics import Metrics

CONTAINERS = Path(__file__).resolve().parents[2] / "containers"



class Application(containers.DeclarativeContainer):
    """The app's container: its config, its metrics, and the castore services."""

    config = providers.Configuration()
    metrics = providers.Singleton(Metrics)
    castore = castore_container(config.castore, metrics=metrics)


router = APIRouter()

Blobs = Annotated[BlobService, Depends(Provide["castore.blobservices.default"])]


def _parse_digest(text: str) -> B3Digest:
    try:
        return B3Digest.parse(text)
    except ValueError as e:
        raise HTTPException(status_code=400, detail=f"invalid digest {text!r}: {e}") from None


@router.post("/blobs", status_code=201)
@inject
async def upload(request: Request, blobs: Blobs) -> dict[str, str | int]:
    """Store the request body; nothing is stored if the upload is interrupted."""
    size = 0
    async with blobs.open_write() as writer:
        async for block in request.stream():
            size += await writer.write(block)
    assert writer.digest is not None
    return {"digest": str(writer.digest), "size": size}


@router.get("/blobs/{digest:path}")  # base64 digests may contain "/"
@inject
async def download(digest: str, blobs: Blobs) -> StreamingResponse:
    """Stream the blob (verified against its digest as it is read)."""
    reader = await blobs.open_read(_parse_digest(digest))
    if reader is None:
        raise HTTPException(status_code=404, detail=f"blob {digest} not found")
    return StreamingResponse(
        _stream(reader),
        media_type="application/octet-stream",
        headers={"Content-Length": str(reader.size)},
    )


async def _stream(reader: BlobReader) -> AsyncIterator[bytes]:
    async with reader:
        async for block in reader.iter_blocks():
            yield block


@router.get("/metrics")
@inject
async def metrics(metrics: Annotated[Metrics, Depends(Provide["metrics"])]) -> Response:
    """Prometheus metrics of every castore service operation."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def default_application() -> Application:
    """The container configured from ``CASTORE_CONFIG`` (or ``containers/local.yaml``).

    The file is parsed as is: castore interpolates ``${VAR}`` when it reads its config.
    """
    application = Application()
    path = Path(os.environ.get("CASTORE_CONFIG") or CONTAINERS / "local.yaml")
    application.config.from_dict({"castore": yaml.safe_load(path.read_text())})
    return application


def create_app(application: Application | None = None) -> FastAPI:
    """The application; its container is wired here, started and stopped by the lifespan."""
    container = application if application is not None else default_application()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await init_resources(container)
        try:
            yield
        finally:
            await shutdown_resources(container)

    container.wire(modules=[__name__])
    app = FastAPI(title="castore blob API", lifespan=lifespan)
    app.state.container = container
    app.include_router(router)
    return app
