"""OpenAI's grader objects as pydantic models, one per ``type``, checked when built: operations, metrics,
templates, a python grader's source, a multi grader's formula. ``Grader`` is the union other models embed
(a spec's ``training.rft.grader``); ``parse_grader`` builds one from JSON with errors naming the field.
"""

from __future__ import annotations

import ast
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from kubetune.graders import formula, template
from kubetune.graders.errors import GraderError

OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
UNSUPPORTED_METRICS = {
    "meteor": "it needs NLTK's WordNet data, which cannot be installed offline and kubetune does not ship",
    "cosine": "it needs OpenAI's embedding model",
}
MAX_SOURCE = 256 * 1024  # OpenAI's limit for a python grader's source


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=256)


def _check_templates(*fields: tuple[str, str]) -> None:
    for param, text in fields:
        template.references(text, param)


class StringCheckGrader(_Grader):
    """1.0 or 0.0: input equal to the reference (eq), not equal (ne), containing it (like), containing it
    ignoring case (ilike)."""

    type: Literal["string_check"]
    input: str
    reference: str
    operation: str

    @field_validator("operation")
    @classmethod
    def _operation(cls, v: str) -> str:
        if v not in OPERATIONS:
            raise ValueError(f"unknown operation {v!r} (one of {', '.join(OPERATIONS)})")
        return v

    @model_validator(mode="after")
    def _templates(self):
        _check_templates(("input", self.input), ("reference", self.reference))
        return self


class TextSimilarityGrader(_Grader):
    """A similarity score in [0, 1] of input to reference (similarity.py)."""

    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: str

    @field_validator("evaluation_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v in UNSUPPORTED_METRICS:
            raise ValueError(f"{v!r} is not supported here: {UNSUPPORTED_METRICS[v]} (use one of {', '.join(METRICS)})")
        if v not in METRICS:
            raise ValueError(f"unknown evaluation_metric {v!r} (one of {', '.join(METRICS)})")
        return v

    @model_validator(mode="after")
    def _templates(self):
        _check_templates(("input", self.input), ("reference", self.reference))
        return self


class PythonGrader(_Grader):
    """The author's ``grade(sample, item) -> float``, run in a sandboxed process (sandbox.py)."""

    type: Literal["python"]
    source: str = Field(max_length=MAX_SOURCE)
    image_tag: str | None = None

    @field_validator("image_tag")
    @classmethod
    def _image_tag(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("image_tag is not supported here: python graders run in the job's own image")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        try:
            tree = ast.parse(v)
        except SyntaxError as e:
            raise ValueError(f"the source is not valid Python: {e.msg} (line {e.lineno})") from None
        grade = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "grade"]
        if not grade:
            raise ValueError("the source must define a top-level function grade(sample, item) -> float")
        a = grade[-1].args
        if len(a.posonlyargs) + len(a.args) < 2 and a.vararg is None:
            raise ValueError("grade must take two arguments: grade(sample, item)")
        return v


class ContentPart(BaseModel):
    """One part of a message's content: text (input_text, output_text) or an image."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["input_text", "output_text", "input_image"]
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None

    @model_validator(mode="after")
    def _fields(self):
        if (self.type == "input_image") != (self.image_url is not None) or (self.type != "input_image") != (
                self.text is not None):
            raise ValueError(f"a {self.type} part needs {'image_url' if self.type == 'input_image' else 'text'} only")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["user", "assistant", "system", "developer"]
    content: str | ContentPart | list[str | ContentPart]
    type: Literal["message"] | None = None

    def texts(self) -> list[str]:
        parts = self.content if isinstance(self.content, list) else [self.content]
        return [p if isinstance(p, str) else p.text or p.image_url or "" for p in parts]


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_completions_tokens: int | None = Field(None, ge=1)
    reasoning_effort: str | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


class ScoreModelGrader(_Grader):
    """A model's score for the sample, from an OpenAI-compatible chat endpoint, clamped to ``range``."""

    type: Literal["score_model"]
    input: list[Message] = Field(min_length=1)
    model: str = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: SamplingParams | None = None

    @field_validator("range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"range must be [low, high] with low < high, not {list(v)}")
        return v

    @model_validator(mode="after")
    def _templates(self):
        for i, message in enumerate(self.input):
            _check_templates(*((f"input.{i}.content", t) for t in message.texts()))
        return self


SubGrader = Annotated[Union[StringCheckGrader, TextSimilarityGrader, PythonGrader, ScoreModelGrader],
                      Field(discriminator="type")]


class MultiGrader(_Grader):
    """Sub-graders by name, combined by ``calculate_output`` (formula.py)."""

    type: Literal["multi"]
    graders: dict[str, SubGrader] = Field(min_length=1)
    calculate_output: str

    @model_validator(mode="after")
    def _formula(self):
        bad = [k for k in self.graders if not k.isidentifier() or k in formula.FUNCTIONS]
        if bad:
            raise GraderError(f"grader name {bad[0]!r} cannot be used in calculate_output: use a name of letters, "
                              "digits and _ that is not a function name", "graders")
        formula.parse(self.calculate_output, set(self.graders))
        return self


Grader = Annotated[Union[StringCheckGrader, TextSimilarityGrader, PythonGrader, ScoreModelGrader, MultiGrader],
                   Field(discriminator="type")]
_ADAPTER = TypeAdapter(Grader)
TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")


def parse_grader(value: object) -> Grader:
    """A grader from its JSON object; GraderError naming the first bad field (``grader.operation``)."""
    try:
        return _ADAPTER.validate_python(value)
    except GraderError:
        raise
    except ValidationError as e:
        error = e.errors()[0]
        inner = (error.get("ctx") or {}).get("error")
        relative = inner.param if isinstance(inner, GraderError) else None  # a check naming its own field
        message = str(inner) if relative else error["msg"].removeprefix("Value error, ")
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            relative = "type"
            tag = (error.get("ctx") or {}).get("tag")
            message = f"unknown grader type {tag!r}" if tag else "type is required"
            message += f" (one of {', '.join(TYPES[:-1] if error['loc'] else TYPES)})"
        param = _param(error["loc"], relative)
        raise GraderError(f"{param}: {message}", param) from None


def _param(loc: tuple, relative: str | None = None) -> str:
    """``grader.graders.NAME.FIELD`` from a pydantic location (and a field below it), without the union's
    type tags."""
    parts, i = ["grader"], 0
    loc = list(loc)
    while i < len(loc):
        part = loc[i]
        if i == 0 and part in TYPES or (i >= 2 and loc[i - 2] == "graders" and part in TYPES):
            i += 1
            continue
        parts.append(str(part))
        i += 1
    return ".".join(parts + ([relative] if relative else []))
