"""The ``kubetune`` command: validate, prepare and run a FineTuneJob on this machine, print the CRDs, ask a
FineTuneSchedule to retrain or roll back."""

from __future__ import annotations

import argparse
import sys
import traceback

from kubetune.errors import KubetuneError, exit_on_sigterm, missing_extra, report, stop_on_sigterm
from kubetune.spec import load_job


def _validate(args) -> int:
    job = load_job(args.job)
    print(f"{args.job}: FineTuneJob '{job.metadata.name}' is valid")
    return 0


def _load(args):
    job = load_job(args.job)
    if args.output:
        job.spec.output.uri = args.output
    return job


def _prepare_job(job, world: int) -> None:
    from kubetune.data.prepare import prepare, summary
    from kubetune.status import DataReport, Status
    from kubetune.train.plan import make_plan
    from kubetune.train.progress import reporter_for

    report = prepare(job)
    print(f"\nData report for '{job.metadata.name}' ({job.spec.output.uri}/data_report.json):")
    print(summary(report), flush=True)
    # in a pod, the counts (never the data) go into the job's status; a failed write is only a warning
    reporter_for(job.spec.output.uri, job.spec.storage).patch(Status(data_report=DataReport.from_report(report)))
    # The batch against the data, before any training pod (and its GPUs) starts: a PlanError fails here, once.
    t = job.spec.training
    plan = make_plan(report["tokens"]["train"]["rows"], t.global_batch_size, 1, world, t.epochs, t.max_steps)
    print(f"batch: {plan.global_batch} rows per step{' (auto)' if t.global_batch_size == 'auto' else ''} on "
          f"{world} process(es): {plan.steps_per_epoch} steps per epoch, {plan.total_steps} in all", flush=True)


def _prepare(args) -> int:
    stop_on_sigterm("preparation")
    _prepare_job(_load(args), args.world)
    return 0


def _train_job(job, nproc: int) -> tuple[int, str]:
    """Run the trainer under torchrun, then the evaluation once its processes have ended: the exit
    code, and the cause a failed rank wrote, if any."""
    import json
    import os
    import tempfile

    from kubetune.evaluate.run import evaluate_after_training
    from kubetune.train.launch import cpu_threads_env, run_ranks, torchrun_command

    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="kubetune-job-", delete=False) as f:
        json.dump(job.model_dump(mode="json", by_alias=True, exclude_none=True), f)
    try:
        code, cause = run_ranks(torchrun_command(f.name, nproc), cpu_threads_env(nproc))
    finally:
        os.unlink(f.name)
    if not code:
        evaluate_after_training(job)
    return code, cause


def _train_pod(args) -> int:
    """A training pod's command: torchrun with the operator's launcher options, then on node 0 the
    evaluation, once the gang has let go of the accelerators. A failed rank's class is the pod's exit
    code (what the Job's podFailurePolicy reads) and its cause the termination message."""
    from kubetune.errors import write_termination_log
    from kubetune.train.launch import launcher_command, node_rank, run_ranks

    code, cause = run_ranks(launcher_command(args.job, args.launcher), {}, pass_signals=True)
    if cause:
        print(f"\n{cause}", file=sys.stderr, flush=True)
        write_termination_log(cause)
    if not code and node_rank(args.launcher) == 0:
        from kubetune.evaluate.run import evaluate_after_training  # torch: seconds, not before the ranks start

        evaluate_after_training(load_job(args.job))
    return code


def _train(args) -> int:
    from kubetune.train.launch import default_nproc

    code, cause = _train_job(_load(args), args.nproc or default_nproc())
    if cause:
        print(f"\n{cause}", file=sys.stderr)  # last, after torchrun's report on every rank
    return code


