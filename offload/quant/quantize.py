"""What is quantized and how: the schemes, the tensors each stores, ``quantize_linear``, and the policy.

One concept: turning a float linear weight into the plain tensors written into a unit (int8 per
output channel, int4 group-wise; the arithmetic is torchao's, imported only when quantizing), their
specs planned from metadata (``quantized_specs``), and which parameters are quantized at all
(``is_quantizable``). The schemes are described in ``offload.quant``.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .int4pack import _pack_native

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)


# --------------------------------------------------------------------------------------------------
# specs, quantization


def _check(shape: tuple[int, ...], scheme: str, group_size: int) -> tuple[int, int]:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if len(shape) != 2:
        raise ValueError(f"only 2-D linear weights are quantized, got shape {tuple(shape)}")
    n, k = shape
    if scheme == "int4":
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if k % group_size or n % 16:
            raise ValueError(f"int4 needs in_features % group_size == 0 and out_features % 16 == 0, "
                             f"got weight shape {tuple(shape)} with group size {group_size}")
    return n, k


def _linear_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    s = tuple(int(d) for d in shape)
    return (s[1], s[0]) if transposed and len(s) == 2 else s  # type: ignore[return-value]


def _specs(n: int, k: int, dtype: torch.dtype, scheme: str,
           group_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if scheme == "int8":
        return {"qweight": (torch.int8, (n, k)), "scales": (dtype, (n,))}
    return {"qweight": (torch.uint8, (n, k // 2)), "scales_and_zeros": (torch.bfloat16, (k // group_size, n, 2))}


def quantized_specs(name: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: str, group_size: int = 64, *,
                    transposed: bool = False) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(f"{name}.{key}", dtype, shape)`` of each tensor ``quantize_linear`` returns for a weight of this
    shape and dtype, without quantizing (to plan a store from metadata). ``key`` is the key of
    ``quantize_linear``'s dict and of ``from_stored``'s argument. ``transposed``: the weight is stored
    ``[in, out]`` (transformers' Conv1D); ``shape`` is the parameter's shape either way."""
    n, k = _check(_linear_shape(shape, transposed), scheme, group_size)
    return [(f"{name}.{key}", dt, sh) for key, (dt, sh) in _specs(n, k, dtype, scheme, group_size).items()]


def _torchao_primitives() -> Any:
    """torchao's quant primitives, imported on first use (1.5 s; the run-time path never needs them). Its
    import logs a warning per optional CUDA extension it cannot load; those say nothing about this use."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization import quant_primitives
    except ImportError as e:
        raise ImportError("quantizing weights needs torchao (pip install torchao)") from e
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return quant_primitives


def quantize_linear(weight: torch.Tensor, scheme: str, group_size: int = 64, *,
                    transposed: bool = False) -> dict[str, torch.Tensor]:
    """Quantize a float linear weight ``[out, in]`` (``[in, out]`` with ``transposed``) into the tensors
    stored for it: int8 ``{"qweight", "scales"}``, int4 ``{"qweight", "scales_and_zeros"}`` (see the module
    docstring). CPU tensors, contiguous, exactly what ``from_stored`` and the kernels take."""
    if not weight.is_floating_point():
        raise ValueError(f"only float weights are quantized, got {weight.dtype}")
    w = weight.detach().to("cpu")
    w = w.t() if transposed else w
    n, k = _check(tuple(w.shape), scheme, group_size)
    qp = _torchao_primitives()
    if scheme == "int8":
        # torchao's Int8Tensor.from_hp(w, PerRow()) for Int8WeightOnlyConfig (version 2)
        block = [1, k]
        scale, zero = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, block, torch.int8, -128, 127,
                                               eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32,
                                               zero_point_dtype=torch.int8, keepdim=True)
        q = qp.quantize_affine(w, block, scale, zero, torch.int8, -128, 127)
        out = {"qweight": q, "scales": scale.reshape(n).to(w.dtype)}
    else:
        # torchao's Int4OpaqueTensor.from_hp (PrototypeInt4WeightOnlyConfig, the CPU int4 path)
        block = [1, group_size]
        scale, zero = qp._choose_qparams_affine_tinygemm(w, qp.MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
                                                         1e-6, None, w.dtype)
        q = qp._quantize_affine_tinygemm(w, block, scale, zero, torch.int32, 0, 15)
        sz = torch.stack([scale.reshape(n, -1), zero.reshape(n, -1)], -1).to(torch.bfloat16)
        out = {"qweight": _pack_native(q), "scales_and_zeros": sz.transpose(0, 1).contiguous()}
    return {key: t.contiguous() for key, t in out.items()}



# --------------------------------------------------------------------------------------------------
# policy


def is_transposed_linear(parent_module: nn.Module) -> bool:
    """transformers' ``Conv1D`` keeps its weight ``[in, out]`` and computes ``addmm(b, x, W)``."""
    cls = type(parent_module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_quantizable(module_name: str, param_name: str, tensor: torch.Tensor, parent_module: nn.Module, *,
                   scheme: str = "int8", group_size: int = 64) -> bool:
    """Whether this parameter is stored quantized: the 2-D float ``weight`` of an ``nn.Linear`` whose
    forward is ``nn.Linear.forward`` (so it goes through ``F.linear``), or of transformers' ``Conv1D``,
    with shapes the kernels take (int8: in_features % 16; int4: in_features % group_size and
    out_features % 16). Norms, biases, embeddings, convolutions, attention-internal projections
    (``NonDynamicallyQuantizableLinear``, read by ``F.multi_head_attention_forward``) and everything
    else stay as they are. ``module_name`` is accepted for policies that name modules; unused here."""
    if param_name != "weight" or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point:
        return False
    transposed = is_transposed_linear(parent_module)
    if not transposed:
        if not isinstance(parent_module, nn.Linear) or type(parent_module).forward is not nn.Linear.forward:
            return False
        if isinstance(parent_module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return False
    n, k = _linear_shape(tuple(tensor.shape), transposed)
    if scheme == "int8":
        return k % 16 == 0
    if scheme == "int4":
        return k % group_size == 0 and n % 16 == 0 and group_size in INT4_GROUP_SIZES
    raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
