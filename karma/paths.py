"""Where things are on disk, outside any one model: the one home of the shared-data location.

The shared data folder holds the raw r/college dumps (`reddit/college_2011_2022/`), the politeness corpus
(`eval/politeness/`) and the evaluation tasks (`eval/bigbench/`, `eval/truthfulqa/`). It is
`$KARMA_SHARED_DATA` when set, else `../shared/data` beside the folder that holds the `karma` package (the
repository checkout, for the usual editable install).
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "KARMA_SHARED_DATA"
#: the folder holding the `karma` package: the repository checkout for an editable install
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir(data_dir: str | Path | None = None) -> Path:
    """The shared data folder: `data_dir` when given, else `$KARMA_SHARED_DATA`, else `../shared/data` beside
    the checkout. Only computes the path: callers decide what a missing folder means."""
    if data_dir is None:
        env = os.environ.get(SHARED_DATA_ENV)
        data_dir = env if env else SOURCE_ROOT.parent / "shared" / "data"
    return Path(data_dir).expanduser()
