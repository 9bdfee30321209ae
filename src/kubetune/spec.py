"""The FineTuneJob spec: one typed model shared by the CLI, the operator and the trainer.

The CRD's openAPIV3Schema is generated from these classes (see ``kubetune.crd``), so a field's
``description`` is also what ``kubectl explain`` shows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from kubetune.errors import KubetuneError
from kubetune.graders.models import Grader
from kubetune.graders.run import score_models
from kubetune.graders.score_model import ModelEndpoint

API_GROUP = "kubetune.dev"
API_VERSION = "v1alpha1"
PLURAL = "finetunejobs"
KIND = "FineTuneJob"

PiiType = Literal["email", "phone", "card", "iban", "ip", "ssn", "secret"]
PII_TYPES = get_args(PiiType)
DEFAULT_LEARNING_RATE = {"lora": 2.0e-4, "full": 2.0e-5}

# Values that end up in the child objects (Jobs, Services, Deployments) are checked here, at admission,
# as the API server would check them there: a bad one then names its FineTuneJob field, instead of
# failing the job later on a child. The patterns and limits are Kubernetes' own (they become CRD patterns).
JOB_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a DNS label: also the prefix of child and pod names
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # Secret, PriorityClass
# cpu/memory: a plain decimal with an optional SI suffix or a short exponent (no sign: requests are >= 0;
# 64 characters and 2 exponent digits keep it finite as a float).
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]{1,2}|[numkMGTPE]|[KMGTPE]i)?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
IMAGE = r"^\S+$"  # container images: no whitespace
TOLERATION_KEY = f"^({LABEL_KEY[1:-1]})?$"  # empty: every taint (with operator: Exists)
DURATION = r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"  # Go's time.Duration form, as kubectl and Kueue write them: 30m, 1h30m, 90s
CHECKPOINT_REF = r"^(last|best|step-[0-9]+)$"
VALIDATION_METRICS = ("valid_loss", "valid_perplexity", "valid_mean_token_accuracy", "valid_pref_accuracy",
                      "valid_reward", "valid_reply_pmi")  # no generation; valid_reply_pmi only after training
ValidationMetric = Literal["valid_loss", "valid_perplexity", "valid_mean_token_accuracy", "valid_pref_accuracy",
                           "valid_reward"]
Uri = Annotated[str, Field(min_length=1, max_length=4096)]
Quantity = Annotated[str, Field(pattern=QUANTITY, max_length=64)]


class _Model(BaseModel):
    # camelCase in YAML like every Kubernetes API; unknown fields are errors, not silently ignored.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class FromConfig(_Model):
    """Initialize a small model from a config (no model hub needed); the tokenizer is trained on the job's data."""

    architecture: Literal["llama"] = Field("llama", description="Model architecture.")
    size: Literal["tiny", "small", "base", "1b", "3b", "8b"] = Field(
        "tiny", description="Size preset: tiny (~0.5M params), small (~10M), base (~100M); 1b, 3b and 8b are shaped "
        "like TinyLlama 1.1B, Llama 3.2 3B and Llama 3.1 8B (grouped-query attention), for benchmarks."
    )
    vocab_size: int = Field(2048, ge=256, le=262144, description="Vocabulary size of the tokenizer trained on the data.")


