"""``QuantizedWeight`` and what it computes with: the tensor type, its kernels, and the dispatch between them.

One concept: a quantized linear weight at run time. ``QuantizedWeight`` has the weight's shape and
float dtype, holds the stored tensors (views into a unit's buffer, rebound per forward, released
after; "Binding" in ``offload.quant``) and dequantizes for any op without a handler; ``_HANDLERS``
routes ``F.linear``, matmul, mm, addmm to ``_linear``: the CPU weight-only kernels, or a chunked
dequantize + matmul that never builds the dense weight (the rules and their measurements are in
``offload.quant``, "Kernels"; the tunables below are read here). The kernels take the tensor's
internals, so they live with it.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .int4pack import _layout_parts, _pack_native, _unpack_int4, aten, int4_layout
from .quantize import _check, _linear_shape, _specs, quantize_linear

log = logging.getLogger("offload")

# The int8 chunked path converts this many weights at a time (8 MiB of fp32: measured best of 1/2/4/8 Mi).
CHUNK_ELEMS = 2 << 20
# Off the CPU kernels (CUDA, autograd) a quantized linear dequantizes this many bytes of its weight at a time.
DEQUANT_CHUNK_BYTES = 64 << 20
# Above this many activation rows the int8 bf16 kernel loses to chunked dequantize + bf16 matmul (measured,
# 2048 -> 8192: 1.11 vs 2.73 ms at 8 rows, 3.59 vs 2.91 ms at 32, 13.05 vs 6.53 ms at 128).
INT8_KERNEL_MAX_ROWS = 16
_INT8_KERNEL_ALIGN = 64  # _weight_int8pack_mm does aligned AVX loads of the activations (a misaligned view segfaults)


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
        # kept across calls: made in inference mode, a call outside it could not write it ("Inplace update to
        # inference tensor outside InferenceMode")
        with torch.inference_mode(False):
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
