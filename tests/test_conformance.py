"""Every backend type through the conformance suites, each built from a config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from castore_di import load_container
from castore_di.blobservice.base import BlobService
from castore_di.composition import default_registry
from castore_di.directoryservice.base import DirectoryService
from castore_di.testing.blob_conformance import BlobServiceConformance
from castore_di.testing.directory_conformance import DirectoryServiceConformance
from tests.cases import BLOB_CASES, DIRECTORY_CASES, Case
from tests.cases_base import ReadsThroughBlobs, ReadsThroughDirectories


def under_test(service: Any) -> Any:
    """The service under test (not the test's read-through wrapper) for the backdoor."""
    return service.reads if isinstance(service, (ReadsThroughBlobs, ReadsThroughDirectories)) else service


def test_every_registered_type_has_a_case() -> None:
    registry = default_registry()
    for kind, cases in (("blobservices", BLOB_CASES), ("directoryservices", DIRECTORY_CASES)):
        covered = {tag for case in cases for tag in case.covers}
        missing = set(registry.tags(kind)) - covered
        assert not missing, f"{kind} types without a conformance case: {sorted(missing)}"


@pytest.fixture(params=BLOB_CASES, ids=lambda c: c.id)
def blob_case(request: pytest.FixtureRequest) -> Case:
    case: Case = request.param
    return case


@pytest.fixture
async def blob_container(blob_case: Case, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    container = load_container({"blobservices": blob_case.instances(request)})
    yield container
    await container.aclose()


class TestBlobServices(BlobServiceConformance):
    @pytest.fixture
    def blob_service(self, blob_container: Any, blob_case: Case) -> BlobService:
        service: BlobService = blob_container.blob_service("default")
        if blob_case.writer is not None:
            return ReadsThroughBlobs(service, blob_container.blob_service(blob_case.writer))
        return service

    @pytest.fixture
    def backdoor(self, blob_service: BlobService, blob_case: Case, request: pytest.FixtureRequest) -> Any:
        service = under_test(blob_service)
        return blob_case.backdoor(service, request) if blob_case.backdoor else None


@pytest.fixture(params=DIRECTORY_CASES, ids=lambda c: c.id)
def directory_case(request: pytest.FixtureRequest) -> Case:
    case: Case = request.param
    return case


@pytest.fixture
async def directory_container(directory_case: Case, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    container = load_container({"directoryservices": directory_case.instances(request)})
    yield container
    await container.aclose()


class TestDirectoryServices(DirectoryServiceConformance):
    @pytest.fixture
    def directory_service(self, directory_container: Any, directory_case: Case) -> DirectoryService:
        service: DirectoryService = directory_container.directory_service("default")
        if directory_case.writer is not None:
            return ReadsThroughDirectories(service, directory_container.directory_service(directory_case.writer))
        return service

    @pytest.fixture
    def backdoor(self, directory_service: DirectoryService, directory_case: Case, request: pytest.FixtureRequest) -> Any:
        service = under_test(directory_service)
        return directory_case.backdoor(service, request) if directory_case.backdoor else None
