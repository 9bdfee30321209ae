"""Operator settings, from the environment (the Helm chart sets them) with CLI overrides in ``main``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    finished_ttl_seconds: int = 86400  # finished child Jobs are removed after this
    metrics_port: int = 9090  # 0: no metrics endpoint
    peering: str = ""  # empty: standalone (no peering objects needed)
    master_port: int = 29500

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            namespaces=[n.strip() for n in env("KUBETUNE_NAMESPACES", "").split(",") if n.strip()],
            trainer_image=env("KUBETUNE_TRAINER_IMAGE", cls.trainer_image),
            image_pull_policy=env("KUBETUNE_IMAGE_PULL_POLICY", cls.image_pull_policy),
            finished_ttl_seconds=int(env("KUBETUNE_FINISHED_TTL_SECONDS", cls.finished_ttl_seconds)),
            metrics_port=int(env("KUBETUNE_METRICS_PORT", cls.metrics_port)),
            peering=env("KUBETUNE_PEERING", cls.peering),
        )
