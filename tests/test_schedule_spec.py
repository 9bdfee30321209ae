"""The FineTuneSchedule model: defaults a user relies on, errors naming the field; which revision a rollback serves."""

import re

import pytest
import yaml

from conftest import EXAMPLES, job_doc
from kubetune.errors import KubetuneError
from kubetune.schedule_commands import rollback_target
from kubetune.schedule_spec import parse_schedule
from kubetune.spec import SpecError


def schedule_doc(name: str = "bot", **spec) -> dict:
    template = job_doc("s3://data/raw/", "s3://models/bot/")["spec"]
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneSchedule", "metadata": {"name": name},
            "spec": {"jobTemplate": template, **spec}}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*-schedule.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    assert parse_schedule(yaml.safe_load(path.read_text()), str(path)).spec.job_template.output.uri


def test_defaults():
    spec = parse_schedule(schedule_doc()).spec
    assert (spec.schedule, spec.concurrency_policy, spec.suspend, spec.retrain_from, spec.history_limit) == \
        (None, "Forbid", False, "promoted", 5)
    assert (spec.promotion.metric, spec.promotion.min_delta, spec.pinned_revision) == ("valid_loss", 0.0, None)
    assert spec.serve.enabled and spec.serve.replicas == 1


@pytest.mark.parametrize("change, problem", [
    ({"schedule": "0 25 * * *"}, "spec.schedule: hour: '25' is outside 0-23"),
    ({"schedule": "daily"}, "spec.schedule: String should match pattern"),
    ({"timeZone": "Mars/Olympus"}, "spec.timeZone: 'Mars/Olympus' is not a time zone"),
    ({"concurrencyPolicy": "Queue"}, "spec.concurrencyPolicy: Input should be 'Forbid', 'Allow' or 'Replace'"),
    ({"historyLimit": 0}, "spec.historyLimit: Input should be greater than or equal to 1"),
    ({"pinnedRevision": 0}, "spec.pinnedRevision: Input should be greater than or equal to 1"),
    ({"promotion": {"metric": "rouge"}}, "spec.promotion.metric: Input should be 'valid_loss'"),
    ({"serve": {"replicas": 0}}, "spec.serve.replicas: Input should be greater than or equal to 1"),
])
def test_bad_fields_are_named(change, problem):
    with pytest.raises(SpecError) as e:
        parse_schedule(schedule_doc(**change))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_the_template_may_not_set_what_the_schedule_decides():
    doc = schedule_doc()
    doc["spec"]["jobTemplate"]["evaluation"] = {"gate": {"metric": "valid_loss", "mustBeat": "base"}}
    with pytest.raises(SpecError, match="jobTemplate.evaluation.gate is set by the schedule from spec.promotion"):
        parse_schedule(doc)
    doc = schedule_doc()
    doc["spec"]["jobTemplate"]["serve"] = {"enabled": True}
    with pytest.raises(SpecError, match="jobTemplate.serve is not used in a template"):
        parse_schedule(doc)


def test_promotion_on_a_reply_score_needs_replies():
    doc = schedule_doc(promotion={"metric": "rouge_l", "goldenSet": "s3://data/golden.jsonl"})
    assert parse_schedule(doc).spec.promotion.metric == "rouge_l"  # 50 replies by default
    doc["spec"]["jobTemplate"]["evaluation"] = {"samples": 0}
    with pytest.raises(SpecError, match="promotion.metric rouge_l scores generated replies, but "
                                        "jobTemplate.evaluation.samples is 0"):
        parse_schedule(doc)


def test_the_name_leaves_room_for_run_numbers():
    with pytest.raises(SpecError, match="metadata.name: String should have at most 30 characters"):
        parse_schedule(schedule_doc("x" * 31))


@pytest.mark.parametrize("status, to, target", [
    ({"revisions": [{"revision": 1}, {"revision": 2}, {"revision": 3}], "servedRevision": 3}, None, 2),
    ({"revisions": [{"revision": 1}, {"revision": 2}, {"revision": 3}], "servedRevision": 2}, None, 1),  # again
    ({"revisions": [{"revision": 1}, {"revision": 2}, {"revision": 3}], "servedRevision": 1}, 3, 3),
])
def test_rollback_target(status, to, target):
    assert rollback_target("bot", status, to) == target


@pytest.mark.parametrize("status, to, message", [
    ({}, None, "bot has no revisions yet"),
    ({"revisions": [{"revision": 1}], "servedRevision": 1}, None, "serves revision 1, its first"),
    ({"revisions": [{"revision": 1}, {"revision": 2}]}, 5, "revision 5 is not among bot's revisions (1, 2)"),
])
def test_rollback_refuses_what_cannot_be_served(status, to, message):
    with pytest.raises(KubetuneError, match=re.escape(message)):
        rollback_target("bot", status, to)
