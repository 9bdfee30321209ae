"""Preparation throughput and near-duplicate recall: kubetune vs an equivalent datatrove pipeline.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/bench_prepare.py [--docs 30000]

Both pipelines read the same generated JSONL corpus (with planted exact and near duplicates and
PII), scrub PII, remove duplicates and write JSONL, single process (kubetune on more: --workers), in one run
on this machine:
- kubetune: read → standardize → normalize → PII (7 types) → exact dedup → MinHash LSH + exact
  Jaccard check → write;
- datatrove: MinhashDedupSignature → Buckets → Cluster → (read → PIIFormatter (emails, IPs) →
  MinhashDedupFilter → JsonlWriter), its documented 4-stage MinHash pipeline (exact duplicates
  are caught by MinHash too, at similarity 1).
Same shingles (word 5-grams) and hash count (14 bands x 8 = 112); datatrove's bands put its
similarity threshold near (1/14)^(1/8) = 0.72, so kubetune runs at nearThreshold 0.72.
Recall = planted duplicates removed / planted; wrongly removed = unique documents removed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

DATATROVE_SCRIPT = textwrap.dedent("""
    import sys
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    src, work = sys.argv[1], sys.argv[2]
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    def run(pipeline, name, tasks=1):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{name}",
                              skip_completed=False).run()
    run([JsonlReader(src), MinhashDedupSignature(output_folder=f"{work}/sigs", config=config)], "sigs")
    run([MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=config)], "buckets",
        tasks=config.num_buckets)  # one task per band, as datatrove requires
    run([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=config)], "cluster")
    run([JsonlReader(src), PIIFormatter(), MinhashDedupFilter(input_folder=f"{work}/remove_ids"),
         JsonlWriter(f"{work}/out", compression=None)], "filter")
""")


def make_corpus(path: Path, docs: int, seed: int = 0) -> dict[int, str]:
    """Write the corpus; returns planted duplicate id -> kind ("exact" or "near")."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "zo", "ri", "pa") for b in range(2000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]  # Zipf-like, as in real text
    pii = ["Write to {0}@mail.example.", "Call +1 415 555 {1}.", "Server at 203.0.113.{2} is down.",
           "Card 4111 1111 1111 1111 was charged."]
    texts, planted = [], {}
    n_unique = int(docs * 0.85)
    for i in range(n_unique):
        words = rng.choices(vocab, weights, k=rng.randint(100, 250))
        if rng.random() < 0.1:
            words += rng.choice(pii).format(f"user{i}", rng.randint(1000, 9999), rng.randint(1, 254)).split()
        texts.append(" ".join(words))
    while len(texts) < docs:
        original = texts[rng.randrange(n_unique)]
        if rng.random() < 0.3:
            planted[len(texts)] = "exact"
            texts.append(original)
        else:
            words = original.split()
            for _ in range(rng.randint(1, 3)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            planted[len(texts)] = "near"
            texts.append(" ".join(words))
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    return planted


def run_kubetune(src: Path, out: Path, workers: int) -> set[int]:
    from kubetune.data.prepare import Report, clean_and_dedup, locate_inputs
    from kubetune.spec import parse_job

    job = parse_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
                     "spec": {"model": {"fromConfig": {}}, "dataset": {"train": str(src), "format": "text"},
                              "output": {"uri": str(out)},
                              "preprocessing": {"minChars": 0, "maxRepetition": 1.0,
                                                "dedup": {"nearThreshold": 0.72, "ngram": 5, "numPerm": 112}}}})
    report = Report()
    kept = clean_and_dedup(job, locate_inputs(job, out, report), out, report, workers, log=lambda _: None)
    with open(out / "kept.jsonl", "wb") as f:  # as datatrove's JsonlWriter writes its output
        for _, line in kept.lines():
            f.write(line + b"\n")
    return {int(n) - 1 for n in kept.line_numbers}


def run_datatrove(src: Path, work: Path) -> set[int]:
    script = work / "datatrove_pipeline.py"
    script.write_text(DATATROVE_SCRIPT)
    # From a script file with workers=1: its bucket stage hangs in a worker pool when run from stdin.
    subprocess.run([sys.executable, str(script), str(src.parent), str(work)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kept = set()
    for f in (work / "out").glob("*.jsonl"):
        kept |= {int(json.loads(line)["id"]) for line in f.open()}
    return kept


def score(kept: set[int], planted: dict[int, str], docs: int) -> tuple[float, int]:
    removed = set(range(docs)) - kept
    recall = len(removed & planted.keys()) / len(planted)
    return recall, len(removed - planted.keys())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=30000)
    parser.add_argument("--workers", type=int, default=1,
                        help="kubetune's worker processes (default 1: datatrove runs with workers=1 too)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        src = tmp / "in" / "corpus.jsonl"
        planted = make_corpus(src, args.docs)
        size_mb = os.path.getsize(src) / 1e6
        print(f"corpus: {args.docs} docs, {size_mb:.1f} MB, {len(planted)} planted duplicates "
              f"({sum(v == 'near' for v in planted.values())} near)")
        results = {}
        for name, fn, out in (("kubetune", functools.partial(run_kubetune, workers=args.workers), tmp / "kt"), ("datatrove", run_datatrove, tmp / "dt")):
            out.mkdir()
            start = time.perf_counter()
            kept = fn(src, out)
            seconds = time.perf_counter() - start
            recall, wrong = score(kept, planted, args.docs)
            results[name] = seconds
            print(f"{name:10s} {seconds:7.2f} s  {args.docs / seconds:8.0f} docs/s  {size_mb / seconds:6.2f} MB/s  "
                  f"recall {recall:.3f}  wrongly removed {wrong}")
        print(f"throughput ratio kubetune / datatrove: {results['datatrove'] / results['kubetune']:.2f}x")


if __name__ == "__main__":
    main()
