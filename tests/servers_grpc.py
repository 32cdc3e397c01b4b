"""Fixtures that run a real grpc server on 127.0.0.1 for the tests."""

from __future__ import annotations