def _run(args) -> int:
    from kubetune.train.launch import default_nproc

    job, nproc = _load(args), args.nproc or default_nproc()
    _prepare_job(job, nproc)
    code, cause = _train_job(job, nproc)
    if code:
        # The cause last, where it is seen; a storage or build failure is not fixed by a rerun alone.
        print(f"\n{cause}" if cause else f"error: training failed (exit code {code}); rerun the same command to "
              "resume from the last checkpoint", file=sys.stderr)
        return code
    from kubetune.storage import join

    out = job.spec.output.uri
    print(f"\nJob '{job.metadata.name}' finished. In {out}:")
    for name, what in (("model/", "fine-tuned model (Hugging Face format)"), ("data_report.json", "data report"),
                       ("metrics.csv", "metrics per step"), ("loss_curve.png", "loss curve"),
                       ("tensorboard/", "TensorBoard events"), ("eval_report.md", "evaluation, base vs fine-tuned")):
        print(f"  {join(out, name):50s} {what}")
    print(f"Chat with it: kubetune serve {join(out, 'model')}  (then open http://127.0.0.1:8000/)")
    return 0


def _upload(args) -> int:
    from pathlib import Path

    from kubetune.spec import Storage
    from kubetune.storage import S3Store, join, upload_tree

    spec = Storage(endpoint=args.endpoint)
    if args.create_bucket:
        store = S3Store(spec)
        bucket = args.destination.removeprefix("s3://").split("/")[0]
        try:
            store.client.create_bucket(Bucket=bucket)
        except store.client.exceptions.BucketAlreadyOwnedByYou:
            pass
    source = Path(args.source)
    if source.is_file():
        S3Store(spec).upload(source, join(args.destination, source.name))
    else:
        upload_tree(source, args.destination, spec)
    print(f"uploaded {source} to {args.destination}")
    return 0


def _evaluate(args) -> int:
    from kubetune.evaluate.run import evaluate_job

    evaluate_job(_load(args))
    return 0


def _serve(args) -> int:
    from kubetune.serve.server import serve
    from kubetune.spec import Storage
    from kubetune.storage import Mirror

    model = Mirror(args.model, spec=Storage(endpoint=args.endpoint))  # an s3:// model: a local copy first
    serve(str(model.fetch()), args.host, args.port, args.name, args.max_tokens, args.max_queue, args.max_batch,
          _recorder(args))
    return 0


def _recorder(args):
    """The capture of served conversations the options ask for, or None."""
    from pydantic import ValidationError

    from kubetune.serve.capture import Recorder
    from kubetune.spec import Capture, Pii, SpecError, validation_problems

    if not args.capture_uri:
        if args.feedback_uri:
            raise SpecError("kubetune serve", ["--feedback-uri: needs --capture-uri"])
        return None
    problems, option = [], {"uri": "--capture-uri", "sample_rate": "--capture-sample-rate", "feedback_uri": "--feedback-uri"}
    try:  # the spec's own checks, each problem named by its option
        c = Capture(uri=args.capture_uri, sample_rate=args.capture_sample_rate, feedback_uri=args.feedback_uri)
    except ValidationError as e:
        problems += [option.get(p.split(":")[0], "") + p[p.index(":"):] for p in validation_problems(e)]
    try:
        pii = Pii.model_validate_json(args.pii) if args.pii else Pii()
    except ValidationError as e:
        problems += [f"--pii {p}" for p in validation_problems(e)]
    if problems:
        raise SpecError("kubetune serve", problems)
    return Recorder(c.uri, c.sample_rate, c.feedback_uri, pii, args.endpoint, args.capture_flush_seconds)


def _api(args) -> int:
    from kubetune.api.access import Limits, audience_names
    from kubetune.api.jobs import load_settings
    from kubetune.api.server import serve_api, tls_context

    storage = {"endpoint": args.storage_endpoint} if args.storage_endpoint else None
    try:
        settings = load_settings(args.config, files_uri=args.files, outputs_uri=args.outputs, storage=storage,
                                 audiences=args.audience)
        audience_names(settings.audiences)
        limits = Limits(args.review_rate, args.review_burst)
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
        if tls:
            tls_context(*tls)  # unreadable files: this error now, not a traceback once serving
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve_api(settings, args.host, args.port, limits, tls)
    return 0


