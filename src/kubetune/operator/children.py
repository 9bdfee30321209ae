"""Pure builders of a FineTuneJob's child objects: plain data in, Kubernetes objects (dicts) out.

No API calls here; ``kubetune.operator.reconcile`` decides which to create, the handlers create them.
The operator never reads the storage Secret: pods get it by reference (``envFrom``).
"""

from __future__ import annotations

import re

import yaml

from kubetune.errors import EXIT_STOPPED, PERMANENT, TERMINATION_LOG_ENV
from kubetune.operator.kueue import PRIORITY_LABEL, QUEUE_LABEL as KUEUE_QUEUE_LABEL
from kubetune.operator.settings import Settings
from kubetune.spec import API_GROUP, FineTuneJob

JOB_LABEL = "kubetune.dev/job"
MANAGED_BY = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/managed-by": "kubetune-operator"}
CONFIG_DIR = "/etc/kubetune"
JOB_FILE = f"{CONFIG_DIR}/job.yaml"
SCRATCH = "/scratch"
RANK_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def names(job_name: str) -> dict[str, str]:
    return {
        "config": f"{job_name}-job",
        "account": f"{job_name}-trainer",
        "role": f"{job_name}-progress",
        "prepare": f"{job_name}-prepare",
        "service": f"{job_name}-train",
        "serve": f"{job_name}-serve",
    }


def training_job_name(job_name: str, attempt: int) -> str:
    return f"{job_name}-train-{attempt}"


def labels(job: FineTuneJob, component: str) -> dict[str, str]:
    return {**MANAGED_BY, "app.kubernetes.io/component": component, JOB_LABEL: job.metadata.name, **kueue_labels(job)}


def kueue_labels(job: FineTuneJob) -> dict[str, str]:
    """Kueue's labels for the children: from spec.queue, else the FineTuneJob's own (as a Job takes them)."""
    own = (job.metadata.model_extra or {}).get("labels") or {}
    queue = job.spec.queue
    name = queue.name if queue else own.get(KUEUE_QUEUE_LABEL)
    if not name:
        return {}
    priority = (queue.priority_class if queue else None) or own.get(PRIORITY_LABEL)
    return {KUEUE_QUEUE_LABEL: name, **({PRIORITY_LABEL: priority} if priority else {})}


def _meta(job: FineTuneJob, name: str, component: str) -> dict:
    return {"name": name, "namespace": job.metadata.namespace, "labels": labels(job, component)}


def job_document(job: FineTuneJob, model_source: str | None = None) -> str:
    """The job file the pods read: the same FineTuneJob document, with fromJob resolved to a URI."""
    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["metadata"] = {"name": job.metadata.name, "namespace": job.metadata.namespace}
    if model_source is not None:
        doc["spec"]["model"] = {"source": model_source}
    return yaml.dump(doc, Dumper=_DUMPER, sort_keys=False)


# safe_dump's document, from libyaml's emitter where PyYAML has it: the pure-Python one took a third of
# the operator's CPU when thousands of jobs start at once
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def config_map(job: FineTuneJob, model_source: str | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(job, names(job.metadata.name)["config"], "config"),
            "data": {"job.yaml": job_document(job, model_source)}}


def service_account(job: FineTuneJob) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(job, names(job.metadata.name)["account"], "rbac")}


def progress_role(job: FineTuneJob) -> dict:
    """The pods may read and patch the status of their own FineTuneJob, and nothing else."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _meta(job, names(job.metadata.name)["role"], "rbac"),
            "rules": [{"apiGroups": [API_GROUP], "resources": ["finetunejobs/status"],
                       "resourceNames": [job.metadata.name], "verbs": ["get", "patch"]}]}


def progress_role_binding(job: FineTuneJob) -> dict:
    n = names(job.metadata.name)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _meta(job, n["role"], "rbac"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n["role"]},
            "subjects": [{"kind": "ServiceAccount", "name": n["account"], "namespace": job.metadata.namespace}]}


def headless_service(job: FineTuneJob) -> dict:
    """Stable DNS for the gang: pod i is ``NAME-train-ATTEMPT-i.NAME-train``."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(job, names(job.metadata.name)["service"], "train"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {JOB_LABEL: job.metadata.name, "app.kubernetes.io/component": "train"},
                     "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500}]}}


