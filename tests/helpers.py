"""Skip helpers shared by the test modules: the one place that decides what this machine can run.

from helpers import requires_docker, requires_gpu

@requires_docker
def test_...(): ...
"""

from __future__ import annotations

import functools
import shutil
import subprocess

import pytest


@functools.cache
def docker_engine() -> bool:
    """A docker CLI on PATH that reaches a running engine (DOCKER_HOST honoured)."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], check=False, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def nvidia_gpu() -> bool:
    """An NVIDIA GPU that the driver lists (nvidia-smi -L), without importing torch."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


requires_docker = pytest.mark.skipif(
    not docker_engine(), reason="needs a running Docker engine (docker info)"
)
requires_gpu = pytest.mark.skipif(not nvidia_gpu(), reason="needs an NVIDIA GPU (nvidia-smi -L)")
