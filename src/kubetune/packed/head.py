"""The model's output layer, made to compute the loss itself (``kubetune.packed.loss``) when asked.

``install`` gives the output layer (``lm_head``) of a supported causal LM a second mode: inside
``LossHead.request``, its forward pass takes the final hidden states, runs the fused loss on the labeled
positions of the batch and returns the result where the logits would be: the model's ``.logits`` is then
(loss, correct, count), or (log-probabilities, correct) per label. The model's own forward pass is otherwise
untouched, so PEFT, gradient checkpointing, compiled blocks and DeepSpeed's ZeRO-3 hooks (which gather the
layer's weight around its forward and follow its output into backward) all work as before. Outside a request
(generation, serving, any other caller) the layer computes logits as always.

Only models whose forward returns ``lm_head``'s output unchanged as the logits are fused (no final
soft-capping or scaling); the others compute logits and the same statistics from them
(``forward_loss``/``forward_logps`` choose).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kubetune.packed import loss as fused
from kubetune.packed.rows import Batch, Collator, Rows

# Architectures whose causal-LM forward is ``logits = self.lm_head(hidden_states)`` and nothing more.
FUSABLE = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2",
           "smollm3"}


def unwrap(model):
    """The Hugging Face model inside a DeepSpeed engine and/or a PEFT model."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


class LossHead:
    """The output layer's loss mode (see the module's docstring)."""

    def __init__(self, linear: torch.nn.Linear):
        self.linear, self.pending = linear, None
        linear.forward = self._forward  # an instance attribute: the class and its state dict stay as they were
        linear.kubetune_head = self

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            return F.linear(hidden, self.linear.weight, self.linear.bias)
        request, self.pending = self.pending, None  # one forward pass per request
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, request.index)
        if request.kind == "loss":
            loss, correct, count = fused.token_loss(h, self.linear.weight, request.target)
            return torch.stack([loss, correct.float(), count.float()])
        logp, correct = fused.token_logps(h, self.linear.weight, request.target)
        return torch.stack([logp, correct.float()])

    @contextlib.contextmanager
    def request(self, batch: Batch, kind: str):
        """Within: the next forward pass of the model computes ``kind`` ("loss" or "logps") for ``batch``'s labels."""
        self.pending = SimpleNamespace(index=batch.index, target=batch.target, kind=kind)
        try:
            yield
        finally:
            self.pending = None


def install(model) -> LossHead | None:
    """Fuse the loss into ``model``'s output layer where its architecture allows; None where it does not."""
    inner = unwrap(model)
    linear = inner.get_output_embeddings()
    if getattr(linear, "kubetune_head", None) is not None:
        return linear.kubetune_head
    if getattr(inner.config, "model_type", None) not in FUSABLE or type(linear) is not torch.nn.Linear:
        return None
    return LossHead(linear)


def head_of(model) -> LossHead | None:
    return getattr(unwrap(model).get_output_embeddings(), "kubetune_head", None)


def _run(model, batch: Batch, kind: str):
    head = head_of(model)
    if head is not None:
        with head.request(batch, kind):
            out = model(**batch.model_inputs()).logits  # what the head returned, through DeepSpeed's hooks
        return (out[0], out[1].long(), out[2].long()) if kind == "loss" else (out[0], out[1].bool())
    logits = model(**batch.model_inputs()).logits
    picked = logits.flatten(0, 1).index_select(0, batch.index)
    return fused.logits_loss(picked, batch.target) if kind == "loss" else fused.logits_logps(picked, batch.target)


def forward_loss(model, batch: Batch):
    """(summed loss, correct predictions, count) over the batch's labels, all on the device."""
    return _run(model, batch, "loss")


def forward_logps(model, batch: Batch):
    """(each label's log-probability, whether it is the model's top prediction), aligned with ``batch.index``."""
    return _run(model, batch, "logps")


@torch.no_grad()
def validation_totals(model, rows: Rows, idx: list[int], micro: int, collator: Collator, device) -> torch.Tensor:
    """(summed loss, correct, count) over the given validation rows, as float64 on ``device``."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for i in range(0, len(idx), micro):
        loss, correct, count = forward_loss(model, collator(rows, idx[i : i + micro]).to(device))
        totals += torch.stack([loss.double(), correct.double(), count.double()])
    return totals
