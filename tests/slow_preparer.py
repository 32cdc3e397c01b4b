"""A preparer that takes its time (imported by the importer's worker processes in tests)."""

from __future__ import annotations

import time
from typing import Any

from castore_di._embedded.codec import Codec
from castore_di._prepare import EmbeddedPreparer, Encoded


class SlowPreparer(EmbeddedPreparer):
    """:class:`EmbeddedPreparer` sleeping ``delay`` seconds per blob: jobs stay in flight."""

    def __init__(self, avg_chunk_size: int, compression: Any, delay: float = 0.02) -> None:
        super().__init__(avg_chunk_size, compression)
        self.delay = delay

    def __reduce__(self) -> tuple[Any, ...]:
        return SlowPreparer, (self.avg_chunk_size, self.compression, self.delay)

    def encode(self, data: bytes, digest: bytes, enc: Codec | None = None) -> Encoded:
        time.sleep(self.delay)
        return super().encode(data, digest, enc)
