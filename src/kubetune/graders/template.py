"""OpenAI's grader templates: ``{{item.field}}``, ``{{item.a.b}}``, ``{{sample.output_text}}``,
``{{sample.output_json.field}}``.

A reference is a namespace (``item`` or ``sample``) and a path of keys, list indexes as numbers
(``{{item.answers.0}}``). Strings are put in as they are, other values as JSON. A missing item field is
an error in the data (the prepare phase checks every line with ``referenced_item_fields``); a missing
``output_json`` field is the sample's fault, which a grader scores 0 and flags (``SampleError``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from kubetune.graders.errors import GraderError

REFERENCE = re.compile(r"\{\{(.*?)\}\}", re.S)
KEY = re.compile(r"^[A-Za-z0-9_-]+$")
SAMPLE_VARIABLES = ("output_text", "output_json")


@dataclass(frozen=True)
class Sample:
    """What the model produced: its text, and that text parsed when it is JSON (else None)."""

    output_text: str
    output_json: object = None
    output_tools: list = field(default_factory=list)

    @classmethod
    def from_text(cls, text: str) -> Sample:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return cls(text, parsed)

    def as_dict(self) -> dict:
        return {"output_text": self.output_text, "output_json": self.output_json, "output_tools": self.output_tools}


class SampleError(Exception):
    """The sample lacks what a template reads: ``parse`` when it is not JSON at all."""

    def __init__(self, message: str, parse: bool):
        super().__init__(message)
        self.parse = parse


def references(text: str, param: str) -> list[tuple[str, ...]]:
    """The references of a template, each as (namespace, key, ...); GraderError for bad syntax."""
    found = []
    for match in REFERENCE.finditer(text):
        found.append(_parse(match.group(1).strip(), param))
    rest = REFERENCE.sub("", text)
    if "{{" in rest:
        raise GraderError("'{{' without a closing '}}'", param)
    return found


def _parse(inner: str, param: str) -> tuple[str, ...]:
    parts = tuple(inner.split("."))
    if parts[0] not in ("item", "sample") or len(parts) < 2:
        raise GraderError(f"{{{{{inner}}}}} is not a reference: use {{{{item.FIELD}}}} or "
                          f"{{{{sample.output_text}}}} / {{{{sample.output_json.FIELD}}}}", param)
    bad = [p for p in parts[1:] if not KEY.match(p)]
    if bad:
        raise GraderError(f"{{{{{inner}}}}} has an invalid key {bad[0]!r} (letters, digits, _ and - only)",
                          param)
    if parts[0] == "sample" and parts[1] not in SAMPLE_VARIABLES:
        raise GraderError(f"{{{{{inner}}}}}: sample has {', '.join(SAMPLE_VARIABLES)}, not {parts[1]!r}",
                          param)
    if parts[0] == "sample" and parts[1] == "output_text" and len(parts) > 2:
        raise GraderError(f"{{{{{inner}}}}}: sample.output_text is a string, it has no fields", param)
    return parts


def lookup(value: object, path: tuple[str, ...]) -> tuple[bool, object]:
    """(found, value) of a key path in nested dicts and lists."""
    for key in path:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return False, None
    return True, value


def fill(text: str, sample: Sample, item: dict) -> str:
    """The template with its references replaced. GraderError for a missing item field, SampleError for
    a sample that lacks one."""
    def value(match: re.Match) -> str:
        parts = _parse(match.group(1).strip(), "template")
        if parts[0] == "item":
            found, v = lookup(item, parts[1:])
            if not found:
                raise GraderError(f"the item has no field {'.'.join(parts[1:])!r}, which the grader reads "
                                  f"({{{{{'.'.join(parts)}}}}})", "item")
        elif parts[1] == "output_text":
            v = sample.output_text
        else:
            if sample.output_json is None:
                raise SampleError(f"{{{{{'.'.join(parts)}}}}}: the sample is not JSON", parse=True)
            found, v = lookup(sample.output_json, parts[2:])
            if not found:
                raise SampleError(f"the sample's JSON has no field {'.'.join(parts[2:])!r}", parse=False)
        return v if isinstance(v, str) else json.dumps(v)

    return REFERENCE.sub(value, text)
