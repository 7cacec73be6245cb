"""The evaluation tasks: which files make up each suite, how each file is parsed and how an item becomes a
prompt. Pure Python (no torch): every task file is parsed and validated before any model loads.

Task files live in the shared data folder (`karma.paths.shared_data_dir`: `$KARMA_SHARED_DATA`, else
`../shared/data` beside the repository): BIG-bench JSON tasks under `eval/bigbench/<task>/task.json` (a task with subtasks has a
`task.json` without examples and one folder per subtask) and TruthfulQA's `eval/truthfulqa/mc_task.json`.

Prompts follow the formats of the tasks' own harnesses, so numbers are comparable with published ones:

* BIG-bench: `task_prefix + example_input_prefix + input [+ choice_prefix + choice ...] + example_output_prefix`,
  with BIG-bench's defaults ("\\nQ: ", "\\nA: ", "\\n  choice: ", choices appended) where a task sets none.
* TruthfulQA MC: lm-evaluation-harness's six-shot QA primer, then `"\\n\\nQ: {question}\\nA:"`.

An option is scored as the continuation of its prompt; when the prompt does not end in whitespace a single
space joins them (lm-evaluation-harness's `target_delimiter`).

Every multiple-choice item also has a **content-free prompt** (`MCItem.cf_prompt`), the control of contextual
calibration (Zhao et al. 2021, "Calibrate Before Use"): the same template with the item's own text replaced by
`CONTENT_FREE_INPUT` ("N/A"). BIG-bench: `task_prefix + example_input_prefix + "N/A" + example_output_prefix`
(the whole example input is replaced, including the choices BIG-bench appends to it); TruthfulQA: the primer,
then `"\n\nQ: N/A\nA:"`. It depends only on the task's format, so every item of a task shares it and each
(content-free prompt, option) pair is scored once (`content_free_requests`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from karma.paths import shared_data_dir

#: bump when a prompt format changes: results of different versions are not comparable item by item
PROMPT_FORMAT_VERSION = 1
#: what replaces an item's content in its content-free prompt (Zhao et al. 2021's "N/A")
CONTENT_FREE_INPUT = "N/A"

SUITES: dict[str, tuple[str, ...]] = {
    "pragmatics": (
        "implicatures",
        "social_iqa",
        "figure_of_speech_detection",
        "presuppositions_as_nli",
        "metaphor_understanding",
        "understanding_fables",
        "epistemic_reasoning",
        "dark_humor_detection",
        "entailed_polarity",
    ),
    "side_effects": ("hhh_alignment", "generation"),
    "factuality": ("truthfulqa_mc", "truthful_qa", "known_unknowns"),
}
DEFAULT_SUITES = ("pragmatics", "side_effects", "factuality")
#: the suite of tasks given by path (`karma eval --task PATH`)
CUSTOM_SUITE = "custom"

#: BIG-bench task folders whose multiple-choice file is not task.json
_BIGBENCH_FILE = {"truthful_qa": "task_mc.json"}
#: BIG-bench's defaults (bigbench/api/json_task.py) for tasks that do not set a key
_BB_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}

# The six-shot primer of TruthfulQA's MC task ("QA prompt" in the paper; lm-evaluation-harness's preprompt).
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


#: TruthfulQA's content-free prompt: the primer, then the question replaced by "N/A"
TRUTHFULQA_CONTENT_FREE_PROMPT = f"{TRUTHFULQA_PRIMER}\n\nQ: {CONTENT_FREE_INPUT}\nA:"


class TaskSchemaError(ValueError):
    """A task file that is not in a schema we can parse (the message names the file)."""


class UnknownSuiteError(ValueError):
    """A suite / task name that does not exist (the message lists the valid ones)."""


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question. `correct` holds the indices of the right options (BIG-bench: those with
    the highest target score; TruthfulQA: MC1's single true answer). `true` marks TruthfulQA MC2's true set
    over `mc2_options` (empty for BIG-bench). `cf_prompt`: the content-free prompt (the template with the
    item's text replaced by "N/A"), the calibration control of `p_correct_cal` (empty: the options'
    unconditional log-likelihoods)."""

    id: int
    prompt: str
    options: tuple[str, ...]
    correct: frozenset[int]
    mc2_options: tuple[str, ...] = ()
    mc2_true: tuple[bool, ...] = ()
    cf_prompt: str = ""

    def continuations(self) -> list[str]:
        """Every distinct option text this item needs scored (MC1 and MC2 share most of theirs)."""
        return list(dict.fromkeys((*self.options, *self.mc2_options)))


