"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from karma.paths import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder (../shared/data beside the repo, or $KARMA_SHARED_DATA); skips if absent."""
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set KARMA_SHARED_DATA)")
    return root
