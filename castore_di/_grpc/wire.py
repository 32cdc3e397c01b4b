"""The wire contract our gRPC client and server share.

RPC names, the message-size limit, the trailing-metadata keys that carry our exception
class and rule code, the status table in both directions and the ``BlobChunk`` codec live
here once, so the two sides cannot drift. Importing this module loads neither grpc nor the
generated code; status codes are named by their ``grpc.StatusCode`` member names.

Status decisions (divergences from the reference, which maps nearly everything to INTERNAL):

* invalid input (a bad digest, an invalid Directory, a broken closure) is INVALID_ARGUMENT
  with our message; our exception class (and rule code) travel in trailing metadata so our
  client re-raises the same class;
* stored bytes that fail verification are DATA_LOSS;
* a backend failure (:class:`StorageError`) is INTERNAL: not a transport problem, so clients
  should not blindly retry it; a store locked by another process or a service already closed
  (server shutting down) is UNAVAILABLE, which clients may retry;
* a call past a server limit is RESOURCE_EXHAUSTED (DEADLINE_EXCEEDED for the idle
  timeout) and a stream the client did not finish is CANCELLED (``grpc_status`` on the
  exception);
* anything unexpected is INTERNAL with the exception's type and message.

Absence is not an error of the services (``None``/``False``); the servicers turn it into
NOT_FOUND themselves and the clients read NOT_FOUND as absence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from castore_di.errors import (
    AccessDeniedError,
    CastoreError,
    ClosedError,
    ClosureError,
    ConfigError,
    DigestError,
    IntegrityError,
    LockedError,
    StorageError,
    UnsupportedOperationError,
    ValidationError,
    describe,
)

__all__ = [
    "BLOB_SERVICE",
    "BLOB_STAT",
    "BLOB_READ",
    "BLOB_PUT",
    "DIRECTORY_SERVICE",
    "DIRECTORY_GET",
    "DIRECTORY_PUT",
    "MAX_MESSAGE_SIZE",
    "CHUNK_MESSAGE_SIZE",
    "ERROR_CLASS_KEY",
    "ERROR_CODE_KEY",
    "STATUS_TABLE",
    "status_name",
    "error_details",
    "error_from_status",
    "encode_blob_chunk",
    "decode_blob_chunk",
]

BLOB_SERVICE = "tvix.castore.v1.BlobService"
BLOB_STAT = f"/{BLOB_SERVICE}/Stat"
BLOB_READ = f"/{BLOB_SERVICE}/Read"
BLOB_PUT = f"/{BLOB_SERVICE}/Put"
DIRECTORY_SERVICE = "tvix.castore.v1.DirectoryService"
DIRECTORY_GET = f"/{DIRECTORY_SERVICE}/Get"
DIRECTORY_PUT = f"/{DIRECTORY_SERVICE}/Put"

MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # receive/send limit on both sides (grpc's default is 4 MiB)
# BlobChunk payload per Read/Put message. benches/grpc_bench.py --read-sizes: 256 KiB-1 MiB is
# the plateau; 1 MiB stays well under the 4 MiB default receive limit of other clients.
CHUNK_MESSAGE_SIZE = 1 << 20
ERROR_CLASS_KEY = "castore-error"  # trailing metadata: our exception class behind a status
ERROR_CODE_KEY = "castore-error-code"  # trailing metadata: the ValidationError rule code

# Server direction, first match wins: more specific classes come first.
STATUS_TABLE: tuple[tuple[type[BaseException], str], ...] = (
    (DigestError, "INVALID_ARGUMENT"),
    (ValidationError, "INVALID_ARGUMENT"),  # ClosureError and every Directory rule
    (IntegrityError, "DATA_LOSS"),
    (LockedError, "UNAVAILABLE"),
    (StorageError, "INTERNAL"),
    (ClosedError, "UNAVAILABLE"),
    (UnsupportedOperationError, "UNIMPLEMENTED"),
    (ConfigError, "INTERNAL"),
    (CastoreError, "INTERNAL"),
)


def status_name(exc: BaseException) -> str:
    """The ``grpc.StatusCode`` member name for an exception (INTERNAL when no row matches).

    An exception that names its own status in ``grpc_status`` (a server limit, a stream the
    client did not finish) gets that one.
    """
    own = getattr(exc, "grpc_status", None)
    if isinstance(own, str):
        return own
    for cls, name in STATUS_TABLE:
        if isinstance(exc, cls):
            return name
    return "INTERNAL"


def error_details(exc: BaseException, what: str = "") -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """``(status name, details, trailing metadata)`` with which a server reports ``exc``."""
    text = describe(exc)
    if not isinstance(exc, CastoreError):
        text = f"internal error ({type(exc).__name__}): {text}"
    details = f"{what}: {text}" if what else text
    metadata: list[tuple[str, str]] = [(ERROR_CLASS_KEY, type(exc).__name__)]
    rule = getattr(exc, "code", None)
    if isinstance(exc, ValidationError) and isinstance(rule, str):
        metadata.append((ERROR_CODE_KEY, rule))
    return status_name(exc), details, tuple(metadata)


# Client direction: exceptions a server may name in trailing metadata, rebuilt as ours.
_REBUILD: dict[str, Callable[[str, str], CastoreError]] = {
    "ClosureError": lambda msg, code: ClosureError(msg, code=code or "closure"),
    "DigestError": lambda msg, code: DigestError(msg),
    "IntegrityError": lambda msg, code: IntegrityError(msg),
    "UnsupportedOperationError": lambda msg, code: UnsupportedOperationError(msg),
}


def error_from_status(
    status: str, details: str, metadata: Iterable[tuple[str, str | bytes]], what: str, target: str
) -> CastoreError:
    """The exception a client raises for a failed call (``status`` is the member name)."""
    meta = {k: v if isinstance(v, str) else v.decode("utf-8", "replace") for k, v in metadata}
    message = f"{what}: {details}" if details else what
    cls_name = meta.get(ERROR_CLASS_KEY, "")
    if cls_name in _REBUILD:
        return _REBUILD[cls_name](message, meta.get(ERROR_CODE_KEY, ""))
    if status == "INVALID_ARGUMENT":
        err = ValidationError(message)
        err.code = meta.get(ERROR_CODE_KEY, "invalid")
        return err
    if status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):  # see castore_di.server.auth
        return AccessDeniedError(f"{what}: gRPC server {target} refused the call ({status}): {details}")
    if status == "UNAVAILABLE":
        return StorageError(f"{what}: gRPC server {target} unavailable: {details}")
    if status == "DEADLINE_EXCEEDED":
        said = f" ({details})" if details and details != "Deadline Exceeded" else ""
        return StorageError(f"{what}: gRPC call to {target} timed out{said}")
    if status == "DATA_LOSS":
        return IntegrityError(f"{what}: server {target} reports data loss: {details}")
    if status == "UNIMPLEMENTED":
        return UnsupportedOperationError(f"{what}: not supported by {target}: {details}")
    if status == "CANCELLED":
        return StorageError(f"{what}: call to {target} was cancelled")
    return StorageError(f"{what}: gRPC server {target} failed ({status}): {details}")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_blob_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """``BlobChunk{data}`` on the wire, built with a single copy of the payload."""
    if not data:
        return b""
    return b"".join((b"\x0a", _varint(len(data)), data))


def decode_blob_chunk(raw: bytes) -> bytes:
    """``BlobChunk.data`` of a serialized message (fast path for the usual one-field form)."""
    if not raw:
        return b""
    if raw[0] == 0x0A:
        length, shift, i = 0, 0, 1
        while i < len(raw) and i < 11:
            b = raw[i]
            length |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                if i + length == len(raw):
                    return raw[i:]
                break
            shift += 7
    from castore_di.proto.tvix.castore.protos import rpc_blobstore_pb2 as pb

    data: bytes = pb.BlobChunk.FromString(raw).data
    return data