def _chat(args) -> int:
    from kubetune.serve.chat import chat

    return chat(args.target, args.system)


def _download(args) -> int:
    from pathlib import Path

    from kubetune.spec import Storage
    from kubetune.storage import download_tree

    download_tree(args.source, Path(args.destination), Storage(endpoint=args.endpoint))
    print(f"downloaded {args.source} to {args.destination}")
    return 0


def _export(args) -> int:
    from kubetune.storage import join
    from kubetune.train import checkpoint

    job = load_job(args.job)
    out, storage = job.spec.output.uri, job.spec.storage
    model = checkpoint.resolve(out, storage, args.checkpoint, job.spec.training.best_metric)
    dest = args.to or join(out, "exports", args.checkpoint)
    checkpoint.copy_model(model, dest, storage)
    print(f"exported {model} ({args.checkpoint}) to {dest}; serve it: kubetune serve {dest}")
    return 0


def _crd(args) -> int:
    import yaml

    from kubetune.crd import crd

    sys.stdout.write(yaml.safe_dump(crd(args.kind), sort_keys=False, width=120))
    return 0


def _retrain(args) -> int:
    from kubetune.schedule_commands import retrain

    print(retrain(args.name, args.namespace))
    return 0


def _rollback(args) -> int:
    from kubetune.schedule_commands import rollback

    print(rollback(args.name, args.namespace, args.to, args.unpin))
    return 0