class ModelSource(_Model):
    """The base model. Exactly one of source, fromJob or fromConfig."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "[has(self.source), has(self.fromJob), has(self.fromConfig)].filter(x, x).size() == 1",
        "message": "set exactly one of source, fromJob, fromConfig"}]})

    source: Uri | None = Field(
        None, description="hf://ORG/NAME, s3://bucket/prefix/ or a local folder holding a Hugging Face model."
    )
    from_job: str | None = Field(None, pattern=JOB_NAME, max_length=40,
                                 description="Start from the output model of a previous FineTuneJob.")
    from_config: FromConfig | None = Field(None, description="Build a fresh small model from a config.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [n for n in ("source", "from_job", "from_config") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of source, fromJob, fromConfig")
        return self


class Dataset(_Model):
    """Where the raw data is and how to read it."""

    train: Uri = Field(description="s3://bucket/prefix/, s3://bucket/file.jsonl or a local file or folder.")
    validation: Uri | None = Field(None, description="Held-out data; when absent, validationSplit of train is held out.")
    validation_split: float = Field(0.1, gt=0, lt=0.5, description="Fraction of train held out for validation.")
    format: Literal["auto", "chat", "instruction", "prompt_completion", "text"] = Field(
        "auto", description="Record format; auto detects it per record."
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the job when more than this fraction of input lines is malformed."
    )


class Dedup(_Model):
    """Exact and near-duplicate removal (MinHash + LSH)."""

    exact: bool = Field(True, description="Drop examples whose normalized text is identical to an earlier one.")
    near: bool = Field(True, description="Drop near duplicates found with MinHash LSH.")
    near_threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity at or above which two examples are near duplicates.")
    ngram: int = Field(3, ge=1, le=16, description="Word n-gram size of the MinHash shingles.")
    num_perm: int = Field(128, ge=16, le=1024, description="Number of MinHash permutations.")
    index: Uri | None = Field(
        None, description="A dedup index kept across jobs (s3://bucket/prefix/ or a local folder): examples that "
        "duplicate (exactly or nearly) one an earlier job trained on are dropped, and this job's training examples "
        "are added to it after preparation. About 0.4 KB an example; the oldest beyond indexMaxExamples are forgotten.")
    index_max_examples: int = Field(1_000_000, ge=1, le=100_000_000, description="The most examples the index "
                                    "remembers (the newest); bounds its size (about 0.4 KB each).")


class Pii(_Model):
    """Personal-data scrubbing: matches are replaced with typed placeholders such as <EMAIL>."""

    redact: list[PiiType] = Field(default_factory=lambda: list(PII_TYPES), description="PII types to redact.")
    allow: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=1000, description="Values that are never redacted, e.g. your own support address."
    )


class Preprocessing(_Model):
    """Cleaning, filtering, deduplication, PII scrubbing, tokenization and packing."""

    normalize: bool = Field(True, description="Unicode NFC, whitespace and control-character normalization.")
    min_chars: int = Field(8, ge=0, description="Drop examples whose assistant text is shorter than this.")
    max_repetition: float = Field(
        0.5, gt=0, le=1, description="Drop examples where more than this fraction of word 3-grams are repeats."
    )
    dedup: Dedup = Field(default_factory=Dedup)
    pii: Pii = Field(default_factory=Pii)
    max_seq_length: int = Field(2048, ge=16, description="Longest sequence in tokens; longer examples are dropped.")
    packing: bool = Field(True, description="Pack several examples into one sequence (attention stays within each example).")


class Lora(_Model):
    """LoRA adapter settings (method: lora only)."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt.")


class EarlyStopping(_Model):
    """Stop training when the validation metric (training.bestMetric) has not improved for a while."""

    patience: int = Field(ge=1, description="Validations in a row without improvement after which training stops.")
    min_delta: float = Field(0.0, ge=0, description="The least change that counts as an improvement.")


class Dpo(_Model):
    """Direct Preference Optimization settings (objective: dpo only)."""

    beta: float = Field(0.1, gt=0, le=10, description="DPO temperature, OpenAI's hyperparameter name: how far the "
                        "model may move from the base model (lower: further).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of a supervised loss on the preferred answer added to "
                              "the DPO loss.")


class Judge(_Model):
    """Where a score_model grader's model answers, as the job's pods reach it."""

    url: Uri = Field(description="Base URL of an OpenAI-compatible API (its /chat/completions is under it), e.g. "
                     "http://support-judge-serve.my-team.svc:8000/v1 for a kubetune endpoint in the cluster.")
    model: str | None = Field(None, max_length=256, description="The model name to send; default the grader's "
                              "model; empty: none (a kubetune endpoint serves one model and takes it as its own).")


