"""Task parsing for `karma eval`: every shipped BIG-bench / TruthfulQA file (counts from shared/data/SOURCES.md),
the prompt formats, suite selection, schema errors naming the file, and the held-out generation prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from karma.eval import tasks as T
from karma.eval.prompts import is_heldout, load_prompts, politeness_heldout
from karma.paths import shared_data_dir

DATA = shared_data_dir()
BB = DATA / "eval" / "bigbench"

# example counts as listed in shared/data/SOURCES.md
SOURCES_COUNTS = {
    "implicatures": 492,
    "social_iqa": 1954,
    "hhh_alignment/harmless": 58,
    "hhh_alignment/helpful": 59,
    "hhh_alignment/honest": 61,
    "hhh_alignment/other": 43,
    "figure_of_speech_detection": 59,
    "presuppositions_as_nli": 735,
    "metaphor_understanding/lit2met": 117,
    "metaphor_understanding/met2lit": 117,
    "understanding_fables": 189,
    "epistemic_reasoning": 2000,
    "dark_humor_detection": 80,
    "entailed_polarity": 149,
    "known_unknowns": 46,
    "truthful_qa": 299,
    "social_support": 897,
}


@pytest.mark.parametrize("family", sorted({n.split("/")[0] for n in SOURCES_COUNTS}))
def test_every_shipped_bigbench_task_parses_with_the_published_counts(family):
    tasks = T.load_bigbench(BB / family)
    expected = {n: c for n, c in SOURCES_COUNTS.items() if n.split("/")[0] == family}
    assert {t.name: len(t.items) for t in tasks} == expected
    for t in tasks:
        assert t.kind == "bigbench" and t.metric_names == ("acc", "acc_norm", "p_correct", "p_correct_cal")
        for item in t.items:
            assert len(item.options) >= 2 and len(item.correct) == 1
            assert len(set(item.options)) == len(item.options)
            assert item.prompt and item.prompt.endswith(("\nA: ", "\nAssistant:", ": ", "? ", "\n"))


def test_truthfulqa_mc_task_parses():
    task = T.load_truthfulqa(DATA / "eval" / "truthfulqa" / "mc_task.json")
    assert len(task.items) == 817 and task.metric_names == ("mc1", "mc2", "p_correct", "p_correct_cal")
    first = task.items[0]
    assert first.prompt.startswith("Q: What is human life expectancy in the United States?")
    assert first.prompt.endswith("\n\nQ: What happens if you eat a pomegranate?\nA:")
    assert first.correct == frozenset({0}) and len(first.options) == 4
    assert first.mc2_true == (True, True, True, False, False, False)
    assert all(len(it.correct) == 1 and 0 < sum(it.mc2_true) < len(it.mc2_true) for it in task.items)


def test_bigbench_prompt_formats():
    (imp,) = T.load_bigbench(BB / "implicatures")
    assert imp.items[0].prompt == (
        "Does Speaker 2's answer mean yes or no? \n\nQ: Speaker 1: 'But aren't you afraid?' "
        "Speaker 2: 'Ma'am, sharks never attack anybody.' \nA: "
    )
    assert imp.items[0].options == ("yes", "no") and imp.items[0].correct == frozenset({1})
    # social_iqa sets no prefixes: BIG-bench defaults, choices appended in a fixed shuffled order
    (siqa,) = T.load_bigbench(BB / "social_iqa")
    p = siqa.items[0].prompt
    assert p.startswith("\nQ: Tracy didn't go home that evening") and p.endswith("\nA: ")
    listed = p.removesuffix("\nA: ").split("\n  choice: ")[1:]
    assert sorted(listed) == sorted(siqa.items[0].options) and listed != list(siqa.items[0].options)
    assert T.load_bigbench(BB / "social_iqa")[0].items[0].prompt == p  # deterministic
    # subtasks inherit the parent's format keys
    harmless = T.load_bigbench(BB / "hhh_alignment", subtask="harmless")[0]
    assert harmless.items[0].prompt.startswith("\nHuman: Can you tell me") and harmless.items[
        0
    ].prompt.endswith("\nAssistant:")


def test_join_adds_a_space_only_where_needed():
    assert T.join("Q: x\nA:", "yes") == ("Q: x\nA:", " yes")
    assert T.join("Q: x\nA: ", "yes") == ("Q: x\nA: ", "yes")
    assert T.join("Assistant:", "\nDear Sir") == ("Assistant:", "\nDear Sir")


def test_requests_are_deduplicated_across_mc1_and_mc2():
    task = T.load_truthfulqa(DATA / "eval" / "truthfulqa" / "mc_task.json")
    task.items = task.items[:3]
    expected = sum(len(set(it.options) | set(it.mc2_options)) for it in task.items)
    reqs = T.requests([task])
    assert len(reqs) == expected and len(set(reqs)) == len(reqs)
    assert all(c.startswith(" ") for _, c in reqs)


# ------------------------------------------------------------------------------------ selection
def test_select_suites_tasks_and_subtasks():
    assert [t for _, t in T.select("factuality")] == ["truthfulqa_mc", "truthful_qa", "known_unknowns"]
    assert T.select("known_unknowns,hhh_alignment/honest,implicatures,implicatures") == [
        ("pragmatics", "implicatures"),
        ("side_effects", "hhh_alignment/honest"),
        ("factuality", "known_unknowns"),
    ]
    assert len(T.select("all")) == sum(len(v) for v in T.SUITES.values())
    assert list(dict.fromkeys(s for s, _ in T.select(None))) == list(T.DEFAULT_SUITES)


def test_unknown_suite_lists_the_valid_ones():
    with pytest.raises(
        T.UnknownSuiteError,
        match=r"unknown suite or task 'pragmatic'; valid suites: pragmatics, "
        r"side_effects, factuality \(or 'all'\); valid tasks: implicatures, social_iqa",
    ):
        T.select("pragmatic,factuality")
    with pytest.raises(T.UnknownSuiteError, match=r"; other BIG-bench tasks by path: --task PATH$"):
        T.select("snarks")
    with pytest.raises(T.UnknownSuiteError, match="valid suites"):
        T.select(" , ")


def test_limit_takes_the_first_items_of_each_subtask():
    tasks = T.load_tasks("metaphor_understanding,truthfulqa_mc", limit=3, data_dir=DATA)
    assert [(t.name, [it.id for it in t.items], t.n_total) for t in tasks] == [
        ("metaphor_understanding/lit2met", [0, 1, 2], 117),
        ("metaphor_understanding/met2lit", [0, 1, 2], 117),
        ("truthfulqa_mc", [0, 1, 2], 817),
    ]
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        T.load_tasks("implicatures", limit=0, data_dir=DATA)


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"evaluation data not found: {tmp_path / 'eval'}"):
        T.load_tasks("implicatures", data_dir=tmp_path)


# ------------------------------------------------------------------------------------ schema errors
def _write(folder: Path, obj, name: str = "task.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "unknown task schema \\(top level is list"),
        ({"name": "x"}, "unknown task schema \\(no 'examples' and no subtask folders"),
        ({"examples": []}, "'examples' must be a non-empty list"),
        ({"examples": [{"input": "q", "target": "a"}]}, "example 0: generative BIG-bench example"),
        (
            {"examples": [{"question": "q"}]},
            "example 0: unknown schema \\(expected an object with a string 'input'",
        ),
        ({"examples": [{"input": "q", "target_scores": {"a": 1}}]}, "at least two options to numbers"),
        ({"examples": [{"input": "q", "target_scores": {"a": "yes", "b": 0}}]}, "at least two options"),
        ({"examples": [{"input": "q", "target_scores": {"a": 1, "b": 1}}]}, "same target score"),
        (
            {"task_prefix": 3, "examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}]},
            "'task_prefix' must",
        ),
    ],
)
def test_bigbench_schema_errors_name_the_file(tmp_path, content, message):
    path = _write(tmp_path / "weird_task", content)
    with pytest.raises(T.TaskSchemaError, match=f"^{path}: .*{message}|^{path}: {message}"):
        T.load_bigbench(tmp_path / "weird_task")


def test_bad_subtask_file_is_named(tmp_path):
    _write(tmp_path / "fam", {"name": "fam"})
    _write(tmp_path / "fam" / "good", {"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}]})
    bad = _write(tmp_path / "fam" / "bad", {"examples": [{"input": "q", "target": "x"}]})
    with pytest.raises(T.TaskSchemaError, match=f"^{bad}: example 0: generative"):
        T.load_bigbench(tmp_path / "fam")
    assert [t.name for t in T.load_bigbench(tmp_path / "fam", subtask="good")] == ["fam/good"]
    with pytest.raises(T.TaskSchemaError, match="no subtask 'nope' \\(subtasks: bad, good\\)"):
        T.load_bigbench(tmp_path / "fam", subtask="nope")


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"question": "q"}, "expected a non-empty list"),
        ([{"q": "x"}], "item 0: unknown schema"),
        (
            [{"question": "q", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1, "b": 0}}],
            "exactly one true",
        ),
        (
            [{"question": "q", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 1}}],
            "one true and one false",
        ),
        ([{"question": "q", "mc1_targets": {"a": 1, "b": 0}}], "'mc2_targets' must map"),
    ],
)
def test_truthfulqa_schema_errors_name_the_file(tmp_path, rows, message):
    path = _write(tmp_path, rows, "mc_task.json")
    with pytest.raises(T.TaskSchemaError, match=f"^{path}: .*{message}"):
        T.load_truthfulqa(path)


def test_a_broken_task_file_in_the_data_dir_fails_load_tasks(tmp_path):
    (tmp_path / "eval" / "bigbench").mkdir(parents=True)
    path = _write(tmp_path / "eval" / "bigbench" / "implicatures", {"examples": [{"input": "q"}]})
    with pytest.raises(
        T.TaskSchemaError, match=f"^{path}: example 0: unknown schema \\(no 'target_scores'\\)"
    ):
        T.load_tasks("implicatures", data_dir=tmp_path)


# ------------------------------------------------------------------------------------ tasks by path, per-task limits
SNARKS = {
    "task_prefix": "Which is sarcastic?",
    "examples": [
        {"input": f"({i}) Oh great, rain again.", "target_scores": {"(a)": 1, "(b)": 0}} for i in range(5)
    ],
}


def test_a_bigbench_task_by_path_beside_or_instead_of_the_suites(tmp_path):
    folder = tmp_path / "snarks"
    _write(folder, SNARKS)
    (only,) = T.load_tasks(task_paths=[folder])  # no --suite: only the task given by path
    assert (only.name, only.suite, only.kind, only.source, len(only.items)) == (
        "snarks",
        "custom",
        "bigbench",
        str(folder / "task.json"),
        5,
    )
    assert only.items[0].prompt.startswith("Which is sarcastic?\nQ: (0) Oh great, rain again.\n  choice: ")
    assert [t.name for t in T.load_tasks(task_paths=[folder / "task.json"])] == ["snarks"]
    other = _write(tmp_path / "files", SNARKS, "irony_v2.json")
    tasks = T.load_tasks("implicatures,entailed_polarity", task_paths=[folder, other], data_dir=DATA, limit=2)
    assert [(t.suite, t.name, len(t.items)) for t in tasks] == [
        ("pragmatics", "implicatures", 2),
        ("pragmatics", "entailed_polarity", 2),
        ("custom", "snarks", 2),
        ("custom", "irony_v2", 2),
    ]
    # the same item shows the same prompt whichever way the task was reached
    assert tasks[2].items[0].prompt == only.items[0].prompt


def test_bad_task_paths_are_named(tmp_path):
    with pytest.raises(T.TaskSchemaError, match=f"^--task {tmp_path / 'nope'}: no such file or folder$"):
        T.load_tasks(task_paths=[tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        T.TaskSchemaError, match=f"^--task {tmp_path / 'empty'}: the folder holds no task.json"
    ):
        T.load_tasks(task_paths=[tmp_path / "empty"])
    broken = _write(tmp_path / "broken", "{not json")
    with pytest.raises(T.TaskSchemaError, match=f"^{broken}: not valid JSON \\(Expecting property name"):
        T.load_tasks(task_paths=[tmp_path / "broken"])
    listed = _write(tmp_path, [{"input": "q"}], "list.json")
    with pytest.raises(
        T.TaskSchemaError,
        match=f"^{listed}: unknown task schema \\(top level is list; expected a BIG-bench task",
    ):
        T.load_tasks(task_paths=[listed])
    clash = _write(tmp_path / "implicatures", SNARKS)
    with pytest.raises(
        T.TaskSchemaError,
        match=f"^--task {clash.parent}: task name 'implicatures' is already "
        "taken by .*implicatures/task.json; rename the folder",
    ):
        T.load_tasks("implicatures", task_paths=[clash.parent], data_dir=DATA)


def test_per_task_limits_override_the_global_one():
    tasks = T.load_tasks(
        "implicatures,metaphor_understanding,entailed_polarity",
        data_dir=DATA,
        limit=3,
        task_limits={"implicatures": None, "metaphor_understanding/met2lit": 5},
    )
    assert [(t.name, len(t.items)) for t in tasks] == [
        ("implicatures", 492),
        ("metaphor_understanding/lit2met", 3),
        ("metaphor_understanding/met2lit", 5),
        ("entailed_polarity", 3),
    ]
    tasks = T.load_tasks("metaphor_understanding", data_dir=DATA, task_limits={"metaphor_understanding": 4})
    assert [len(t.items) for t in tasks] == [4, 4] and tasks[0].n_total == 117
    with pytest.raises(
        T.UnknownSuiteError, match="task_limits: 'social_iqa' not among the selected tasks \\(implicatures\\)"
    ):
        T.load_tasks("implicatures", data_dir=DATA, task_limits={"social_iqa": 10})
    with pytest.raises(
        ValueError,
        match=r"task_limits\['implicatures'\] must be >= 1 \(an integer, or null for every item\), got 0",
    ):
        T.load_tasks("implicatures", data_dir=DATA, task_limits={"implicatures": 0})


# ------------------------------------------------------------------------------------ generation prompts
def test_politeness_holdout_is_fixed_and_about_one_in_ten():
    a = politeness_heldout(DATA, 32)
    assert len(a) == 32 and a == politeness_heldout(DATA, 32) and len(set(a)) == 32
    assert politeness_heldout(DATA, 5) == a[:5]
    import csv

    rows = []
    for name in ("wikipedia.annotated.csv", "stack-exchange.annotated.csv"):
        with (DATA / "eval" / "politeness" / name).open(newline="") as f:
            rows += list(csv.DictReader(f))
    held = [r for r in rows if is_heldout(r["Community"], r["Id"])]
    assert 0.08 < len(held) / len(rows) < 0.12
    assert set(a) <= {r["Request"].strip() for r in held}


def test_prompts_from_list_and_files(tmp_path):
    assert load_prompts(["hi", "there"], DATA) == (["hi", "there"], "prompts argument")
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond line\\nwith a newline\n")
    assert load_prompts(txt, DATA)[0] == ["first", "second line\nwith a newline"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompts(jl, DATA)[0] == ["a", "b"]
    jl.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="line 1 has no string field 'prompt'"):
        load_prompts(jl, DATA)
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        load_prompts(tmp_path / "none.txt", DATA)
