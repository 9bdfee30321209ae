"""GPU-hours and MFU in the progress record: the formula and the peak table."""

import time

import pytest

from kubetune.train.bookkeeping import Cost, mfu, peak_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12),
    ("NVIDIA L40S", None), ("NVIDIA A10G", None), ("Tesla T4", None), (None, None),  # unknown: no guess
])
def test_peak_by_device_name(name, peak):
    assert peak_flops(name) == peak


def test_mfu_is_six_flops_per_parameter_and_token_over_the_peak_of_all_gpus():
    # a 1B model at 41 200 tokens/s on 8 H100s: 6 * 1e9 * 41 200 / (8 * 989e12) = 3.12 %
    assert mfu(1_000_000_000, 41_200.0, 989e12, 8) == pytest.approx(0.031244, rel=1e-4)
    assert mfu(1_000_000_000, 41_200.0, None, 8) is None  # unknown GPU
    assert mfu(1_000_000_000, 41_200.0, 989e12, 0) is None  # CPU


def test_gpu_hours_continue_from_earlier_attempts_and_are_none_on_cpu():
    cost = Cost(gpus=8, device_name="NVIDIA H100 80GB HBM3", params=10, started=time.monotonic() - 1800)
    cost.before = 2.0  # what the checkpoint of earlier attempts recorded
    assert cost.gpu_hours() == pytest.approx(2.0 + 8 * 0.5, abs=1e-3)
    assert Cost(gpus=0, device_name=None, params=10, started=time.monotonic()).gpu_hours() is None
