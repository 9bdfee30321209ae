"""Where a fine-tuned model came from: ``lineage.json`` and a model card (``README.md``) beside it.

Both go into ``OUTPUT/model/`` (local or s3://). lineage.json records the hashes that pin the
model's inputs — the job spec, the base model, the input data files (``data_report.json``'s
``inputs``) and the prepared shards — with the counts of the data report, the hyperparameters, the
final metrics, the evaluation gate's verdict, the kubetune version and the trainer image. The model
card is the Hugging Face format: YAML front matter, then a readable summary. Neither ever holds
data content: counts, names of files and hashes only.

A hash "over files" is the sha256 of the lines ``<sha256 of a file>  <its path in the folder>``
sorted by path, as ``sha256sum`` prints them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from kubetune.spec import FineTuneJob
from kubetune.storage import StorageError, is_s3, join, store_for


def sha256_json(value) -> str:
    """sha256 of the canonical JSON of ``value`` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def spec_hash(job: FineTuneJob) -> str:
    return sha256_json(job.spec.model_dump(mode="json", by_alias=True, exclude_none=True))


def tree_hash(files: dict[str, str]) -> str:
    """sha256 over files' hashes ({path: sha256}), as ``sha256sum`` lines sorted by path."""
    return hashlib.sha256("".join(f"{files[p]}  {p}\n" for p in sorted(files)).encode()).hexdigest()


def file_hashes(uri: str, storage=None) -> dict[str, str]:
    """{path inside the folder: sha256} of every file under a local folder or s3:// prefix."""
    store, root = store_for(uri, storage), uri.rstrip("/") + "/"
    out = {}
    for file_uri in store.list(uri):
        name = file_uri.removeprefix(root) if file_uri != uri else os.path.basename(uri)
        if not is_s3(uri):
            out[name] = sha256_file(Path(file_uri))
            continue
        with tempfile.TemporaryDirectory(prefix="kubetune-hash-") as tmp:  # one file on disk at a time
            store.download(file_uri, Path(tmp) / "f")
            out[name] = sha256_file(Path(tmp) / "f")
    return out


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def base_model(job: FineTuneJob) -> dict:
    """The base model and what pins it: a hash over its files, or the config it was built from."""
    m, seed = job.spec.model, job.spec.training.seed
    if m.from_config is not None:
        config = m.from_config.model_dump(mode="json", by_alias=True)
        return {"kind": "fromConfig", "name": f"fromConfig:{config['architecture']}-{config['size']}", "config": config,
                "seed": seed, "hash": sha256_json({"fromConfig": config, "seed": seed})}
    if m.from_job is not None:  # in a cluster the operator resolves it to a source; locally only the name is known
        return {"kind": "fromJob", "name": f"fromJob:{m.from_job}", "hash": None}
    if m.source.startswith("hf://"):  # no local files to hash; the hub id is the reference
        return {"kind": "hf", "name": m.source.removeprefix("hf://"), "hash": None}
    kind = "s3" if is_s3(m.source) else "folder"
    try:
        files = file_hashes(m.source, job.spec.storage)
    except (StorageError, OSError) as e:
        return {"kind": kind, "name": m.source, "hash": None, "error": type(e).__name__}
    return {"kind": kind, "name": m.source, "hash": tree_hash(files), "files": files}


def data(report: dict | None) -> dict:
    """Input files with their hashes (recorded by preparation) and the data report's counts."""
    report = report or {}
    inputs = report.get("inputs")
    counts = {k: report[k] for k in ("examples_in", "examples_out", "duplicates", "dropped", "pii_redacted") if k in report}
    if "bad_lines" in report:
        counts["bad_lines"] = report["bad_lines"]["total"]
    if "tokens" in report:
        counts["tokens"] = {split: t.get("tokens") for split, t in report["tokens"].items()}
    files = {i["uri"]: i["sha256"] for i in inputs or []}
    return {"inputs": inputs, "hash": tree_hash(files) if inputs else None, "counts": counts}


