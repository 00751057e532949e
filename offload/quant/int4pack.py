"""The int4 CPU packing layouts: how ``_convert_weight_to_int4pack_for_cpu`` lays out nibbles on this CPU.

One concept: the stored int4 bytes depend on the CPU that packed them (see "The int4 CPU packing
depends on the CPU it ran on" in ``offload.quant``). ``int4_layout`` names this machine's layout by
packing a probe; ``_pack_int4`` / ``_unpack_int4`` convert between layouts with torch ops.
"""
from __future__ import annotations

import functools

import torch

aten = torch.ops.aten

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
