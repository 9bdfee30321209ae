"""Base models and tokenizers: hf:// ids, s3:// or local Hugging Face folders, or from a config.

No model hub is reachable in tests, so ``fromConfig`` builds a small Llama from a size preset and
trains a byte-level BPE tokenizer on the job's own (cleaned, PII-scrubbed) data. The loading code
for real models is the ordinary ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from kubetune.errors import EXIT_MODEL, KubetuneError
from kubetune.spec import FineTuneJob, FromConfig
from kubetune.storage import Mirror, is_s3

# ChatML, the template Qwen and many others use; <|im_end|> ends a turn and is the EOS token.
# Tool calling as Qwen 2.5 / Hermes write it: the tools as JSON in the system turn (merged with the
# conversation's system message), each call as <tool_call>{"name", "arguments"}</tool_call> in the
# assistant turn, each result as <tool_response> in a tool turn. A conversation without tools renders
# exactly as plain ChatML. {% generation %} marks what an assistant turn trains (content, calls and
# <|im_end|>): preparation takes the labels from one rendering (kubetune.data.tokenize).
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>"
)
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '" + TOOLS_PREAMBLE.replace("\n", "\\n") + "' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '" + TOOLS_INSTRUCTIONS.replace("\n", "\\n") + "<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|im_start|>tool\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endgeneration %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SIZE_PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    # Shaped like real models (grouped-query attention, their tying), for benchmarks without a hub:
    # TinyLlama 1.1B, Llama 3.2 3B, Llama 3.1 8B. Their vocabulary is the tokenizer's (vocabSize).
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, max_position_embeddings=8192),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False, max_position_embeddings=8192),
}


class ModelError(KubetuneError):
    """The base model cannot be found or loaded."""

    exit_code = EXIT_MODEL


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def config_for(fc: FromConfig, tokenizer):
    from transformers import LlamaConfig

    shape = {"max_position_embeddings": 4096, "tie_word_embeddings": True, **SIZE_PRESETS[fc.size]}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **shape,
    )


def resolve_source(job: FineTuneJob, cache_dir: Path | None = None) -> str:
    """A path or hub id that ``from_pretrained`` accepts; s3:// models are downloaded first."""
    model = job.spec.model
    if model.from_job is not None:
        raise ModelError(
            f"model.fromJob '{model.from_job}' is resolved by the operator; locally, set model.source "
            "to that job's output model (OUTPUT/model)"
        )
    source = model.source or ""
    if source.startswith("hf://"):
        return source.removeprefix("hf://")
    if is_s3(source):
        return str(Mirror(source, cache_dir, job.spec.storage).fetch())
    if not Path(source).is_dir():
        raise ModelError(f"model.source: {source} is not a folder (expected hf://, s3:// or a local model folder)")
    return source


def load_tokenizer(job: FineTuneJob, texts: Iterable[str] | None = None, cache_dir: Path | None = None):
    """The job's tokenizer: trained on ``texts`` for fromConfig, else the base model's own."""
    fc = job.spec.model.from_config
    if fc is not None:
        if texts is None:
            raise ModelError("a fromConfig tokenizer is trained during preparation; pass the training texts")
        return train_tokenizer(texts, fc.vocab_size)
    from transformers import AutoTokenizer  # imports torch (0.4 GB): only for a real model's tokenizer

    source = resolve_source(job, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise ModelError(f"model.source: cannot load a tokenizer from {source}: {str(e).splitlines()[0]}") from None
    if not tokenizer.chat_template:
        raise ModelError(f"model.source: the tokenizer of {source} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(job: FineTuneJob, tokenizer, source: str | None = None, dtype=None, device=None):
    """The base causal LM: ``source`` (a resolved folder) or a fresh model from the config preset (built on
    ``device``: an 8B-shaped model is built on the GPU in seconds, on the host in minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    fc = job.spec.model.from_config
    if fc is not None and source is None:
        torch.manual_seed(job.spec.training.seed)
        with torch.device(device or "cpu"):
            return LlamaForCausalLM(config_for(fc, tokenizer)).to(dtype or torch.float32)
    source = source or resolve_source(job)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto")
    except OSError as e:
        raise ModelError(f"model.source: cannot load a model from {source}: {str(e).splitlines()[0]}") from None


def build_model(job: FineTuneJob, tokenizer, source: str | None, dtype, device=None):
    """The model as the trainer trains it: packed-row attention, LoRA. (Gradient checkpointing, the fused loss
    and compiled blocks are the trainer's choices: ``kubetune.train.recipe.setup``.)"""
    from kubetune.packed import attention

    t = job.spec.training
    model = load_model(job, tokenizer, source=source, dtype=dtype, device=device)
    model.set_attn_implementation(attention.register())  # packed rows: attention within each document
    model.config.use_cache = False
    if t.method == "lora":
        from peft import LoraConfig, get_peft_model

        # Adapters in the model's dtype, not peft's fp32: DeepSpeed casts the whole module to bf16 anyway, and
        # compiled blocks traced before that cast keep its fp32 input casts (torch 2.11 on a GPU: "expected mat1
        # and mat2 to have the same dtype"). The optimizer keeps fp32 master weights either way.
        model = get_peft_model(model, LoraConfig(
            r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
            target_modules=t.lora.target_modules, task_type="CAUSAL_LM"), autocast_adapter_dtype=False)
    return model
