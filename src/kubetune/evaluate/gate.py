"""The evaluation gate (``evaluation.gate``): does the fine-tuned model clear the bar? Pure functions.

A gate names one metric of the evaluation report and exactly one bar: ``mustBeat: base`` (strictly
better than the base model, by at least ``minDelta``, on the validation split), ``mustBeat: serving`` (the
same against ``evaluation.servedModel``, on the golden set when there is one), ``min`` or ``max``. "Better" is lower for losses and error rates, higher
for everything else. A verdict is never an exception: a metric that could not be computed (no
generated replies with ``samples: 0``, no embedding model) is a failed gate that says why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kubetune.spec import VALIDATION_METRICS, Gate

LOWER_IS_BETTER = frozenset({"valid_loss", "valid_perplexity", "repetition_rate", "empty_rate", "truncated_rate",
                             "valid_logp_rejected"})  # a DPO report's: the non-preferred answer should become less likely


@dataclass(frozen=True)
class Verdict:
    passed: bool
    metric: str
    value: float | None
    threshold: float | None
    message: str

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def word(self) -> str:
        return "PASS" if self.passed else "FAIL"


def better(metric: str, value: float, other: float) -> bool:
    """Strictly better: lower for losses and error rates, higher otherwise."""
    return value < other if metric in LOWER_IS_BETTER else value > other


def needs_generation(metric: str) -> bool:
    """Every metric but the validation ones (loss, perplexity, token accuracy) scores generated replies."""
    return metric not in VALIDATION_METRICS


def _number(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def verdict(gate: Gate, metrics: dict, samples: int, where: str = "") -> Verdict:
    """The gate's verdict from an eval report's ``metrics`` ({"base": {...}, "fine_tuned": {...}}); for mustBeat:
    serving, "base" holds the served model's figures (see ``compared``), measured ``where``."""
    m = gate.metric
    other = "served" if gate.must_beat == "serving" else "base"
    threshold = _threshold(gate, metrics)
    if needs_generation(m) and not samples:
        return Verdict(False, m, None, threshold, f"{m} needs generated replies, but evaluation.samples is 0; "
                       "set evaluation.samples or gate on a validation metric (valid_loss, ...)")
    value = _number(metrics.get("fine_tuned", {}).get(m))
    if value is None:
        return Verdict(False, m, None, threshold, f"{m} of the fine-tuned model could not be computed (see the report's notes)")
    if gate.must_beat is not None:
        if threshold is None:
            return Verdict(False, m, value, None, f"{m} of the {other} model could not be computed, so there is nothing to beat")
        delta = gate.min_delta or 0.0
        passed = better(m, value, threshold) and abs(value - threshold) >= delta
        relation = _relation(value, threshold)
        return Verdict(passed, m, value, threshold, f"{m} {value:.4f} (fine-tuned) {relation} {threshold:.4f} ({other}): "
                       + ("better than the " if passed else "not better than the ") + f"{other} model"
                       + (f" by at least minDelta {delta:g}" if delta else "") + (f" on the {where}" if where else ""))
    if gate.min is not None:
        passed = value >= gate.min
        return Verdict(passed, m, value, threshold, f"{m} {value:.4f} " + (">=" if passed else "<") + f" min {gate.min:g}")
    passed = value <= gate.max
    return Verdict(passed, m, value, threshold, f"{m} {value:.4f} " + ("<=" if passed else ">") + f" max {gate.max:g}")


def compared(gate: Gate | None, report: dict) -> tuple[dict, int, str]:
    """What a gate judges in an evaluation report: (metrics, samples, where). mustBeat: serving puts the served
    model's figures as "base", from the golden set when the report has one; other gates read the validation split."""
    if gate is None or gate.must_beat != "serving":
        return report["metrics"], report["samples"], ""
    part, where = (report["golden"], "golden set") if report.get("golden") else (report, "validation split")
    return {"base": part["metrics"].get("served", {}), "fine_tuned": part["metrics"]["fine_tuned"]}, part["samples"], where


def _threshold(gate: Gate, metrics: dict) -> float | None:
    if gate.must_beat is not None:
        return _number(metrics.get("base", {}).get(gate.metric))
    return gate.min if gate.min is not None else gate.max


def _relation(a: float, b: float) -> str:
    return "<" if a < b else (">" if a > b else "=")


def parity_failure(problems: list[str], gate: Gate | None) -> Verdict:
    """A broken train/serve parity fails the gate whatever the metrics say: the served model would not
    see prompts as it was trained on them, or would not stop."""
    return Verdict(False, gate.metric if gate else "parity", None, None,
                   "train/serve parity check failed: " + "; ".join(problems))


def combine(parity_problems: list[str], gate: Gate | None, metrics: dict | None, samples: int,
            where: str = "") -> Verdict | None:
    """The job's verdict: parity first, then the gate; None when there is no gate and parity holds."""
    if parity_problems:
        return parity_failure(parity_problems, gate)
    if gate is None:
        return None
    return verdict(gate, metrics or {}, samples, where)