class Rft(_Model):
    """Reinforcement fine-tuning settings (objective: rft only): GRPO, each prompt's samples scored by the grader
    and compared with each other."""

    # The grader is OpenAI's object, a union on its ``type``: the CRD keeps it as an open object (a structural
    # schema cannot say oneOf), and the CLI and the operator validate it with these models.
    grader: Grader = Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
                           description="An OpenAI grader object (string_check, text_similarity, python, score_model "
                           "or multi) that scores each sampled answer; its templates read {{sample.output_text}} and "
                           "{{item.FIELD}} (the data line's other fields).")
    samples_per_prompt: int = Field(4, ge=2, le=64, description="Answers sampled per prompt; each one's advantage "
                                    "is its reward against the mean and spread of its group.")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Longest sampled answer in tokens.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature.")
    kl_coef: float = Field(0.04, ge=0, le=10, description="Weight of the KL penalty to the base "
                           "model (0: no reference model); TRL's beta.")
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the probability ratio to the "
                                "sampling policy.")
    judges: dict[str, Judge] = Field(default_factory=dict, max_length=16, description="For score_model graders: "
                                     "each grader model's endpoint, by the name in the grader's model field. The "
                                     "trainer sends no API key: an endpoint the job's pods may call as they are.")

    @model_validator(mode="after")
    def _every_judge_has_an_endpoint(self) -> Rft:
        # Refused here, naming the field, rather than every sample scoring 0 from the first step on.
        missing = sorted(score_models(self.grader) - set(self.judges))
        if missing:
            raise ValueError(f"judges has no endpoint for the score_model model {missing[0]!r}: add "
                             f"judges: {{{missing[0]}: {{url: http://.../v1}}}}")
        return self

    def endpoints(self) -> dict[str, ModelEndpoint]:
        """The graders' judge endpoints, for kubetune.graders.grade_batch."""
        return {name: ModelEndpoint(j.url, model=j.model) for name, j in self.judges.items()}