def final_metrics(metrics_csv: bytes | None) -> dict:
    """The last row of metrics.csv, numbers as numbers, blanks left out."""
    if not metrics_csv:
        return {}
    rows = list(csv.DictReader(io.StringIO(metrics_csv.decode())))
    if not rows:
        return {}
    out = {}
    for key, text in rows[-1].items():
        if text not in ("", None):
            out[key] = text if key == "batch" else _number(text)  # batch: a fingerprint of the step's data
    return out


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def kubetune_version() -> str:
    try:
        return version("kubetune")
    except PackageNotFoundError:
        return "unknown"


def build(job: FineTuneJob, prepared_dir: Path, gate: dict | None, parity: dict | None) -> dict:
    """The lineage record of a job whose prepared shards are in the local ``prepared_dir``."""
    spec, out = job.spec, job.spec.output.uri
    store = store_for(out, spec.storage)
    prepared = {p.relative_to(prepared_dir).as_posix(): sha256_file(p) for p in sorted(prepared_dir.rglob("*")) if p.is_file()}
    return {
        "job": job.metadata.name,
        "spec_hash": spec_hash(job),
        "base_model": base_model(job),
        "data": data(_read_json(store, join(out, "data_report.json"))),
        "prepared": {"files": prepared, "hash": tree_hash(prepared) if prepared else None},
        "training": spec.training.model_dump(mode="json", by_alias=True, exclude_none=True),
        "trainer_choices": trainer_choices(_read_json(store, join(out, "progress.json"))),
        "final_metrics": final_metrics(_read(store, join(out, "metrics.csv"))),
        "evaluation": _read_json(store, join(out, "eval_report.json"), key="metrics") if spec.evaluation.samples or gate else None,
        "gate": gate,
        "parity": parity,
        "kubetune_version": kubetune_version(),
        "trainer_image": os.environ.get("KUBETUNE_TRAINER_IMAGE"),
        "output": out,
    }


def trainer_choices(progress: dict | None) -> dict:
    """What the trainer chose where the spec says auto (global and micro batch, gradient checkpointing, compiled
    blocks), from its last progress record."""
    keys = ("globalBatchSize", "microBatchSize", "gradientCheckpointing", "compiled")
    return {k: progress[k] for k in keys if isinstance(progress, dict) and progress.get(k) is not None}


def _read(store, uri: str) -> bytes | None:
    try:
        return store.read_bytes(uri)
    except StorageError:
        return None


def _read_json(store, uri: str, key: str | None = None):
    raw = _read(store, uri)
    value = json.loads(raw) if raw else None
    return value.get(key) if key and isinstance(value, dict) else value