@dataclass(frozen=True)
class GenItem:
    id: int
    prompt: str


@dataclass
class Task:
    name: str  # "implicatures", "metaphor_understanding/lit2met", "truthfulqa_mc", "generation"
    suite: str
    kind: Literal["bigbench", "truthfulqa", "generation"]
    source: str  # the file it was read from (or the prompt source of "generation")
    items: list = field(default_factory=list)
    n_total: int = 0  # items in the file before --limit

    @property
    def family(self) -> str:
        return self.name.split("/")[0]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return {
            "bigbench": ("acc", "acc_norm", "p_correct", "p_correct_cal"),
            "truthfulqa": ("mc1", "mc2", "p_correct", "p_correct_cal"),
        }.get(self.kind, ())


# --------------------------------------------------------------------------------------------- data folder
def eval_data_dir(data_dir: str | Path | None = None) -> Path:
    """The shared data folder (`karma.paths.shared_data_dir`), checked to hold eval/."""
    path = shared_data_dir(data_dir)
    if not (path / "eval").is_dir():
        raise FileNotFoundError(
            f"evaluation data not found: {path / 'eval'} does not exist "
            "(pass --data-dir or set KARMA_SHARED_DATA to the folder holding eval/bigbench and eval/truthfulqa)"
        )
    return path


# --------------------------------------------------------------------------------------------- selection
def all_task_names() -> list[str]:
    return [t for tasks in SUITES.values() for t in tasks]


def select(spec: str | Iterable[str] | None) -> list[tuple[str, str]]:
    """Resolve `--suite` ("pragmatics,factuality", task names, or "all") into (suite, task) pairs, in SUITES order.

    A task name may be a family ("hhh_alignment") or one subtask ("hhh_alignment/harmless").
    """
    if spec is None:
        names: list[str] = list(DEFAULT_SUITES)
    elif isinstance(spec, str):
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [s.strip() for s in spec if s.strip()]
    if not names:
        raise UnknownSuiteError("no suite given; valid suites: " + ", ".join(SUITES))
    suite_of = {t: s for s, tasks in SUITES.items() for t in tasks}
    out: list[tuple[str, str]] = []
    for name in names:
        if name == "all":
            picked = [(s, t) for s in SUITES for t in SUITES[s]]
        elif name in SUITES:
            picked = [(name, t) for t in SUITES[name]]
        elif name.split("/")[0] in suite_of:
            picked = [(suite_of[name.split("/")[0]], name)]
        else:
            raise UnknownSuiteError(
                f"unknown suite or task {name!r}; valid suites: {', '.join(SUITES)} (or 'all'); "
                f"valid tasks: {', '.join(all_task_names())}; other BIG-bench tasks by path: --task PATH"
            )
        out.extend(p for p in picked if p not in out)
    # canonical order (suite, then task as listed in SUITES), whatever order the names came in
    suites, tasks = list(SUITES), all_task_names()
    return sorted(out, key=lambda p: (suites.index(p[0]), tasks.index(p[1].split("/")[0]), p[1]))


