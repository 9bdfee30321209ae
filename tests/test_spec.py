import subprocess
import sys

import pytest
import yaml

from conftest import EXAMPLES, job_doc
from kubetune.spec import SpecError, load_job, parse_job


@pytest.mark.parametrize("path", sorted(set(EXAMPLES.glob("*.yaml")) - set(EXAMPLES.glob("*-schedule.yaml"))),
                         ids=lambda p: p.name)
def test_examples_are_valid(path):
    job = load_job(path)
    assert job.metadata.name


def test_defaults_a_user_expects():
    spec = parse_job(job_doc("data/", "out/")).spec
    t = spec.training
    assert (t.method, t.epochs, t.learning_rate) == ("lora", 3, 2e-4)
    assert (t.lora.r, t.lora.alpha) == (16, 32)
    full = parse_job(job_doc("data/", "out/", training={"method": "full"})).spec.training
    assert full.learning_rate == 2e-5 and full.lora is None
    assert spec.preprocessing.pii.redact == ["email", "phone", "card", "iban", "ip", "ssn", "secret"]


def test_every_problem_is_listed_with_its_field_path():
    doc = job_doc("data/", "out/", training={"method": "full", "learningRate": -1, "lora": {"r": 8}},
                  resources={"nodes": 0, "gpusPerNode": -1})
    del doc["spec"]["output"]
    doc["spec"]["dataset"]["formt"] = "chat"
    with pytest.raises(SpecError) as e:
        parse_job(doc)
    problems = "\n".join(e.value.problems)
    for path in ("spec.training.learningRate", "spec.resources.nodes", "spec.resources.gpusPerNode",
                 "spec.output", "spec.dataset.formt"):
        assert path in problems, problems
    assert len(e.value.problems) >= 5


def test_cross_field_rules():
    with pytest.raises(SpecError, match="lora settings are only allowed with method: lora"):
        parse_job(job_doc("d", "o", training={"method": "full", "lora": {"r": 4}}))
    with pytest.raises(SpecError, match="spec.model: set exactly one of source, fromJob, fromConfig"):
        parse_job(job_doc("d", "o", model={"source": "hf://x/y", "fromJob": "prev"}))


def test_cli_validate_reports_problems_and_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = job_doc("data/", "out/", training={"epochs": 0})
    bad.write_text(yaml.safe_dump(doc))
    run = subprocess.run([sys.executable, "-m", "kubetune.cli", "validate", str(bad)], capture_output=True, text=True)
    assert run.returncode == 3  # invalid input (kubetune.errors)
    assert "spec.training.epochs: Input should be greater than or equal to 1" in run.stderr
    assert "Traceback" not in run.stderr
    ok = subprocess.run([sys.executable, "-m", "kubetune.cli", "validate", str(EXAMPLES / "quickstart.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "is valid" in ok.stdout


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: kubetune.dev/v1alpha1\nkind: FineTuneJob\nspec: [unclosed\n")
    with pytest.raises(SpecError, match=r"line \d+, column \d+"):
        load_job(bad)


def test_must_beat_serving_needs_the_served_model_named():
    doc = job_doc("s3://d/", "s3://o/", evaluation={"gate": {"metric": "valid_loss", "mustBeat": "serving"}})
    with pytest.raises(SpecError, match=r"evaluation: gate.mustBeat: serving needs evaluation.servedModel"):
        parse_job(doc)
    doc["spec"]["evaluation"]["servedModel"] = "s3://models/bot/bot-r1/model"
    assert parse_job(doc).spec.evaluation.gate.must_beat == "serving"
