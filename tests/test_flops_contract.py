"""Contract: each unit's FLOPs are what a training-mode forward executes, for every zoo model and for
models that would take PyTorch's fused attention fast path in eval mode (issue: attention counted as zero).

Tolerance 0.1 %: the trace and the reference run the same ops on inputs of the same shape, so the counts are
equal up to float rounding of the per-sample division; 0.1 % is the contract the cost model promises.
"""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from freezebench.units import partition
from freezebench.zoo.models import build_model, list_models


def training_forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs per sample of one training-mode forward with autograd on (what a training step runs)."""
    model.train()
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / x.shape[0]


class EncoderNet(nn.Module):
    """A linear embedding, one ``nn.TransformerEncoderLayer`` (8 heads) and a linear head."""

    def __init__(self, d: int = 64, heads: int = 8):
        super().__init__()
        self.emb = nn.Linear(16, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, batch_first=True)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class MHANet(nn.Module):
    """Bare ``nn.MultiheadAttention`` (4 heads) between two linears."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.emb = nn.Linear(8, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.mean(1))


def _check(model: nn.Module, x: torch.Tensor) -> None:
    part = partition(model, x)
    total = sum(u.flops for u in part) + part.other_flops
    ref = training_forward_flops(model, x)
    assert ref > 0
    assert total == pytest.approx(ref, rel=1e-3)
    # the units own (almost) everything: nothing hides in "other" for these models
    assert part.other_flops <= 1e-3 * ref


@pytest.mark.parametrize("name", list_models())
def test_zoo_unit_flops_equal_a_training_forward(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=32)
    _check(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("make,x", [(EncoderNet, (2, 10, 16)), (MHANet, (2, 6, 8))])
def test_attention_flops_equal_a_training_forward(make, x):
    torch.manual_seed(0)
    _check(make(), torch.randn(*x))


def test_encoder_attention_unit_by_hand():
    """The self-attention unit of an 8-head encoder layer, 2 FLOPs per multiply-add: in-projection
    2·L·d·3d, scores Q·Kᵀ 2·L·L·d, weighted values 2·L·L·d, out-projection 2·L·d·d (per sample)."""
    torch.manual_seed(0)
    L, d = 10, 64
    part = partition(EncoderNet(d, 8), torch.randn(2, L, 16))
    att = next(u for u in part if u.name == "enc.self_attn")
    assert att.flops == 2 * L * d * 3 * d + 2 * L * L * d + 2 * L * L * d + 2 * L * d * d
    assert any(n.endswith("self_attn.out_proj") for n in att.module_names)


def test_trace_restores_model_state_and_rng():
    """The training-mode trace must leave BatchNorm statistics, per-module modes and dropout's RNG alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 2))
    model.eval()
    model[1].train()  # a mixed state, as the freezer leaves it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    partition(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model] == [False, True, False, False, False]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
