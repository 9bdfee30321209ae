"""``kubetune-operator``: run the FineTuneJob operator (settings from the environment, flags override)."""

from __future__ import annotations

import argparse
import dataclasses
import socket

from kubetune.errors import missing_extra
from kubetune.operator.settings import Settings


def _few_malloc_arenas(arenas: int = 2) -> None:
    """Let glibc's malloc keep few arenas (MALLOC_ARENA_MAX, unless set): by default each of the handler
    threads may get one of up to 8 per CPU, and memory freed in one is not reused by the others, so the
    operator's RSS grew with its threads under load. Before any thread starts; nothing elsewhere (musl)."""
    import ctypes
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(ctypes.c_int(-8), ctypes.c_int(arenas))  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    _few_malloc_arenas()
    try:
        import kopf
    except ModuleNotFoundError as e:  # installed without the operator extra: one line, not a traceback
        raise SystemExit(f"error: {missing_extra(e, 'kubetune-operator', 'operator') or e}") from None

    env = Settings.from_env()
    parser = argparse.ArgumentParser(prog="kubetune-operator", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=None,
                        help="watch this namespace (repeatable); default: all namespaces or $KUBETUNE_NAMESPACES")
    parser.add_argument("--trainer-image", default=env.trainer_image)
    parser.add_argument("--metrics-port", type=int, default=env.metrics_port)
    parser.add_argument("--peering", default=env.peering, help="peering name; empty runs standalone")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint ('' to disable)")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(env, namespaces=args.namespace or env.namespaces, trainer_image=args.trainer_image,
                                   metrics_port=args.metrics_port, peering=args.peering)

    import kubetune.operator.handlers  # noqa: F401  (registers the handlers)
    import kubetune.operator.schedule_handlers  # noqa: F401  (FineTuneSchedules')

    kopf.configure()  # INFO to stderr, as `kopf run` does; kopf.run() alone logs nothing but warnings

    kopf.run(
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,  # peering: set up in handlers.configure, from the same settings
        liveness_endpoint=args.liveness or None,
        # Kopf's default identity asks the passwd database for the user name, which fails for a
        # UID with no entry (the chart's 10001, OpenShift's random UIDs); the pod name is unique.
        identity=f"kubetune-operator@{socket.gethostname()}",
        memo=kopf.Memo(settings=settings),
    )


if __name__ == "__main__":
    main()