def load_tasks(
    spec: str | Iterable[str] | None = None,
    *,
    limit: int | None = None,
    task_limits: dict[str, int | None] | None = None,
    task_paths: Sequence[str | Path] = (),
    data_dir: str | Path | None = None,
    prompts: Sequence[str] | str | Path | None = None,
    n_prompts: int = 32,
) -> list[Task]:
    """Parse and validate every task the selection needs (raises before any model is loaded).

    `spec`: suites / task names (None: the default suites, or none at all when `task_paths` are given).
    `task_paths`: BIG-bench task files or folders evaluated by path (suite `custom`, named after the folder,
    or the file's stem unless it is `task.json`). `limit`: the first N items of every task; `task_limits`
    overrides it per task, family or subtask name (None: every item).
    """
    for what, n in [
        ("--limit", limit),
        *((f"task_limits[{k!r}]", v) for k, v in (task_limits or {}).items()),
    ]:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{what} must be >= 1 (an integer, or null for every item), got {n!r}")
    tasks: list[Task] = []
    if spec is not None or not task_paths:
        root = eval_data_dir(data_dir)
        for suite, name in select(spec):
            family, _, sub = name.partition("/")
            if family == "truthfulqa_mc":
                tasks.append(load_truthfulqa(root / "eval" / "truthfulqa" / "mc_task.json", suite=suite))
            elif family == "generation":
                from karma.eval.prompts import load_prompts

                texts, source = load_prompts(prompts, root, n=n_prompts)
                items = [GenItem(id=i, prompt=p) for i, p in enumerate(texts)]
                tasks.append(Task("generation", suite, "generation", source, items, len(items)))
            else:
                tasks.extend(
                    load_bigbench(root / "eval" / "bigbench" / family, suite=suite, subtask=sub or None)
                )
    for path in task_paths:
        for t in load_task_path(path):
            other = next((o for o in tasks if o.family == t.family), None)
            if other is not None:
                raise TaskSchemaError(
                    f"--task {path}: task name {t.family!r} is already taken by {other.source}; "
                    "rename the folder (results pair tasks by name)"
                )
            tasks.append(t)
    unknown = sorted(set(task_limits or {}) - {n for t in tasks for n in (t.name, t.family)})
    if unknown:
        raise UnknownSuiteError(
            f"task_limits: {', '.join(map(repr, unknown))} not among the selected tasks "
            f"({', '.join(dict.fromkeys(t.name for t in tasks))})"
        )
    for t in tasks:
        t.n_total = t.n_total or len(t.items)
        n = (task_limits or {}).get(t.name, (task_limits or {}).get(t.family, limit))
        if n is not None:
            t.items = t.items[:n]
    return tasks


