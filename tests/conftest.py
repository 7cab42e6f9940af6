"""Fixtures shared by the unit and namespace tests."""

from __future__ import annotations

import pytest
from collection_support import Collection, build_and_install


@pytest.fixture(scope="session")
def installed_collection(tmp_path_factory: pytest.TempPathFactory) -> Collection:
    """The Ansible collection, built from this checkout and installed, once per session."""
    return build_and_install(tmp_path_factory.mktemp("collection"))
