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

from .int4pack import INT4_LAYOUTS, _pack_int4, _unpack_int4, int4_layout  # noqa: F401
from .quantize import (INT4_GROUP_SIZES, SCHEMES, is_quantizable, is_transposed_linear, quantize_linear,  # noqa: F401
                       quantized_specs)
# The kernels' tunables (CHUNK_ELEMS, DEQUANT_CHUNK_BYTES, ...) are read in quant.tensor: set them there.
from .tensor import QuantizedWeight, _int8_chunked, _warned, from_stored  # noqa: F401
