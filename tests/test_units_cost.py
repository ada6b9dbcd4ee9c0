"""Units partition and the cost model, checked against FLOPs counted by hand and by autograd itself."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from freezebench.cost import CostModel
from freezebench.errors import ConfigError
from freezebench.zoo.models import build_model
from freezebench.units import partition


def mlp3():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                         nn.Linear(8, 3, bias=False))


def test_units_of_a_sequential_mlp_by_hand():
    p = partition(mlp3(), torch.randn(5, 4))
    assert [u.name for u in p] == ["0", "2", "4"]
    # 2 FLOPs per multiply-add: 2*in*out per sample
    assert [u.flops for u in p] == [64.0, 128.0, 48.0]
    assert [u.is_head for u in p] == [False, False, True]
    assert p.other_flops == 0.0


def test_cost_model_by_hand():
    c = CostModel([64.0, 128.0, 48.0])
    # full: forward 240 + weight grads 240 + input grads of units after the first trainable (128 + 48)
    assert c.full_step_flops == 240 + 240 + 176
    # prefix {0} frozen: no weight grad for unit 0, backprop stops at unit 1
    assert c.step_flops({0}) == 240 + 176 + 48
    # middle unit frozen: its weight grad is skipped but gradients still flow through it
    assert c.step_flops({1}) == 240 + 112 + 176
    assert c.step_flops({0, 1}) == 240 + 48 + 0
    # a cached prefix of 1 unit skips its forward too
    assert c.step_flops({0}, cached_prefix=1) == 176 + 176 + 48


@pytest.mark.parametrize("frozen", [(), (0,), (1,), (0, 1)])
def test_cost_model_matches_autograd_flops(frozen):
    """The cost model predicts exactly what forward + backward really execute (FlopCounterMode)."""
    model = mlp3()
    x = torch.randn(5, 4)
    p = partition(model, x)
    for i in frozen:
        for q in p[i].parameters:
            q.requires_grad_(False)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    cost = CostModel([u.flops for u in p], p.other_flops)
    assert fc.get_total_flops() == pytest.approx(cost.step_flops(set(frozen)) * 5)


def test_cost_model_matches_autograd_on_a_conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 10, bias=False))
    x = torch.randn(3, 1, 8, 8)
    p = partition(model, x)
    assert len(p) == 3 and p[0].module_names == ["0", "1"] and p[1].module_names == ["3", "4"]
    # conv: 2 * C_out*H*W * C_in*k*k per sample
    assert p[0].flops == 2 * 4 * 64 * 1 * 9 and p[1].flops == 2 * 4 * 64 * 4 * 9 and p[2].flops == 2 * 256 * 10
    for q in p[0].parameters:
        q.requires_grad_(False)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    assert fc.get_total_flops() == CostModel([u.flops for u in p]).step_flops({0}) * 3


def test_norm_joins_only_the_op_whose_output_it_reads():
    class PreNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.ln = nn.LayerNorm(6)  # reads the residual sum, not the linear's output
            self.lin = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.lin(self.ln(h + 1))
            return self.head(h)

    p = partition(PreNorm(), torch.randn(3, 4))
    assert [u.module_names for u in p] == [["inp"], ["ln"], ["lin"], ["head"]]


def test_block_granularity_resnet20():
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    layer = partition(model, x, "layer")
    block = partition(model, x, "block")
    assert len(layer) == 1 + 9 * 2 + 1  # stem conv, two convs per block, head
    assert [u.name for u in block][:3] == ["conv1", "layer1.0", "layer1.1"] and block[-1].name == "fc"
    assert len(block) == 1 + 9 + 1
    assert sum(u.flops for u in block) == pytest.approx(sum(u.flops for u in layer))
    assert block.total_params == layer.total_params == sum(q.numel() for q in model.parameters())
    # ResNet-20 at 32x32: about 41 MFLOPs (MACs) per image -> ~82 MFLOPs counting 2 per MAC
    assert 80e6 < sum(u.flops for u in layer) < 84e6


def test_partition_leaves_model_state_untouched():
    model = build_model("tiny", num_classes=10, in_channels=1, image_size=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partition(model, torch.randn(4, 1, 8, 8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_vit_attention_out_proj_joins_its_attention_unit():
    model = build_model("deit_tiny", num_classes=10, in_channels=3, image_size=32)
    p = partition(model, torch.randn(2, 3, 32, 32))
    att = [u for u in p if u.name.endswith("encoder_layer_0.self_attention")][0]
    assert any(n.endswith("self_attention.out_proj") for n in att.module_names)
    assert p.total_params == sum(q.numel() for q in model.parameters())
    assert p[-1].name == "heads.head" and p[-1].is_head


def test_unknown_granularity():
    with pytest.raises(ConfigError, match="granularity"):
        partition(mlp3(), torch.randn(2, 4), "neuron")