def _schedule_commands(sub) -> None:
    p = sub.add_parser("retrain", help="start a run of a FineTuneSchedule now (sets kubetune.dev/retrain-requested-at)")
    p.add_argument("name")
    p.add_argument("-n", "--namespace", help="default: kubectl's current namespace")
    p.set_defaults(func=_retrain)
    p = sub.add_parser("rollback", help="serve an earlier revision of a FineTuneSchedule (sets spec.pinnedRevision)")
    p.add_argument("name")
    p.add_argument("--to", type=int, help="the revision to serve (default: the one before the served one)")
    p.add_argument("--unpin", action="store_true", help="remove spec.pinnedRevision: serve the latest revision again")
    p.add_argument("-n", "--namespace", help="default: kubectl's current namespace")
    p.set_defaults(func=_rollback)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model folder or s3:// model as an OpenAI-compatible endpoint")
    p.add_argument("model", help="a Hugging Face model folder or s3://bucket/prefix/model/")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="model id clients use (default: the folder name)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond this get 503")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests generated together (continuous batching); 1 generates one at a time")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL for an s3:// model and the capture")
    # serve.capture (kubetune.serve.capture): the operator passes these from the job's spec
    p.add_argument("--capture-uri", help="record conversations and feedback, PII-scrubbed, as chat JSONL under this "
                   "s3:// prefix or folder (serve.capture.uri)")
    p.add_argument("--capture-sample-rate", type=float, default=1.0, help="fraction of conversations recorded")
    p.add_argument("--feedback-uri", help="where conversations rated up or corrected go, as training data")
    p.add_argument("--pii", help='the scrubbing, as preprocessing.pii in JSON, e.g. {"redact": ["email"], "allow": []} '
                   "(default: every type)")
    p.add_argument("--capture-flush-seconds", type=float, default=30.0, help="longest wait before a batch is written")
    p.set_defaults(func=_serve)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune chat models on your own data.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a FineTuneJob file and list every problem with its field")
    p.add_argument("job")
    p.set_defaults(func=_validate)
    for name, func, text in (("prepare", _prepare, "clean, dedup, scrub and tokenize the job's data"),
                             ("train", _train, "train on already prepared data (resumes from the last checkpoint)"),
                             ("run", _run, "run the whole job on this machine: prepare, train, validate"),
                             ("evaluate", _evaluate, "generation evaluation of a trained job (base vs fine-tuned)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job")
        p.add_argument("--output", help="override spec.output.uri")
        if name in ("train", "run"):
            p.add_argument("--nproc", type=int, help="training processes (default: GPUs, else 2 on CPU)")
        if name == "prepare":
            p.add_argument("--world", type=int, default=1, help="training processes the batch is planned for "
                           "(the operator passes the job's; the batch must divide among them)")
        p.set_defaults(func=func)
    p = sub.add_parser("train-job", help="a training pod's command: torchrun with these launcher options, then "
                       "evaluation on node 0")
    p.add_argument("job")
    p.add_argument("launcher", nargs=argparse.REMAINDER, help="torchrun options, e.g. --nnodes=2 --node-rank=0")
    p.set_defaults(func=_train_pod)
    _serve_parser(sub)
    p = sub.add_parser("api", help="OpenAI's files and fine-tuning API on this cluster (api_key: a Kubernetes token)")
    p.add_argument("--config", help="YAML settings: filesUri, outputsUri, storage, jobDefaults, models, "
                   "defaultNamespace, audiences")
    p.add_argument("--files", help="s3:// prefix for uploaded files (filesUri)")
    p.add_argument("--outputs", help="s3:// prefix for the jobs' outputs (outputsUri)")
    p.add_argument("--storage-endpoint", help="S3-compatible endpoint URL (storage.endpoint)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--audience", action="append",
                   help="callers' tokens must be made for this audience (repeatable; default kubetune, or the "
                        "config file's audiences): kubectl create token SA --audience kubetune")
    p.add_argument("--review-rate", type=float, default=20.0,
                   help="TokenReviews + SubjectAccessReviews a second at most; beyond it new keys get 429")
    p.add_argument("--review-burst", type=int, default=40, help="reviews at once before the rate applies")
    p.add_argument("--tls-cert", help="serve HTTPS only, with this PEM certificate (chain)")
    p.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    p.set_defaults(func=_api)
    p = sub.add_parser("chat", help="chat in the terminal with an endpoint (http://…) or a local model folder")
    p.add_argument("target")
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=_chat)
    p = sub.add_parser("upload", help="copy a local file or folder to an s3:// prefix (e.g. example data)")
    p.add_argument("source")
    p.add_argument("destination", help="s3://bucket/prefix/")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL, e.g. http://localhost:9000")
    p.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    p.set_defaults(func=_upload)
    p = sub.add_parser("download", help="copy an s3:// prefix (e.g. a trained model) to a local folder")
    p.add_argument("source", help="s3://bucket/prefix/")
    p.add_argument("destination")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL")
    p.set_defaults(func=_download)
    p = sub.add_parser("export", help="a servable model folder from a checkpoint: step-N, best (by "
                       "training.bestMetric) or last")
    p.add_argument("job")
    p.add_argument("--checkpoint", required=True, help="step-N, best or last (the final model once the job finished)")
    p.add_argument("--to", help="destination folder or s3:// prefix (default OUTPUT/exports/CHECKPOINT/)")
    p.set_defaults(func=_export)
    _schedule_commands(sub)
    p = sub.add_parser("crd", help="print a CustomResourceDefinition: FineTuneJob (default) or FineTuneSchedule")
    p.add_argument("--kind", choices=["job", "schedule"], default="job")
    p.set_defaults(func=_crd)
    return parser


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # again here for `python -m kubetune.cli` and callers of main(): kubetune.command
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - every failure ends with one line naming its cause; the code its class
        # a missing optional package (`kubetune prepare` with only the operator's extras): which extra has it
        e = missing_extra(e, f"kubetune {args.command}", args.command) or e
        if not isinstance(e, KubetuneError):
            traceback.print_exc()  # a bug: its traceback for whoever fixes it, then the cause
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
