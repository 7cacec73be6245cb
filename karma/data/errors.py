"""The errors `karma data prepare` raises for its inputs (shared by :mod:`karma.data.prepare` and
:mod:`karma.data.shp`, which both check inputs; neither imports the other for them)."""

from __future__ import annotations


class InputNotFoundError(FileNotFoundError):
    """An input path given on the command line does not exist."""


class NoUsableDataError(ValueError):
    """The inputs were read but nothing usable remains."""
