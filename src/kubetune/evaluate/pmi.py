"""valid_reply_pmi: does the model answer what was asked?

For each held-out reply, how much more likely the model finds it after its own conversation than after other
held-out conversations: log p(reply | own) - log p(reply | other), averaged over a few others, summed over all
replies and divided by their tokens (nats per reply token; the replies' pointwise mutual information with what
was asked). Comparing one reply under different prompts cancels how likely the reply is anyway, which is most of
a loss: data with the replies shuffled between conversations lowers the loss (the replies' words and style are
still learnt) but teaches that a reply does not depend on the question, and this figure falls toward 0.
"""

from __future__ import annotations

import torch

OTHERS = 3  # other conversations each reply is set after


@torch.no_grad()
def reply_pmi(model, tokenizer, pairs: list, max_length: int, others: int = OTHERS) -> float | None:
    """``pairs``: (Prompt, reply) as ``evaluate.run.held_out`` gives them. None with fewer than 2."""
    if len(pairs) < 2:
        return None
    prompts = [tokenizer(p.render(tokenizer), add_special_tokens=False)["input_ids"] for p, _ in pairs]
    shifts = range(1, min(others, len(pairs) - 1) + 1)
    total, tokens = 0.0, 0
    for i, (_, reply) in enumerate(pairs):
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"][: max_length // 2] + [tokenizer.eos_token_id]
        own = _logprob(model, prompts[i], ids, max_length)
        total += sum(own - _logprob(model, prompts[(i + s) % len(pairs)], ids, max_length) for s in shifts) / len(shifts)
        tokens += len(ids)
    return total / tokens


def _logprob(model, prompt: list[int], reply: list[int], max_length: int) -> float:
    """log p(reply | prompt), the prompt cut from the left to fit ``max_length`` tokens in all."""
    prompt = prompt[-(max_length - len(reply)):]
    ids = torch.tensor([prompt + reply], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    target = torch.tensor(reply, device=model.device)
    return torch.log_softmax(logits, -1).gather(1, target[:, None]).sum().item()
