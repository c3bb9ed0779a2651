"""Test-wide settings: an isolated SELFSUP_HOME per session, and the shared data root when it is there."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # The README's test command needs no environment: beside a checkout, ../shared/data is the data root.
    shared = REPO.parent / "shared" / "data"
    if "SELFSUP_DATA" not in os.environ and shared.is_dir():
        os.environ["SELFSUP_DATA"] = str(shared)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    old = os.environ.get("SELFSUP_HOME")
    os.environ["SELFSUP_HOME"] = str(tmp_path_factory.mktemp("selfsup_home"))
    yield
    if old is None:
        os.environ.pop("SELFSUP_HOME", None)
    else:
        os.environ["SELFSUP_HOME"] = old


def data_root() -> Path | None:
    value = os.environ.get("SELFSUP_DATA")
    return Path(value) if value and Path(value).is_dir() else None


requires_data = pytest.mark.skipif(data_root() is None and not (REPO.parent / "shared" / "data").is_dir(),
                                   reason="needs SELFSUP_DATA (../shared/data) with the real datasets")
