"""A Downpour push in 16 bits: float32 gradients encoded as bfloat16 or float16 words (uint16) and decoded at the server.

    words = np.empty(n, np.uint16); encode(g, words, "bf16")     # the worker, before its Put
    decode(words, g32, "bf16")                                   # the server, before it applies the update

bfloat16 keeps float32's exponent and rounds the mantissa to 8 bits (round to nearest, ties to even: torch's
`.to(torch.bfloat16)`), so it never overflows where float32 does not; NaN stays NaN. float16 (IEEE half) rounds to
11 bits but saturates to inf above 65504: numpy's conversion, exactly torch's. The master copy at the server stays
float32; only the wire carries 16 bits. "fp32" is the identity (the words are the float32 values themselves).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from hpcdnn.kernels.jit import kernel

DTYPES = {"fp32": np.float32, "bf16": np.uint16, "fp16": np.uint16}  # a push's element type on the wire


@kernel(parallel=True)
def bf16_encode_kernel(bits, out):
    """out[i] = the bfloat16 of the float32 whose bits are bits[i], rounded to nearest even; NaN -> a quiet NaN.
    (Views are taken by the caller: `.view` inside a parallel Numba kernel wrote elsewhere in Numba 0.68.)"""
    for i in prange(bits.size):
        b = bits[i]
        if (b & 0x7FFFFFFF) > 0x7F800000:
            out[i] = np.uint16((b >> 16) | 0x40)
        else:
            out[i] = np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)


@kernel(parallel=True)
def bf16_decode_kernel(words, bits):
    """bits[i] = the float32 bits whose upper half is words[i] (exact)."""
    for i in prange(words.size):
        bits[i] = np.uint32(words[i]) << 16


def encode(x: np.ndarray, out: np.ndarray, dtype: str) -> np.ndarray:
    """x (float32) as `dtype` words in `out` (the wire buffer); returns the buffer to send."""
    if dtype == "fp32":
        return x
    if dtype == "bf16":
        bf16_encode_kernel(x.view(np.uint32), out)
    elif dtype == "fp16":
        with np.errstate(over="ignore"):  # above 65504 becomes inf, as intended
            out.view(np.float16)[:] = x  # numpy rounds to nearest even and saturates to inf, like torch's .half()
    else:
        raise ValueError(f"push dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return out


def decode(words: np.ndarray, out: np.ndarray, dtype: str) -> np.ndarray:
    """`dtype` words as float32 in `out`; returns the float32 values (`words` itself for fp32)."""
    if dtype == "fp32":
        return words
    if dtype == "bf16":
        bf16_decode_kernel(words, out.view(np.uint32))
    elif dtype == "fp16":
        out[:] = words.view(np.float16)
    else:
        raise ValueError(f"push dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return out
