"""CUDA staging: same tokens/logits as the model on the GPU, bounded GPU memory, no host syncs.

Runs only where CUDA exists; skipped (not failed) elsewhere.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import offload
from conftest import forward_logits, greedy, inputs_for, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_cuda(inputs):
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.parametrize("arch", ["bloom", "opt", "t5"])
def test_cuda_matches_model_on_gpu(arch, tmp_path, no_thread_leak):
    model = make_model(arch).cuda()
    inputs = to_cuda(inputs_for(arch))
    expected_logits = forward_logits(model, arch, inputs)
    expected_tokens = greedy(model, inputs)
    # gpu_tier=0: no GPU tier, everything streams through the device ring
    with offload.enable(model, prefetch=2, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False) as h:
        assert all(hk.stager.__class__.__name__ == "CudaStager" for hk in h._hooks)
        assert torch.equal(forward_logits(model, arch, inputs), expected_logits)
        assert torch.equal(greedy(model, inputs), expected_tokens)
    with offload.enable(model, prefetch=1, ram_tier="1GiB", gpu_tier=0, store=tmp_path / "s", progress=False):
        assert torch.equal(greedy(model, inputs), expected_tokens)  # RAM tier: copied, never re-read


def test_gpu_tier_and_cpu_model_on_cuda(tmp_path, no_thread_leak):
    model = make_model("bloom")
    inputs = inputs_for("bloom")
    with torch.no_grad():
        expected = model.cuda()(**to_cuda(inputs)).logits
    model.cpu()
    with offload.enable(model, prefetch=1, device="cuda", ram_tier=0, gpu_tier="1GiB", store=tmp_path / "s",
                        progress=False) as h:
        assert h._hooks[0].stager.gpu_tier  # the small model fits: units stay on the GPU
        with torch.no_grad():
            assert torch.equal(model(**to_cuda(inputs)).logits, expected)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def mlp_stack(d=256, n=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d), nn.Sequential(*[Block(d) for _ in range(n)]), nn.Linear(d, d))


def test_gpu_memory_bound(tmp_path, no_thread_leak):
    d, n, prefetch = 256, 8, 2
    model = mlp_stack(d, n).cuda().eval()
    x = torch.randn(4, d, device="cuda")
    with torch.no_grad():
        expected = model(x)
    torch.cuda.synchronize()
    with offload.enable(model, prefetch=prefetch, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False) as h:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(x), expected)
        torch.cuda.synchronize()
        unit = max(hk.record.data_bytes for hk in h._hooks)
        activations = 3 * x.numel() * 4 * 4 * 4  # a few [4, 4d] fp32 temporaries
        assert torch.cuda.max_memory_allocated() - base <= activations + (1 << 20)
        # the ring itself was allocated once at enable: (prefetch+1) slots of the largest unit
        assert h._hooks[0].stager.slot_bytes == unit and len(h._hooks[0].stager.slots) == prefetch + 1


def test_steady_state_makes_no_host_sync(tmp_path, no_thread_leak):
    model = mlp_stack().cuda().eval()
    x = torch.randn(4, 256, device="cuda")
    with offload.enable(model, prefetch=2, ram_tier=0, gpu_tier=0, store=tmp_path / "s", progress=False) as h:
        with torch.no_grad():
            for _ in range(2):
                model(x)  # warm-up: order learned, buffers touched
            h._prefetcher.wait_idle()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(5):
                    y = model(x)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        with torch.no_grad():
            assert torch.isfinite(y).all()