_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                 "seccompProfile": {"type": "RuntimeDefault"}}
_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                       "capabilities": {"drop": ["ALL"]}}


def _env(job: FineTuneJob) -> list[dict]:
    return [
        {"name": "KUBETUNE_JOB_NAME", "value": job.metadata.name},
        {"name": "KUBETUNE_JOB_NAMESPACE", "value": job.metadata.namespace},
        {"name": "KUBETUNE_SCRATCH", "value": SCRATCH},
        {"name": "HOME", "value": SCRATCH},  # the root filesystem is read-only
        {"name": "TMPDIR", "value": SCRATCH},  # preparation's scratch files (the examples, the shingles)
        {"name": "HF_HOME", "value": f"{SCRATCH}/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # A failure's one-line cause becomes the pod's termination message, and so the reason the operator
        # reports, instead of the last lines of its log (torchrun's report about every rank).
        {"name": TERMINATION_LOG_ENV, "value": "/dev/termination-log"},
    ]


def _env_from(job: FineTuneJob) -> list[dict]:
    secret = job.spec.storage.credentials_secret
    return [{"secretRef": {"name": secret}}] if secret else []


def _pod_spec(job: FineTuneJob, container: dict, extra_volumes: list[dict] = ()) -> dict:
    return {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": job.spec.resources.termination_grace_period_seconds,
        "serviceAccountName": names(job.metadata.name)["account"],
        "securityContext": _POD_SECURITY,
        # The pod's pause process is PID 1, not kubetune: a container's PID 1 drops a signal it has no handler for,
        # and a SIGTERM in the first instants (Kueue preempting a Job it has just admitted) was lost, the pod
        # running on for its whole grace period. Now such a SIGTERM ends it at once (exit 143: stopped).
        "shareProcessNamespace": True,
        "containers": [{
            **container,
            "securityContext": _CONTAINER_SECURITY,
            "terminationMessagePolicy": "FallbackToLogsOnError",  # the last error line becomes the reason
            "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                             {"name": "scratch", "mountPath": SCRATCH}] + container.get("volumeMounts", []),
        }],
        "volumes": [{"name": "config", "configMap": {"name": names(job.metadata.name)["config"]}},
                    {"name": "scratch", "emptyDir": {}}, *extra_volumes],
        **({"priorityClassName": job.spec.resources.priority_class_name} if job.spec.resources.priority_class_name else {}),
    }


# How a failed pod counts (kubetune.errors has the exit codes). The first rule that matches applies.
POD_FAILURE_POLICY = {"rules": [
    # Preemption, eviction, a node drain: not the job's failure. The Job replaces the pod, which resumes
    # from its SIGTERM checkpoint, and nothing counts against the backoff limit or spec.maxRetries.
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    # A trainer that saved its step on SIGTERM and stopped: its pod was deleted (Kueue suspending the Job deletes
    # them unmarked), not failed; the pod that follows resumes.
    {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [EXIT_STOPPED]}},
    # Bad input, storage refusing, a model that does not load, a diverged loss: no attempt would do better.
    {"action": "FailJob", "onExitCodes": {"operator": "In", "values": sorted(PERMANENT)}},
]}


def _job(job: FineTuneJob, name: str, component: str, pod_spec: dict, settings: Settings, **spec) -> dict:
    meta = _meta(job, name, component)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {
        "backoffLimit": 0,  # any other failed pod fails the Job; the operator decides about retries
        "podFailurePolicy": POD_FAILURE_POLICY,
        "ttlSecondsAfterFinished": settings.finished_ttl_seconds,
        # Kueue admits a queued Job by unsuspending it; it must start suspended.
        "suspend": KUEUE_QUEUE_LABEL in meta["labels"],
        **spec,
        "template": {"metadata": {"labels": meta["labels"]}, "spec": pod_spec},
    }}


def prepare_job(job: FineTuneJob, settings: Settings) -> dict:
    """One CPU pod: read, clean, dedup, scrub, tokenize; writes shards and the data report. It works on as
    many processes as it requests CPUs (a node's core count says nothing of the pod's share)."""
    requests = job.spec.resources.prepare
    container = {
        "name": "prepare",
        "image": job.spec.resources.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune", "prepare", JOB_FILE, f"--world={job.spec.resources.nodes * processes_per_node(job)}"],
        "env": _env(job) + [{"name": "KUBETUNE_WORKERS", "value": str(whole_cpus(requests.cpu))}],
        "envFrom": _env_from(job),
        "resources": {"requests": requests.model_dump()},
    }
    # One pod at a time; Kubernetes counts its failures (the podFailurePolicy fails it at once on a permanent one).
    return _job(job, names(job.metadata.name)["prepare"], "prepare", _pod_spec(job, container), settings,
                backoffLimit=job.spec.max_retries)