class Training(_Model):
    """Fine-tuning hyperparameters."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "!has(self.lora) || !has(self.method) || self.method == 'lora'",
        "message": "lora settings are only allowed with method: lora"}, {
        "rule": "has(self.rft) == (has(self.objective) && self.objective == 'rft')",
        "message": "training.rft goes with objective: rft, and objective: rft needs training.rft with a grader"}]})

    method: Literal["lora", "full"] = Field("lora", description="lora trains adapters; full trains every weight.")
    objective: Literal["sft", "dpo", "rft"] = Field(
        "sft", description="sft: supervised fine-tuning on assistant turns; dpo: Direct Preference Optimization on "
        "preferred/non-preferred answer pairs; rft: reinforcement fine-tuning (GRPO) of answers sampled for "
        "prompts, scored by training.rft.grader.")
    epochs: int = Field(3, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate; default 2e-4 for lora, 2e-5 for full.")
    global_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Packed rows per optimizer step across all ranks. auto: 32, or fewer for small data "
        "(about 8 steps per epoch; a multiple of the training processes); the choice is in status.progress.")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Rows per rank per forward pass (the global batch stays exact through gradient "
        "accumulation). auto: on GPUs the largest that fits, found by a short probe at start; on CPU 4.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps of linear warmup before cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    offload: bool = Field(False, description="Offload optimizer state to CPU (ZeRO 2/3).")
    gradient_checkpointing: bool | None = Field(
        None, description="Trade compute for activation memory. Absent (auto): on only when a micro batch of one "
        "row does not fit in GPU memory without it.")
    compile: bool | None = Field(
        None, description="torch.compile each decoder block (fuses norms, activations and rotary embeddings). "
        "Absent (auto): on with GPUs and ZeRO stages 0-2; it needs the fused attention kernel, so not on CPU.")
    checkpoint_every: int = Field(200, ge=1, description="Save a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Keep only the newest this many complete checkpoints.")
    eval_every: int = Field(50, ge=1, description="Compute validation metrics every this many steps (and at the end).")
    seed: int = Field(42, description="Seed for data order, splitting and initialization.")
    stall_timeout: str = Field(
        "30m", pattern=DURATION, max_length=32, description="An attempt whose trainer has not finished a step for "
        "this long (e.g. 30m, 1h, 90s) is stopped and counted as failed; the next attempt resumes from the latest checkpoint.")
    best_metric: ValidationMetric = Field(
        "valid_loss", description="The validation metric that marks the best checkpoint (and early stopping watches); "
        "valid_pref_accuracy with objective: dpo only.")
    early_stopping: EarlyStopping | None = Field(None, description="Stop when the validation metric stops improving.")
    lora: Lora | None = Field(None, description="LoRA settings; defaults apply when method is lora.")
    dpo: Dpo | None = Field(None, description="DPO settings; defaults apply when objective is dpo.")
    rft: Rft | None = Field(None, description="Reinforcement fine-tuning settings; required when objective is rft.")

    @model_validator(mode="after")
    def _method_defaults(self) -> Training:
        if self.lora is not None and self.method != "lora":
            raise ValueError("lora settings are only allowed with method: lora")
        if self.method == "lora" and self.lora is None:
            self.lora = Lora()
        if self.objective == "dpo" and self.dpo is None:
            self.dpo = Dpo()
        self._rft_settings()
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE[self.method]
        return self

    def _rft_settings(self) -> None:
        if self.rft is not None and self.objective != "rft":
            raise ValueError("rft settings are only allowed with objective: rft")
        if self.objective != "rft":
            return
        if self.rft is None:
            raise ValueError("objective: rft needs training.rft with a grader")
        if "best_metric" not in self.model_fields_set:
            self.best_metric = "valid_reward"  # rft has no loss on held-out answers: the mean reward marks the best
        elif self.best_metric != "valid_reward":
            raise ValueError(f"bestMetric {self.best_metric} is not computed with objective: rft (use valid_reward)")

    @property
    def stall_timeout_seconds(self) -> float:
        return duration_seconds(self.stall_timeout)


class Toleration(_Model):
    """A Kubernetes toleration passed through to the job's pods."""

    # Pod validation's rules for a toleration, so that a bad one is refused here, naming it.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
         "message": "operator must be Exists when key is empty"},
        {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
         "message": "value must be empty when operator is Exists"},
        {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
         "message": "tolerationSeconds needs effect: NoExecute"}]})

    key: str | None = Field(None, pattern=TOLERATION_KEY, max_length=317)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, pattern=LABEL_VALUE, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _like_kubernetes(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise ValueError("operator must be Exists when key is empty")
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect: NoExecute")
        return self


class PrepareResources(_Model):
    """The prepare pod's requests: it streams the dataset through cleaning, dedup and tokenization."""

    cpu: Quantity = Field("1", description="CPU request of the prepare pod; it works on one process per whole CPU.")
    memory: Quantity = Field("2Gi", description="Memory request of the prepare pod; preparation streams, so 2Gi "
                             "holds about 3 M conversations whatever their size (the dedup index grows by about "
                             "0.5 KB a conversation).")


class Resources(_Model):
    """Where training runs. gpusPerNode: 0 selects the CPU fallback."""

    # Map keys have no schema of their own: nodeSelector's are checked by a rule.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": f"!has(self.nodeSelector) || self.nodeSelector.all(k, k.matches(r'{LABEL_KEY}') && size(k) <= 317)",
        "fieldPath": ".nodeSelector", "message": "nodeSelector keys must be label keys, e.g. kubernetes.io/arch"}]})

    # At most 10 000 (an Indexed Job allows 100 000): pod hostnames NAME-train-ATTEMPT-INDEX stay within 63.
    nodes: int = Field(1, ge=1, le=10000, description="Training pods (one per node).")
    gpus_per_node: int = Field(1, ge=0, le=1024, description="GPUs per pod; 0 trains on CPU with DeepSpeed's CPU accelerator.")
    cpu: Quantity | None = Field(None, description="CPU request per pod, e.g. '4'.")
    memory: Quantity | None = Field(None, description="Memory request per pod, e.g. '16Gi'.")
    image: str | None = Field(None, pattern=IMAGE, max_length=1024, description="Trainer image; the operator's default when absent.")
    node_selector: dict[str, Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]] | None = Field(
        None, max_length=64, description="Node selector for the pods.")
    tolerations: list[Toleration] | None = Field(None, max_length=64, description="Tolerations for the pods.")
    priority_class_name: str | None = Field(None, pattern=DNS_SUBDOMAIN, max_length=253, description="PriorityClass of the pods.")
    prepare: PrepareResources = Field(default_factory=PrepareResources, description="Requests of the prepare pod.")
    termination_grace_period_seconds: int = Field(
        300, ge=10, le=86400, description="Seconds a pod has after SIGTERM (drain, eviction, suspend) to finish its "
        "step and write a checkpoint before it is killed.")

    @model_validator(mode="after")
    def _selector_keys(self) -> Resources:
        bad = [k for k in self.node_selector or {} if not re.fullmatch(LABEL_KEY[1:-1], k) or len(k) > 317]
        if bad:
            raise ValueError(f"nodeSelector keys must be label keys, e.g. kubernetes.io/arch (not {bad[0]!r})")
        return self


