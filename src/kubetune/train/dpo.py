"""Direct Preference Optimization (``training.objective: dpo``): the loss, the reference model and the
pair metrics, for the one training loop in ``kubetune.train.recipe`` and for the evaluation.

A prepared DPO row holds whole pairs as consecutive documents, chosen then rejected (``doc_lens``
``[c1, r1, c2, r2, ...]``, labels on the answers only; see ``kubetune.data.preference``). A sequence's
log-probability is the sum of its label tokens' log-probabilities, taken per document from the packed
forward pass, so a pair costs one forward pass of the policy (and one of the reference) in one row.

The reference model is the base model:
- LoRA: the same weights with the adapter switched off (peft's ``disable_adapter()``), under no_grad,
  every step: no second copy of the model.
- Full fine-tune: the reference log-probabilities of every training and validation pair are computed once,
  before training, by the engine itself while it still holds the base weights (``StoredReference``). That is
  correct under every ZeRO stage (the engine's own partitioning does the work; no unpartitioned copy, no
  second engine) and costs one forward pass over the data. Set-up runs before a checkpoint is loaded, so a
  resumed attempt computes them again from the base weights rather than keep a file that could go stale.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kubetune.packed import IGNORE
from kubetune.packed.head import forward_logps
from kubetune.packed.rows import Batch, Collator, Rows

# Totals summed over pairs / chosen tokens (and reduced over ranks), in this order.
FIELDS = ("loss", "pairs", "accurate", "margin", "logp_chosen", "logp_rejected", "logp_accurate",
          "nll", "correct", "tokens")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards of both answers, as TRL's ``DPOTrainer.dpo_loss``
    computes them (loss_type "sigmoid", no label smoothing; Rafailov et al. 2023, eq. 7):
    ``-logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))``, rewards ``beta * (pi - ref)``."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def document_sums(batch: Batch, logp: torch.Tensor) -> torch.Tensor:
    """Each document's summed label log-probabilities, documents numbered through the batch row by row."""
    docs = sum(len(lens) for lens in batch.inputs["doc_lens"])
    return logp.new_zeros(docs).index_add_(0, batch.doc, logp)


