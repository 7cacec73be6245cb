"""One way to configure every stage: its pydantic model is its flags, its YAML file and its environment.

Each stage (`serve`, `train`, `rm train|eval|compare`, `data prepare`, `eval`, `experiment`) has one typed
config model: `Field(description=...)` is the help, `Literal` the choices, `ge`/`gt` the ranges, nested models
the sections. :func:`command` turns such a model into a typer command, and :func:`load` builds a config with
the precedence

    defaults  <  --config FILE (YAML)  <  environment (PREFIX + FIELD, e.g. KARMA_TRAIN_KL_COEF)  <  flags

Flags are flat (`--kl-coef`, not `--ppo.kl-coef`), so field names are unique across a model's sections; the
file keeps the sections (`ppo: {kl_coef: 0.1}`). A field may rename its flags or add an environment variable
with a :class:`Cli` marker in its `Annotated` metadata. A wrong key, in any source, fails at load with the
field's dotted name and where the value came from.

Why not pydantic-settings' own CLI or tyro: both nest flags (`--ppo.kl-coef`), which would rename every flag
users already script against, and both print help outside the `karma` typer app; HfArgumentParser has no
environment layer. This module is ~250 lines over typer and pydantic, which the project already depends on.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field and where its value came from."""


@dataclass(frozen=True)
class Cli:
    """`Annotated` marker of a config field: its flag declarations and extra environment variables.

    `Cli("--model", "-m")` replaces the default `--field-name`; a bool's declaration may carry its negative
    (`"--drop-bots/--keep-bots"`). `env=("KARMA_REWARD_URL",)` adds variables read after `PREFIX + FIELD`.
    `hidden=True` keeps a field out of the flags (file and environment only)."""

    flags: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    hidden: bool = False

    def __init__(self, *flags: str, env: Sequence[str] = (), hidden: bool = False):
        object.__setattr__(self, "flags", tuple(flags))
        object.__setattr__(self, "env", tuple(env))
        object.__setattr__(self, "hidden", hidden)


@dataclass(frozen=True)
class Option:
    """One leaf field of a config model, as the command line and the environment see it."""

    path: tuple[str, ...]  # ("ppo", "kl_coef"); a top-level field has a path of length 1
    info: FieldInfo
    annotation: Any
    cli: Cli

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def section(self) -> str | None:
        return self.path[0] if len(self.path) > 1 else None

    def env_names(self, prefix: str) -> tuple[str, ...]:
        return (prefix + self.name.upper(), *self.cli.env)

    @property
    def flag(self) -> str:
        """The long flag users type (first declaration, without a negative)."""
        return (self.cli.flags[0] if self.cli.flags else "--" + self.name.replace("_", "-")).split("/")[0]

    @property
    def no_decode(self) -> bool:
        """The field parses its own string form (pydantic-settings' `NoDecode`): pass env text through."""
        return any(type(m).__name__ == "NoDecode" or m is _no_decode() for m in self.info.metadata)

    @property
    def kind(self) -> str:
        """scalar | bool | list | dict | secret: how a flag or an environment string becomes a value."""
        tp = _strip_optional(self.annotation)
        origin = typing.get_origin(tp)
        if tp is bool:
            return "bool"
        if origin in (list, tuple, set, frozenset, Sequence):
            return "list"
        if origin in (dict, Mapping):
            return "dict"
        return "secret" if tp is SecretStr else "scalar"


def _no_decode() -> Any:
    try:
        from pydantic_settings import NoDecode
    except ImportError:  # the GPU box has no pydantic-settings; nothing can be marked with it there
        return None
    return NoDecode


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _is_section(tp: Any) -> bool:
    tp = _strip_optional(tp)
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_model_union(tp: Any) -> bool:
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return len(args) > 1 and all(_is_section(a) for a in args)


def options(cls: type[BaseModel], *, sections: bool = True) -> list[Option]:
    """Every leaf field of `cls` in declaration order (sections flattened, or skipped when `sections=False`).
    Raises `TypeError` if two leaves share a name: flags are flat."""
    out: list[Option] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, info in model.model_fields.items():
            if _is_model_union(info.annotation):
                continue  # one of several section types (the experiment's data): the file's, not a flag
            if _is_section(info.annotation):
                if sections:
                    walk(_strip_optional(info.annotation), (*prefix, name))
                continue
            cli = next((m for m in info.metadata if isinstance(m, Cli)), Cli())
            out.append(Option((*prefix, name), info, info.annotation, cli))

    walk(cls, ())
    seen: dict[str, str] = {}
    for opt in out:
        if opt.name in seen:
            raise TypeError(f"{cls.__name__}: field {opt.name!r} is in {seen[opt.name]} and {opt.dotted}")
        seen[opt.name] = opt.dotted
    return out


# ------------------------------------------------------------------------------------------------ loading
def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file: one YAML mapping (sections as nested mappings)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of fields (and sections)")
    return data


def env_value(opt: Option, raw: str) -> Any:
    """An environment string as the field expects it: JSON for a list or mapping written as one, a comma-
    separated list otherwise; scalars stay text (pydantic converts them)."""
    text = raw.strip()
    if opt.no_decode:
        return raw
    if opt.kind in ("list", "dict") and text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{opt.dotted}: the environment value is not valid JSON: {exc}") from None
    if opt.kind == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    return raw


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {} if node is None else dict(node) if isinstance(node, Mapping) else node
        tree = node
    tree[path[-1]] = value


