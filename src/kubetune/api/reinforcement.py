"""OpenAI's reinforcement method in `kubetune api`: ``method: {type: reinforcement, reinforcement: {grader,
hyperparameters}}`` ↔ ``training.objective: rft`` (GRPO, kubetune.train.rft).

Hyperparameters beside the common three (n_epochs, batch_size: prompts per step, learning_rate_multiplier):

    compute_multiplier  → training.rft.samplesPerPrompt = round(4 × multiplier), clamped to [2, 64] (4 is
                          the spec's default, so 1 means the default; GRPO's compute is the samples per prompt)
    eval_interval       → training.evalEvery (steps between valid_reward computations)
    eval_samples        → evaluation.samples (held-out prompts answered and graded at the end)
    reasoning_effort    → accepted and kept, but ignored: kubetune's models have no reasoning mode

The grader is checked as /graders/validate checks it. A python grader runs in the job's pod under the job's
ServiceAccount (README "Graders"). A score_model grader is refused: this API does not wire a judge's
endpoint to the job (training.rft.judges, which a FineTuneJob applied with kubectl may set).
"""

from __future__ import annotations

from kubetune.graders import Grader, GraderError, parse_grader, referenced_item_fields, score_models
from kubetune.openai_errors import RequestError

EXTRA = ("compute_multiplier", "eval_interval", "eval_samples", "reasoning_effort")
LIMITS = {"compute_multiplier": (1e-3, 16.0), "eval_interval": (1, 100_000), "eval_samples": (1, 100_000)}
EFFORTS = ("default", "low", "medium", "high")
DEFAULT_SAMPLES, DEFAULT_EVAL_EVERY, DEFAULT_EVAL_SAMPLES = 4, 50, 50  # spec.py's defaults, for reading back
PARAM = "method.reinforcement.grader"


def parse_grader_at(value: object, prefix: str = "") -> Grader:
    """The grader, or a 400 whose param is where it sits in the request (``prefix`` + ``grader.operation``)."""
    try:
        return parse_grader(value)
    except GraderError as e:
        param = prefix + (e.param or "grader")
        raise RequestError(400, prefix + str(e) if str(e).startswith("grader") else str(e), param) from None


def job_grader(method: dict) -> Grader:
    """The grader of a reinforcement method, checked for use in a training job."""
    inner = method.get("reinforcement")
    if not isinstance(inner, dict) or "grader" not in inner:
        raise RequestError(400, "method.reinforcement.grader is required: the grader that scores each sampled "
                           "answer", PARAM)
    grader = parse_grader_at(inner["grader"], "method.reinforcement.")
    if score_models(grader):
        raise RequestError(400, "score_model graders cannot be used in fine-tuning jobs created through this API "
                           "yet: it wires no judge endpoints to a job's trainer (try one with "
                           "/v1/fine_tuning/alpha/graders/run; a FineTuneJob applied with kubectl can name them in "
                           "training.rft.judges; here, use string_check, text_similarity, python or a multi of "
                           "them)", PARAM, "unsupported_grader")
    return grader


def check_item_fields(grader: Grader, record: dict, file_id: str, param: str) -> None:
    """Every item field the grader reads must be in every line of the file. Upload validation records the
    top-level fields all prompts share; deeper parts (``item.a.b``'s ``b``) are left to the prepare step,
    which fails naming the line. Files uploaded before ``item_fields`` was recorded are not checked here."""
    shared = record.get("item_fields")
    if shared is None:
        return
    for name in sorted(referenced_item_fields(grader)):
        if name.split(".")[0] not in shared:
            raise RequestError(400, f"{param}: the grader reads {{{{item.{name}}}}}, but not every line of file "
                               f"{file_id} has the field {name.split('.')[0]!r} (fields in every line: "
                               f"{', '.join(shared) or 'none'})", param, "invalid_file")


def samples_per_prompt(multiplier: float) -> int:
    return min(64, max(2, round(DEFAULT_SAMPLES * multiplier)))


def apply(spec: dict, grader: Grader, hp: dict) -> None:
    """objective rft, the grader and the reinforcement hyperparameters into a job's spec."""
    training = spec.setdefault("training", {})
    training["objective"] = "rft"
    rft = {**training.get("rft", {}), "grader": grader.model_dump(mode="json", exclude_none=True)}
    if hp["compute_multiplier"] is not None:
        rft["samplesPerPrompt"] = samples_per_prompt(hp["compute_multiplier"])
    training["rft"] = rft
    if hp["eval_interval"] is not None:
        training["evalEvery"] = hp["eval_interval"]
    if hp["eval_samples"] is not None:
        spec["evaluation"] = {**spec.get("evaluation", {}), "samples": hp["eval_samples"]}


def method_object(spec: dict, asked: dict, hp: dict) -> dict:
    """OpenAI's ``method`` of an rft job, read from its spec (what runs), and reasoning_effort as asked."""
    training, rft = spec.get("training", {}), spec.get("training", {}).get("rft") or {}
    samples = rft.get("samplesPerPrompt", DEFAULT_SAMPLES)
    return {"type": "reinforcement", "reinforcement": {"grader": rft.get("grader"), "hyperparameters": {
        **hp, "compute_multiplier": samples / DEFAULT_SAMPLES,
        "eval_interval": training.get("evalEvery", DEFAULT_EVAL_EVERY),
        "eval_samples": (spec.get("evaluation") or {}).get("samples", DEFAULT_EVAL_SAMPLES),
        "reasoning_effort": asked.get("reasoning_effort") or "default"}}}


# OpenAI's names for the rewards of RFT metrics, beside the trainer's (metrics.csv's reward_mean and
# valid_reward): the reward of this step's sampled answers and of the held-out prompts' greedy answers.
ALIASES = {"reward_mean": "train_reward_mean", "valid_reward": "valid_reward_mean"}


def with_openai_names(metrics: dict) -> dict:
    return {**metrics, **{ALIASES[k]: v for k, v in metrics.items() if k in ALIASES}}