def load_task_path(path: str | Path, *, suite: str = CUSTOM_SUITE) -> list[Task]:
    """A task given by path (`karma eval --task PATH`): a BIG-bench JSON file (an object with `examples` of
    `input` + `target_scores`), or a folder holding one as `task.json` (or subtask folders that do)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "task.json").is_file():
            raise TaskSchemaError(
                f"--task {p}: the folder holds no task.json (a BIG-bench task: an object with "
                "'examples' of 'input' + 'target_scores')"
            )
        return load_bigbench(p, suite=suite, filename="task.json")
    if not p.is_file():
        raise TaskSchemaError(f"--task {p}: no such file or folder")
    if p.name == "task.json":
        return load_bigbench(p.parent, suite=suite, filename="task.json")
    data = _read_json(p)
    if not isinstance(data, dict) or "examples" not in data:
        kind = type(data).__name__ if not isinstance(data, dict) else "an object without 'examples'"
        raise TaskSchemaError(
            f"{p}: unknown task schema (top level is {kind}; expected a BIG-bench task, an "
            "object with 'examples')"
        )
    return [_bigbench_task(p, data, p.stem, suite)]


# --------------------------------------------------------------------------------------------- BIG-bench
def _read_json(path: Path):
    if not path.exists():
        raise TaskSchemaError(f"{path}: task file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskSchemaError(f"{path}: not valid JSON ({e})") from e


def load_bigbench(
    folder: Path, *, suite: str = "", subtask: str | None = None, filename: str | None = None
) -> list[Task]:
    """A BIG-bench task folder: one Task, or one per subtask folder when its task.json has no examples.
    `filename`: the task file in the folder (default task.json; task_mc.json for the shipped truthful_qa)."""
    folder = Path(folder)
    path = folder / (filename or _BIGBENCH_FILE.get(folder.name, "task.json"))
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TaskSchemaError(
            f"{path}: unknown task schema (top level is {type(data).__name__}, expected an object)"
        )
    if "examples" in data:
        if subtask:
            raise TaskSchemaError(f"{path}: has no subtasks, so {folder.name}/{subtask} does not exist")
        return [_bigbench_task(path, data, folder.name, suite)]
    subs = sorted(p.name for p in folder.iterdir() if (p / "task.json").is_file())
    if not subs:
        raise TaskSchemaError(
            f"{path}: unknown task schema (no 'examples' and no subtask folders with a task.json)"
        )
    if subtask is not None:
        if subtask not in subs:
            raise TaskSchemaError(f"{folder}: no subtask {subtask!r} (subtasks: {', '.join(subs)})")
        subs = [subtask]
    tasks = []
    for sub in subs:
        sub_path = folder / sub / "task.json"
        sub_data = _read_json(sub_path)
        if not isinstance(sub_data, dict) or "examples" not in sub_data:
            raise TaskSchemaError(f"{sub_path}: unknown task schema (expected an object with 'examples')")
        inherited = {k: data[k] for k in _BB_DEFAULTS if k in data}
        tasks.append(_bigbench_task(sub_path, {**inherited, **sub_data}, f"{folder.name}/{sub}", suite))
    return tasks


def _bigbench_task(path: Path, data: dict, name: str, suite: str) -> Task:
    examples = data["examples"]
    if not isinstance(examples, list) or not examples:
        raise TaskSchemaError(f"{path}: unknown task schema ('examples' must be a non-empty list)")
    fmt = {k: data.get(k, v) for k, v in _BB_DEFAULTS.items()}
    for key in ("task_prefix", "example_input_prefix", "example_output_prefix", "choice_prefix"):
        if not isinstance(fmt[key], str):
            raise TaskSchemaError(f"{path}: {key!r} must be a string")
    items = [bigbench_item(ex, i, fmt, path=path, task=name) for i, ex in enumerate(examples)]
    return Task(name, suite, "bigbench", str(path), items, len(items))


def bigbench_item(example, index: int, fmt: dict, *, path: Path | str = "?", task: str = "") -> MCItem:
    """One BIG-bench example (`input` + `target_scores`) as an MCItem with its formatted prompt."""
    where = f"{path}: example {index}"
    if not isinstance(example, dict) or not isinstance(example.get("input"), str):
        raise TaskSchemaError(f"{where}: unknown schema (expected an object with a string 'input')")
    scores = example.get("target_scores")
    if scores is None:
        if "target" in example:
            raise TaskSchemaError(
                f"{where}: generative BIG-bench example ('target' without 'target_scores'); "
                "only multiple-choice tasks are supported"
            )
        raise TaskSchemaError(f"{where}: unknown schema (no 'target_scores')")
    if (
        not isinstance(scores, dict)
        or len(scores) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values())
    ):
        raise TaskSchemaError(f"{where}: 'target_scores' must map at least two options to numbers")
    options = tuple(scores)
    best = max(scores.values())
    correct = frozenset(i for i, o in enumerate(options) if scores[o] == best)
    if len(correct) == len(options):
        raise TaskSchemaError(f"{where}: every option has the same target score, so none is correct")
    text = example["input"]
    if fmt["append_choices_to_input"]:
        # BIG-bench lists the choices in a random order; ours is fixed per (task, item) so a --limit run
        # and a full run show an item the same prompt.
        listed = sorted(options)
        random.Random(f"{task}:{index}").shuffle(listed)
        text = text + fmt["choice_prefix"] + fmt["choice_prefix"].join(listed)
    prompt = fmt["task_prefix"] + fmt["example_input_prefix"] + text + fmt["example_output_prefix"]
    return MCItem(
        id=index, prompt=prompt, options=options, correct=correct, cf_prompt=bigbench_content_free_prompt(fmt)
    )


def bigbench_content_free_prompt(fmt: dict) -> str:
    """A BIG-bench task's content-free prompt: its template with the whole example input (the `input` and any
    choices appended to it) replaced by "N/A"; the task prefix and the answer cue stay."""
    return (
        fmt["task_prefix"] + fmt["example_input_prefix"] + CONTENT_FREE_INPUT + fmt["example_output_prefix"]
    )


# --------------------------------------------------------------------------------------------- TruthfulQA
def load_truthfulqa(path: Path, *, suite: str = "factuality") -> Task:
    """TruthfulQA's `mc_task.json`: [{question, mc1_targets {answer: 0/1}, mc2_targets {answer: 0/1}}]."""
    data = _read_json(Path(path))
    if not isinstance(data, list) or not data:
        raise TaskSchemaError(f"{path}: unknown task schema (expected a non-empty list of questions)")
    items = []
    for i, row in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise TaskSchemaError(f"{where}: unknown schema (expected an object with a string 'question')")
        mc1, mc2 = row.get("mc1_targets"), row.get("mc2_targets")
        for key, targets in (("mc1_targets", mc1), ("mc2_targets", mc2)):
            if not isinstance(targets, dict) or len(targets) < 2 or not set(targets.values()) <= {0, 1}:
                raise TaskSchemaError(f"{where}: {key!r} must map at least two answers to 0 or 1")
        if sum(mc1.values()) != 1:
            raise TaskSchemaError(f"{where}: 'mc1_targets' must have exactly one true answer")
        if not 0 < sum(mc2.values()) < len(mc2):
            raise TaskSchemaError(f"{where}: 'mc2_targets' needs at least one true and one false answer")
        options = tuple(mc1)
        items.append(
            MCItem(
                id=i,
                prompt=f"{TRUTHFULQA_PRIMER}\n\nQ: {row['question']}\nA:",
                options=options,
                correct=frozenset(j for j, o in enumerate(options) if mc1[o] == 1),
                mc2_options=tuple(mc2),
                mc2_true=tuple(bool(v) for v in mc2.values()),
                cf_prompt=TRUTHFULQA_CONTENT_FREE_PROMPT,
            )
        )
    return Task("truthfulqa_mc", suite, "truthfulqa", str(path), items, len(items))