def processes_per_node(job: FineTuneJob) -> int:
    """One process per GPU; on CPU one per requested CPU (whole CPUs, at least one)."""
    r = job.spec.resources
    return r.gpus_per_node or whole_cpus(r.cpu)


_SI = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
       "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_value(text: str) -> float:
    """The value of a Kubernetes quantity as the spec admits them (``kubetune.spec.QUANTITY``): "500m", "2",
    "1.5Gi", "1e3" (an exponent), ".2E" (E alone is exa)."""
    number, suffix = re.fullmatch(r"([0-9]*\.?[0-9]*)(.*)", text).groups()
    if suffix[:1] in ("e", "E") and suffix[1:] not in ("", "i"):
        return float(number + suffix)
    return float(number) * _SI[suffix]


def whole_cpus(quantity: str | None) -> int:
    """Whole CPUs of a CPU quantity, at least one ("500m" and None: 1; "2500m": 2)."""
    return max(1, int(quantity_value(quantity or "1")))


def training_command(job: FineTuneJob, attempt: int, settings: Settings) -> list[str]:
    """`kubetune train-job`: torchrun on every pod, node rank from the completion index, rendezvous on
    pod 0; then pod 0 evaluates, once the gang has let go of the accelerators."""
    n = job.spec.resources.nodes
    master = f"{training_job_name(job.metadata.name, attempt)}-0.{names(job.metadata.name)['service']}"
    # On SIGTERM the ranks finish their step and checkpoint; torchrun waits for them for almost the
    # whole grace period (its default is 30 s), keeping a few seconds to exit before the kubelet kills.
    grace = job.spec.resources.termination_grace_period_seconds
    return ["kubetune", "train-job", JOB_FILE, f"--nnodes={n}", f"--nproc-per-node={processes_per_node(job)}",
            "--node-rank=$(NODE_RANK)", f"--master-addr={master}", f"--master-port={settings.master_port}",
            f"--shutdown-timeout={grace - 5}"]


def training_job(job: FineTuneJob, attempt: int, settings: Settings) -> dict:
    """The gang: an Indexed Job of ``nodes`` pods behind the headless Service."""
    r = job.spec.resources
    requests: dict = {k: v for k, v in (("cpu", r.cpu), ("memory", r.memory)) if v}
    limits: dict = {"nvidia.com/gpu": r.gpus_per_node} if r.gpus_per_node else {}
    env = _env(job) + [{"name": "NODE_RANK", "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{RANK_ANNOTATION}']"}}}]
    # Progress records carry the attempt (the stall watchdog ignores a previous attempt's last step);
    # lineage.json names the image that trained the model.
    env += [{"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
            {"name": "KUBETUNE_TRAINER_IMAGE", "value": r.image or settings.trainer_image}]
    if not r.gpus_per_node:
        env.append({"name": "OMP_NUM_THREADS", "value": "1"})  # one CPU per rank; no oversubscription
    container = {
        "name": "trainer",
        "image": r.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": training_command(job, attempt, settings)[:1],
        "args": training_command(job, attempt, settings)[1:],
        "env": env,
        "envFrom": _env_from(job),
        "ports": [{"name": "rendezvous", "containerPort": settings.master_port}],
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],  # NCCL and dataloaders need more than 64 MiB
    }
    pod = _pod_spec(job, container, [{"name": "shm", "emptyDir": {"medium": "Memory"}}])
    pod["subdomain"] = names(job.metadata.name)["service"]
    if r.node_selector:
        pod["nodeSelector"] = r.node_selector
    if r.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in r.tolerations]
    return _job(job, training_job_name(job.metadata.name, attempt), "train", pod, settings,
                completionMode="Indexed", completions=r.nodes, parallelism=r.nodes)


SERVE_PORT = 8000
PRESTOP_SECONDS = 5  # long enough for kube-proxy and the API server's proxy to drop a terminating pod
MODEL_DIR = "/model"


