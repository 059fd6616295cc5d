from __future__ import annotations

import pytest

from tests.serving.adapters_on_disk import write_folders


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("serving"))
