"""Graders as OpenAI defines them for reinforcement fine-tuning: string_check, text_similarity, python,
score_model and multi. ``parse_grader`` builds one (models.py), ``grade``/``grade_batch`` score samples
with it (run.py), ``referenced_item_fields`` lists the data fields its templates read."""

from kubetune.graders.errors import GraderError, GraderUnavailable
from kubetune.graders.models import Grader, parse_grader
from kubetune.graders.run import (GradeErrors, GradeResult, Runner, grade, grade_batch, referenced_item_fields,
                                  score_models, uses_python)
from kubetune.graders.sandbox import PythonLimits, isolation
from kubetune.graders.score_model import ModelEndpoint
from kubetune.graders.template import Sample

__all__ = ["Grader", "GraderError", "GraderUnavailable", "GradeErrors", "GradeResult", "ModelEndpoint",
           "PythonLimits", "Runner", "Sample", "grade", "grade_batch", "isolation", "parse_grader",
           "referenced_item_fields", "score_models", "uses_python"]
