"""The ``kubetune`` command: validate, prepare and run a FineTuneJob on this machine, print the CRD."""

from __future__ import annotations

import argparse
import sys

from kubetune.spec import SpecError, load_job
from kubetune.storage import StorageError


def _validate(args) -> int:
    job = load_job(args.job)
    print(f"{args.job}: FineTuneJob '{job.metadata.name}' is valid")
    return 0


def _prepare(args) -> int:
    from kubetune.data.prepare import prepare, summary

    job = load_job(args.job)
    if args.output:
        job.spec.output.uri = args.output
    report = prepare(job)
    print(f"\nData report for '{job.metadata.name}' ({job.spec.output.uri}/data_report.json):")
    print(summary(report))
    return 0


def _run(args) -> int:
    print("kubetune run: preparing the data; the training stage lands with the trainer.")
    return _prepare(args)


def _crd(args) -> int:
    import yaml

    from kubetune.crd import crd

    sys.stdout.write(yaml.safe_dump(crd(), sort_keys=False, width=120))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune chat models on your own data.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a FineTuneJob file and list every problem with its field")
    p.add_argument("job")
    p.set_defaults(func=_validate)
    for name, func, text in (("prepare", _prepare, "clean, dedup, scrub and tokenize the job's data"),
                             ("run", _run, "run the whole job on this machine")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job")
        p.add_argument("--output", help="override spec.output.uri")
        p.set_defaults(func=func)
    p = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    p.set_defaults(func=_crd)
    args = parser.parse_args(argv)

    from kubetune.data.prepare import PrepareError
    from kubetune.models import ModelError

    try:
        return args.func(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StorageError, PrepareError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
