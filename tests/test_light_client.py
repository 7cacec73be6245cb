"""The light client distribution, `karma-client` (clients/karma-client): the reward client and the framework
adapters with only what they import, installable beside verl / OpenRLHF / TRL, whose transformers pins
clash with the service's.

* fast: its modules import nothing heavy; it ships every karma module they import, declares exactly the
  third-party packages they import, and keeps the project's version.
* slow (need the package index): a real install into a bare venv imports and works there; a real pip
  resolution of it beside verl 0.9.1, OpenRLHF 0.11.2 and TRL 1.16.0.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "clients" / "karma-client"
#: what a light install must not pull in (the service's, trainer's and eval's stacks)
HEAVY = (
    "torch",
    "transformers",
    "numpy",
    "fastapi",
    "uvicorn",
    "vllm",
    "typer",
    "scipy",
    "pandas",
    "services",
)
IMPORT_CHECK = f"""
import json, sys, time
t = time.perf_counter()
import karma.client, karma.integrations.trl, karma.integrations.verl
took = time.perf_counter() - t
loaded = {{m.split(".")[0] for m in sys.modules}}
print(json.dumps({{"heavy": sorted(loaded & set({HEAVY!r})), "seconds": took, "karma": karma.__file__}}))
"""


def light_project() -> dict:
    return tomllib.loads((CLIENT / "pyproject.toml").read_text())


def requirement_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")


def test_the_client_and_adapters_import_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["heavy"] == [], f"the light modules import {report['heavy']}"
    assert report["seconds"] < 5.0


def _imports(path: Path) -> set[str]:
    """Every absolute module a file imports, at the top or inside functions (`from a import b` gives `a.b`,
    which is `a`'s attribute or its submodule)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_the_light_distribution_ships_what_its_modules_import_and_declares_only_that():
    project = light_project()
    main = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    modules = set(project["tool"]["setuptools"]["py-modules"])
    assert project["project"]["version"] == main["version"]  # released together
    assert project["project"]["requires-python"] == main["requires-python"]
    # every adapter ships (a new one cannot be forgotten), from the repository's own files
    adapters = {f"karma.integrations.{p.stem}" for p in (REPO / "karma" / "integrations").glob("[!_]*.py")}
    assert adapters <= modules
    packages = {"karma", "karma.integrations"}
    third_party = set()
    for module in sorted(modules):
        path = CLIENT / (module.replace(".", "/") + ".py")
        assert path.resolve() == REPO / (module.replace(".", "/") + ".py"), module
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "karma":
                parent = name.rsplit(".", 1)[0]
                # `karma.x` is shipped, or an attribute of a shipped module (`karma.client.RewardClient`)
                assert name in modules | packages or parent in modules, (
                    f"{module} imports {name}, not shipped"
                )
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    declared = {requirement_name(r) for r in project["project"]["dependencies"]}
    assert declared == third_party == {"httpx", "pydantic"}
    # the same lower bounds as the full project, so one install never differs from the other
    full = {requirement_name(r): r for r in main["dependencies"]}
    assert sorted(project["project"]["dependencies"]) == sorted(full[n] for n in declared)


# --------------------------------------------------------------------------------------------- real pip (slow)
#: the frameworks, and what of theirs a bare resolution cannot build: OpenRLHF 0.11.2 requires flash-attn,
#: published as an sdist whose build imports torch (OpenRLHF installs it into a torch image); it requires only
#: torch and einops, so it cannot clash with the client's httpx / pydantic
FRAMEWORKS = {"verl==0.9.1": (), "openrlhf==0.11.2": ("flash-attn",), "trl==1.16.0": ()}


def _pip_env() -> dict[str, str]:
    """This machine's pip configuration files are left out (PyPI's truth, not a local cap); its environment
    variables (an index mirror, a certificate) are kept."""
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _pip(python: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_pip_env(),
    )


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A bare venv with a current pip (PEP 658 metadata: it resolves without downloading torch wheels)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        httpx.get(f"{index}/pip/", timeout=15, follow_redirects=True)
    except httpx.TransportError as exc:
        pytest.skip(
            f"the package index {index} is unreachable ({type(exc).__name__}: {exc}); a real pip "
            "resolution needs it"
        )
    root = tmp_path_factory.mktemp("bare-venv")
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    upgraded = _pip(python, "install", "--quiet", "pip>=25")
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    return python


def _resolve(python: Path, report: Path, *requirements: str) -> dict:
    """`pip install --dry-run` of `requirements`: what pip would install, or the test fails with pip's error."""
    out = _pip(
        python,
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        str(report),
        *requirements,
    )
    errors = "\n".join(line for line in out.stderr.splitlines() if "ERROR" in line or "conflict" in line)
    assert out.returncode == 0, f"pip could not resolve {requirements}:\n{errors or out.stderr[-3000:]}"
    return {i["metadata"]["name"].lower(): i for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_the_light_client_resolves_beside_each_framework(bare_python, tmp_path, framework):
    """Measured 2026-12: each resolves in 100-120 s; the full project beside verl 0.9.1 does not
    (transformers >=5.16.1 against verl's <5.11; OpenRLHF 0.11.2 pins transformers==5.15.0)."""
    unbuildable = FRAMEWORKS[framework]
    requirements = [framework]
    if unbuildable:  # the framework's own requirements, less those (read from its wheel's metadata)
        (meta,) = _resolve(bare_python, tmp_path / "framework.json", "--no-deps", framework).values()
        requirements = [
            r
            for r in meta["metadata"]["requires_dist"]
            if "extra ==" not in r and requirement_name(r) not in unbuildable
        ]
        assert len(requirements) > 10, requirements
    got = _resolve(bare_python, tmp_path / "report.json", str(CLIENT), *requirements)
    assert got["karma-client"]["metadata"]["version"] == light_project()["project"]["version"]
    assert {"httpx", "pydantic", "transformers"} <= set(got)  # beside the framework's own transformers
    if not unbuildable:
        name, version = framework.split("==")
        assert got[name]["metadata"]["version"] == version


@pytest.mark.slow
def test_the_light_client_installs_alone_and_works_without_torch(bare_python, tmp_path):
    installed = _pip(bare_python, "install", "--quiet", str(CLIENT))
    assert installed.returncode == 0, installed.stderr[-3000:]
    check = (
        IMPORT_CHECK
        + """
from karma.integrations import verl
try:
    verl.Options.from_kwargs({"modle": "full"})
except TypeError as exc:
    print(json.dumps({"error": str(exc)}))
import importlib.util
print(json.dumps({"torch": importlib.util.find_spec("torch") is not None}))
"""
    )
    # -I: the installed copy, not the checkout (no cwd, no PYTHONPATH on sys.path)
    out = subprocess.run(
        [str(bare_python), "-I", "-c", check],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    first, error, torch = (json.loads(line) for line in out.stdout.splitlines())
    assert first["heavy"] == [] and "site-packages" in first["karma"]
    assert "unknown reward_kwargs key 'modle'" in error["error"] and torch == {"torch": False}
    assert _pip(bare_python, "check").returncode == 0


def test_the_docs_install_the_light_client_beside_the_frameworks():
    lines = [
        line.split("#")[0].split()
        for doc in (REPO / "README.md", REPO / "docs" / "reward_service.md")
        for line in doc.read_text().splitlines()
        if line.startswith("pip install") and re.search(r"\b(verl|trl|openrlhf)==", line)
    ]
    assert len(lines) == 2
    for words in lines:
        assert "./clients/karma-client" in words and "--no-deps" not in words
        assert (REPO / words[words.index("./clients/karma-client")]).samefile(CLIENT)
        assert {w.split("==")[0] for w in words if "==" in w} <= {"verl", "trl", "openrlhf"}
