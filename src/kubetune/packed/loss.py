"""The next-token loss without full-vocabulary logits: the output layer and the cross-entropy fused, in chunks.

Materializing the logits of a micro batch costs B x L x V floats (8 x 2048 x 32,000 in fp32 is 2 GiB, and
cross-entropy keeps as much again for backward). Here the output layer runs on the labeled positions only
(the host lists them when it collates: prompts and padding never reach it) and on ``chunk`` of them at a
time, so at most chunk x V logits exist at once. The same code runs on CPU and GPU, in pure torch.

- ``token_loss`` (supervised training): the summed loss, correct predictions and count. Its gradients are
  computed during the forward pass, chunk by chunk, as Liger-Kernel's fused linear cross-entropy does:
  the loss is a plain sum, so backward only scales them by the incoming gradient.
- ``token_logps`` (DPO, which needs each label's log-probability): the logits are recomputed in backward
  for the incoming per-position gradients, as Apple's cut-cross-entropy does.

Nothing here reads a value back to the host: counts stay on the device, to be read once per step.
Liger's kernel was not used: it calls ``.item()`` in its forward and compares the incoming gradient on the
host in its backward (host syncs inside every micro batch), and it has no CPU path.
"""

from __future__ import annotations

import torch

from kubetune.packed import IGNORE

_LOGITS_BUDGET = 2**25  # floats of logits per chunk: 128 MiB in fp32, whatever the vocabulary


def chunk_size(vocab: int) -> int:
    return max(128, min(8192, _LOGITS_BUDGET // vocab))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _scores(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor):
    """fp32 logits of a chunk, their log-sum-exp, the target's logit (0 where ignored) and the valid mask."""
    z = (h @ weight.T).float()
    valid = target != IGNORE
    safe = target.clamp(min=0)
    return z, z.logsumexp(-1), z.gather(1, safe[:, None]).squeeze(1), valid, safe


def _backprop(h, weight, z, lse, safe, scale, grad_h, grad_w, s) -> None:
    """Gradients of sum(scale x per-position loss) for chunk ``s``, with ``z`` its fp32 logits (overwritten):
    d loss / dz = softmax - one-hot, times each position's ``scale`` (0 where ignored)."""
    z.sub_(lse[:, None]).exp_()
    z[torch.arange(len(safe), device=z.device), safe] -= 1
    g = z.mul_(scale[:, None]).to(h.dtype)
    if grad_h is not None:
        grad_h[s] = g @ weight
    if grad_w is not None:  # summed in place in the weight's dtype, as Liger does: no V x H temporary
        grad_w.addmm_(g.T, h)


class _TokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None  # an fp32 one would be 2 GiB for 8B's V x H
        for s in _chunks(hidden.shape[0], chunk):
            h, t = hidden[s], target[s]
            z, lse, picked, valid, safe = _scores(h, weight, t)
            loss += ((lse - picked) * valid).sum()
            correct += ((z.argmax(-1) == t) & valid).sum()
            if want_h or want_w:
                _backprop(h, weight, z, lse, safe, valid, grad_h, grad_w, s)
        ctx.save_for_backward(grad_h, grad_w)
        count = (target != IGNORE).sum()
        ctx.mark_non_differentiable(correct, count)
        return loss, correct, count

    @staticmethod
    def backward(ctx, grad_loss, _correct, _count):
        grad_h, grad_w = ctx.saved_tensors
        # scaled in place (no second copy of the V x H gradient): the loss is backpropagated once
        return (None if grad_h is None else grad_h.mul_(grad_loss),
                None if grad_w is None else grad_w.mul_(grad_loss), None, None)


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk):
        logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        correct = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        lse_all = torch.zeros_like(logp)
        for s in _chunks(hidden.shape[0], chunk):
            z, lse, picked, valid, _ = _scores(hidden[s], weight, target[s])
            logp[s] = (picked - lse) * valid
            correct[s] = (z.argmax(-1) == target[s]) & valid
            lse_all[s] = lse
        ctx.chunk = chunk
        ctx.save_for_backward(hidden, weight, target, lse_all)
        ctx.mark_non_differentiable(correct)
        return logp, correct

    @staticmethod
    def backward(ctx, grad_logp, _correct):
        hidden, weight, target, lse_all = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        for s in _chunks(hidden.shape[0], ctx.chunk):
            z, _, _, valid, safe = _scores(hidden[s], weight, target[s])
            # log-probability is minus the loss: its gradient is the loss's, scaled by -grad_logp
            _backprop(hidden[s], weight, z, lse_all[s], safe, -grad_logp[s] * valid, grad_h, grad_w, s)
        return grad_h, grad_w, None, None


def token_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None):
    """(summed loss, correct predictions, count) over ``target`` (IGNORE: not counted) for the hidden states
    ``hidden`` (N, H) under the output layer ``weight`` (V, H). Only the loss carries gradients."""
    return _TokenLoss.apply(hidden, weight, target, chunk or chunk_size(weight.shape[0]))


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None):
    """(log-probability of each target (0 where IGNORE), whether it is the argmax), with gradients on the first."""
    return _TokenLogps.apply(hidden, weight, target, chunk or chunk_size(weight.shape[0]))


def logits_loss(logits: torch.Tensor, target: torch.Tensor):
    """``token_loss`` from logits already computed (N, V): the path of models whose output layer is not fused."""
    z = logits.float()
    loss = torch.nn.functional.cross_entropy(z, target, ignore_index=IGNORE, reduction="sum")
    valid = target != IGNORE
    return loss, ((z.detach().argmax(-1) == target) & valid).sum(), valid.sum()


def logits_logps(logits: torch.Tensor, target: torch.Tensor):
    """``token_logps`` from logits already computed (N, V)."""
    z = logits.float()
    logp = -torch.nn.functional.cross_entropy(z, target, ignore_index=IGNORE, reduction="none")
    return logp, (z.detach().argmax(-1) == target) & (target != IGNORE)
