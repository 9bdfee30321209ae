"""A script written for OpenAI's fine-tuning API: upload, train (supervised, then DPO or reinforcement
fine-tuning on top, or either alone), watch the events, list the checkpoints, chat with the result.
Nothing in it knows about kubetune; point it at a cluster with the two variables every OpenAI client reads:

    export OPENAI_BASE_URL=http://kubetune-api.kubetune-system.svc:8080/v1   # kubetune api
    export OPENAI_API_KEY=$(kubectl create token my-team-bot -n my-team --audience kubetune)  # a Kubernetes token
    python examples/openai_finetune.py kubetune-tiny examples/data/support-chat.jsonl \
        --dpo examples/preference.jsonl
    python examples/openai_finetune.py kubetune-tiny examples/rft-warmup.jsonl \
        --rft examples/rft-labels.jsonl     # a supervised warm-up, then graded (see --grader)
"""

from __future__ import annotations

import argparse
import json
import time

from openai import OpenAI

client = OpenAI()
LABEL = {"type": "string_check", "name": "label", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
         "operation": "eq"}


def train(model: str, path: str, method: dict, suffix: str) -> str:
    """Upload ``path``, fine-tune ``model`` on it, print the events as they come; the new model's name."""
    with open(path, "rb") as f:
        file = client.files.create(file=f, purpose="fine-tune")
    if file.status == "error":
        raise SystemExit(f"{path}: {file.status_details}")
    job = client.fine_tuning.jobs.create(model=model, training_file=file.id, method=method, suffix=suffix)
    print(f"{job.id}: {job.status}", flush=True)
    seen: set[str] = set()
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=20).data):
            if event.id not in seen:
                seen.add(event.id)
                print(f"  {event.message}", flush=True)
        job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded":
        raise SystemExit(f"{job.id} {job.status}: {job.error.message if job.error else ''}")
    for checkpoint in client.fine_tuning.jobs.checkpoints.list(job.id).data:
        metrics = checkpoint.metrics.model_dump(exclude_none=True)  # with the method's own, e.g. rewards
        print(f"  checkpoint {checkpoint.fine_tuned_model_checkpoint}: " +
              ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k != "step"))
    print(f"{job.id}: succeeded, {job.trained_tokens} tokens trained -> {job.fine_tuned_model}", flush=True)
    return job.fine_tuned_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the base model, e.g. gpt-4o-mini-2024-07-18 at OpenAI, kubetune-tiny here")
    parser.add_argument("train", nargs="?", help="chat examples (JSONL) for a supervised job first")
    parser.add_argument("--dpo", help="preference pairs (JSONL): a DPO job on top of the supervised model")
    parser.add_argument("--rft", help="prompts with item fields (JSONL): reinforcement fine-tuning against "
                        "--grader (on top of the supervised model, if any)")
    parser.add_argument("--grader", type=json.loads, default=LABEL,
                        help="the grader as JSON (default: the answer must equal the line's label field)")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    hp = {"hyperparameters": {"n_epochs": args.epochs}}
    model = args.model
    if args.train:
        model = train(model, args.train, {"type": "supervised", "supervised": hp}, "support")
    if args.dpo:
        model = train(model, args.dpo, {"type": "dpo", "dpo": {"hyperparameters": {**hp["hyperparameters"],
                                                                                     "beta": 0.1}}}, "support-dpo")
    question = [{"role": "user", "content": "How do I export my notes?"}]
    if args.rft:
        with open(args.rft) as f:
            first = json.loads(f.readline())
        client.fine_tuning.alpha.graders.validate(grader=args.grader)
        check = client.fine_tuning.alpha.graders.run(grader=args.grader, model_sample="A", item=first)
        print(f"grader {args.grader['name']!r} gives the sample 'A' {check.reward} on the first line", flush=True)
        model = train(model, args.rft, {"type": "reinforcement", "reinforcement": {
            "grader": args.grader, "hyperparameters": hp["hyperparameters"]}}, "rft")
        question = first["messages"]
    reply = client.chat.completions.create(model=model, max_tokens=32, messages=question)
    print(f"{model}: {reply.choices[0].message.content!r}")


if __name__ == "__main__":
    main()
