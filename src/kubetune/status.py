"""The status of a FineTuneJob: one model for all three writers, like the spec's.

The operator writes the phase and what it started, the prepare pod the data report, the trainer its
progress. Each builds these models and sends ``patch()`` (camelCase, only the fields it set) as a JSON
merge patch; the CRD's status schema is generated from ``Status`` (``kubectl explain ftj.status``).
``StatusSink`` is how a pod patches its own job's status.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.spec import API_GROUP, API_VERSION, PLURAL

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def patch(self) -> dict:
        """The merge patch of the fields that were set; one set to None is removed from the object."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class Condition(_Model):
    """A Kubernetes-style condition: Ready, Running, Succeeded or Failed."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    last_transition_time: str = Field(description="When status last flipped (RFC 3339).")


class DataReport(_Model):
    """Counts from the prepare pod (the whole report, with reasons, is data_report.json in the output)."""

    examples_in: int = Field(description="Examples read from the dataset.")
    train: int = Field(description="Training examples after cleaning, dedup and tokenization.")
    validation: int = Field(description="Validation examples.")
    bad_lines: int = Field(description="Input lines that could not be read (see data_report.json for which and why).")
    exact_duplicates: int
    near_duplicates: int
    pii_redacted: int = Field(description="Personal-data values replaced with placeholders.")
    train_tokens: int
    golden: int | None = Field(None, description="Examples of evaluation.goldenSet (a split of their own).")
    golden_removed: int | None = Field(None, description="Training and validation examples dropped as exact or near "
                                       "copies of a golden example.")
    index_removed: int | None = Field(None, description="Examples dropped as copies of ones earlier jobs trained on "
                                      "(preprocessing.dedup.index).")

    @classmethod
    def from_report(cls, report: dict) -> DataReport:
        """Counts only: never the data itself."""
        return cls(examples_in=report["examples_in"], train=report["examples_out"]["train"],
                   validation=report["examples_out"]["validation"], bad_lines=report["bad_lines"]["total"],
                   exact_duplicates=report["duplicates"]["exact"], near_duplicates=report["duplicates"]["near"],
                   pii_redacted=sum(report["pii_redacted"].values()), train_tokens=report["tokens"]["train"]["tokens"],
                   **{k: v for k, v in (("golden", report["examples_out"].get("golden")),
                                        ("golden_removed", report["duplicates"].get("golden")),
                                        ("index_removed", report["duplicates"].get("index"))) if v is not None})


class Progress(_Model):
    """The trainer's progress, written by rank 0 when it starts, every few seconds and at each checkpoint."""

    phase: Literal["starting", "training", "exporting", "evaluating", "done"]
    attempt: int | None = Field(None, description="The training attempt (0 first) that wrote this record.")
    step: int
    total_steps: int
    epoch: float
    percent: float
    eta_seconds: int | None = Field(None, description="Estimated seconds left.")
    tokens_per_second: float
    gpu_hours: float | None = Field(None, description="GPU-hours used by this job so far (GPUs x hours, all attempts).")
    mfu: float | None = Field(None, description="Model FLOPs utilization on GPUs: achieved / peak FLOP/s (0-1); "
                              "the FLOPs the step really does (see the README's Training section).")
    global_batch_size: int | None = Field(None, description="Packed rows per optimizer step (training.globalBatchSize "
                                          "as resolved; auto: fitted to the data).")
    micro_batch_size: int | None = Field(None, description="Rows per rank per forward pass (training.microBatchSize "
                                         "as resolved; auto: what the probe found).")
    gradient_checkpointing: bool | None = Field(None, description="Whether gradient checkpointing is on.")
    compiled: bool | None = Field(None, description="Whether the decoder blocks run torch.compile'd.")
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Latest train_loss, train_accuracy, valid_loss, ...; evaluation at the end.")
    checkpoint: str | None = Field(None, description="The latest complete checkpoint.")
    updated_at: str | None = None