GateMetric = Literal["valid_loss", "valid_perplexity", "valid_mean_token_accuracy", "valid_pref_accuracy",
                     "valid_reply_pmi", "rouge_l",
                     "bleu", "semantic_similarity", "repetition_rate", "distinct_1", "distinct_2", "empty_rate",
                     "truncated_rate", "grader_score"]


class Gate(_Model):
    """A bar the fine-tuned model must clear to be served. Exactly one of mustBeat, min or max."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "[has(self.mustBeat), has(self.min), has(self.max)].filter(x, x).size() == 1",
        "message": "set exactly one of mustBeat, min, max"}, {
        "rule": "!has(self.minDelta) || has(self.mustBeat)", "message": "minDelta goes with mustBeat"}]})

    metric: GateMetric = Field(description="An evaluation metric (see eval_report.json).")
    must_beat: Literal["base", "serving"] | None = Field(
        None, description="base: the fine-tuned model must do better than the base model (on the validation split); "
        "serving: than evaluation.servedModel, on evaluation.goldenSet when given, else on the validation split.")
    min_delta: float | None = Field(None, ge=0, description="With mustBeat: the fine-tuned model must be better by at "
                                    "least this much (absent: any improvement).")
    min: float | None = Field(None, description="The fine-tuned model's value must be at least this.")
    max: float | None = Field(None, description="The fine-tuned model's value must be at most this.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Gate:
        if [self.must_beat is not None, self.min is not None, self.max is not None].count(True) != 1:
            raise ValueError("set exactly one of mustBeat, min, max")
        if self.min_delta is not None and self.must_beat is None:
            raise ValueError("minDelta goes with mustBeat")
        return self


class Evaluation(_Model):
    """Generation evaluation on held-out conversations at the end."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "!has(self.gate) || !has(self.gate.mustBeat) || self.gate.mustBeat != 'serving' || has(self.servedModel)",
        "message": "gate.mustBeat: serving needs evaluation.servedModel (the model being served)"}]})

    samples: int = Field(50, ge=0, description="Held-out conversations to generate replies for.")
    max_new_tokens: int = Field(128, ge=1, description="Longest generated reply.")
    gate: Gate | None = Field(None, description="Serve the model only if it passes this, e.g. {metric: valid_loss, "
                              "mustBeat: base} or {metric: rouge_l, min: 0.3}.")
    golden_set: Uri | None = Field(
        None, description="A fixed evaluation set (JSONL conversations, s3:// or local): never trained on (training "
        "and validation examples that duplicate one of it, exactly or nearly, are dropped), and both models are "
        "scored on it as on the validation split.")
    served_model: Uri | None = Field(
        None, description="The model being served (hf://, s3:// or a local folder), for gate.mustBeat: serving; "
        "the report shows it beside the fine-tuned model.")

    @model_validator(mode="after")
    def _serving_needs_model(self) -> Evaluation:
        if self.gate is not None and self.gate.must_beat == "serving" and self.served_model is None:
            raise ValueError("gate.mustBeat: serving needs evaluation.servedModel (the model being served)")
        return self


