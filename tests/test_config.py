"""karma.config: one typed model per stage becomes its flags, its YAML file and its environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode
from typer.testing import CliRunner

from karma.config import Cli, ConfigError, command, load, options
from tests.support import cli_text


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate: float = Field(0.1, gt=0, description="a rate")
    mode: Literal["fast", "slow"] = Field("fast", description="how")
    tags: list[str] = Field(default_factory=list, description="tags")


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Cli("--name", "-n", env=("LEGACY_NAME",))] = Field("x", description="a name")
    steps: int = Field(3, ge=1, description="steps")
    keep: Annotated[bool, Cli("--keep/--drop")] = Field(True, description="keep it")
    verbose: bool = Field(False, description="talk")
    spec: Annotated[list[str], NoDecode] = Field(default_factory=list, description="own format: a;b")
    inner: Inner = Field(default_factory=Inner)

    @field_validator("spec", mode="before")
    @classmethod
    def _own_format(cls, value):
        return value.split(";") if isinstance(value, str) else value


def test_each_source_overrides_the_one_before(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\nname: file\ninner: {rate: 0.5, mode: slow}\n")
    env = {"K_STEPS": "6", "K_RATE": "0.7", "K_TAGS": "a, b", "K_SPEC": "x=1,y=2"}
    cfg = load(Outer, file=f, prefix="K_", environ=env, flags={"steps": 9, "verbose": None, "tags": []})
    assert (cfg.name, cfg.steps, cfg.inner.rate, cfg.inner.mode) == ("file", 9, 0.7, "slow")
    assert cfg.inner.tags == ["a", "b"]  # an environment list: comma-separated (or JSON)
    assert cfg.spec == ["x=1,y=2"]  # NoDecode: the field's own parser gets the text
    assert load(Outer, prefix="K_", environ={"K_TAGS": '["c", "d"]'}).inner.tags == ["c", "d"]
    assert load(Outer, prefix="K_", environ={"LEGACY_NAME": "old"}).name == "old"  # an extra variable
    assert load(Outer, prefix="K_", environ={"K_NAME": "new", "LEGACY_NAME": "old"}).name == "new"
    assert load(Outer, environ={"K_STEPS": "6"}).steps == 3  # no prefix: no environment


def test_errors_name_the_field_and_where_its_value_came_from(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner: {rat: 1}\nsteps: 0\n")
    with pytest.raises(ConfigError) as err:
        load(Outer, file=f, prefix="K_", environ={"K_RATE": "-1"}, flags={"name": "ok"})
    assert str(err.value).splitlines() == [
        "invalid config:",
        f"  steps: Input should be greater than or equal to 1 (from {f})",
        "  inner.rate: Input should be greater than 0 (from environment K_RATE)",
        f"  inner.rat: unknown key (from {f})",
    ]
    with pytest.raises(
        ConfigError, match="inner.mode: Input should be 'fast' or 'slow' \\(from flag --mode\\)"
    ):
        load(Outer, flags={"mode": "medium"})
    with pytest.raises(ConfigError, match="unknown option 'stepz' for Outer"):
        load(Outer, flags={"stepz": 1})
    with pytest.raises(ConfigError, match="config file not found"):
        load(Outer, file=tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="a config file must be a mapping"):
        load(Outer, file=tmp_path / "list.yaml")


def test_flags_are_flat_and_names_unique():
    assert [o.flag for o in options(Outer)] == [
        "--name",
        "--steps",
        "--keep",
        "--verbose",
        "--spec",
        "--rate",
        "--mode",
        "--tags",
    ]

    class Clash(BaseModel):
        steps: int = 1
        inner: Inner = Field(default_factory=Inner)
        other: Inner = Field(default_factory=Inner)

    with pytest.raises(TypeError, match="Clash: field 'rate' is in inner.rate and other.rate"):
        options(Clash)


def test_the_generated_command(tmp_path):
    seen: list[Outer] = []
    app = typer.Typer()
    app.command("go")(command(Outer, seen.append, prefix="K_"))
    app.command("other")(lambda: None)
    runner = CliRunner()

    res = runner.invoke(
        app,
        ["go", "-n", "cli", "--drop", "--verbose", "--tags", "a", "--tags", "b", "--mode", "slow"],
        env={"K_STEPS": "4"},
    )
    assert res.exit_code == 0, res.output
    assert seen[-1].model_dump() == {
        "name": "cli",
        "steps": 4,
        "keep": False,
        "verbose": True,
        "spec": [],
        "inner": {"rate": 0.1, "mode": "slow", "tags": ["a", "b"]},
    }
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\n")
    res = runner.invoke(app, ["go", "--config", str(f), "--print-config", "--rate", "0.2"])
    assert res.exit_code == 0 and len(seen) == 1  # printed, not run
    assert yaml.safe_load(res.output)["steps"] == 7 and yaml.safe_load(res.output)["inner"]["rate"] == 0.2
    res = runner.invoke(app, ["go", "--mode", "medium"])
    assert res.exit_code == 2 and "'medium' is not one of 'fast', 'slow'" in cli_text(res.output)
    res = runner.invoke(app, ["go", "--steps", "0"])
    assert res.exit_code == 2
    assert "steps: Input should be greater than or equal to 1 (from flag --steps)" in cli_text(res.output)
    res = runner.invoke(app, ["go", "--help"], env={"COLUMNS": "200"})
    text = cli_text(res.output)
    assert "a rate (default: 0.1; env K_RATE)" in text and "--keep --drop" in text
    assert "a name (default: x; env K_NAME or LEGACY_NAME)" in text


def test_every_stage_reads_its_defaults_from_its_config_type():
    """`karma <stage> --help` comes from the stage's type: each command's options are that type's fields."""
    from karma.cli import app
    from karma.data.prepare import PrepareConfig
    from karma.eval.run import PolicyEvalConfig
    from karma.experiment.config import ExperimentConfig
    from karma.rm.cli import RMCompareJob, RMEvalJob, RMTrainJob
    from services.policy_trainer.config import TrainConfig
    from services.reward_api.core.config import Settings

    root = typer.main.get_command(app)
    ctx = root.context_class(root)
    stages = {
        ("serve",): (Settings, True),
        ("train",): (TrainConfig, True),
        ("rm", "train"): (RMTrainJob, True),
        ("rm", "eval"): (RMEvalJob, True),
        ("rm", "compare"): (RMCompareJob, True),
        ("data", "prepare"): (PrepareConfig, True),
        ("eval",): (PolicyEvalConfig, True),
        ("experiment",): (ExperimentConfig, False),
    }
    for path, (cls, sections) in stages.items():
        cmd = _resolve(root, ctx, path)
        flags = {opt for p in cmd.params for opt in p.opts}
        for opt in options(cls, sections=sections):
            if not opt.cli.hidden:
                assert opt.flag in flags, (path, opt.name)
        assert {"--config", "--print-config"} <= flags, path


def _resolve(root, ctx, path):
    cmd = root
    for part in path:
        cmd = cmd.get_command(ctx, part)  # a group (rm, data, eval) holds the command
    return cmd


def test_python_dash_m_karma_runs_the_cli():
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "karma", "train", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and "--kl-coef" in res.stdout


def test_config_types_take_paths(tmp_path):
    """Paths from a file arrive as text, from code as `Path`: both load."""

    class P(BaseModel):
        out: Path = Path("x")

    assert load(P, file={"out": str(tmp_path)}).out == tmp_path
    assert load(P, flags={"out": tmp_path}).out == tmp_path


def test_config_reference_is_current():
    """docs/config.md is generated from the command line; a changed field must regenerate it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"],
        cwd=root,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