class CheckpointInfo(_Model):
    """A complete checkpoint: its step, the validation metrics at that step and a servable model."""

    name: str = Field(description="step-N: what serve.checkpoint and kubetune export --checkpoint take.")
    step: int
    metrics: dict[str, float] = Field(default_factory=dict, description="valid_loss, valid_perplexity, ... at this step.")
    model: str | None = Field(None, description="A Hugging Face model folder made from this checkpoint.")
    best: bool | None = Field(None, description="The best checkpoint by training.bestMetric.")


class EvaluationResult(_Model):
    """The evaluation gate's verdict (evaluation.gate)."""

    passed: bool
    metric: str
    value: float | None = None
    threshold: float | None = Field(None, description="What the value had to beat (the base model's value, min or max).")
    message: str


class Lineage(_Model):
    """Where the model came from (the whole record is lineage.json beside the model)."""

    spec_hash: str = Field(description="sha256 of the job spec that trained it.")
    base_model: str
    base_model_hash: str | None = None
    data_hash: str | None = Field(None, description="sha256 over the input files' hashes.")
    prepared_hash: str | None = Field(None, description="sha256 over the prepared shards' hashes.")
    kubetune_version: str
    trainer_image: str | None = None
    uri: str = Field(description="lineage.json")


class Status(_Model):
    """Observed state, written by the operator, the prepare pod and the trainer."""

    phase: Literal["Pending", "Preparing", "Training", "Suspended", "Succeeded", "Failed"] | None = None
    reason: str | None = None
    message: str | None = None
    conditions: list[Condition] | None = None
    observed_generation: int | None = Field(None, description="The spec generation the operator last acted on.")
    start_time: str | None = None
    completion_time: str | None = None
    base_model: str | None = Field(None, description="model.fromJob resolved to that job's output model.")
    prepared: bool | None = Field(None, description="The data is prepared.")
    training_job: str | None = Field(None, description="The current training gang (a Job).")
    retries: int | None = Field(None, description="Failed training gangs restarted so far (counted against spec.maxRetries).")
    preemptions: int | None = Field(None, description="Training gangs restarted after a preemption, eviction or node "
                                    "drain (not counted against spec.maxRetries).")
    admitted_at: str | None = Field(None, description="When Kueue admitted the running Job (spec.queue); absent while "
                                    "it waits (reason Queued, with Kueue's message) or after a preemption.")
    output_model: str | None = Field(None, description="Where the fine-tuned model is.")
    endpoint: str | None = Field(None, description="The OpenAI-compatible endpoint, when served.")
    data_report: DataReport | None = None
    progress: Progress | None = None
    checkpoints: list[CheckpointInfo] | None = Field(None, description="Complete checkpoints, the best marked.")
    evaluation: EvaluationResult | None = Field(None, description="The evaluation gate's result.")
    lineage: Lineage | None = None


class StatusSink:
    """PATCH .../finetunejobs/NAME/status of the pod's own job; its ServiceAccount may patch only that."""

    def __init__(self, name: str, namespace: str, server: str, token_file: Path, ca_file: Path | None):
        self.url = f"{server}/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    @classmethod
    def from_environment(cls) -> StatusSink | None:
        """In a pod of a job (KUBETUNE_JOB_NAME and a mounted token), else None."""
        name = os.environ.get("KUBETUNE_JOB_NAME")
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not name or not host or not (SA_DIR / "token").exists():
            return None
        namespace = os.environ.get("KUBETUNE_JOB_NAMESPACE") or (SA_DIR / "namespace").read_text().strip()
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return cls(name, namespace, f"https://{host}:{port}", SA_DIR / "token", SA_DIR / "ca.crt")

    def send(self, progress: Progress) -> None:
        self.patch(Status(progress=progress))

    def patch(self, status: Status) -> None:
        body = json.dumps({"status": status.patch()}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH", headers={
            "Content-Type": "application/merge-patch+json",
            "Authorization": f"Bearer {self.token_file.read_text().strip()}",  # re-read: tokens rotate
        })
        with urllib.request.urlopen(request, timeout=10, context=self.context):
            pass
