"""The errors of graders: a grader that cannot be built, and a data item a grader cannot read."""

from __future__ import annotations

from kubetune.errors import KubetuneError


class GraderError(KubetuneError, ValueError):
    """An invalid grader or item. ``param`` names the field as the API reports it (``grader.operation``,
    ``grader.graders.exact.reference``, ``item``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class GraderUnavailable(KubetuneError):
    """A valid grader this installation cannot run (a metric's package is missing, no endpoint for a model,
    python graders refused here)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