class Output(_Model):
    """Where prepared data, checkpoints, reports and the final model go."""

    uri: Uri = Field(description="s3://bucket/prefix/ or a local folder.")


class Storage(_Model):
    """How to reach S3-compatible object storage."""

    endpoint: Uri | None = Field(None, description="Endpoint URL of an S3-compatible server (MinIO, Ceph); AWS when absent.")
    region: str | None = Field(None, max_length=64, description="Region; us-east-1 when absent.")
    credentials_secret: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, given to the job's pods."
    )


class Capture(_Model):
    """Recording served conversations and users' feedback (POST /v1/feedback), PII-scrubbed with
    preprocessing.pii before anything is written. Only `kubetune serve` records (not a custom serve.image)."""

    uri: Uri = Field(description="s3:// prefix (or local folder) the sampled conversations and every feedback "
                     "are written to, as chat JSONL objects named by time and pod. Set a lifecycle rule on it: "
                     "kubetune deletes nothing.")
    sample_rate: float = Field(1.0, ge=0, le=1, description="Fraction of conversations recorded (0: only those "
                               "given feedback).")
    feedback_uri: Uri | None = Field(None, description="s3:// prefix (or local folder) conversations rated up or "
                                     "corrected are written to as training data (chat JSONL), e.g. a schedule's "
                                     "dataset prefix.")


# A custom server (vLLM) does not record: capture is kubetune serve's.
CAPTURE_RULE = {"rule": "!has(self.capture) || !has(self.image)", "fieldPath": ".capture",
                "message": "capture needs kubetune serve: remove image (a custom server records nothing)"}


def check_capture(serve: Any) -> Any:
    if serve.capture is not None and serve.image is not None:
        raise ValueError(CAPTURE_RULE["message"])
    return serve


class Serve(_Model):
    """Serving the final model as an OpenAI-compatible endpoint."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [CAPTURE_RULE]})

    enabled: bool = Field(False, description="Deploy an endpoint after the job succeeds.")
    replicas: int = Field(1, ge=1, le=10000, description="Serving pods.")
    gpus: int = Field(0, ge=0, le=1024, description="GPUs per serving pod.")
    cpu: Quantity | None = Field(None, description="CPU request per serving pod.")
    memory: Quantity | None = Field(None, description="Memory request per serving pod.")
    image: str | None = Field(
        None, pattern=IMAGE, max_length=1024, description="Serving image; default the trainer image running `kubetune serve`. E.g. a vLLM image."
    )
    args: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        None, max_length=64, description="Container args for a custom image; {model} is replaced by a local copy of the model, "
        "{name} by the job name, {port} by 8000. E.g. [--model, '{model}', --served-model-name, '{name}', --port, '{port}']."
    )
    checkpoint: str = Field("last", pattern=CHECKPOINT_REF, max_length=32,
                            description="What is served: last (the final model), best (by training.bestMetric) or step-N.")
    capture: Capture | None = Field(None, description="Record served conversations and feedback (off when absent).")

    _capture = model_validator(mode="after")(check_capture)


# What may change once a job exists. Everything else is fixed at creation: the pods' job file (a
# ConfigMap) and every retry's gang are built from the spec, so an edit would be ignored or mix two
# specs in one job. These three are read by the operator alone, when it acts on them, so edits take effect.
EDITABLE_FIELDS = ("suspend", "maxRetries", "serve")
_EDITABLE = "only suspend, maxRetries and serve can; create a new job instead"


def _immutable_rules(schema: dict) -> None:
    """CEL transition rules for the CRD (the API server checks them on updates, against oldSelf).

    A rule on spec cannot see status, so "immutable" means from creation on, as in Kubeflow's TrainJob.
    One rule per field, so the rejection names the field. Defaults are not stored (see kubetune.crd), so
    an optional field's presence counts too.
    """
    rules = []
    for name in schema["properties"]:
        if name in EDITABLE_FIELDS:
            continue
        same = f"self.{name} == oldSelf.{name}"
        if name not in schema.get("required", []):
            same = f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || {same})"
        rules.append({"rule": same, "fieldPath": f".{name}", "reason": "FieldValueForbidden",
                      "message": f"{name} cannot change once the job exists; {_EDITABLE}"})
    schema["x-kubernetes-validations"] = rules


class Queue(_Model):
    """Kueue (kueue.sigs.k8s.io): where the job's Jobs wait for quota, and how they rank there."""

    name: str = Field(pattern=LABEL_VALUE, min_length=1, max_length=63, description="The LocalQueue in the job's "
                      "namespace (the label kueue.x-k8s.io/queue-name of every child Job; the FineTuneJob's own label "
                      "works too). Each Job starts suspended and runs once Kueue admits it: the training gang's pods "
                      "all at once.")
    priority_class: str | None = Field(None, pattern=DNS_SUBDOMAIN, max_length=253, description="A Kueue "
                                       "WorkloadPriorityClass (kueue.x-k8s.io/priority-class): higher ones are "
                                       "admitted first and may preempt lower ones, which save a checkpoint and "
                                       "resume when admitted again.")


