"""bfloat16 only where it is native: `--precision auto`, dtp_ext.hardware, and a one-time
warning when bfloat16 feedback loops are asked for on a CPU that emulates them."""

import warnings

import pytest
import torch
from torch import nn

import dtp_ext
from dtp_ext import hardware
from dtp_ext.feedback import block_loop
from dtp_ext.train.config import TrainConfig
from dtp_ext.train.resolve import resolve


@pytest.fixture
def cpu_with(monkeypatch):
    def set_flags(*flags):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(block_loop, "_WARNED_BFLOAT16", set())

    return set_flags


@pytest.mark.parametrize(
    "flags, native", [(("avx2",), False), (("avx512_bf16",), True), (("amx_bf16",), True)]
)
def test_cpu_bfloat16_detection(cpu_with, flags, native):
    cpu_with(*flags)
    missing = hardware.missing_bfloat16("cpu")
    assert (missing is None) == native
    if not native:
        assert "AVX512-BF16 or AMX-BF16" in missing
    assert hardware.preferred_compute_dtype("cpu") == (torch.bfloat16 if native else None)


@pytest.mark.parametrize("flags, chosen", [(("avx2",), "fp32"), (("amx_bf16",), "bf16")])
def test_precision_auto_picks_bf16_only_where_native(cpu_with, flags, chosen):
    cpu_with(*flags)
    assert resolve(TrainConfig(precision="auto", out="unused")).precision == chosen
    # Algorithms that train in float32 only get fp32 from auto, never an error.
    assert resolve(TrainConfig(algorithm="dtp", precision="auto", out="unused")).precision == "fp32"


def test_bfloat16_feedback_on_an_emulating_cpu_warns_once_naming_the_feature(cpu_with):
    cpu_with("avx2", "fma")
    model = nn.Sequential(dtp_ext.Linear(4, 6), nn.Tanh(), dtp_ext.Linear(6, 3))
    t = dtp_ext.FeedbackTrainer(model, 1, 0.1, 1e-3, compute_dtype=torch.bfloat16, blocks=["2"])
    model(torch.randn(8, 4, requires_grad=True))
    with pytest.warns(RuntimeWarning, match="AVX512-BF16 or AMX-BF16"):
        t.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.step()


def test_no_warning_where_bfloat16_is_native(cpu_with):
    cpu_with("amx_bf16")
    model = nn.Sequential(dtp_ext.Linear(4, 6), nn.Tanh(), dtp_ext.Linear(6, 3))
    t = dtp_ext.FeedbackTrainer(model, 1, 0.1, 1e-3, compute_dtype=torch.bfloat16, blocks=["2"])
    model(torch.randn(8, 4, requires_grad=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.step()
