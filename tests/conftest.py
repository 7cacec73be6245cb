"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder (../shared/data beside the repo, or $KARMA_SHARED_DATA); skips if absent."""
    root = Path(os.environ.get("KARMA_SHARED_DATA", Path(__file__).parents[1].parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set KARMA_SHARED_DATA)")
    return root
