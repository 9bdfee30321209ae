"""Group-relative policy optimisation (GRPO; Shao et al. 2024, as TRL's ``GRPOTrainer`` computes it): the
math of ``training.objective: rft``, apart from the loop (``kubetune.train.rft``).

- advantages: each sample's reward against its own prompt's group, ``(r - mean) / (std + eps)``;
- loss per completion token: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL``, the ratio
  to the sampling policy's probability of the token, KL the k3 estimator
  ``exp(ref - logp) - (ref - logp) - 1`` of KL(policy || reference) (http://joschu.net/blog/kl-approx.html);
- the loss of a step is the sum over every completion token of the global batch divided by their number
  (token-level, as DAPO and TRL's default ``loss_type``), so a long answer weighs by its tokens.

Completions are scored by one packed forward pass per micro batch: each prompt + completion is one document
of a row, labelled on the completion only (``completion_rows``), so the fused output layer
(``kubetune.packed.head``) gives each completion token's log-probability.
"""

from __future__ import annotations

import torch

from kubetune.packed import IGNORE, loss as fused
from kubetune.packed.head import forward_logps
from kubetune.packed.rows import Batch, Rows

ADVANTAGE_EPS = 1e-4  # TRL's: a group whose samples all scored the same gets advantage 0, not 0/0


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """``rewards`` (n * group,) in groups of ``group`` consecutive samples: each one's normalized advantage."""
    r = rewards.view(-1, group).double()
    std = r.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + ADVANTAGE_EPS)).view(-1).float()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): non-negative, unbiased, low variance."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
                 clip_epsilon: float, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token KL (0 without a reference), whether the token's ratio was clipped); ``adv`` is
    the advantage of each token's sample."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - clip_epsilon, 1 + clip_epsilon)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if kl_coef and ref_logp is not None:
        loss = loss + kl_coef * kl
    was_clipped = ((ratio < 1 - clip_epsilon) & (adv < 0)) | ((ratio > 1 + clip_epsilon) & (adv > 0))
    return loss, kl.detach(), was_clipped


def completion_rows(prompts: list[list[int]], completions: list[list[int]]) -> Rows:
    """One row per sample: the prompt then the completion, labelled on the completion (a first label never
    counts, so the prompt's last token predicts the completion's first)."""
    ids = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE] * len(p) + c for p, c in zip(prompts, completions)]
    return Rows(ids, labels, [[len(r)] for r in ids])


def completion_logps(model, batch: Batch, temperature: float) -> torch.Tensor:
    """Each completion token's log-probability under ``model`` at the sampling temperature (the distribution
    the tokens were drawn from), in the batch's label order."""
    if temperature == 1.0:
        return forward_logps(model, batch)[0]
    logits = model(**batch.model_inputs()).logits  # outside a head request the output layer gives logits
    return fused.logits_logps(logits.flatten(0, 1).index_select(0, batch.index) / temperature, batch.target)[0]