def front_matter(job: FineTuneJob, lineage: dict) -> dict:
    """The model card's YAML header (Hugging Face model card metadata)."""
    metrics = [{"type": k, "value": v, "name": k.replace("_", " ")} for k, v in lineage["final_metrics"].items()
               if k.startswith("valid_") and isinstance(v, (int, float))]
    meta = {"base_model": lineage["base_model"]["name"], "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["kubetune", "fine-tuned", "chat", job.spec.training.method]}
    if metrics:
        meta["model-index"] = [{"name": job.metadata.name, "results": [{
            "task": {"type": "text-generation"}, "dataset": {"name": f"{job.metadata.name} validation split", "type": "custom"},
            "metrics": metrics}]}]
    return meta


def model_card(job: FineTuneJob, lineage: dict) -> str:
    """README.md for OUTPUT/model: front matter, then what, from what, how well, how to use."""
    name, gate, counts = job.metadata.name, lineage["gate"], lineage["data"]["counts"]
    model_uri = join(job.spec.output.uri, "model")
    lines = ["---", yaml.safe_dump(front_matter(job, lineage), sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"A chat model fine-tuned with kubetune ({job.spec.training.method} "
             f"fine-tuning) from `{lineage['base_model']['name']}`.", ""]
    if gate:
        lines += [f"**Evaluation gate: {'PASS' if gate['passed'] else 'FAIL'}** — {gate['message']}", ""]
    lines += ["## Training data", "", "Counts only (the data itself is not described here); see `data_report.json`.", "",
              "| | |", "|---|---:|"]
    out = counts.get("examples_out", {})
    for label, value in (("examples read", counts.get("examples_in")), ("training examples", out.get("train")),
                         ("validation examples", out.get("validation")), ("unreadable lines", counts.get("bad_lines")),
                         ("exact / near duplicates removed", _pair(counts.get("duplicates"))),
                         ("personal-data values redacted", sum((counts.get("pii_redacted") or {}).values()) if counts else None),
                         ("training tokens", (counts.get("tokens") or {}).get("train")),
                         ("input files", len(lineage["data"]["inputs"] or []) or None)):
        if value is not None:
            lines.append(f"| {label} | {value} |")
    lines += ["", "## Hyperparameters", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in lineage["training"].items()]
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in lineage["final_metrics"].items()
              if k != "batch"]
    lines += _evaluation_lines(lineage)
    lines += ["", "## Use it", "", "```sh", f"kubetune serve {model_uri}   # OpenAI-compatible /v1/chat/completions on :8000",
              f"kubetune chat {model_uri}", "```", "", "It uses the chat template it was trained with (in `tokenizer_config.json`"
              " / `chat_template.jinja`); replies end with the tokenizer's eos token.", "",
              "## Lineage", "", "`lineage.json` beside this file pins the inputs:", ""]
    for label, value in (("spec sha256", lineage["spec_hash"]), ("base model sha256", lineage["base_model"]["hash"]),
                         ("input data sha256", lineage["data"]["hash"]), ("prepared shards sha256", lineage["prepared"]["hash"]),
                         ("kubetune", lineage["kubetune_version"]), ("trainer image", lineage["trainer_image"])):
        lines.append(f"- {label}: `{value}`" if value else f"- {label}: (none)")
    return "\n".join(lines) + "\n"


def _pair(d: dict | None) -> str | None:
    return None if not d else f"{d.get('exact', 0)} / {d.get('near', 0)}"


def _evaluation_lines(lineage: dict) -> list[str]:
    lines = []
    metrics = lineage.get("evaluation") or {}
    base, tuned = metrics.get("base") or {}, metrics.get("fine_tuned") or {}
    if tuned:
        lines += ["", "## Evaluation (held-out data, see `eval_report.md`)", "", "| metric | base | fine-tuned |", "|---|---:|---:|"]
        lines += [f"| {k} | {_fmt(base.get(k))} | {_fmt(v)} |" for k, v in tuned.items() if v is not None]
    parity = lineage.get("parity")
    if parity:
        state = "ok" if parity["ok"] else "FAILED: " + "; ".join(parity["problems"])
        lines += ["", f"Train/serve parity: {state} ({parity['stopped']} of {parity['prompts']} greedy replies ended on the "
                  f"eos token `{parity['eos_token']}` within {parity['max_new_tokens']} tokens)."]
    return lines


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def write(job: FineTuneJob, lineage: dict) -> str:
    """lineage.json and README.md into OUTPUT/model/; the lineage.json URI."""
    out = job.spec.output.uri
    store = store_for(out, job.spec.storage)
    uri = join(out, "model", "lineage.json")
    store.write_bytes(uri, json.dumps(lineage, indent=2).encode())
    store.write_bytes(join(out, "model", "README.md"), model_card(job, lineage).encode())
    return uri


def status_lineage(lineage: dict, uri: str):
    """The summary for status.lineage."""
    from kubetune.status import Lineage

    return Lineage(spec_hash=lineage["spec_hash"], base_model=lineage["base_model"]["name"],
                   base_model_hash=lineage["base_model"]["hash"], data_hash=lineage["data"]["hash"],
                   prepared_hash=lineage["prepared"]["hash"], kubetune_version=lineage["kubetune_version"],
                   trainer_image=lineage["trainer_image"], uri=uri)