def serving_endpoint(job: FineTuneJob) -> str:
    return f"http://{names(job.metadata.name)['serve']}.{job.metadata.namespace}.svc:{SERVE_PORT}/v1"


def serving_deployment(job: FineTuneJob, model_uri: str, settings: Settings) -> dict:
    """The endpoint: an init container copies the model from storage, then `kubetune serve` (or the
    image named in spec.serve, e.g. vLLM, with its args) serves it on port 8000."""
    s, name = job.spec.serve, job.metadata.name
    trainer_image = job.spec.resources.image or settings.trainer_image
    endpoint = ["--endpoint", job.spec.storage.endpoint] if job.spec.storage.endpoint else []
    fill = {"{model}": MODEL_DIR, "{name}": name, "{port}": str(SERVE_PORT)}
    if s.image:
        server = {"image": s.image, "args": [_fill(a, fill) for a in s.args or []],
                  "readinessProbe": {"tcpSocket": {"port": SERVE_PORT}}}
    else:
        server = {"image": trainer_image, "imagePullPolicy": settings.image_pull_policy,
                  "command": ["kubetune", "serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(SERVE_PORT), "--name", name,
                              *capture_args(job)],
                  "readinessProbe": {"httpGet": {"path": "/readyz", "port": SERVE_PORT}}}
        if s.capture:  # the server writes to storage: it gets the credentials, as the init container does
            server["envFrom"] = _env_from(job)
    requests = {k: v for k, v in (("cpu", s.cpu), ("memory", s.memory)) if v}
    limits = {"nvidia.com/gpu": s.gpus} if s.gpus else {}
    mounts = [{"name": "model", "mountPath": MODEL_DIR}, {"name": "scratch", "mountPath": SCRATCH}]
    labels_ = labels(job, "serve")
    selector = {JOB_LABEL: name, "app.kubernetes.io/component": "serve"}
    pod = {
        "securityContext": _POD_SECURITY,
        "initContainers": [{
            "name": "fetch-model", "image": trainer_image, "imagePullPolicy": settings.image_pull_policy,
            "command": ["kubetune", "download", model_uri, MODEL_DIR, *endpoint],
            "env": _env(job), "envFrom": _env_from(job), "volumeMounts": mounts,
            "securityContext": _CONTAINER_SECURITY,
        }],
        "containers": [{
            "name": "server", **server, "env": _env(job) + _region(job),
            "ports": [{"name": "http", "containerPort": SERVE_PORT}],
            # A rollout's old pod leaves the Service's endpoints while it waits: no request meets a closed port.
            "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
            "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
            "volumeMounts": mounts, "securityContext": _CONTAINER_SECURITY,
        }],
        "volumes": [{"name": "model", "emptyDir": {}}, {"name": "scratch", "emptyDir": {}}],
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(job, names(name)["serve"], "serve"),
            "spec": {"replicas": s.replicas, "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": labels_}, "spec": pod}}}


def capture_args(job: FineTuneJob) -> list[str]:
    """`kubetune serve` options that record conversations and feedback (serve.capture), scrubbed as
    preparation scrubs the job's data (preprocessing.pii); none without capture."""
    c, storage = job.spec.serve.capture, job.spec.storage
    if c is None:
        return []
    pii = job.spec.preprocessing.pii.model_dump_json()
    return ["--capture-uri", c.uri, "--capture-sample-rate", str(c.sample_rate),
            *(["--feedback-uri", c.feedback_uri] if c.feedback_uri else []), "--pii", pii,
            *(["--endpoint", storage.endpoint] if storage.endpoint else [])]


def _region(job: FineTuneJob) -> list[dict]:
    region = job.spec.storage.region
    return [{"name": "AWS_DEFAULT_REGION", "value": region}] if region and job.spec.serve.capture else []


def serving_service(job: FineTuneJob) -> dict:
    name = job.metadata.name
    spec = {"selector": {JOB_LABEL: name, "app.kubernetes.io/component": "serve"},
            "ports": [{"name": "http", "port": SERVE_PORT, "targetPort": SERVE_PORT}]}
    if job.spec.serve.capture:  # feedback names a completion the pod that served it keeps in memory
        spec["sessionAffinity"] = "ClientIP"
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(job, names(name)["serve"], "serve"), "spec": spec}


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace(key, value)
    return arg
