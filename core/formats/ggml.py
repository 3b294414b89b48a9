"""GGML block formats in torch: dequantizers bit-identical to the ``gguf`` package's numpy ones, and the
quantizers the converter uses.

A quantized tensor is stored row by row (a row is the last torch dimension, GGUF's ``ne0``), each row a run of
blocks of ``block_size`` values packed into ``type_size`` bytes. Dequantization runs on any device on the raw
bytes ``[rows, bytes_per_row]`` (uint8) and computes in float32 with the numpy reference's operation order, so
the result equals ``gguf.quants.dequantize`` bit for bit; the caller casts it to the compute dtype.

Quantization: Q8_0, Q5_0, Q5_1 and Q4_0 go through ``gguf.quants.quantize`` (the reference). gguf-py has no
quantizer for the K-quants, so Q6_K, Q5_K and Q4_K follow llama.cpp's reference quantizers
(``quantize_row_q{4,5,6}_K_ref``: weighted scale/min search per sub-block, 6- or 8-bit sub-block scales).
Rows whose length is not a multiple of 256 cannot be K-quantized; ``fallback`` names what llama.cpp uses then.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class QType:
    name: str
    id: int            # GGMLQuantizationType value
    block_size: int    # values per block
    type_size: int     # bytes per block

    def row_bytes(self, row: int) -> int:
        return row // self.block_size * self.type_size


QTYPES = {q.name: q for q in (
    QType("F32", 0, 1, 4), QType("F16", 1, 1, 2), QType("BF16", 30, 1, 2),
    QType("Q8_0", 8, 32, 34), QType("Q5_0", 6, 32, 22), QType("Q5_1", 7, 32, 24), QType("Q4_0", 2, 32, 18),
    QType("Q6_K", 14, QK_K, 210), QType("Q5_K", 13, QK_K, 176), QType("Q4_K", 12, QK_K, 144),
    # read only (city96 / llama-quantize files): no quantizer here
    QType("Q3_K", 11, QK_K, 110), QType("Q2_K", 10, QK_K, 84), QType("IQ4_NL", 20, 32, 18),
    QType("IQ4_XS", 23, QK_K, 136),
)}
FLOAT_TYPES = ("F32", "F16", "BF16")
# What a K-quant falls back to for rows that are not a multiple of 256 (llama.cpp's choice).
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def fits(qtype: QType, row: int) -> bool:
    return row % qtype.block_size == 0


def qtype_for_row(name: str, row: int) -> QType:
    """``name``, or its fallback when rows of length ``row`` do not split into its blocks."""
    qtype = QTYPES[name]
    if not fits(qtype, row) and name in FALLBACK:
        qtype = QTYPES[FALLBACK[name]]
    if not fits(qtype, row):
        qtype = QTYPES["F16"] if name != "BF16" else QTYPES["BF16"]
    return qtype


# ---- dequantization -------------------------------------------------------------------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 bytes ``[n, 2]`` -> float32 ``[n, 1]``."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes ``[n, k*group]`` -> ``[n, k, 2, group]``: low nibbles of a group of bytes, then the high ones."""
    n = qs.shape[0]
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return (qs.reshape(n, -1, 1, group) >> shifts) & 0x0F


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Little-endian bit ``i`` of ``qh`` bytes ``[n, count/8]`` as ``[n, count]`` uint8."""
    n = qh.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).view(1, 1, 8)
    return ((qh.reshape(n, -1, 1) >> shifts) & 1).reshape(n, count)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K) as ``[n, 8]`` each."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _dq_q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _dq_q4_0(b):
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], -1).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _dq_q5_0(b):
    n = b.shape[0]
    q = _nibbles(b[:, 6:], 16).reshape(n, -1) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b[:, :2]) * (q.to(torch.int8) - 16).float()


def _dq_q5_1(b):
    n = b.shape[0]
    q = _nibbles(b[:, 8:], 16).reshape(n, -1) | (_bits(b[:, 4:8], 32) << 4)
    return (_f16(b[:, :2]) * q.float()) + _f16(b[:, 2:4])


def _dq_q4_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _dq_q5_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    low = _nibbles(b[:, 48:], 32).reshape(n, -1, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 1, 8, 1)
    high = ((b[:, 16:48].reshape(n, -1, 1, 32) >> shifts) & 1).reshape(n, -1, 32)
    q = (low | (high << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _dq_q6_k(b):
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    low = _nibbles(b[:, :128], 64).reshape(n, -1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, -1, 1, 32) >> shifts) & 0x03).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


def _dq_q2_k(b):
    n = b.shape[0]
    scales = b[:, :16]
    d = (_f16(b[:, 80:82]) * (scales & 0x0F).float()).reshape(n, QK_K // 16, 1)
    m = (_f16(b[:, 82:84]) * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    q = ((b[:, 16:80].reshape(n, -1, 1, 32) >> shifts) & 0x03).reshape(n, QK_K // 16, 16).float()
    return (d * q - m).reshape(n, QK_K)


def _dq_q3_k(b):
    n = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (packed[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                          device=b.device).view(1, 2, 1)).reshape(n, 16)
    high = (packed[:, 8:].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                           device=b.device).view(1, 4, 1)).reshape(n, 16)
    scales = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(n, 16, 1)
    shifts2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    shifts1 = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 1, 8, 1)
    ql = ((qs.reshape(n, -1, 1, 32) >> shifts2).reshape(n, 16, 16)) & 0x03
    qh = (((hmask.reshape(n, -1, 1, 32) >> shifts1).reshape(n, 16, 16)) & 0x01) ^ 0x01  # set bit: no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _dq_iq4_nl(b):
    n = b.shape[0]
    table = torch.tensor(IQ4_VALUES, dtype=torch.int8, device=b.device)
    q = _nibbles(b[:, 2:], 16).reshape(n, -1).long()
    return _f16(b[:, :2]) * table[q].float()


def _dq_iq4_xs(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    high = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=b.device).view(1, 8)
    high = ((high >> shifts) & 0x03).to(torch.uint8)
    low = (b[:, 4:8].reshape(n, -1, 1) >> torch.tensor([0, 4], dtype=torch.uint8,
                                                       device=b.device).view(1, 1, 2)).reshape(n, 8) & 0x0F
    scales = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(n, 8, 1)
    table = torch.tensor(IQ4_VALUES, dtype=torch.int8, device=b.device)
    q = _nibbles(b[:, 8:], 16).reshape(n, 8, 32).long()
    return (dl * table[q].float()).reshape(n, QK_K)


BLOCK_DEQUANTIZERS = {"Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1,
                      "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k, "Q3_K": _dq_q3_k, "Q2_K": _dq_q2_k,
                      "IQ4_NL": _dq_iq4_nl, "IQ4_XS": _dq_iq4_xs}


def dequantize(data: torch.Tensor, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8, ``[..., bytes_per_row]``) of a ``qtype`` tensor -> float32 of ``shape``."""
    raw = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
    if qtype.name == "F32":
        return raw.view(torch.float32).reshape(shape)
    if qtype.name == "F16":
        return raw.view(torch.float16).float().reshape(shape)
    if qtype.name == "BF16":
        return raw.view(torch.bfloat16).float().reshape(shape)
    blocks = raw.reshape(-1, qtype.type_size)
    return BLOCK_DEQUANTIZERS[qtype.name](blocks).reshape(shape)


