"""Weight-only int8 / int4 quantization of linear weights, stored in the form the kernels read.

A quantized linear weight is a few plain tensors (``quantize_linear``) written into the unit's
safetensors file as they are; at run time they are views into the unit's byte buffer, and
``from_stored`` wraps them in a ``QuantizedWeight``: a tensor subclass with the original shape and
float dtype that ``F.linear`` (so ``nn.Linear.forward``, unchanged) dispatches on.

Schemes (arithmetic from torchao's quant primitives, imported only when quantizing)
-------------------------------------------------------------------------------------
``int8``  per output channel, symmetric: what torchao's ``Int8WeightOnlyConfig`` does
          (``choose_qparams_affine`` SYMMETRIC, block ``[1, K]``, -128..127, fp32 eps); the tensors
          are identical to torchao's ``Int8Tensor`` except that the scale is stored in the weight's
          dtype, the dtype ``_weight_int8pack_mm`` reads (torchao casts it to that dtype per call).
          Stored: ``qweight`` int8 ``[N, K]``, ``scales`` ``[N]`` (weight dtype).
``int4``  group-wise asymmetric (group 32/64/128), torchao's tinygemm qparams, exactly what
          torchao's CPU int4 (``Int4OpaqueTensor``, ``PrototypeInt4WeightOnlyConfig``) does, packed
          by ``_convert_weight_to_int4pack_for_cpu`` *at quantize time*. Stored: ``qweight`` uint8
          ``[N, K/2]`` (packed), ``scales_and_zeros`` bf16 ``[K/group, N, 2]``. The scales are bf16
          whatever the model dtype, because the only vectorized int4 CPU kernel is the bf16 one; for an
          fp32 weight the integers are torchao's (qparams chosen and applied in fp32) and only the
          stored qparams are rounded to bf16. (Quantizing against the bf16-rounded qparams instead was
          measured worse: a scale rounded down clamps each group's extremes, max error 1.05x torchao's.)

The int4 CPU packing depends on the CPU it ran on
-------------------------------------------------
``_convert_weight_to_int4pack_for_cpu`` lays the nibbles out for the vector width of the CPU
capability it runs with: blocks of 64 output rows split in halves under AVX512 (``split64``),
blocks of 32 under AVX2 (``split32``), adjacent pairs otherwise (``pairs32``, ``pairs16`` on
NEON). The kernel reads its own machine's layout and silently computes garbage on another's
(checked here: the same weights packed under ``ATEN_CPU_CAPABILITY=avx512/avx2/default`` give three
different byte strings). So the layout is part of the stored format: ``int4_layout()`` names this
machine's, the store must record it when it writes int4 units, and ``from_stored(..., layout=)``
repacks (one extra pass, a warning once) when it differs from this machine's.

Kernels (chosen by ``benchmarks/bench_quant_kernels.py``, figures below)
------------------------------------------------------------------------
On x86 both aten weight-only kernels are vectorized for bf16 activations only; fp32 and fp16
activations take a scalar loop (5-12 ms at 1 row, 45-100 ms at 8, for one bloom-1b7 MLP matrix). So,
on the CPU:

* int8, bf16 activations, up to ``INT8_KERNEL_MAX_ROWS`` rows: ``aten._weight_int8pack_mm`` (reads the
  int8 weight and the scales, nothing else); more rows: chunked dequantize + bf16 matmul (below).
* int8, fp32/fp16 activations: chunked dequantize + fp32 matmul: ``CHUNK_ELEMS`` weights at a time are
  converted into one per-thread buffer, so the dense weight never exists and the weight read is
  1 byte/weight; the result is torchao's fp32 ``x @ q.t().float() * scale``. (Casting the activations
  to bf16 for the kernel is 4x faster, but its error is 1.07x torchao's RMS: over the 1.05 bar.)
* int4, any float activations: ``aten._weight_int4pack_mm_for_cpu`` in bf16 (fp32 / fp16 activations
  are cast to bf16 and the result back; measured within 1.02x torchao's fp32 error, since int4's own
  error is ~10x int8's).
* CUDA (not measured here) and any other device: dequantize, then ``F.linear`` in the activation
  dtype (torchao's int8 weight-only path does the same); int4 is unpacked from the stored CPU layout
  with torch ops.

Anything else done with a ``QuantizedWeight`` (``weight @ x``, ``addmm``, ``embedding``,
``weight * 2``, slicing, ``.float()``...) dequantizes it and runs the op on the dense tensor, so no
op computes on the empty wrapper; in-place ops on it raise. ``.t()``/``.T`` give a transposed
``QuantizedWeight`` so ``x @ w.T``, ``w @ v`` and Conv1D's ``addmm(b, x, w)`` use the kernel.
Dispatch costs ~10-20 us a call (tiny shapes), ``from_stored`` ~10-20 us a weight.

Measured on this machine (2-core AMD EPYC, AVX512 + AVX512-BF16, torch 2.13 CPU, torchao 0.18,
int4 group 64; each method cycles through 96 MiB of weight copies, > 2x the 32 MiB L3, as a streamed
weight is read cold; medians of 11 alternated calls, machine otherwise idle; ms per call)::

    rows                                      2048 -> 8192                8192 -> 2048
                                      1      8     32    128       1      8     32    128
    fp32 F.linear                  3.01   5.60  10.14  27.24    2.47   4.80   8.50  22.95
    bf16 F.linear                  1.28   1.36   2.13   5.33    1.23   1.33   2.10   5.32
    int8 kernel, bf16 act          0.55   1.11   3.59  13.05    0.59   1.14   3.61  12.74
    int8 kernel, fp32 act (scalar) 5.44   45.0    181    731    5.49   46.0    184    730
    int8 dequant+matmul bf16       19.9   20.1   21.1   24.3    21.5   22.1   22.7   26.3
    int8 dequant+matmul fp32       35.5   38.5   42.9   59.9    37.0   40.9   44.1   58.4
    int8 chunked, bf16             1.93   2.73   2.91   6.53    2.02   2.58   2.80   6.31
    int8 chunked, fp32             2.21   4.24   7.09  22.43    2.18   4.85   7.36  22.51
    int4 kernel, bf16 act          0.33   0.91   3.34  12.57    0.31   0.90   3.27  12.50
    int4 kernel, fp32 act (scalar) 12.2   96.3    387   1559    12.4   98.6    394   1571
    int4 dequant+matmul bf16       96.3   91.4   94.0   98.0    99.1   96.1    101   98.3
    F.linear(x, QuantizedWeight):
      int8, bf16 act               0.75   1.33*  3.23*  6.96    0.75   1.51   3.21   6.68
      int8, fp32 act               2.03   4.43   7.05  22.09    2.23   4.98   7.03  22.40
      int4, bf16 act               0.37   0.94   3.37  12.60    0.34   0.95   3.36  12.68
      int4, fp32 act               0.37   0.95   3.29  12.72    0.32   0.97   3.33  12.78
    (* minimum: a burst of other work hit that median.) Chunk size for the int8 chunked path, 2048 ->
    8192, 1 / 8 / 128 rows: 1 Mi 1.46 / 3.73 / 22.0, 2 Mi 1.40 / 3.65 / 21.8, 4 Mi 1.98 / 4.40 / 23.0,
    8 Mi 3.66 / 6.71 / 24.6 ms.

Bytes read per weight (what a streamed unit shrinks to): int8 1 + 4/in_features (fp32 scales) or
1 + 2/in_features; int4 0.5 + 4/group: 0.625 (group 32), 0.5625 (64), 0.53125 (128); so against
fp32 (4 bytes) int8 is 0.25x and int4 0.156x / 0.141x / 0.133x: group 64 or 128 for int4 <= 0.15x.
The chunked paths issue two small parallel regions per chunk; when other processes compete for
the cores they slow down far more than the one-call kernels (measured 20-60 ms a call at a load
average of 2-10 on these 2 cores).

Quality (``bench_quant_kernels.py``; random weights std 0.02, 64 random input rows; error of the
output against fp32 ``F.linear`` of the unquantized weight, offload / torchao's ``quantize_`` with
``Int8WeightOnlyConfig()`` and ``PrototypeInt4WeightOnlyConfig(group_size)``, torchao 0.18's CPU int4
(``Int4WeightOnlyConfig`` needs the CUDA-only mslk kernels); max error ratio, RMS ratio)::

                         2048 -> 8192              8192 -> 2048
                       fp32        bf16          fp32        bf16
    int8             1.000 1.000  1.000 1.000  1.000 1.000  1.000 1.000
    int4 group 32    1.007 1.001  1.000 1.000  1.018 1.001  1.000 1.000
    int4 group 64    1.001 1.000  1.000 1.000  0.987 1.000  1.000 1.000
    int4 group 128   0.990 1.000  1.000 1.000  0.994 1.000  1.000 1.000

(absolute, 2048 -> 8192, fp32: int8 max 0.0397 RMS 0.00743; int4 g64 max 0.403 RMS 0.0810.)

Binding (for the runtime)
-------------------------
``QuantizedWeight`` is not an ``nn.Parameter``: ``module.weight = qw`` raises
(``nn.Module.__setattr__`` wants a Parameter), ``module._parameters["weight"] = qw`` works and is
what to use (the ``Offloaded`` stand-in is bound the same way); ``nn.Parameter(qw,
requires_grad=False)`` also works (it returns a detached ``QuantizedWeight`` flagged as a parameter,
as torchao does) if a Parameter is required. To keep one object per parameter across forwards, as the
unquantized binding keeps ``live``, build it once and call ``qw.rebind(views)`` per forward and
``qw.release()`` after (using a released weight raises instead of reading stale memory).
"""
from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("offload")
aten = torch.ops.aten

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
# The int8 chunked path converts this many weights at a time (8 MiB of fp32: measured best of 1/2/4/8 Mi).
CHUNK_ELEMS = 2 << 20
# Off the CPU kernels (CUDA, autograd) a quantized linear dequantizes this many bytes of its weight at a time.
DEQUANT_CHUNK_BYTES = 64 << 20
# Above this many activation rows the int8 bf16 kernel loses to chunked dequantize + bf16 matmul (measured,
# 2048 -> 8192: 1.11 vs 2.73 ms at 8 rows, 3.59 vs 2.91 ms at 32, 13.05 vs 6.53 ms at 128).
INT8_KERNEL_MAX_ROWS = 16
_INT8_KERNEL_ALIGN = 64  # _weight_int8pack_mm does aligned AVX loads of the activations (a misaligned view segfaults)


