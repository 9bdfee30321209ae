"""GPU-hours and MFU in the progress record: the FLOPs formula and the peak table."""

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune.models import SIZE_PRESETS
from kubetune.train.bookkeeping import Cost
from kubetune.train.flops import peak_flops, shape_of


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", None), ("Tesla T4", None), (None, None),  # unknown: no guess
])
def test_peak_by_device_name(name, peak):
    assert peak_flops(name) == peak


def model(preset: str, vocab: int):
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SIZE_PRESETS[preset]))


def test_the_formula_counts_body_head_and_attention_as_the_step_does_them():
    shape = shape_of(model("1b", 32000))
    # TinyLlama's shape: 22 blocks of 4 * 2048^2 * (1 + 1/8 + 1/8 ... GQA) + MLP + norms, no embeddings
    assert shape.trainable_body == 968_976_384 and shape.frozen_body == 0 and shape.head_trains
    # one row of 2048 tokens as 4 documents of 512, 1000 of them labeled
    flops = shape.step_flops(tokens=2048, head_positions=1000, squared_doc_lens=4 * 512**2)
    body = 6 * 968_976_384 * 2048
    head = 6 * 32000 * 2048 * 1000
    attention = 6 * 22 * 2048 * 4 * 512**2
    assert flops == body + head + attention
    # the same tokens as one document cost more attention, never more of the rest
    assert shape.step_flops(2048, 1000, 2048**2) - flops == 6 * 22 * 2048 * (2048**2 - 4 * 512**2)


def test_lora_counts_its_real_work():
    from peft import LoraConfig, get_peft_model

    full = shape_of(model("tiny", 512))
    lora = shape_of(get_peft_model(model("tiny", 512), LoraConfig(r=4, target_modules="all-linear")))
    assert lora.frozen_body == full.trainable_body and 0 < lora.trainable_body < full.trainable_body / 4
    assert not lora.head_trains  # frozen: forward and the input's gradient, 4 per weight
    assert lora.step_flops(100, 50, 10_000) < full.step_flops(100, 50, 10_000)


def test_mfu_is_model_flops_per_second_over_the_peak_of_all_gpus():
    cost = Cost(gpus=8, device_name="NVIDIA H100 80GB HBM3", started=time.monotonic())
    cost.observe(step_flops=6e9 * 1000, step_tokens=1000)  # 6 GFLOP a token
    # 41 200 tokens/s on 8 H100s: 6e9 * 41 200 / (8 * 989e12) = 3.12 %
    assert cost.mfu(41_200.0) == pytest.approx(0.031244, rel=1e-4)
    assert Cost(gpus=8, device_name="Tesla T4", started=0).mfu(41_200.0) is None  # unknown GPU
    assert Cost(gpus=0, device_name=None, started=0).mfu(41_200.0) is None  # CPU


def test_gpu_hours_continue_from_earlier_attempts_and_are_none_on_cpu():
    cost = Cost(gpus=8, device_name="NVIDIA H100 80GB HBM3", started=time.monotonic() - 1800)
    cost.before = 2.0  # what the checkpoint of earlier attempts recorded
    assert cost.gpu_hours() == pytest.approx(2.0 + 8 * 0.5, abs=1e-3)
    assert Cost(gpus=0, device_name=None, started=time.monotonic()).gpu_hours() is None