# ---- quantization (K-quants; llama.cpp's reference algorithms) ------------------------------------------------
def _fit_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                   nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp ``make_qkx2_quants`` on sub-blocks ``x [m, n]`` with weights ``w``: the scale and the
    (positive) min offset with ``x ~ scale * q - min`` for ``q in 0..nmax``."""
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    span = hi - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)

    def quants(iscale):
        return torch.round(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)

    def error(scale, minimum, q):
        return (w * (scale[:, None] * q + minimum[:, None] - x) ** 2).sum(-1)

    iscale = nmax / span
    scale, minimum = 1 / iscale, lo.clone()
    best = error(scale, minimum, quants(iscale))
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)
    for step in range(nstep + 1):
        q = quants((rmin + rdelta * step + nmax) / span)
        sum_l, sum_l2, sum_xl = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = error(this_scale, this_min, q)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    minimum = torch.where(flat, lo, minimum)
    return scale, -minimum


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins ``[n, 8]`` (uint8) -> the 12-byte layout ``_scale_min_k4`` reads."""
    out = torch.zeros(ls.shape[0], 12, dtype=torch.uint8, device=ls.device)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _half_bytes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[n]`` -> (its float16 bytes ``[n, 2]``, the float16 value back in float32 ``[n]``)."""
    h = x.to(torch.float16)
    return h.view(torch.uint8).reshape(-1, 2), h.float()


def _quantize_k4_like(blocks: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared part of Q4_K and Q5_K: d, dmin bytes, packed scales and the quants ``[n, 256]`` in 0..nmax."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    av = torch.sqrt((blocks * blocks).sum(-1) / QK_K)
    weights = av[:, None, None] + sub.abs()
    scales, mins = _fit_scale_min(sub.reshape(-1, 32), weights.reshape(-1, 32), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.amax(-1), mins.amax(-1)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale.clamp(min=1e-30), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min.clamp(min=1e-30), torch.zeros_like(max_min))
    ls = torch.round(inv_scale[:, None] * scales).clamp(0, 63).to(torch.uint8)
    lm = torch.round(inv_min[:, None] * mins).clamp(0, 63).to(torch.uint8)
    d_bytes, d = _half_bytes(max_scale / 63)
    dmin_bytes, dmin = _half_bytes(max_min / 63)
    step = (d[:, None] * ls.float()).reshape(n, 8, 1)
    offset = (dmin[:, None] * lm.float()).reshape(n, 8, 1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.where(step == 0, torch.zeros_like(sub), torch.round((sub + offset) / safe).clamp(0, nmax))
    return d_bytes, dmin_bytes, _pack_scale_min_k4(ls, lm), q.to(torch.uint8).reshape(n, QK_K)


def _pack_nibble_pairs(q: torch.Tensor, group: int) -> torch.Tensor:
    """Quants ``[n, k*2*group]`` (values < 16) -> bytes ``[n, k*group]``: value j low, value j+group high."""
    n = q.shape[0]
    q = q.reshape(n, -1, 2, group)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _q_q4_k(blocks):
    d, dmin, scales, q = _quantize_k4_like(blocks, 15, -1.0, 20)
    return torch.cat([d, dmin, scales, _pack_nibble_pairs(q, 32)], dim=1)


def _q_q5_k(blocks):
    d, dmin, scales, q = _quantize_k4_like(blocks, 31, -0.5, 15)
    n = q.shape[0]
    low = _pack_nibble_pairs(q & 0x0F, 32)
    high = (q >> 4).reshape(n, 8, 32)  # bit j of qh[l]: high bit of sub-block j, element l
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device).view(1, 8, 1)
    qh = (high << shifts).sum(1, dtype=torch.int32).to(torch.uint8)
    return torch.cat([d, dmin, scales, qh, low], dim=1)


def _q_q6_k(blocks):
    n = blocks.shape[0]
    nmax = 32
    sub = blocks.reshape(n * 16, 16)
    w = sub * sub
    imax = sub.abs().argmax(-1, keepdim=True)
    peak = sub.gather(-1, imax).squeeze(-1)
    tiny = peak.abs() < 1e-15
    peak = torch.where(tiny, torch.ones_like(peak), peak)

    def fit(iscale):
        q = torch.round(iscale[:, None] * sub).clamp(-nmax, nmax - 1)
        return q, (w * sub * q).sum(-1), (w * q * q).sum(-1)

    _, sumlx, suml2 = fit(-nmax / peak)
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        _, sumlx, suml2 = fit(-(nmax + 0.1 * step) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2.clamp(min=1e-30), scale)
        best = torch.where(better, scale * sumlx, best)
    scale = torch.where(tiny, torch.zeros_like(scale), scale).reshape(n, 16)

    pick = scale.abs().argmax(-1, keepdim=True)
    max_scale = scale.gather(-1, pick).squeeze(-1)
    zero = max_scale.abs() < 1e-15
    iscale = torch.where(zero, torch.zeros_like(max_scale), -128 / torch.where(zero, torch.ones_like(max_scale),
                                                                             max_scale))
    d_bytes, d = _half_bytes(torch.where(zero, torch.zeros_like(iscale), 1 / torch.where(zero, torch.ones_like(iscale),
                                                                                        iscale)))
    ls = torch.round(iscale[:, None] * scale).clamp(-128, 127)
    step = (d[:, None] * ls).reshape(n, 16, 1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round(blocks.reshape(n, 16, 16) / safe).clamp(-32, 31)
    q = (torch.where(step == 0, torch.zeros_like(q), q) + 32).to(torch.uint8).reshape(n, QK_K)

    halves = q.reshape(n, 2, 128)
    ql = _pack_nibble_pairs((halves & 0x0F).reshape(n, -1), 64)
    hi = (halves >> 4).reshape(n, 2, 4, 32)  # bits 2k..2k+1 of qh[h*32 + l]: quarter k of half h
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=q.device).view(1, 1, 4, 1)
    qh = (hi << shifts).sum(2, dtype=torch.int32).to(torch.uint8).reshape(n, 64)
    return torch.cat([ql, qh, ls.to(torch.int8).view(torch.uint8), d_bytes], dim=1)


K_QUANTIZERS = {"Q4_K": _q_q4_k, "Q5_K": _q_q5_k, "Q6_K": _q_q6_k}
ROWS_PER_CHUNK = 1 << 15  # blocks quantized at once (bounds the search's temporary memory)


def quantize(weight: torch.Tensor, qtype: QType) -> torch.Tensor:
    """A float tensor ``[..., row]`` -> its raw ``qtype`` bytes ``[prod(...), bytes_per_row]`` (uint8, CPU)."""
    x = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    row = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, row)
    if not fits(qtype, row):
        raise ValueError(f"rows of {row} values do not split into {qtype.name} blocks of {qtype.block_size}")
    if qtype.name == "F32":
        return rows.view(torch.uint8).clone()
    if qtype.name == "F16":
        return rows.to(torch.float16).view(torch.uint8)
    if qtype.name == "BF16":
        return rows.to(torch.bfloat16).view(torch.uint8)
    if qtype.name in K_QUANTIZERS:
        blocks = rows.reshape(-1, qtype.block_size)
        out = torch.cat([K_QUANTIZERS[qtype.name](blocks[i:i + ROWS_PER_CHUNK])
                         for i in range(0, blocks.shape[0], ROWS_PER_CHUNK)])
        return out.reshape(rows.shape[0], qtype.row_bytes(row))
    import gguf  # the reference quantizers of the legacy types

    packed = gguf.quants.quantize(rows.numpy(), gguf.GGMLQuantizationType(qtype.id))
    return torch.from_numpy(packed).reshape(rows.shape[0], qtype.row_bytes(row))
