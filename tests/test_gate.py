"""The evaluation gate's verdicts (pure functions), the status it writes and the report's headline."""

import pytest

from kubetune.evaluate.gate import Verdict, better, combine, verdict
from kubetune.evaluate.run import markdown, status_patch
from kubetune.spec import Gate
from kubetune.status import Lineage

METRICS = {"base": {"valid_loss": 3.0, "valid_mean_token_accuracy": 0.2, "rouge_l": 0.10, "repetition_rate": 0.05,
                    "semantic_similarity": None},
           "fine_tuned": {"valid_loss": 1.5, "valid_mean_token_accuracy": 0.6, "rouge_l": 0.08, "repetition_rate": 0.20,
                          "semantic_similarity": None}}


def gate(**kw) -> Gate:
    return Gate.model_validate(kw)


@pytest.mark.parametrize("metric, passed", [("valid_loss", True), ("valid_mean_token_accuracy", True),
                                            ("rouge_l", False), ("repetition_rate", False)])
def test_must_beat_base_knows_which_way_is_better(metric, passed):
    v = verdict(gate(metric=metric, mustBeat="base"), METRICS, samples=10)
    assert v.passed is passed
    assert v.value == METRICS["fine_tuned"][metric] and v.threshold == METRICS["base"][metric]
    assert ("better than the base model" if passed else "not better than the base model") in v.message


def test_a_tie_does_not_beat_the_base():
    same = {"base": {"valid_loss": 2.0}, "fine_tuned": {"valid_loss": 2.0}}
    v = verdict(gate(metric="valid_loss", mustBeat="base"), same, samples=0)
    assert not v.passed and "2.0000 (fine-tuned) = 2.0000 (base)" in v.message


def test_min_and_max_bounds_include_the_bound():
    assert verdict(gate(metric="rouge_l", min=0.08), METRICS, 5).passed
    assert not verdict(gate(metric="rouge_l", min=0.3), METRICS, 5).passed
    v = verdict(gate(metric="valid_loss", max=1.0), METRICS, 0)
    assert (v.passed, v.value, v.threshold, v.message) == (False, 1.5, 1.0, "valid_loss 1.5000 > max 1")
    assert verdict(gate(metric="valid_loss", max=1.5), METRICS, 0).passed


def test_a_generation_metric_without_samples_fails_saying_so():
    v = verdict(gate(metric="rouge_l", min=0.0), {"base": {"valid_loss": 3.0}, "fine_tuned": {"valid_loss": 1.0}}, samples=0)
    assert not v.passed and v.value is None and "evaluation.samples is 0" in v.message


def test_a_metric_that_could_not_be_computed_fails():
    v = verdict(gate(metric="semantic_similarity", min=0.1), METRICS, samples=10)
    assert not v.passed and "could not be computed" in v.message
    v = verdict(gate(metric="valid_loss", mustBeat="base"), {"base": {}, "fine_tuned": {"valid_loss": 1.0}}, 0)
    assert not v.passed and "nothing to beat" in v.message


def test_better():
    assert better("valid_perplexity", 2.0, 3.0) and not better("bleu", 2.0, 3.0) and better("distinct_2", 0.5, 0.4)


def test_broken_parity_fails_even_a_passing_gate_and_without_a_gate():
    g = gate(metric="valid_loss", mustBeat="base")
    v = combine(["eos differs"], g, METRICS, 10)
    assert not v.passed and v.metric == "valid_loss" and "parity check failed: eos differs" in v.message
    assert combine(["eos differs"], None, None, 0).metric == "parity"
    assert combine([], None, METRICS, 10) is None
    assert combine([], g, METRICS, 10).passed


def test_status_fields():
    lin = Lineage(spec_hash="a" * 64, base_model="fromConfig:llama-tiny", kubetune_version="0.1.0", uri="out/model/lineage.json")
    patch = status_patch(Verdict(False, "valid_loss", 1.5, 1.0, "valid_loss 1.5000 > max 1"), lin).patch()
    assert patch["evaluation"] == {"passed": False, "metric": "valid_loss", "value": 1.5, "threshold": 1.0,
                                   "message": "valid_loss 1.5000 > max 1"}
    assert patch["lineage"]["specHash"] == "a" * 64 and patch["lineage"]["uri"] == "out/model/lineage.json"
    assert "evaluation" not in status_patch(None, lin).patch()  # no gate: no status.evaluation


def test_report_says_pass_or_fail_at_the_top():
    v = verdict(gate(metric="valid_loss", mustBeat="base"), METRICS, 0)
    report = {"gate": v.as_dict(), "parity": None, "samples": 0, "max_new_tokens": 8, "metrics": METRICS,
              "notes": [], "examples": []}
    lines = markdown("t", report).splitlines()
    assert lines[2].startswith("**Evaluation gate: PASS** — valid_loss 1.5000 (fine-tuned) < 3.0000 (base)")
    report["gate"] = verdict(gate(metric="valid_loss", max=1.0), METRICS, 0).as_dict()
    assert markdown("t", report).splitlines()[2].startswith("**Evaluation gate: FAIL**")


@pytest.mark.parametrize("metric, delta, passed", [
    ("valid_loss", 1.0, True),  # 1.5 vs 3.0: better by 1.5
    ("valid_loss", 2.0, False),  # better, but by less than minDelta
    ("valid_mean_token_accuracy", 0.3, True),  # 0.6 vs 0.2 (higher is better)
    ("valid_mean_token_accuracy", 0.5, False),
    ("repetition_rate", 0.01, False),  # worse stays worse, whatever the distance
])
def test_min_delta_asks_for_a_margin_over_the_base(metric, delta, passed):
    v = verdict(gate(metric=metric, mustBeat="base", minDelta=delta), METRICS, samples=10)
    assert v.passed is passed and v.message.endswith(f"by at least minDelta {delta:g}")


def test_min_delta_goes_with_must_beat_only():
    with pytest.raises(ValueError, match="minDelta goes with mustBeat"):
        gate(metric="valid_loss", max=2.0, minDelta=0.1)
