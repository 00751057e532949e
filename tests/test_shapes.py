"""Models that are not stacks of transformer blocks: the general mechanism, checked bit for bit.

BatchNorm statistics updated in train mode, blocks reached as attributes (no ModuleList), a weight
tied across two units, a parent reading a streamed child's weight outside the child's forward.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import offload
from offload.hooks import Offloaded


class ConvBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + x


class ResNetLike(nn.Module):
    """Blocks as attributes layer1..layer4, as torchvision's ResNet has them: no container to find."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = (ConvBlock(16) for _ in range(4))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return self.head(x.mean((2, 3)))


class ScaledLinear(nn.Module):
    """Reads its child's weight directly instead of calling the child."""

    def __init__(self, d: int):
        super().__init__()
        self.fc, self.scale = nn.Linear(d, d), nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(F.linear(x, self.fc.weight * 2, self.fc.bias) * self.scale)


class TiedAcrossUnits(nn.Module):
    def __init__(self, d: int = 32, n: int = 5):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(ScaledLinear(d) for _ in range(n))
        self.blocks[3].fc.weight = self.blocks[0].fc.weight  # one Parameter in two units
        self.out = nn.Linear(d, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


class ParentReadsChildWeight(nn.Module):
    """The top level multiplies by a streamed block's weight outside that block's forward."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x @ self.blocks[0].weight.T + self.blocks[2].bias


CASES = {
    "resnet-like-eval": (lambda: ResNetLike().eval(), lambda: torch.randn(2, 3, 8, 8)),
    "resnet-like-train-bn-stats": (lambda: ResNetLike().train(), lambda: torch.randn(2, 3, 8, 8)),
    "tied-across-units": (lambda: TiedAcrossUnits().eval(), lambda: torch.randint(0, 50, (2, 5))),
    "parent-reads-child-weight": (lambda: ParentReadsChildWeight().eval(), lambda: torch.randn(2, 32)),
    "nested-sequential": (lambda: nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(6)]),
                          lambda: torch.randn(2, 32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("prefetch", [1, 2])
def test_matches_in_memory_and_disable_restores_state(case, prefetch, tmp_path, no_thread_leak):
    build, make_input = CASES[case]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    x = make_input()
    with torch.no_grad():
        expected = [reference(x) for _ in range(3)]  # three passes: train-mode BN statistics move
    with offload.enable(model, prefetch=prefetch, ram_tier=0, store=tmp_path / "s", progress=False) as h:
        assert h.stats().streamed_units >= 4
        with torch.no_grad():
            got = [model(x) for _ in range(3)]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    want, have = reference.state_dict(), model.state_dict()
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)


def test_stray_use_reads_the_real_weight_and_warns_once(tmp_path, caplog, no_thread_leak):
    model = ParentReadsChildWeight().eval()
    w = model.blocks[0].weight.detach().clone()
    with offload.enable(model, prefetch=1, ram_tier=0, store=tmp_path / "s", progress=False):
        stand_in = model.blocks[0].weight
        assert isinstance(stand_in, Offloaded)
        # metadata without a disk read; device is where the weight computes, not "meta"
        assert stand_in.shape == w.shape and stand_in.dtype == w.dtype and stand_in.device.type == "cpu"
        assert stand_in.numel() == w.numel() and not stand_in.is_meta
        with caplog.at_level(logging.WARNING, logger="offload"):
            assert torch.equal(stand_in + 0, w)  # values, not uninitialised memory
            assert torch.equal(torch.ones(1, 32) @ stand_in.T, torch.ones(1, 32) @ w.T)
        assert sum("blocks.0.weight was used outside its unit's forward" in r.message for r in caplog.records) == 1
        assert "Offloaded(blocks.0.weight" in repr(stand_in)
