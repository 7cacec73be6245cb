"""Reddit / SHP data pipeline: `karma.data.prepare(...)` (and `karma data prepare` on the command line).

Importing this package is cheap: DuckDB, pyarrow and zstandard load only when `prepare` runs.
"""

from __future__ import annotations

from karma.data.decode import DecodeError
from karma.data.errors import InputNotFoundError, NoUsableDataError
from karma.data.prepare import PrepareConfig, prepare
from karma.data.relational import split_of

__all__ = ["DecodeError", "InputNotFoundError", "NoUsableDataError", "PrepareConfig", "prepare", "split_of"]
