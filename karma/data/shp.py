"""Stanford Human Preferences (SHP) inputs: local JSONL / parquet rows, or the hub dataset when online.

SHP rows (``post_id, domain, history, c_root_id_A/B, created_at_utc_A/B, score_A/B, human_ref_A/B, …``) are
decoded by :func:`karma.data.records.shp_record` like any other dump; this module only finds the files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from karma.data.errors import InputNotFoundError

log = logging.getLogger(__name__)

SHP_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".zst", ".gz")


class ShpHubError(RuntimeError):
    """The SHP dataset id could not be loaded from the hub (offline, or no such dataset)."""


def expand_shp_inputs(spec: str) -> list[Path]:
    """A file, a folder of SHP files (searched recursively), or a hub dataset id materialised as parquet."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SHP_SUFFIXES))
        if not files:
            raise InputNotFoundError(f"no SHP files (*.json, *.jsonl, *.parquet) in folder: {spec} (--shp)")
        return files
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.suffix
    if not looks_like_hub_id:
        raise InputNotFoundError(f"input file not found: {spec} (--shp)")
    return _from_hub(spec)


def _from_hub(dataset_id: str) -> list[Path]:
    """Download an SHP-format dataset with `datasets` (needs internet) into parquet files in the karma cache."""
    from karma.models import cache_dir

    try:
        import datasets

        dd = datasets.load_dataset(dataset_id)
    except Exception as exc:
        raise ShpHubError(
            f"could not load SHP dataset {dataset_id!r} from the Hugging Face hub "
            f"(this needs internet; give local JSONL/parquet files instead): {type(exc).__name__}: {exc}"
        ) from exc
    folder = cache_dir() / "shp" / dataset_id.replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for split, ds in dd.items():
        target = folder / f"{split}.parquet"
        if not target.exists():
            ds.to_parquet(str(target))
        files.append(target)
    log.info("SHP %s: %d split file(s) in %s", dataset_id, len(files), folder)
    return files
