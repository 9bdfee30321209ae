"""Answers sampled from the policy for objective rft, and their grades.

Generation is Hugging Face's ``generate`` with the KV cache, a batch of left-padded prompts at a time, each
prompt repeated for its group. The trainer's packed attention ignores an attention mask (its rows carry
their layout as ``doc_lens``), so the model attends with plain sdpa while it generates, which does honour the
padding mask. Under ZeRO-3 with several ranks ``synced_gpus`` keeps every rank running forward passes until
all have finished, since each pass gathers the partitioned weights collectively.
"""

from __future__ import annotations

import contextlib

import torch

from kubetune.graders import grade_batch
from kubetune.packed import attention, head


@contextlib.contextmanager
def masked_attention(model):
    """Within: the model attends with sdpa and an attention mask (padded batches); after: packed rows again."""
    hf = head.unwrap(model)
    hf.set_attn_implementation("sdpa")
    try:
        yield hf
    finally:
        hf.set_attn_implementation(attention.register())


@torch.no_grad()
def sample(model, prompts: list[list[int]], group: int, max_new_tokens: int, temperature: float | None,
           pad_id: int, eos_id: int, synced: bool) -> list[list[int]]:
    """``group`` completions of each prompt, in order (prompt 0's group first), each cut after its first end of
    turn. ``temperature`` None: greedy (one completion per prompt whatever ``group`` says)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    repeat = group if temperature is not None else 1
    ids, mask = ids.repeat_interleave(repeat, 0).to(device), mask.repeat_interleave(repeat, 0).to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature is not None \
        else dict(do_sample=False)  # top_k 0, top_p 1: the policy's own distribution, which the loss assumes
    was_training = model.training
    model.eval()  # no dropout while sampling
    with masked_attention(model) as hf:
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, use_cache=True,
                          pad_token_id=pad_id, eos_token_id=eos_id, synced_gpus=synced, **sampling)
    model.train(was_training)
    return [cut(row, eos_id) for row in out[:, width:].tolist()]


def cut(tokens: list[int], eos_id: int) -> list[int]:
    """A completion up to and including its first end-of-turn token (what follows is padding)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def grades(rft, tokenizer, completions: list[list[int]], items: list[dict]) -> tuple[list[float], list[dict]]:
    """Each completion's reward and sub-rewards (a multi grader's, by name), graded as text by ``rft``'s grader
    (a score_model's requests go to ``rft.judges``, one sample after another)."""
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    results = grade_batch(rft.grader, list(zip(texts, items)), rft.endpoints())
    return [r.reward for r in results], [r.sub_rewards for r in results]