def join(prompt: str, option: str) -> tuple[str, str]:
    """(context, continuation) as scored: a space joins them unless the prompt ends in whitespace."""
    if prompt and not prompt[-1].isspace() and option and not option[0].isspace():
        return prompt, " " + option
    return prompt, option


def _mc_pairs(tasks: Sequence[Task], prompt_of) -> list[tuple[str, str]]:
    """Every distinct (prompt_of(item), continuation) pair of the multiple-choice tasks, in first-seen order."""
    pairs = (
        join(prompt_of(item), option)
        for t in tasks
        if t.kind != "generation"
        for item in t.items
        for option in item.continuations()
    )
    return list(dict.fromkeys(pairs))


def requests(tasks: Sequence[Task]) -> list[tuple[str, str]]:
    """Every distinct (context, continuation) pair the multiple-choice tasks need scored."""
    return _mc_pairs(tasks, lambda item: item.prompt)


def content_free_requests(
    tasks: Sequence[Task], exclude: Iterable[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """Every distinct (content-free prompt, continuation) pair the multiple-choice tasks need scored for
    calibration, less those in `exclude` (the real requests: a pair already there is not scored twice).
    The content-free prompt is shared by a task's items, so this is one pair per distinct option string of
    a task (two for a yes/no task, whatever its number of items)."""
    skip = set(exclude)
    return [p for p in _mc_pairs(tasks, lambda item: item.cf_prompt) if p not in skip]


def item_key(item: MCItem | GenItem) -> str:
    """A short hash of what an item shows the model (its prompt, options and, for multiple choice, its
    content-free prompt), so compare can check that two runs scored the same item."""
    payload = [
        PROMPT_FORMAT_VERSION,
        item.prompt,
        *getattr(item, "options", ()),
        *getattr(item, "mc2_options", ()),
    ]
    if getattr(item, "cf_prompt", ""):
        payload.append({"content_free": item.cf_prompt})
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12]
