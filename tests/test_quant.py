"""offload.quant: stored int8/int4 linear weights and the QuantizedWeight tensor type (CPU)."""
from __future__ import annotations

import copy
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offload import quant as Q

from conftest import inputs_for, make_model

try:
    import torchao  # noqa: F401  (quantizing needs it; the run-time path does not)
    HAVE_TORCHAO = True
except ImportError:
    HAVE_TORCHAO = False
needs_torchao = pytest.mark.skipif(not HAVE_TORCHAO, reason="quantizing needs torchao")

SCHEMES = [("int8", 64), ("int4", 32), ("int4", 64)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
X86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _weight(n: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def _x(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _lay_out(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: dict[str, torch.Tensor]):
    """Write the tensors into one page-aligned uint8 buffer at 256-byte aligned offsets, as a store unit holds
    them, and return the buffer and the views the runtime binds: data[offset:offset+nbytes].view(dtype).view(shape)."""
    offsets, pos = [], 0
    for _, dt, sh in specs:
        nbytes = torch.Size(sh).numel() * torch.empty(0, dtype=dt).element_size()
        offsets.append((pos, nbytes))
        pos = (pos + nbytes + 255) // 256 * 256
    raw = torch.zeros(pos + 4096, dtype=torch.uint8)
    data = raw[(-raw.data_ptr()) % 4096:][:pos]
    views = {}
    for (name, dt, sh), (off, nbytes) in zip(specs, offsets):
        key = name.rsplit(".", 1)[1]
        data[off:off + nbytes].copy_(tensors[key].reshape(-1).view(torch.uint8))
        views[key] = data[off:off + nbytes].view(dt).view(sh)
    return data, views


@needs_torchao
@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_through_a_byte_buffer_is_bit_exact(scheme, group, dtype):
    w, b = _weight(96, 128, dtype), _x(96, dtype=dtype, seed=5)
    tensors = Q.quantize_linear(w, scheme, group)
    specs = Q.quantized_specs("mlp.fc.weight", (96, 128), dtype, scheme, group)
    assert [(n, dt, tuple(sh)) for n, dt, sh in specs] == \
        [(f"mlp.fc.weight.{k}", t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    data, views = _lay_out(specs, tensors)
    in_memory = Q.from_stored(tensors, (96, 128), dtype, scheme, group)
    bound = Q.from_stored(views, (96, 128), dtype, scheme, group)
    lo, hi = data.data_ptr(), data.data_ptr() + data.numel()
    for key, t in bound.stored().items():  # no copy: the weight computes from the buffer itself
        assert t.data_ptr() == views[key].data_ptr() and lo <= t.data_ptr() < hi
    assert bound.shape == (96, 128) and bound.dtype == dtype and bound.device.type == "cpu"
    for x in (_x(1, 128, dtype=dtype), _x(3, 5, 128, dtype=dtype), _x(2, 20, 128, dtype=dtype)):  # 40 rows: chunked
        y = F.linear(x, bound, b)
        assert y.dtype == dtype and y.shape == (*x.shape[:-1], 96)
        assert torch.equal(y, F.linear(x, in_memory, b))
        lin = nn.Linear(128, 96).to(dtype)
        lin._parameters["weight"], lin._parameters["bias"] = bound, nn.Parameter(b)
        assert torch.equal(lin(x), y)


@needs_torchao
@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stored_tensors_are_torchaos(scheme, group, dtype):
    """Same integers and qparams as torchao's own weight-only quantization (the CPU int4 one for int4)."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    w = _weight(64, 128, dtype)
    lin = nn.Linear(128, 64, bias=False).to(dtype)
    lin.weight.data = w.clone()
    quantize_(lin, Int8WeightOnlyConfig() if scheme == "int8" else PrototypeInt4WeightOnlyConfig(group_size=group))
    ours = Q.quantize_linear(w, scheme, group)
    if scheme == "int8":
        assert torch.equal(ours["qweight"], lin.weight.qdata)
        assert torch.equal(ours["scales"], lin.weight.scale.reshape(-1).to(dtype))
    else:
        assert torch.equal(ours["qweight"], lin.weight.qdata)
        assert torch.equal(ours["scales_and_zeros"], lin.weight.scale_and_zero.to(torch.bfloat16))


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = y.double() - ref.double()
    return d.abs().max().item(), d.pow(2).mean().sqrt().item()


@needs_torchao
@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_vs_fp32_is_within_torchaos(scheme, group, dtype):
    """Max and RMS error against the fp32 linear: no worse than 1.05x torchao's on the same weights."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    w, x = _weight(256, 1024), _x(64, 1024)
    ref = F.linear(x, w)
    lin = nn.Linear(1024, 256, bias=False).to(dtype)
    lin.weight.data = w.to(dtype)
    quantize_(lin, Int8WeightOnlyConfig() if scheme == "int8" else PrototypeInt4WeightOnlyConfig(group_size=group))
    with torch.no_grad():
        ao_max, ao_rms = _errors(lin(x.to(dtype)), ref)
    our_max, our_rms = _errors(F.linear(x.to(dtype), Q.QuantizedWeight.from_float(w.to(dtype), scheme, group)), ref)
    assert our_max <= 1.05 * ao_max and our_rms <= 1.05 * ao_rms, (our_max / ao_max, our_rms / ao_rms)


@needs_torchao
@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_f_linear_uses_the_kernel_not_the_dense_weight(scheme, group, monkeypatch):
    qw = Q.QuantizedWeight.from_float(_weight(64, 128), scheme, group)
    xs = [_x(2, 128), _x(2, 128, dtype=torch.bfloat16), _x(40, 128, dtype=torch.bfloat16)]
    want = [F.linear(x, qw.dequantize().to(x.dtype)) for x in xs]

    def no_dense(*a, **k):
        raise AssertionError("dequantized the whole weight")
    monkeypatch.setattr(Q.QuantizedWeight, "dequantize", no_dense)
    for x, ref in zip(xs, want):
        torch.testing.assert_close(F.linear(x, qw), ref, atol=0.02, rtol=0.02)
        torch.testing.assert_close(x @ qw.T, ref, atol=0.02, rtol=0.02)


@needs_torchao
@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_ops_compute_on_the_dequantized_weight(scheme, group, dtype):
    qw = Q.QuantizedWeight.from_float(_weight(64, 128, dtype), scheme, group)
    dense = qw.dequantize()
    assert dense.dtype == dtype and dense.shape == (64, 128)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 or scheme == "int4" else {"atol": 1e-5, "rtol": 1e-5}
    x2, v = _x(128, 3, dtype=dtype), _x(128, dtype=dtype)
    torch.testing.assert_close(qw @ x2, dense @ x2, **tol)  # weight @ x
    torch.testing.assert_close(qw @ v, dense @ v, **tol)
    torch.testing.assert_close(torch.matmul(_x(4, 64, dtype=dtype), qw), _x(4, 64, dtype=dtype) @ dense, **tol)
    torch.testing.assert_close(torch.addmm(_x(64, dtype=dtype), _x(4, 128, dtype=dtype), qw.t()),
                               torch.addmm(_x(64, dtype=dtype), _x(4, 128, dtype=dtype), dense.t()), **tol)
    torch.testing.assert_close(torch.addmm(_x(128, dtype=dtype), _x(4, 64, dtype=dtype), qw),
                               torch.addmm(_x(128, dtype=dtype), _x(4, 64, dtype=dtype), dense), **tol)
    assert torch.equal(qw * 2, dense * 2)
    assert torch.equal(qw[:3], dense[:3])
    assert torch.equal(qw.float(), dense.float())
    assert torch.equal(qw.sum(), dense.sum())
    assert torch.equal(F.embedding(torch.tensor([1, 5]), qw), dense[[1, 5]])  # a tied embedding
    assert qw.T.shape == (128, 64) and torch.equal(qw.T.dequantize(), dense.t())
    with pytest.raises(RuntimeError, match="read-only"):
        qw.mul_(2)
    with pytest.raises(RuntimeError, match="read-only"):
        torch.add(dense, 1, out=qw)


@needs_torchao
def test_released_weight_raises_instead_of_reading_stale_memory():
    qw = Q.QuantizedWeight.from_float(_weight(32, 64), "int8")
    kept = qw.stored()
    transposed, alias = qw.T, nn.Parameter(qw, requires_grad=False)  # e.g. kept by model code past the forward
    qw.release()
    with pytest.raises(RuntimeError, match="after release"):
        F.linear(_x(1, 64), qw)
    with pytest.raises(RuntimeError, match="after release"):
        _ = _x(1, 64) @ transposed
    with pytest.raises(RuntimeError, match="after release"):
        F.linear(_x(1, 64), alias)
    with pytest.raises(RuntimeError, match="after release"):
        _ = qw + 1
    qw.rebind(kept)
    assert F.linear(_x(1, 64), qw).shape == (1, 32)
    with pytest.raises(ValueError, match="qweight"):
        qw.rebind({"qweight": kept["qweight"].float(), "scales": kept["scales"]})
    with pytest.raises(ValueError, match="needs tensors"):
        Q.from_stored({"qweight": kept["qweight"]}, (32, 64), torch.float32, "int8")


def test_misaligned_int8_operands_do_not_crash_the_kernel():
    """_weight_int8pack_mm does aligned AVX loads: an activation view 2 bytes into a tensor, or weight rows not a
    multiple of 16 bytes long, segfault it (a subprocess, so a crash fails this test instead of the run)."""
    code = ("import torch, torch.nn.functional as F\n"
            "from offload import quant as Q\n"
            "qw = Q.from_stored({'qweight': torch.ones(64, 256, dtype=torch.int8),\n"
            "                    'scales': torch.ones(64, dtype=torch.bfloat16)}, (64, 256), torch.bfloat16, 'int8')\n"
            "base = torch.ones(3 * 256 + 1, dtype=torch.bfloat16)\n"
            "x = base[1:].view(3, 256)\n"
            "assert x.data_ptr() % 64\n"
            "y = F.linear(x, qw)\n"
            "assert torch.equal(y, torch.full((3, 64), 256.0, dtype=torch.bfloat16)), y\n"
            "odd = Q.from_stored({'qweight': torch.ones(64, 40, dtype=torch.int8),\n"  # rows 40 bytes apart: unaligned
            "                     'scales': torch.ones(64, dtype=torch.bfloat16)}, (64, 40), torch.bfloat16, 'int8')\n"
            "y = F.linear(torch.ones(3, 40, dtype=torch.bfloat16), odd)\n"
            "assert torch.equal(y, torch.full((3, 64), 40.0, dtype=torch.bfloat16)), y\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_int4_layout_is_this_cpus_and_unpacks_its_packing():
    layout = Q.int4_layout()
    assert layout in Q.INT4_LAYOUTS
    g = torch.Generator().manual_seed(3)
    for n in (128, 112, 48, 16):  # full blocks and a partial last block
        vals = torch.randint(0, 16, (n, 64), dtype=torch.int32, generator=g)
        native = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals, 1)
        assert torch.equal(Q._pack_int4(vals, layout), native)
        for other in Q.INT4_LAYOUTS:
            assert torch.equal(Q._unpack_int4(Q._pack_int4(vals, other), n, 64, other), vals.to(torch.uint8))


@pytest.mark.skipif(not X86, reason="the x86 capabilities")
def test_int4_layout_follows_the_cpu_capability():
    """The packing differs by CPU capability: AVX2 and the scalar fallback each have their own."""
    want = {"avx2": "split32", "default": "pairs32"}
    for cap, layout in want.items():
        r = subprocess.run([sys.executable, "-c", "from offload import quant; print(quant.int4_layout())"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "ATEN_CPU_CAPABILITY": cap},
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-1] == layout


@needs_torchao
@pytest.mark.parametrize("written", [x for x in Q.INT4_LAYOUTS])
def test_int4_written_on_another_cpu_is_repacked(written, caplog):
    w, x = _weight(112, 128), _x(3, 128)
    tensors = Q.quantize_linear(w, "int4", 64)
    native = Q.from_stored(tensors, (112, 128), torch.float32, "int4", 64)
    vals = Q._unpack_int4(tensors["qweight"], 112, 128, Q.int4_layout())
    foreign = {**tensors, "qweight": Q._pack_int4(vals, written)}
    Q._warned.clear()
    with caplog.at_level(logging.WARNING, logger="offload"):
        qw = Q.from_stored(foreign, (112, 128), torch.float32, "int4", 64, layout=written)
    assert torch.equal(F.linear(x, qw), F.linear(x, native))
    assert torch.equal(qw.dequantize(), native.dequantize())
    assert ("repacking" in caplog.text) == (written != Q.int4_layout())


@needs_torchao
def test_parameter_binding():
    """module._parameters[...] = qw binds it (what the runtime does); nn.Parameter(qw) gives a parameter that is
    still a QuantizedWeight; plain attribute assignment refuses a non-Parameter."""
    qw = Q.QuantizedWeight.from_float(_weight(32, 64), "int8")
    lin = nn.Linear(64, 32)
    with pytest.raises(TypeError, match="Parameter"):
        lin.weight = qw
    p = nn.Parameter(qw, requires_grad=False)
    assert isinstance(p, nn.Parameter) and isinstance(p, Q.QuantizedWeight) and not p.requires_grad
    lin.weight = p
    x = _x(2, 64)
    assert torch.equal(lin(x), F.linear(x, qw, lin.bias))
    lin._parameters["weight"] = qw
    assert torch.equal(lin(x), F.linear(x, qw, lin.bias))
    assert torch.equal(F.linear(x, copy.deepcopy(qw)), F.linear(x, qw))
    assert torch.equal(F.linear(x, pickle.loads(pickle.dumps(qw))), F.linear(x, qw))
    assert isinstance(qw.data, Q.QuantizedWeight) and torch.equal(F.linear(x, qw.data), F.linear(x, qw))
    assert isinstance(lin.state_dict()["weight"], Q.QuantizedWeight)
    assert "QuantizedWeight(int8" in repr(qw)


@needs_torchao
def test_gradient_flows_to_the_input():
    qw = Q.QuantizedWeight.from_float(_weight(32, 64), "int4", 32)
    x = _x(2, 64).requires_grad_()
    F.linear(x, qw).sum().backward()
    torch.testing.assert_close(x.grad, qw.dequantize().sum(0).expand(2, 64))


def test_policy():
    from transformers.pytorch_utils import Conv1D

    class Custom(nn.Linear):
        def forward(self, x):
            return x @ self.weight.t() * 2

    lin, emb, norm = nn.Linear(128, 64), nn.Embedding(10, 128), nn.LayerNorm(128)
    assert Q.is_quantizable("l", "weight", lin.weight, lin)
    assert Q.is_quantizable("l", "weight", lin.weight, lin, scheme="int4", group_size=64)
    lin96 = nn.Linear(96, 64)  # 96 in_features: a multiple of 32 and 16, not of 64
    assert Q.is_quantizable("l", "weight", lin96.weight, lin96, scheme="int4", group_size=32)
    assert not Q.is_quantizable("l", "weight", lin96.weight, lin96, scheme="int4", group_size=64)
    assert not Q.is_quantizable("l", "bias", lin.bias, lin)
    assert not Q.is_quantizable("e", "weight", emb.weight, emb)
    assert not Q.is_quantizable("n", "weight", norm.weight, norm)
    assert not Q.is_quantizable("c", "weight", Custom(128, 64).weight, Custom(128, 64))
    mha = nn.MultiheadAttention(128, 4)
    assert not Q.is_quantizable("a.out_proj", "weight", mha.out_proj.weight, mha.out_proj)
    odd = nn.Linear(100, 64)
    assert not Q.is_quantizable("o", "weight", odd.weight, odd)
    conv = Conv1D(192, 64)  # nf=192 out, nx=64 in: weight [64, 192]
    assert Q.is_transposed_linear(conv)
    assert Q.is_quantizable("c", "weight", conv.weight, conv, scheme="int4", group_size=64)
    assert not Q.is_quantizable("l", "weight", lin.weight.to(torch.int8), lin)


def test_policy_group_size_and_rows():
    lin = nn.Linear(128, 40)  # 40 output rows: the int4 packing wants multiples of 16
    assert Q.is_quantizable("l", "weight", lin.weight, lin, scheme="int8")
    assert not Q.is_quantizable("l", "weight", lin.weight, lin, scheme="int4", group_size=32)
    with pytest.raises(ValueError, match="out_features % 16"):
        Q.quantized_specs("l.weight", (40, 128), torch.float32, "int4", 32)
    with pytest.raises(ValueError, match="group size"):
        Q.quantized_specs("l.weight", (64, 128), torch.float32, "int4", 48)


def _make_llama():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).eval()


def _make_gpt2():
    import transformers as tf
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()


def _quantize_model(model: nn.Module, scheme: str, group: int, dense: bool = False) -> int:
    """Swap each quantizable weight for its QuantizedWeight (dense=True: for the dequantized dense tensor)."""
    n = 0
    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or not Q.is_quantizable(mname, pname, p, mod, scheme=scheme, group_size=group):
                continue
            t = Q.is_transposed_linear(mod)
            tensors = Q.quantize_linear(p.data, scheme, group, transposed=t)
            qw = Q.from_stored(tensors, tuple(p.shape), p.dtype, scheme, group, transposed=t)
            mod._parameters[pname] = nn.Parameter(qw.dequantize(), requires_grad=False) if dense else qw
            n += 1
    return n


@needs_torchao
@pytest.mark.parametrize("arch", ["bloom", "llama", "opt", "gpt2"])
@pytest.mark.parametrize("scheme,group,dtype", [
    pytest.param("int8", 64, torch.float32, id="int8-fp32"), pytest.param("int8", 64, torch.bfloat16, id="int8-bf16"),
    pytest.param("int4", 32, torch.float32, id="int4-fp32")])
def test_tiny_models_generate_with_quantized_weights(arch, scheme, group, dtype):
    build = {"llama": _make_llama, "gpt2": _make_gpt2}.get(arch, lambda: make_model(arch))
    qmodel, dense = build().to(dtype), build().to(dtype)
    n = _quantize_model(qmodel, scheme, group)
    assert n == _quantize_model(dense, scheme, group, dense=True) and n >= 8
    assert all(isinstance(m.weight, Q.QuantizedWeight) for m in qmodel.modules() if isinstance(m, nn.Linear)
               and m.weight.shape[0] != 256)  # every block linear (not the tied head)
    inputs = inputs_for("bloom")
    with torch.no_grad():
        out = qmodel.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert out.shape == (1, inputs["input_ids"].shape[1] + 8)
        got, ref = qmodel(out).logits.float(), dense(out).logits.float()
    # the same computation as the dequantized dense model, up to the kernels' rounding
    tol = 1e-4 if (scheme, dtype) == ("int8", torch.float32) else 0.05 * ref.std().item()
    assert (got - ref).abs().max().item() <= tol
    start = inputs["input_ids"].shape[1]
    chosen = out[0, start:]
    ref_step = ref[0, start - 1:-1]
    margin = ref_step.max(-1).values - ref_step.gather(-1, chosen[:, None])[:, 0]
    assert (margin <= 2 * tol).all(), margin  # each generated token is the dense model's choice (or a near tie)


@needs_torchao
@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_specs_of_a_transposed_weight(scheme, group):
    """transformers' Conv1D keeps [in, out]: the specs plan what quantize_linear(transposed=True) writes."""
    w = _weight(128, 96)  # in=128, out=96
    tensors = Q.quantize_linear(w, scheme, group, transposed=True)
    specs = Q.quantized_specs("c_fc.weight", (128, 96), torch.float32, scheme, group, transposed=True)
    assert [(n, dt, tuple(sh)) for n, dt, sh in specs] == \
        [(f"c_fc.weight.{k}", t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    qw = Q.from_stored(tensors, (128, 96), torch.float32, scheme, group, transposed=True)
    assert qw.shape == (128, 96)
    x, b = _x(4, 128), _x(96, seed=2)
    torch.testing.assert_close(torch.addmm(b, x, qw), torch.addmm(b, x, qw.dequantize()), atol=0.02, rtol=0.02)
    torch.testing.assert_close(qw.dequantize(), w, atol=0.01, rtol=0)


def test_int8_chunk_buffer_made_under_inference_mode_serves_later_calls(monkeypatch):
    """The int8 CPU path keeps one conversion buffer per thread; made during a first call under
    ``torch.inference_mode()`` it was an inference tensor, and every later call outside inference mode failed
    ("Inplace update to inference tensor outside InferenceMode")."""
    from offload.quant import tensor as T
    monkeypatch.setattr(T, "_local", type(T._local)())  # no buffer yet in this thread
    torch.manual_seed(0)
    w = torch.randn(64, 32)  # fp32 activations: the chunked path (no vectorized fp32 int8 kernel)
    qw = Q.from_stored(Q.quantize_linear(w, "int8", None), (64, 32), torch.float32, "int8")
    x = torch.randn(3, 32)
    with torch.inference_mode():
        a = F.linear(x, qw)
    with torch.no_grad():
        b = F.linear(x, qw)
    assert torch.equal(a, b)
