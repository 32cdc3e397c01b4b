"""Who may read and who may write: the server's authentication and authorisation.

One ``grpc.aio`` server interceptor applies an :class:`AuthPolicy` to every call before its
handler runs:

* the gRPC health service (``grpc.health.v1.Health``) is always open, for probes;
* with bearer tokens (:class:`TokenTable`), a call without an ``authorization: Bearer TOKEN``
  header, or with a token the table does not hold, is refused with UNAUTHENTICATED;
* a Put (blob or directory) on a read-only server, or with a ``read`` token, is refused
  with PERMISSION_DENIED.

Client certificates (``--tls-client-ca``) are checked by the TLS handshake itself: a client
without a certificate signed by that CA never gets a connection, so no call of it reaches
this module. Combined with tokens, a call needs both.

A refused call is answered before its request is read and leaves one audit line on the
``castore_di.server.audit`` logger: a JSON object with ``peer``, ``method``, ``status`` and
``reason`` (and ``client``, the certificate's common name, over mutual TLS). Tokens are kept
only as SHA-256 digests, compared in constant time, and never logged nor echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn

import attrs
import grpc
import grpc.aio

from castore_di._grpc.wire import BLOB_PUT, DIRECTORY_PUT
from castore_di.errors import ConfigError

__all__ = [
    "AuthInterceptor",
    "AuthPolicy",
    "MIN_TOKEN_LENGTH",
    "OPEN_PREFIXES",
    "Refusal",
    "TokenTable",
    "WRITE_METHODS",
    "check_exposure",
    "is_loopback",
    "parse_tokens",
]

audit_log = logging.getLogger("castore_di.server.audit")
log = logging.getLogger("castore_di.server")

# The calls that change a store; every other call (Stat, Read, Get, reflection) reads.
WRITE_METHODS = frozenset({BLOB_PUT, DIRECTORY_PUT})
# Methods every client may call, with or without credentials.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
MIN_TOKEN_LENGTH = 16
ROLES = ("read", "write")
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))  # visible ASCII: valid in a header value


def _digest(token: str | bytes) -> bytes:
    raw = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def parse_tokens(text: str, source: str) -> list[tuple[bytes, str]]:
    """``(SHA-256 of token, role)`` per ``read TOKEN``/``write TOKEN`` line of a tokens file.

    Blank lines and lines starting with ``#`` are skipped; a ``#`` word after the token starts
    a comment. Errors name the file and line, never the token.
    """
    entries: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{source} line {number}"
        if len(words) > 2 and not words[2].startswith("#"):
            raise ConfigError(f"{where}: expected 'read TOKEN' or 'write TOKEN' (a token holds no spaces)")
        if len(words) < 2 or words[1].startswith("#"):
            raise ConfigError(f"{where}: expected 'read TOKEN' or 'write TOKEN', the token is missing")
        role, token = words[0], words[1]
        if role not in ROLES:
            raise ConfigError(f"{where}: unknown role (expected 'read' or 'write')")
        if not set(token) <= _TOKEN_CHARS:
            raise ConfigError(f"{where}: a token holds only visible ASCII characters")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters")
        digest = _digest(token)
        if entries.get(digest, role) != role:
            raise ConfigError(f"{where}: the same token is listed as both read and write")
        entries[digest] = role
    return list(entries.items())


class TokenTable:
    """The bearer tokens of a tokens file; :meth:`reload` re-reads it (SIGHUP)."""

    def __init__(self, path: str) -> None:
        """Read ``path`` now: a missing, unreadable or invalid file is a :class:`ConfigError`."""
        self.path = path
        self._entries: tuple[tuple[bytes, str], ...] = ()
        self.reload()
        if not self._entries:
            raise ConfigError(f"{path}: no tokens (expected lines 'read TOKEN' or 'write TOKEN')")

    def reload(self) -> int:
        """Re-read the file and replace the tokens; returns how many there are now.

        Blocking file I/O: call it from a thread when a loop is running. A file that cannot be
        read or parsed raises :class:`ConfigError` and the previous tokens stay in force.
        """
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read the tokens file {self.path}: {e.strerror or e}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("castore serve: the tokens file %s is open to group or others (chmod 600 it)", self.path)
        self._entries = tuple(parse_tokens(text, self.path))
        return len(self._entries)

    def role(self, token: str | bytes) -> str | None:
        """The role of ``token``, or None. Compares against every entry, in constant time each."""
        presented = _digest(token)
        found: str | None = None
        for digest, role in self._entries:
            if hmac.compare_digest(presented, digest):
                found = role
        return found

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenTable({self.path!r}, {len(self._entries)} tokens)"


@attrs.frozen
class Refusal:
    """Why a call is refused: the status, a message for the client, a short reason for the audit line."""

    code: grpc.StatusCode
    message: str
    reason: str


_NO_TOKEN = Refusal(
    grpc.StatusCode.UNAUTHENTICATED, "this server needs a bearer token (authorization: Bearer TOKEN)", "no-token"
)
_BAD_HEADER = Refusal(
    grpc.StatusCode.UNAUTHENTICATED,
    "the authorization header is not a single 'Bearer TOKEN'",
    "malformed-authorization",
)
_UNKNOWN_TOKEN = Refusal(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not accepted", "unknown-token")
_READ_ONLY = Refusal(grpc.StatusCode.PERMISSION_DENIED, "this server is read-only: Put is refused", "read-only")
_READ_TOKEN = Refusal(
    grpc.StatusCode.PERMISSION_DENIED, "the bearer token may only read: Put needs a write token", "read-token-on-write"
)


@attrs.frozen
class AuthPolicy:
    """What :class:`AuthInterceptor` enforces.

    Attributes:
        read_only: refuse every Put.
        tokens: require a bearer token from this table (None: no tokens).
        client_ca: PEM file of the CA whose client certificates the TLS handshake requires
            (None: no client certificates). Only recorded here; the server credentials enforce it.
    """

    read_only: bool = False
    tokens: TokenTable | None = None
    client_ca: str | None = None

    def describe(self) -> str:
        """A few words for the start-up log line (never a token)."""
        parts = ["read-only"] if self.read_only else []
        if self.tokens is not None:
            parts.append(f"bearer tokens from {self.tokens.path} ({len(self.tokens)})")
        if self.client_ca is not None:
            parts.append(f"client certificates signed by {self.client_ca}")
        return ", ".join(parts) or "no authentication"

    @property
    def protected(self) -> bool:
        """Whether anything restricts who may read or write."""
        return self.read_only or self.tokens is not None or self.client_ca is not None

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Refusal | None:
        """The refusal of a call to ``method`` carrying ``metadata``, or None when it may proceed."""
        if method.startswith(OPEN_PREFIXES):
            return None
        role = "write"
        if self.tokens is not None:
            headers = [v for k, v in metadata or () if k == "authorization"]
            if not headers:
                return _NO_TOKEN
            value = headers[0]
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            token = token.strip()
            if len(headers) != 1 or scheme.lower() != "bearer" or not token:
                return _BAD_HEADER
            found = self.tokens.role(token)
            if found is None:
                return _UNKNOWN_TOKEN
            role = found
        if method in WRITE_METHODS:
            if self.read_only:
                return _READ_ONLY
            if role != "write":
                return _READ_TOKEN
        return None


def _peer(context: Any) -> dict[str, str]:
    """``peer`` (address) and, over mutual TLS, ``client`` (the certificate's common name)."""
    out: dict[str, str] = {}
    try:
        out["peer"] = str(context.peer())
        names = context.auth_context().get("x509_common_name") or ()
    except Exception:  # a call torn down already has no peer to tell
        return {"peer": "unknown"}
    if names:
        name = names[0]
        out["client"] = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return out


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Applies an :class:`AuthPolicy` to every incoming call (see the module docstring)."""

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        refusal = self.policy.check(method, handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if refusal is None:
            return await continuation(handler_call_details)
        return _refusing_handler(method, refusal)


def _refusing_handler(method: str, refusal: Refusal) -> grpc.RpcMethodHandler:
    # A request-streaming handler whatever the method's kind: grpc then reads no request
    # message before the behaviour runs, so a refused peer cannot make the server buffer one.
    async def refuse(_requests: Any, context: Any) -> NoReturn:
        audit_log.warning(
            json.dumps(
                {"event": "refused", **_peer(context), "method": method,
                 "status": refusal.code.name, "reason": refusal.reason},
                separators=(",", ":"),
            )
        )
        await context.abort(refusal.code, refusal.message)
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    return grpc.stream_unary_rpc_method_handler(refuse)


def is_loopback(address: str) -> bool:
    """Whether a listen address (``host:port``, ``[v6]:port``, ``unix:…``) is reachable only locally."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def check_exposure(listen: Sequence[str], policy: AuthPolicy, *, allow_unauthenticated: bool = False) -> None:
    """Refuse to serve a non-loopback, non-unix address that nothing protects (:class:`ConfigError`)."""
    if policy.protected or allow_unauthenticated:
        return
    exposed = [a for a in listen if not is_loopback(a)]
    if exposed:
        raise ConfigError(
            f"refusing to listen on {', '.join(exposed)} unprotected: anyone who can reach it could read and "
            "write the store. Protect it with --tls-client-ca FILE (client certificates), --auth-tokens FILE "
            "(bearer tokens) or --read-only, or pass --allow-unauthenticated if you mean it"
        )
