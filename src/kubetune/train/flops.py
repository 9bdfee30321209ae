"""Model FLOPs of a training step, counted as the work the step really does, and the peak of the GPU it runs on.

The formula (``Shape.step_flops``), per step, with T the real (non-padding) tokens, P the positions whose
next-token logits are computed (the labeled ones: kubetune's loss skips the rest), and n the length of
each packed document:

    body       T x (6 x trainable body parameters + 4 x frozen body parameters)
    head       P x (6 if the output layer trains, else 4) x vocab x hidden
    attention  6 x layers x (query heads x head dim) x sum(n^2)

- 6 per parameter and token is forward (2) + gradient of the input (2) + gradient of the weight (2); a
  frozen weight (LoRA's base) skips the last, so it does 4. LoRA's adapters are trainable body parameters.
- Embeddings are a lookup, not a matmul: left out, as torchtitan does. The output layer is counted apart
  because it runs only on the positions that have a label.
- Attention: QK^T and PV are 2 x n^2 x d each forward, halved by causality, times 3 for forward and
  backward, per document (documents never attend to each other), per layer.
- Padding and recomputation (gradient checkpointing) are not model work and never counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Dense bf16 peak FLOP/s of one GPU (the datasheets' "with sparsity" figures halved). The form factor
# matters: an H100 PCIe or NVL is not an H100 SXM.
_PEAKS = {
    "H100": 989e12, "H100 PCIE": 756e12, "H100 NVL": 835e12,
    "H200": 989e12, "H200 NVL": 835e12, "GH200": 989e12,
    "B200": 2250e12, "B100": 1750e12,
    "A100": 312e12, "A800": 312e12, "H800": 989e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12,
}
_VARIANTS = ("PCIE", "NVL")


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU as ``torch.cuda.get_device_name()`` names it ("NVIDIA H100 PCIe",
    "NVIDIA A100-SXM4-80GB"); None when unknown."""
    words = [w for w in re.split(r"[^A-Z0-9]+", (device_name or "").upper()) if w]
    for word in words:
        if word in _PEAKS:
            variant = next((v for v in _VARIANTS if v in words and f"{word} {v}" in _PEAKS), None)
            return _PEAKS[f"{word} {variant}"] if variant else _PEAKS[word]
    return None


@dataclass(frozen=True)
class Shape:
    """What the FLOPs of a step depend on, read once from the model."""

    layers: int
    attention_width: int  # query heads x head dim
    hidden: int
    vocab: int
    trainable_body: int  # parameters outside the embeddings and output layer that train (LoRA: the adapters)
    frozen_body: int
    head_trains: bool

    def step_flops(self, tokens: int, head_positions: int, squared_doc_lens: int) -> float:
        body = tokens * (6 * self.trainable_body + 4 * self.frozen_body)
        head = head_positions * (6 if self.head_trains else 4) * self.vocab * self.hidden
        attention = 6 * self.layers * self.attention_width * squared_doc_lens
        return float(body + head + attention)


def shape_of(model) -> Shape:
    """The shape of a Hugging Face causal LM (a PEFT model or a DeepSpeed engine's module too); ZeRO-3
    partitioned parameters count whole."""
    from kubetune.packed.head import unwrap

    inner = unwrap(model)
    config = inner.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = inner.get_output_embeddings().weight
    outside = {id(inner.get_input_embeddings().weight), id(head)}
    trainable = frozen = 0
    for p in model.parameters():
        if id(p) in outside:
            continue
        n = getattr(p, "ds_numel", p.numel())
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return Shape(layers=config.num_hidden_layers, attention_width=heads * head_dim, hidden=config.hidden_size,
                 vocab=(getattr(head, "ds_shape", None) or head.shape)[0], trainable_body=trainable,
                 frozen_body=frozen, head_trains=head.requires_grad)
