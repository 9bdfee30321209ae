"""Grading: a grader, a model's sample and a data item in; a reward with OpenAI's metadata out.

Errors are of two kinds. A bad grader or item (a missing item field, a metric not installed, no endpoint
for a score model) raises: no sample can be graded. A sample the grader cannot score (not JSON where the
grader reads its JSON, a python grader's exception or limit, a score model's unreadable reply or failed
request) gets reward 0 and the flag OpenAI's run endpoint sets for it, so one bad sample does not stop
a trainer's batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from kubetune.graders import formula, similarity
from kubetune.graders.errors import GraderUnavailable
from kubetune.graders.models import (Grader, MultiGrader, PythonGrader, ScoreModelGrader, StringCheckGrader,
                                     TextSimilarityGrader)
from kubetune.graders.sandbox import PythonLimits, PythonWorker
from kubetune.graders.score_model import ModelEndpoint, ask, chat_messages, clamp, request_body
from kubetune.graders.template import Sample, SampleError, fill, references

FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error", "model_grader_refusal_error",
         "model_grader_server_error", "other_error", "python_grader_runtime_error", "python_grader_server_error",
         "sample_parse_error", "truncated_observation_error", "unresponsive_reward_error")
DETAILS = ("model_grader_server_error_details", "python_grader_runtime_error_details",
           "python_grader_server_error_type")


@dataclass
class GradeErrors:
    """OpenAI's ``metadata.errors``: which failures happened, with details for some."""

    flags: set[str] = field(default_factory=set)
    details: dict[str, str] = field(default_factory=dict)

    def add(self, flag: str, detail_key: str | None = None, detail: str | None = None) -> None:
        self.flags.add(flag)
        if detail_key and detail is not None:
            self.details.setdefault(detail_key, detail)

    def __bool__(self) -> bool:
        return bool(self.flags)

    def as_dict(self) -> dict:
        return {**{f: f in self.flags for f in FLAGS}, **{k: self.details.get(k) for k in DETAILS}}


@dataclass
class GradeResult:
    reward: float
    sub_rewards: dict[str, float]
    errors: GradeErrors
    execution_time: float
    name: str = ""
    type: str = ""
    token_usage: dict[str, dict[str, int]] = field(default_factory=dict)  # per score model

    def as_openai(self) -> dict:
        """The body of OpenAI's /fine_tuning/alpha/graders/run answer."""
        total = sum(u.get("total_tokens", 0) for u in self.token_usage.values())
        return {"reward": self.reward, "sub_rewards": self.sub_rewards,
                "model_grader_token_usage_per_model": self.token_usage,
                "metadata": {"name": self.name, "type": self.type, "errors": self.errors.as_dict(),
                             "execution_time": self.execution_time,
                             "scores": self.sub_rewards or {self.name: self.reward},
                             "token_usage": total if self.token_usage else None, "sampled_model_name": None}}


Endpoints = Mapping[str, ModelEndpoint] | Callable[[str], ModelEndpoint | None]


def walk(grader: Grader) -> Iterator[Grader]:
    yield grader
    if isinstance(grader, MultiGrader):
        yield from grader.graders.values()


def _templates(grader: Grader) -> Iterator[str]:
    for g in walk(grader):
        if isinstance(g, (StringCheckGrader, TextSimilarityGrader)):
            yield from (g.input, g.reference)
        elif isinstance(g, ScoreModelGrader):
            for message in g.input:
                yield from message.texts()


def referenced_item_fields(grader: Grader) -> set[str]:
    """The item fields the grader's templates read, as dotted paths (``answer``, ``meta.lang``). A python
    grader reads the item as it likes: its fields are not known."""
    return {".".join(ref[1:]) for text in _templates(grader) for ref in references(text, "template")
            if ref[0] == "item"}


def score_models(grader: Grader) -> set[str]:
    return {g.model for g in walk(grader) if isinstance(g, ScoreModelGrader)}


def uses_python(grader: Grader) -> bool:
    return any(isinstance(g, PythonGrader) for g in walk(grader))


