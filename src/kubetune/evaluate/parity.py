"""Train/serve parity: the served model sees prompts as it was trained on them, and can stop.

Checked on the exported model (``OUTPUT/model``), with the tokenizer preparation trained on
(``OUTPUT/tokenizer``) and one validation conversation:

- the exported chat template is the training one, and the prompt ``kubetune serve`` builds
  (``serve.engine.ChatModel.encode``) is token for token the prefix training rendered
  (``data.tokenize``) before that assistant turn;
- the tokenizer's eos token ends every trained assistant turn in the rendered training text and is
  among the trained (labelled) tokens, and it is one token the model can emit (inside its output
  vocabulary): ``generate`` stops on it;
- greedy replies to a few prompts through the server's engine: how many stopped on eos before
  ``max_new_tokens``. A tiny, briefly trained model may never stop, so this figure is reported
  (``stopped``/``prompts``), not required.

A broken check is a ``problem`` (the gate fails with it); ``notes`` are for the report only, e.g.
the server joining OpenAI content parts differently from preparation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

STOP_PROMPTS = 3
STOP_MAX_NEW_TOKENS = 48


@dataclass
class Parity:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    eos_token: str | None = None
    stopped: int = 0
    prompts: int = 0
    max_new_tokens: int = STOP_MAX_NEW_TOKENS

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        verdict = "ok" if self.ok else "FAILED: " + "; ".join(self.problems)
        return (f"train/serve parity {verdict} (eos {self.eos_token!r}; {self.stopped} of {self.prompts} greedy replies "
                f"stopped on it within {self.max_new_tokens} tokens)")


def eos_problems(tokenizer, model) -> list[str]:
    """The eos token exists, is one token, and the model's output layer can produce it."""
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        return ["the tokenizer has no eos token, so generation never stops"]
    problems = []
    if tokenizer(eos, add_special_tokens=False)["input_ids"] != [eos_id]:
        problems.append(f"the eos token {eos!r} is not a single token of the tokenizer")
    vocab = model.get_output_embeddings().weight.shape[0]
    if eos_id >= vocab:
        problems.append(f"the eos token {eos!r} (id {eos_id}) is outside the model's output vocabulary ({vocab})")
    return problems


def template_problems(train_tokenizer, served_tokenizer, conversation: list[dict]) -> list[str]:
    """The training rendering of ``conversation`` ends its assistant turns with eos, labels eos, and the
    served tokenizer has the same template and eos."""
    from kubetune.data.tokenize import TemplateError, render_with_spans, tokenize_batch

    problems = []
    if served_tokenizer.chat_template != train_tokenizer.chat_template:
        problems.append("the exported model's chat template differs from the one the data was prepared with")
    if served_tokenizer.eos_token != train_tokenizer.eos_token:
        problems.append(f"the exported model's eos token {served_tokenizer.eos_token!r} differs from the training "
                        f"tokenizer's {train_tokenizer.eos_token!r}")
    eos = served_tokenizer.eos_token
    try:
        text, spans = render_with_spans(train_tokenizer, conversation)
    except TemplateError as e:
        return problems + [str(e)]
    ends = [text[s:e].rstrip() for s, e in spans]
    if eos is None or not all(end.endswith(eos) for end in ends):
        tail = next((end[-20:] for end in ends if eos is None or not end.endswith(eos)), "")
        problems.append(f"the chat template does not end assistant turns with the eos token {eos!r} "
                        f"(a turn ends with {tail!r}), so the model does not learn to stop where generation stops")
    else:
        labels = tokenize_batch(train_tokenizer, [conversation])[0].labels
        if labels.count(served_tokenizer.eos_token_id) < len(spans):
            problems.append(f"the eos token {eos!r} is not among the trained tokens of every assistant turn")
    return problems


def prompt_problems(train_tokenizer, chat_model, prompt: list[dict]) -> list[str]:
    """The served prompt (the server's own encoding) is exactly what training put before the reply."""
    from kubetune.data.tokenize import _render

    trained = train_tokenizer(_render(train_tokenizer, prompt, generation_prompt=True), add_special_tokens=False)["input_ids"]
    served = chat_model.encode([{"role": m["role"], "content": m["content"]} for m in prompt])[0].tolist()
    if served != trained:
        at = next((i for i, (a, b) in enumerate(zip(served, trained)) if a != b), min(len(served), len(trained)))
        return [f"the server encodes a prompt differently from training ({len(served)} vs {len(trained)} tokens, "
                f"first difference at token {at})"]
    return []


def content_parts_notes(chat_model, conversation: list[dict]) -> list[str]:
    """OpenAI content parts ([{"type": "text", ...}, ...]) become the same text in the server as in preparation."""
    from kubetune.data.formats import standardize
    from kubetune.serve.server import parse_request

    parted = [{"role": m["role"], "content": [{"type": "text", "text": t} for t in m["content"].split(" ", 1)]}
              for m in conversation]  # two parts where a message has a space
    trained = [m["content"] for m in standardize({"messages": parted}, "chat")]
    served = [m["content"] for m in parse_request({"messages": parted}, chat_model, 1)[0]]
    if trained != served:
        return ["the server joins OpenAI content parts differently from preparation; clients that send content "
                "parts get prompts unlike the training data"]
    return []


def stops(chat_model, prompts: list[list[dict]], max_new_tokens: int) -> int:
    """How many greedy replies (through the server's engine) ended on eos before max_new_tokens."""
    from kubetune.serve.engine import Params

    params = Params(temperature=0.0, max_tokens=max_new_tokens)
    return sum(chat_model.complete(chat_model.encode(p), params).finish_reason == "stop" for p in prompts)


def check(root: Path, conversation: list[dict] | None, prompts: list[list[dict]],
          max_new_tokens: int = STOP_MAX_NEW_TOKENS) -> Parity:
    """All checks on a local output folder (model/, tokenizer/); never raises: a failure is a problem."""
    result = Parity(max_new_tokens=max_new_tokens)
    try:
        _check(result, root, conversation, prompts)
    except Exception as e:  # a check that cannot run is a failed check, not a failed (retried) training
        result.problems.append(f"the parity check could not run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the model loaded here is gone; the evaluation loads two more
    return result


def _check(result: Parity, root: Path, conversation: list[dict] | None, prompts: list[list[dict]]) -> None:
    from transformers import AutoTokenizer

    from kubetune.serve.engine import ChatModel

    chat_model = ChatModel(root / "model")
    if (root / "tokenizer").is_dir():
        train_tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    else:
        train_tokenizer = chat_model.tokenizer
        result.notes.append("no prepared tokenizer/ in the output: the exported tokenizer stands for the training one")
    result.eos_token = chat_model.tokenizer.eos_token
    result.problems += eos_problems(chat_model.tokenizer, chat_model.model)
    if conversation is None:
        result.notes.append("no validation conversation with a trained assistant turn: template checks skipped")
    else:
        result.problems += template_problems(train_tokenizer, chat_model.tokenizer, conversation)
        result.notes += content_parts_notes(chat_model, conversation)
    if prompts:
        result.problems += prompt_problems(train_tokenizer, chat_model, prompts[0])
    if result.ok and prompts:
        result.prompts = len(prompts)
        result.stopped = stops(chat_model, prompts, result.max_new_tokens)