def chosen_documents(batch: Batch) -> torch.Tensor:
    """The number (through the batch) of each pair's chosen document, in row order; rejected is the next one."""
    out, before = [], 0
    for lens in batch.inputs["doc_lens"]:
        out += [before + 2 * k for k in range(len(lens) // 2)]
        before += len(lens)
    return torch.tensor(out, dtype=torch.long, device=batch.doc.device)


def pair_logps(batch: Batch, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sums, chosen = document_sums(batch, logp), chosen_documents(batch)
    return sums[chosen], sums[chosen + 1]


def rank_chunks(idx: list[int], rows: int, micro: int, world: int) -> list[list[int]]:
    """This rank's rows ``idx`` (every ``world``-th of ``rows``) in micro batches, padded with empty ones (a
    forward pass to run and discard) so that every rank runs as many forward passes: under ZeRO-3 each one
    gathers the parameters collectively, and a rank with one pass more would wait forever."""
    forwards = math.ceil(math.ceil(rows / world) / micro)
    return [list(idx[i * micro : (i + 1) * micro]) for i in range(forwards)]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class AdapterReference:
    """LoRA: the base model is the policy with its adapter off."""

    def logps(self, model, batch: Batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        peft_model = getattr(model, "module", model)  # the DeepSpeed engine's module, or the PeftModel itself
        with torch.no_grad(), peft_model.disable_adapter():
            logp, _ = forward_logps(peft_model, batch)
        return pair_logps(batch, logp)


class StoredReference:
    """Reference log-probabilities computed once per split, looked up by row: each row's documents in order."""

    def __init__(self, values: dict[str, np.ndarray], rows: dict[str, Rows]):
        self.values = values
        self.offsets = {k: np.concatenate([[0], np.cumsum([len(d) for d in r.doc_lens])]) for k, r in rows.items()}

    @classmethod
    @torch.no_grad()
    def compute(cls, model, rows: dict[str, Rows], micro: int, collator: Collator, device, rank: int = 0,
                world: int = 1) -> StoredReference:
        """Every rank a slice of each split's rows; the sums are reduced over ranks when distributed."""
        was_training = model.training
        model.eval()
        values = {}
        for split, part in rows.items():
            offsets = np.concatenate([[0], np.cumsum([len(d) for d in part.doc_lens])])
            out = torch.zeros(int(offsets[-1]), dtype=torch.float64)
            for chunk in rank_chunks(list(range(rank, len(part), world)), len(part), micro, world):
                batch = collator(part, chunk or [0]).to(device)  # empty: a pass to discard
                sums = document_sums(batch, forward_logps(model, batch)[0]).double().cpu()
                before = 0
                for row in chunk:
                    n = len(part.doc_lens[row])
                    out[offsets[row] : offsets[row] + n] = sums[before : before + n]
                    before += n
            if world > 1:
                out = out.to(device)
                dist.all_reduce(out)
            values[split] = out.cpu().numpy()
        model.train(was_training)
        return cls(values, rows)

    def logps(self, model, batch: Batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        values, offsets = self.values[split], self.offsets[split]
        flat = [offsets[row] + d for row, lens in zip(batch.rows, batch.inputs["doc_lens"])
                for d in range(0, len(lens) // 2 * 2, 2)]
        chosen = torch.tensor(values[flat], dtype=torch.float32, device=batch.doc.device)
        rejected = torch.tensor(values[[f + 1 for f in flat]], dtype=torch.float32, device=batch.doc.device)
        return chosen, rejected


class Dpo:
    """The DPO objective: ``micro_loss`` for a training micro batch, ``totals`` for validation, ``metrics``."""

    def __init__(self, beta: float, sft_weight: float, reference):
        self.beta, self.sft_weight, self.reference = beta, sft_weight, reference

    def pair_stats(self, model, batch: Batch, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed DPO loss, summed NLL of the chosen answers' tokens, the FIELDS totals of this batch, on the device)."""
        ref_chosen, ref_rejected = self.reference.logps(model, batch, split)  # first: no graph kept
        logp, correct = forward_logps(model, batch)
        chosen, rejected = pair_logps(batch, logp)
        losses, reward_chosen, reward_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        on_chosen = torch.isin(batch.doc, chosen_documents(batch))  # the answer tokens of chosen documents
        nll = -(logp * on_chosen).sum()
        totals = torch.stack([x.double() for x in (
            losses.detach().sum(), torch.tensor(len(losses), device=logp.device), (reward_chosen > reward_rejected).sum(),
            (reward_chosen - reward_rejected).sum(), chosen.detach().sum(), rejected.detach().sum(),
            (chosen.detach() > rejected.detach()).sum(), nll.detach(), (correct & on_chosen).sum(), on_chosen.sum())])
        return losses.sum(), nll, totals

    width = len(FIELDS)

    def normalizer(self, rows: Rows, idx) -> tuple[int, int]:
        """The global batch's pairs and chosen-answer tokens: what its loss is a mean over."""
        return pairs(rows, idx), chosen_tokens(rows, idx)

    def micro_loss(self, engine, batch: Batch, norm: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro batch's share of the global batch's loss: the DPO loss is the mean over the global batch's
        pairs, plus ``sft_weight`` x the mean NLL over its chosen answers' tokens."""
        pairs, chosen_tokens = norm
        loss, nll, totals = self.pair_stats(engine, batch, "train")
        if self.sft_weight:
            loss = loss / max(pairs, 1) + self.sft_weight * nll / max(chosen_tokens, 1)
        else:
            loss = loss / max(pairs, 1)
        return loss, totals

    @torch.no_grad()
    def totals(self, model, rows: Rows, idx: list[int], micro: int, collator: Collator, device,
               split: str = "validation"):
        """The FIELDS totals over the rows ``idx`` (when distributed, this rank's every world-th row)."""
        totals = torch.zeros(len(FIELDS), dtype=torch.float64, device=device)
        for chunk in rank_chunks(idx, len(rows), micro, _world_size()):
            found = self.pair_stats(model, collator(rows, chunk or [0]).to(device), split)[2]
            totals += found if chunk else 0  # an empty chunk: a pass run only to keep the ranks in step
        return totals

    def _means(self, totals: torch.Tensor) -> dict:
        t = dict(zip(FIELDS, totals.tolist()))
        pairs, tokens = max(t["pairs"], 1), max(t["tokens"], 1)
        nll = t["nll"] / tokens
        return {"loss": t["loss"] / pairs + self.sft_weight * nll, "nll": nll, "token_accuracy": t["correct"] / tokens,
                **{k: t[k] / pairs for k in ("accurate", "margin", "logp_chosen", "logp_rejected", "logp_accurate")}}

    def step_metrics(self, totals: torch.Tensor) -> dict:
        """A training step's: the loss (the objective), token accuracy on the chosen answers, the fraction of
        pairs whose chosen answer has the higher implicit reward, and the mean reward margin."""
        m = self._means(totals)
        return {"train_loss": m["loss"], "train_accuracy": m["token_accuracy"], "pref_accuracy": m["accurate"],
                "reward_margin": m["margin"]}

    def metrics(self, totals: torch.Tensor) -> dict:
        """Validation: the loss (the training objective), preference accuracy (reward of chosen > rejected),
        reward margin, mean log-probabilities of both answers and how often the chosen one is the likelier
        (reference-free, so it compares a base and a tuned model), and as for SFT perplexity and token
        accuracy, on the chosen answers."""
        m = self._means(totals)
        return {"valid_loss": m["loss"], "valid_perplexity": math.exp(min(m["nll"], 50)),
                "valid_mean_token_accuracy": m["token_accuracy"], "valid_pref_accuracy": m["accurate"],
                "valid_reward_margin": m["margin"], "valid_logp_chosen": m["logp_chosen"],
                "valid_logp_rejected": m["logp_rejected"], "valid_logp_accuracy": m["logp_accurate"]}


def chosen_tokens(rows: Rows, idx) -> int:
    """Trained tokens of the chosen answers in these rows (the sft_weight term's denominator)."""
    total = 0
    for i in np.asarray(idx, dtype=np.int64):
        labels, start = rows.labels[i], 0
        for d, n in enumerate(rows.doc_lens[i]):
            if d % 2 == 0 and d + 1 < len(rows.doc_lens[i]):
                total += int((labels[start + 1 : start + n] != IGNORE).sum())
            start += n
    return total


def pairs(rows: Rows, idx) -> int:
    return int(sum(len(rows.doc_lens[i]) // 2 for i in np.asarray(idx, dtype=np.int64)))


def reference_for(method: str, engine, train_rows: Rows, valid_rows: Rows, micro: int, collator: Collator):
    """The reference model for this fine-tuning method (see the module's docstring). Every rank calls it."""
    if method == "lora":
        return AdapterReference()
    return StoredReference.compute(engine, {"train": train_rows, "validation": valid_rows}, micro, collator,
                                   engine.device, dist.get_rank(), dist.get_world_size())
