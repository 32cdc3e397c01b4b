"""An HTTP service that stores uploads and serves blobs by digest.

Endpoints receive ``blobservices.default`` via ``@inject`` and ``Provide``; the container is
loaded from ``containers/local.yaml`` unless ``CASTORE_CONFIG`` names another file.
"""


import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from dependency_injector.wiring import Provide, inject
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

import castore_di
from castore_di import B3Digest, BlobReader, BlobService

CONTAINERS = Path(__file__).resolve().parents[2] / "containers"

router = APIRouter()

Blobs = Annotated[BlobService, Depends(Provide["blobservices.default"])]


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


def create_app(container: castore_di.CastoreContainer | None = None) -> FastAPI:
    """The application; its container is wired here and closed on shutdown."""
    if container is None:
        container = castore_di.load_container(os.environ.get("CASTORE_CONFIG") or CONTAINERS / "local.yaml")
    castore = container

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await castore.aclose()

    castore.wire(modules=[__name__])
    app = FastAPI(title="castore blob API", lifespan=lifespan)
    app.state.castore = castore
    app.include_router(router)
    return app
