"""Shared test fixtures: the real third-party assets in ../shared/data (see its README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared(*parts: str) -> Path:
    """The path SHARED_DATA/parts; fails (never skips) the test with a clear message when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"{path} is missing: this test needs the real assets in ../shared/data beside the repository "
            f"({SHARED_DATA}); see ../shared/data/README.md",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shared_data():
    """`shared_data("gpt2-tokenizer")` -> the asset's path, failing the test when it is absent."""
    return require_shared
