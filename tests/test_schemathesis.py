"""The OpenAPI document is the contract, checked with the stock tool and its stock options:
`schemathesis run <url>/openapi.json --checks all` against `karma serve`'s app on a real uvicorn (tiny
models), with zero failures tolerated — no 5xx, every status documented, bodies and content types as
documented, invalid data rejected, and every request the schema calls valid accepted.

Three runs, as a user would make them:
  * the scoring and operations routes of a server without an API key, unauthenticated;
  * the same routes of a server with an API key, with the key (`-H Authorization: Bearer ...`);
  * the admin routes (load, hot swap, unload, default model: they change the server) alone, with the admin
    token, in a run of their own.

The one refusal a JSON schema cannot state — an item over the model's max_length with `truncate: false` — is
out of reach of generated data here because the tiny models read 512 tokens.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.reward_api.core.config import Settings
from services.reward_api.main import create_app
from tests.support import make_tiny_rm, serve_in_thread

pytestmark = pytest.mark.slow

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, variant, seed in (("a", "full", 0), ("b", "context", 1)):
        make_tiny_rm(root / name, variant, seed=seed, max_length=512)
    return root


def schemathesis_run(url: str, *args: str, cwd: Path) -> tuple[int, str]:
    """The CLI as a user runs it (from `cwd`: it keeps a cache folder there)."""
    proc = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--no-color",
            "--seed",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
        cwd=cwd,
    )
    return proc.returncode, proc.stdout + proc.stderr


def assert_clean(code: int, out: str, min_cases: int) -> None:
    tail = out[-6000:]
    assert code == 0, tail
    assert "No issues found" in out, tail
    cases = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) generated", out)]
    assert cases and sum(cases) >= min_cases, tail
    print(f"\n{tail[-1200:]}")


def test_scoring_routes_unauthenticated(root, tmp_path):
    app = create_app(Settings(models={"a": str(root / "a"), "b": str(root / "b")}))
    with serve_in_thread(app) as url:
        code, out = schemathesis_run(url, cwd=tmp_path)
    assert_clean(code, out, 1000)


def test_scoring_routes_with_an_api_key(root, tmp_path):
    app = create_app(Settings(models={"a": str(root / "a"), "b": str(root / "b")}, api_key="score-secret"))
    with serve_in_thread(app) as url:
        code, out = schemathesis_run(url, "-H", "Authorization: Bearer score-secret", cwd=tmp_path)
    assert_clean(code, out, 1000)


def test_admin_routes_with_the_admin_token(root, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(root, models)
    settings = Settings(
        models={"a": str(models / "a"), "b": str(models / "b")},
        admin_token="admin-secret",
        model_roots=[str(models)],
    )
    with serve_in_thread(create_app(settings)) as url:
        code, out = schemathesis_run(
            url, "--include-tag", "admin", "-H", "Authorization: Bearer admin-secret", cwd=tmp_path
        )
    assert_clean(code, out, 200)