# --------------------------------------------------------------------------------------------------
# int4 CPU packing layouts


def _layout_parts(layout: str) -> tuple[str, int]:
    for style in ("split", "pairs"):
        if layout.startswith(style) and layout[len(style):].isdigit():
            return style, int(layout[len(style):])
    raise ValueError(f"unknown int4 packing layout {layout!r} (known: {', '.join(INT4_LAYOUTS)})")


INT4_LAYOUTS = ("split64", "split32", "pairs16", "pairs32", "pairs64")


def _pack_int4(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (integers 0..15, ``[N, K]``) packed as ``_convert_weight_to_int4pack_for_cpu`` does on a CPU
    of that layout: uint8 ``[N, K/2]``. Rows go in blocks of ``block_n``; in a full block each k holds the
    block's column of nibbles, byte j = v[j] | v[j + block_n/2] << 4 ("split") or v[2j] | v[2j+1] << 4
    ("pairs"); a last, partial block is always "pairs"."""
    style, bn = _layout_parts(layout)
    n, k = values.shape
    v = values.to(torch.uint8)
    out = []
    full = n // bn
    if full:
        blk = v[:full * bn].reshape(full, bn, k).transpose(1, 2)  # [block, k, row]
        lo, hi = (blk[..., :bn // 2], blk[..., bn // 2:]) if style == "split" else (blk[..., 0::2], blk[..., 1::2])
        out.append((lo | (hi << 4)).reshape(-1))
    if n % bn:
        blk = v[full * bn:].t()  # [k, rows]
        out.append((blk[:, 0::2] | (blk[:, 1::2] << 4)).reshape(-1))
    return torch.cat(out).view(n, k // 2)


def _unpack_int4(packed: torch.Tensor, n: int, k: int, layout: str) -> torch.Tensor:
    """The inverse of ``_pack_int4``: uint8 ``[N, K]`` of 0..15 (torch ops, so it runs on any device)."""
    style, bn = _layout_parts(layout)
    flat = packed.reshape(-1)
    full = n // bn
    parts = []
    if full:
        blk = flat[:full * bn * k // 2].view(full, k, bn // 2)
        lo, hi = blk & 0xF, blk >> 4
        vals = torch.cat([lo, hi], -1) if style == "split" else torch.stack([lo, hi], -1).reshape(full, k, bn)
        parts.append(vals.transpose(1, 2).reshape(full * bn, k))
    rest = n - full * bn
    if rest:
        blk = flat[full * bn * k // 2:].view(k, rest // 2)
        parts.append(torch.stack([blk & 0xF, blk >> 4], -1).reshape(k, rest).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


@functools.lru_cache(maxsize=None)
def int4_layout() -> str:
    """The int4 packing layout of this machine's ``_convert_weight_to_int4pack_for_cpu`` (one of
    ``INT4_LAYOUTS``, or ``"unknown"``): found by packing a probe, not guessed from the CPU's name."""
    probe = torch.randint(0, 16, (128, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    native = aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for layout in INT4_LAYOUTS:
        if torch.equal(_pack_int4(probe, layout), native):
            return layout
    return "unknown"


def _pack_native(values: torch.Tensor) -> torch.Tensor:
    return aten._convert_weight_to_int4pack_for_cpu(values.to("cpu", torch.int32).contiguous(), 1)


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
# the tensor type


_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


class _Bound:
    """What a weight computes from: its stored tensors (None once released) and their int4 packing layout."""
    __slots__ = ("tensors", "layout")

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, layout: str = ""):
        self.tensors, self.layout = tensors, layout


class QuantizedWeight(torch.Tensor):
    """A quantized linear weight that reports the original shape, float dtype and device.

    ``F.linear(x, w, b)``, ``x @ w.T``, ``torch.mm(x, w.t())``, ``torch.addmm(b, x, w.t())`` and
    ``w @ v`` run the quantized kernel; every other op dequantizes and runs on the dense tensor.
    Build with ``from_stored`` (or ``QuantizedWeight.from_float`` for a weight in memory).
    """

    _qt: _Bound  # shared with the weight's transposes and detached aliases, so release() reaches them all
    _qt_scheme: str
    _qt_group: int
    _qt_nk: tuple[int, int]
    _qt_transposed: bool

    @staticmethod
    def __new__(cls, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, scheme: str,
                group_size: int = 64, *, transposed: bool = False, layout: str | None = None) -> QuantizedWeight:
        n, k = _check(_linear_shape(shape, transposed), scheme, group_size)
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(int(d) for d in shape), dtype=dtype, device=device,
                                                requires_grad=False)
        t._qt_scheme, t._qt_group, t._qt_nk, t._qt_transposed = scheme, group_size, (n, k), transposed
        t._qt = _Bound()
        t.rebind(tensors, layout=layout)
        return t

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # everything is done in __new__
        super().__init__()

    # ---- construction helpers

    @classmethod
    def from_float(cls, weight: torch.Tensor, scheme: str, group_size: int = 64, *,
                   transposed: bool = False) -> QuantizedWeight:
        return cls(quantize_linear(weight, scheme, group_size, transposed=transposed), tuple(weight.shape),
                   weight.dtype, scheme, group_size, transposed=transposed)

    def _same(self, bound: _Bound, transposed: bool) -> QuantizedWeight:
        n, k = self._qt_nk
        t = torch.Tensor._make_wrapper_subclass(type(self), (k, n) if transposed else (n, k), dtype=self.dtype,
                                                device=self.device, requires_grad=False)
        t._qt_scheme, t._qt_group, t._qt_nk, t._qt_transposed = self._qt_scheme, self._qt_group, self._qt_nk, transposed
        t._qt = bound
        return t

    def rebind(self, tensors: Mapping[str, torch.Tensor], *, layout: str | None = None) -> None:
        """Point this weight at new stored tensors (views into the next buffer), checked against the specs.
        ``layout``: the int4 packing layout the tensors were written with (``None``: this machine's)."""
        n, k = self._qt_nk
        want = _specs(n, k, self.dtype, self._qt_scheme, self._qt_group)
        if set(tensors) != set(want):
            raise ValueError(f"{self._qt_scheme} weight needs tensors {sorted(want)}, got {sorted(tensors)}")
        for key, (dt, sh) in want.items():
            t = tensors[key]
            if t.dtype != dt or tuple(t.shape) != sh:
                raise ValueError(f"{self._qt_scheme} {key}: expected {dt} {sh}, got {t.dtype} {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{key} is on {t.device}, the weight on {self.device}")
        tensors = dict(tensors)
        layout = (layout or int4_layout()) if self._qt_scheme == "int4" else ""
        if layout and self.device.type == "cpu" and layout != int4_layout():
            _warn_once(f"repack:{layout}", "offload: int4 weights were packed for the %s layout, this CPU's kernel "
                       "reads %s: repacking on every load (re-convert the store on this machine to avoid it)",
                       layout, int4_layout())
            tensors["qweight"] = _pack_native(_unpack_int4(tensors["qweight"], n, k, layout))
            layout = int4_layout()
        self._qt.tensors, self._qt.layout = tensors, layout

    def release(self) -> None:
        """Drop the stored tensors (the buffer goes back to the ring); any later use of this weight, or of a
        transpose or alias of it, raises."""
        self._qt.tensors = None

    def stored(self) -> dict[str, torch.Tensor]:
        if self._qt.tensors is None:
            raise RuntimeError("QuantizedWeight used after release(): its buffer is no longer bound")
        return self._qt.tensors

    @property
    def scheme(self) -> str:
        return self._qt_scheme

    @property
    def group_size(self) -> int:
        return self._qt_group

    # ---- values

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """The dense weight (the shape this tensor reports) in ``dtype`` (default: its own)."""
        q = self.stored()
        n, k = self._qt_nk
        dtype = dtype or self.dtype
        if self._qt_scheme == "int8":
            w = q["qweight"].to(dtype) * q["scales"].to(dtype)[:, None]
        else:
            vals = _unpack_int4(q["qweight"], n, k, self._qt.layout)
            sz = q["scales_and_zeros"].float()  # [G, N, 2]
            scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]
            w = ((vals.view(n, k // self._qt_group, self._qt_group).float() - 8) * scale + zero).view(n, k).to(dtype)
        return w.t() if self._qt_transposed else w

    def __repr__(self, **kwargs: Any) -> str:
        state = "" if self._qt.tensors is not None else ", released"
        return (f"QuantizedWeight({self._qt_scheme}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device}"
                f"{', group_size=' + str(self._qt_group) if self._qt_scheme == 'int4' else ''}"
                f"{', transposed' if self._qt_transposed else ''}{state})")

    def __reduce_ex__(self, proto: Any) -> Any:
        return (_rebuild, (dict(self.stored()), tuple(self.shape), self.dtype, self._qt_scheme, self._qt_group,
                           self._qt_transposed, self._qt.layout))

    def __deepcopy__(self, memo: Any) -> QuantizedWeight:
        return self._same(_Bound({key: t.clone() for key, t in self.stored().items()}, self._qt.layout),
                          self._qt_transposed)

    # ---- dispatch

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(*args, **kwargs)
            if out is not NotImplemented:
                return out
        with torch._C.DisableTorchFunctionSubclass():  # -> __torch_dispatch__ below, on the dense values
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for i, a in enumerate(func._schema.arguments):
            v = args[i] if i < len(args) else kwargs.get(a.name)
            if isinstance(v, QuantizedWeight) and a.alias_info is not None and a.alias_info.is_write:
                raise RuntimeError(f"{func} would write into a QuantizedWeight; quantized weights are read-only")
        args, kwargs = torch.utils._pytree.tree_map_only(QuantizedWeight, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


def _rebuild(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, scheme: str, group: int,
             transposed: bool, layout: str) -> QuantizedWeight:
    return QuantizedWeight(tensors, shape, dtype, scheme, group, transposed=transposed, layout=layout)


def from_stored(tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, scheme: str,
                group_size: int = 64, *, transposed: bool = False, layout: str | None = None) -> QuantizedWeight:
    """A ``QuantizedWeight`` over the stored tensors (keys as ``quantize_linear`` returns them; views into
    a byte buffer are used as they are, no copy). ``shape``/``dtype``: the original parameter's.
    ``layout``: ``int4_layout()`` of the machine that wrote int4 tensors, if it may differ from this one."""
    return QuantizedWeight(tensors, shape, dtype, scheme, group_size, transposed=transposed, layout=layout)


# --------------------------------------------------------------------------------------------------
# compute


_local = threading.local()


def _chunk_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """One conversion buffer per thread and dtype, kept: allocating 8 MiB per call costs its page faults each
    time the allocator has given the memory back (measured up to 4 ms a call after a large free)."""
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _int8_chunked(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x2 @ (q * s).T`` without the dense weight: ``CHUNK_ELEMS`` weights at a time into one buffer (CPU)."""
    cd = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
    xc = x2.to(cd)
    n, k = q.shape
    rows = max(1, min(n, CHUNK_ELEMS // max(k, 1)))
    yt = torch.empty(n, x2.shape[0], dtype=cd)
    buf = _chunk_buffer(rows * k, cd).view(rows, k)
    xt = xc.t()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        b = buf[:r1 - r0]
        b.copy_(q[r0:r1])
        torch.mm(b, xt, out=yt[r0:r1])
    yt.mul_(s.to(cd)[:, None])
    return yt.t().contiguous()


def _cpu_kernels(w: QuantizedWeight) -> bool:
    """Whether the CPU kernels above serve ``w`` (elsewhere: dequantize in row chunks)."""
    return w.device.type == "cpu"


def _rows_dequantized(w: QuantizedWeight, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Output rows ``r0:r1`` of the dense ``[N, K]`` weight, in ``dtype`` (int4: ``r0`` on a packing block)."""
    q = w.stored()
    n, k = w._qt_nk
    if w._qt_scheme == "int8":
        return q["qweight"][r0:r1].to(dtype) * q["scales"][r0:r1].to(dtype)[:, None]
    vals = _unpack_int4(q["qweight"].reshape(-1)[r0 * k // 2:r1 * k // 2], r1 - r0, k, w._qt.layout)
    sz = q["scales_and_zeros"][:, r0:r1].float()  # [G, rows, 2]
    scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]
    g = w._qt_group
    return ((vals.view(r1 - r0, k // g, g).float() - 8) * scale + zero).view(r1 - r0, k).to(dtype)


def _linear_dequantized(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None,
                        chunk_bytes: int | None = None) -> torch.Tensor:
    """``F.linear`` over the dense weight, built ``DEQUANT_CHUNK_BYTES`` of it at a time: the temporaries of
    a 70B MLP matrix are one chunk (plus int4's unpacking), not the whole matrix in float."""
    n, k = w._qt_nk
    chunk_bytes = DEQUANT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per_row = k * 4  # int4 unpacks through float32
    block = 1
    if w._qt_scheme == "int4":
        block = _layout_parts(w._qt.layout)[1] if w._qt.layout and w._qt.layout != "unknown" else n
    rows = max(block, chunk_bytes // max(per_row, 1) // block * block)
    if rows >= n:
        return F.linear(x, w.dequantize(x.dtype), bias)
    ys = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ys.append(F.linear(x, _rows_dequantized(w, r0, r1, x.dtype), None if bias is None else bias[r0:r1]))
    return torch.cat(ys, -1)


def _linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    q = w.stored()
    n, k = w._qt_nk
    if x.shape[-1] != k:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({math.prod(x.shape[:-1])}x{x.shape[-1]} "
                           f"and {k}x{n})")
    if x.device != w.device:
        raise RuntimeError(f"expected the input on {w.device}, got {x.device}")
    if not x.is_floating_point():
        return F.linear(x, w.dequantize(), bias)
    if (x.requires_grad and torch.is_grad_enabled()) or not _cpu_kernels(w):
        return _linear_dequantized(x, w, bias)  # autograd, CUDA, ...: dequantize a few rows at a time
    x2 = x.reshape(-1, k)
    if w._qt_scheme == "int8":
        qw = q["qweight"]
        if (x.dtype == torch.bfloat16 and x2.shape[0] <= INT8_KERNEL_MAX_ROWS and k % 16 == 0
                and qw.data_ptr() % 16 == 0 and qw.is_contiguous()):
            x2 = x2.contiguous()
            if x2.data_ptr() % _INT8_KERNEL_ALIGN:  # a view into a tensor's middle: copy (allocations are 64-aligned)
                x2 = x2.clone(memory_format=torch.contiguous_format)
            y = aten._weight_int8pack_mm(x2, qw, q["scales"].to(torch.bfloat16))
        else:
            y = _int8_chunked(x2, qw, q["scales"])
    else:
        xb = x2.to(torch.bfloat16).contiguous()
        y = aten._weight_int4pack_mm_for_cpu(xb, q["qweight"], w._qt_group, q["scales_and_zeros"])
    y = y.to(x.dtype).view(*x.shape[:-1], n)
    if bias is not None:
        y = y + bias
    return y


# --------------------------------------------------------------------------------------------------
# which torch functions take the kernel (all others: dequantize, see __torch_dispatch__)


def _is_qw(t: Any) -> bool:
    return isinstance(t, QuantizedWeight)


def _h_linear(input: Any, weight: Any, bias: Any = None) -> Any:
    if _is_qw(weight) and not weight._qt_transposed and not _is_qw(input) and not _is_qw(bias):
        return _linear(input, weight, bias)
    return NotImplemented


def _h_matmul(a: Any, b: Any, *, out: Any = None) -> Any:
    if out is not None:
        return NotImplemented
    if _is_qw(b) and b._qt_transposed and not _is_qw(a) and a.dim() >= 1:  # x @ W.T
        return _linear(a, b, None)
    if _is_qw(a) and not a._qt_transposed and not _is_qw(b) and b.dim() in (1, 2):  # W @ v, W @ X = (X.T @ W.T).T
        return _linear(b, a, None) if b.dim() == 1 else _linear(b.t(), a, None).t()
    return NotImplemented


def _h_mm(a: Any, b: Any, *, out: Any = None) -> Any:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != 2 or b.dim() != 2:
        return NotImplemented
    return _h_matmul(a, b, out=out)


def _h_addmm(input: Any, mat1: Any, mat2: Any, *, beta: Any = 1, alpha: Any = 1, out: Any = None) -> Any:
    if (out is None and beta == 1 and alpha == 1 and _is_qw(mat2) and mat2._qt_transposed and not _is_qw(mat1)
            and not _is_qw(input) and isinstance(mat1, torch.Tensor) and mat1.dim() == 2):
        return _linear(mat1, mat2, input)  # Conv1D: addmm(bias, x, W) with W stored [in, out]
    return NotImplemented


def _h_t(self: Any) -> Any:
    return self._same(self._qt, not self._qt_transposed) if _is_qw(self) else NotImplemented


def _h_transpose(self: Any, dim0: int, dim1: int) -> Any:
    if _is_qw(self) and {dim0 % 2, dim1 % 2} == {0, 1}:
        return _h_t(self)
    return NotImplemented


def _h_detach(self: Any) -> Any:
    return self._same(self._qt, self._qt_transposed) if _is_qw(self) else NotImplemented


def _getter(name: str) -> Callable[..., Any]:
    return getattr(torch.Tensor, name).__get__  # type: ignore[no-any-return]


_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.linear: _h_linear,
    torch.matmul: _h_matmul, torch.Tensor.matmul: _h_matmul, torch.Tensor.__matmul__: _h_matmul,
    torch.mm: _h_mm, torch.Tensor.mm: _h_mm,
    torch.addmm: _h_addmm, torch.Tensor.addmm: _h_addmm,
    torch.t: _h_t, torch.Tensor.t: _h_t, _getter("T"): _h_t, _getter("mT"): _h_t, _getter("H"): _h_t,
    _getter("mH"): _h_t, torch.transpose: _h_transpose, torch.Tensor.transpose: _h_transpose,
    torch.Tensor.detach: _h_detach, torch.detach: _h_detach, _getter("data"): _h_detach,
}


def _h_rmatmul(self: Any, other: Any) -> Any:  # other @ self, when other's __matmul__ gave NotImplemented
    return _h_matmul(other, self)


_HANDLERS[torch.Tensor.__rmatmul__] = _h_rmatmul


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