def load(
    cls: type[M],
    *,
    file: str | Path | Mapping[str, Any] | None = None,
    prefix: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    sections: bool = True,
) -> M:
    """`cls` from its defaults < `file` (a YAML path or an already-read mapping) < the environment
    (`prefix` + FIELD; no environment when `prefix` is None) < `flags` ({field name: value}; None = not given).
    Raises :class:`ConfigError` naming every bad field and its source."""
    data: dict[str, Any] = copy.deepcopy(dict(file)) if isinstance(file, Mapping) else {}
    if isinstance(file, str | Path):
        data = read_yaml(file)
    file_label = str(file) if isinstance(file, str | Path) else ""
    source: dict[tuple[str, ...], str] = {}
    opts = options(cls, sections=sections)
    environ = os.environ if environ is None else environ
    if prefix is not None:
        for opt in opts:
            for var in opt.env_names(prefix):
                if var in environ:
                    _put(data, opt.path, env_value(opt, environ[var]))
                    source[opt.path] = f"environment {var}"
                    break
    by_name = {opt.name: opt for opt in opts}
    for name, value in (flags or {}).items():
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        if name not in by_name:
            raise ConfigError(f"unknown option {name!r} for {cls.__name__}")
        _put(data, by_name[name].path, list(value) if isinstance(value, tuple) else value)
        source[by_name[name].path] = f"flag {by_name[name].flag}"
    try:
        return cls(**data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, source, file_label)) from None


def describe(
    exc: ValidationError, source: Mapping[tuple[str, ...], str] | None = None, file: str = ""
) -> str:
    """A pydantic error as one line per field: `ppo.kl_coef: must be >= 0 (from flag --kl-coef)`."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        where = (source or {}).get(loc) or (f"from {file}" if file and loc else "")
        where = where if where.startswith("from") or not where else f"from {where}"
        lines.append(f"{'.'.join(loc) or 'config'}: {msg}" + (f" ({where})" if where else ""))
    return "invalid config:\n  " + "\n  ".join(lines)


def to_yaml(cfg: BaseModel) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------------------ the CLI
_SCALARS = (str, int, float, Path)


def _cli_type(opt: Option) -> Any:
    """The python type of the typer option (typer shows a `Literal`'s values as the choices)."""
    tp = _strip_optional(opt.annotation)
    kind = opt.kind
    if kind == "bool":
        return bool
    if kind in ("list", "dict"):
        args = typing.get_args(tp)
        inner = _strip_optional(args[0]) if kind == "list" and args else str
        return list[inner if inner in _SCALARS else str]  # typer takes no list[Literal]
    if typing.get_origin(tp) is Literal and all(isinstance(v, str) for v in typing.get_args(tp)):
        return tp
    return tp if tp in _SCALARS else str


def _default_text(opt: Option) -> str:
    info = opt.info
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, SecretStr) or opt.kind == "secret":
        return "unset" if value is None else "set"
    if value is None or value == [] or value == {}:
        return "unset"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _parameter(opt: Option, prefix: str | None) -> inspect.Parameter:
    py_type = _cli_type(opt)
    decls = list(opt.cli.flags) or ["--" + opt.name.replace("_", "-")]
    if py_type is bool and not any("/" in d for d in decls):
        decls[0] = f"{decls[0]}/--no-{decls[0].removeprefix('--')}"
    env = f"; env {' or '.join(opt.env_names(prefix))}" if prefix is not None else ""
    # parentheses, not brackets: typer's rich help would read [..] as markup and drop it
    help_text = f"{opt.info.description or ''} (default: {_default_text(opt)}{env})".strip()
    kwargs: dict[str, Any] = {"help": help_text, "show_default": False, "hidden": opt.cli.hidden}
    if opt.section:
        kwargs["rich_help_panel"] = opt.section
    return parameter(opt.name, Annotated[py_type | None, typer.Option(*decls, **kwargs)])


def parameter(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    """A keyword-only command parameter (`command`'s `extra`, e.g. `--force`): `annotation` is
    `Annotated[type, typer.Option(...)]` (or `typer.Context`)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def command(
    cls: type[M],
    run: Callable[..., Any],
    *,
    prefix: str | None,
    help: str | None = None,
    sections: bool = True,
    config_help: str | None = None,
    extra: Sequence[inspect.Parameter] = (),
    build: Callable[[type[M], dict[str, Any], dict[str, Any]], M] | None = None,
) -> Callable[..., Any]:
    """A typer command whose options are `cls`'s fields, plus `--config FILE` and `--print-config`.

    `run(cfg, **extra_values)` gets the loaded config. `extra` are further typer parameters that are not
    config (e.g. `--force`); `build(cls, flags, extra_values)` may replace the default
    `load(cls, file=--config, prefix=prefix, flags=flags)` (the experiment's presets use it)."""
    opts = options(cls, sections=sections)
    config_option = typer.Option(
        "--config", "-c", help=config_help or "YAML file of these options (flags and environment override it)"
    )
    params = [
        parameter("config", Annotated[Path | None, config_option]),
        parameter(
            "print_config",
            Annotated[
                bool, typer.Option("--print-config", help="print the resolved config as YAML and exit")
            ],
            default=False,
        ),
        *extra,
        *(_parameter(opt, prefix) for opt in opts),
    ]
    extra_names = [p.name for p in extra]

    def cmd(**kwargs: Any) -> Any:
        file = kwargs.pop("config")
        show = kwargs.pop("print_config")
        extra_values = {name: kwargs.pop(name) for name in extra_names}
        try:
            if build is not None:
                cfg = build(cls, kwargs, {"config": file, **extra_values})
            else:
                cfg = load(cls, file=file, prefix=prefix, flags=kwargs, sections=sections)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
        if show:
            typer.echo(to_yaml(cfg), nl=False)
            return None
        return run(cfg, **extra_values)

    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    cmd.__doc__ = help or cls.__doc__
    cmd.__name__ = getattr(run, "__name__", "command")
    return cmd
