"""The status model every writer uses: merge patches carry only what a writer set."""

import pytest
from pydantic import ValidationError

from kubetune.status import DataReport, Progress, Status


def test_patch_has_only_the_fields_set_in_camel_case_and_none_removes():
    assert Status(training_job="bot-train-1", retries=1).patch() == {"trainingJob": "bot-train-1", "retries": 1}
    assert Status(endpoint=None).patch() == {"endpoint": None}  # merge patch: the field is removed
    assert Status(**{"outputModel": "s3://m/bot/model"}).patch() == {"outputModel": "s3://m/bot/model"}


def test_data_report_carries_counts_only():
    report = {"examples_in": 10, "examples_out": {"train": 7, "validation": 1},
              "bad_lines": {"total": 2, "first": [{"line": 3, "reason": "malformed JSON"}]},
              "duplicates": {"exact": 1, "near": 0}, "pii_redacted": {"email": 2, "phone": 1},
              "tokens": {"train": {"tokens": 900}}}
    assert Status(data_report=DataReport.from_report(report)).patch() == {"dataReport": {
        "examplesIn": 10, "train": 7, "validation": 1, "badLines": 2, "exactDuplicates": 1, "nearDuplicates": 0,
        "piiRedacted": 3, "trainTokens": 900}}

    report["examples_out"]["golden"] = 4  # with evaluation.goldenSet and preprocessing.dedup.index
    report["duplicates"].update(golden=2, index=5)
    assert DataReport.from_report(report).patch() == {
        "examplesIn": 10, "train": 7, "validation": 1, "badLines": 2, "exactDuplicates": 1, "nearDuplicates": 0,
        "piiRedacted": 3, "trainTokens": 900, "golden": 4, "goldenRemoved": 2, "indexRemoved": 5}


def test_a_writer_cannot_invent_fields_or_phases():
    with pytest.raises(ValidationError, match="stepz"):
        Progress(phase="training", step=1, stepz=2, total_steps=2, epoch=0.5, percent=50, tokens_per_second=1)
    with pytest.raises(ValidationError, match="phase"):
        Status(phase="Running")