class FineTuneJobSpec(_Model):
    """A fine-tuning job: data in, a tuned chat model out."""

    model_config = ConfigDict(json_schema_extra=_immutable_rules)

    model: ModelSource
    dataset: Dataset
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    training: Training = Field(default_factory=Training)
    resources: Resources = Field(default_factory=Resources)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: Output
    storage: Storage = Field(default_factory=Storage)
    serve: Serve = Field(default_factory=Serve)
    queue: Queue | None = Field(None, description="Queue the job's Jobs in Kueue (absent: they start at once, unless "
                                "the FineTuneJob has the label kueue.x-k8s.io/queue-name).")
    suspend: bool = Field(False, description="Stop the running workload, keeping progress; false again resumes it.")
    max_retries: int = Field(  # at most 100: training Job names (NAME-train-ATTEMPT) stay short
        3, ge=0, le=100, description="Times a failed training gang is restarted from the latest checkpoint before the job fails."
    )


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    # 40, not 63: child names and pod hostnames add suffixes such as "-train-12-7".
    name: str = Field(pattern=JOB_NAME, max_length=40)
    namespace: str | None = None


class FineTuneJob(BaseModel):
    model_config = ConfigDict(extra="allow")
    api_version: Literal["kubetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: Metadata
    spec: FineTuneJobSpec


def duration_seconds(text: str) -> float:
    """Seconds in a duration such as 30m, 1h30m or 90s (the pattern DURATION has been checked)."""
    unit = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * unit[u] for n, u in re.findall(r"([0-9]+(?:\.[0-9]+)?)([hms])", text))


class SpecError(KubetuneError):
    """A job file is unreadable or invalid; ``problems`` lists each one as 'field.path: message'."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def _field_path(loc: tuple[Any, ...]) -> str:
    # Model-level validators report loc ending at the object; list indices read as [i].
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(document)"


def parse_job(doc: Any, source: str = "job") -> FineTuneJob:
    """Validate a loaded YAML/JSON document; raises SpecError naming every bad field."""
    return parse_document(FineTuneJob, doc, source)


def parse_document(model: type[BaseModel], doc: Any, source: str):
    """``doc`` as ``model`` (a kind: apiVersion, kind, metadata and spec); SpecError names every bad field."""
    if not isinstance(doc, dict):
        raise SpecError(source, ["(document): expected a mapping with apiVersion, kind, metadata and spec"])
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise SpecError(source, validation_problems(e)) from None


def validation_problems(e: ValidationError) -> list[str]:
    """Each error of a validation as 'field.path: message'."""
    return [f"{_field_path(err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]


def load_job(path: str | Path) -> FineTuneJob:
    """Read one FineTuneJob from a YAML file."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(str(path), [f"(file): {e.strerror}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(document)"
        raise SpecError(str(path), [f"{where}: {getattr(e, 'problem', None) or e}"]) from None
    return parse_job(doc, str(path))