class Runner:
    """Grades samples, keeping one process per python grader until closed (a batch)."""

    def __init__(self, endpoints: Endpoints | None = None, limits: PythonLimits = PythonLimits(),
                 samples: int = 1):
        self.endpoints, self.limits, self.samples = endpoints or {}, limits, samples
        self._workers: dict[int, tuple[PythonGrader, PythonWorker]] = {}

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for _, worker in self._workers.values():
            worker.close()
        self._workers.clear()

    def grade(self, grader: Grader, sample: str | Sample, item: dict) -> GradeResult:
        sample = sample if isinstance(sample, Sample) else Sample.from_text(sample)
        start = time.perf_counter()
        errors, usage, sub = GradeErrors(), {}, {}
        if isinstance(grader, MultiGrader):
            for name, g in grader.graders.items():
                sub[name] = self._score(g, sample, item, errors, usage)
            reward = _combine(grader, sub, errors)
        else:
            reward = self._score(grader, sample, item, errors, usage)
        return GradeResult(reward, sub, errors, time.perf_counter() - start, grader.name, grader.type, usage)

    def _score(self, g: Grader, sample: Sample, item: dict, errors: GradeErrors, usage: dict) -> float:
        try:
            if isinstance(g, StringCheckGrader):
                return string_check(g.operation, fill(g.input, sample, item), fill(g.reference, sample, item))
            if isinstance(g, TextSimilarityGrader):
                return similarity.score(g.evaluation_metric, fill(g.input, sample, item),
                                        fill(g.reference, sample, item))
            if isinstance(g, PythonGrader):
                return self._python(g, sample, item, errors)
            return self._model(g, sample, item, errors, usage)
        except SampleError as e:
            errors.add("sample_parse_error" if e.parse else "invalid_variable_error")
            return 0.0

    def _python(self, g: PythonGrader, sample: Sample, item: dict, errors: GradeErrors) -> float:
        if id(g) not in self._workers:
            self._workers[id(g)] = (g, PythonWorker(g.source, self.limits, self.samples))
        outcome = self._workers[id(g)][1].grade(sample.as_dict(), item)
        if outcome.error is None:
            return outcome.score
        if outcome.runtime:
            errors.add("python_grader_runtime_error", "python_grader_runtime_error_details", outcome.error)
        else:
            errors.add("python_grader_server_error", "python_grader_server_error_type",
                       "timeout" if outcome.timeout else "process_ended")
            errors.add("unresponsive_reward_error" if outcome.timeout else "other_error")
            errors.details.setdefault("python_grader_runtime_error_details", outcome.error)
        return 0.0

    def _model(self, g: ScoreModelGrader, sample: Sample, item: dict, errors: GradeErrors, usage: dict) -> float:
        endpoint = self._endpoint(g.model)
        reply = ask(endpoint, request_body(g, chat_messages(g, sample, item),
                                              g.model if endpoint.model is None else endpoint.model))
        if reply.usage:
            total = usage.setdefault(g.model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                               "cached_tokens": 0})
            for key in total:
                value = reply.usage.get(key, (reply.usage.get("prompt_tokens_details") or {}).get(key, 0))
                total[key] += value if isinstance(value, int) else 0
        if reply.server_error:
            errors.add("model_grader_server_error", "model_grader_server_error_details", reply.server_error)
        elif reply.refusal:
            errors.add("model_grader_refusal_error")
        elif reply.parse_error:
            errors.add("model_grader_parse_error")
        return 0.0 if reply.score is None else clamp(reply.score, *g.range)

    def _endpoint(self, model: str) -> ModelEndpoint:
        found = self.endpoints(model) if callable(self.endpoints) else self.endpoints.get(model)
        if found is None:
            raise GraderUnavailable(f"no endpoint is configured for the score model {model!r}", "grader.model")
        return found


def string_check(operation: str, text: str, reference: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    return float(reference.lower() in text.lower())


def _combine(grader: MultiGrader, sub: dict[str, float], errors: GradeErrors) -> float:
    try:
        value = formula.evaluate(formula.parse(grader.calculate_output, set(grader.graders)), sub)
    except (ArithmeticError, ValueError):  # division by zero, overflow, log(0)
        errors.add("other_error")
        return 0.0
    if not math.isfinite(value):
        errors.add("other_error")
        return 0.0
    return value


def grade(grader: Grader, sample: str | Sample, item: dict, endpoints: Endpoints | None = None,
          limits: PythonLimits = PythonLimits()) -> GradeResult:
    """One sample's grade."""
    with Runner(endpoints, limits) as runner:
        return runner.grade(grader, sample, item)


def grade_batch(grader: Grader, pairs: Iterable[tuple[str | Sample, dict]], endpoints: Endpoints | None = None,
                limits: PythonLimits = PythonLimits()) -> list[GradeResult]:
    """The grades of many (sample, item) pairs, in order: a python grader's process serves them all."""
    pairs = list(pairs)
    with Runner(endpoints, limits, samples=len(pairs)) as runner:
        return [runner.grade(grader, sample, item) for sample, item in pairs]
