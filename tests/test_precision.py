"""16-bit pushes: our bfloat16/float16 encode and decode against torch's conversions, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcdnn.kernels.precision import bf16_encode_kernel, decode, encode


def values(n: int = 4099) -> np.ndarray:
    """Mixed magnitudes, exact ties, subnormals, the float16 overflow edge, infinities and NaN."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-40, 38, n)).astype(np.float32)
    ties = (np.arange(64, dtype=np.uint32) << 16 | 0x8000).view(np.float32) + 0  # halfway between two bfloat16s
    special = np.array([0.0, -0.0, 1e-45, 65504.0, 65520.0, 7e4, np.inf, -np.inf, np.nan, 3.4e38], np.float32)
    return np.concatenate([x, ties, special]).astype(np.float32)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_round_trip_equals_torch(dtype, torch_dtype):
    x = values()
    words = encode(x, np.empty(x.size, np.uint16), dtype)
    back = decode(words, np.empty(x.size, np.float32), dtype)
    ref = torch.from_numpy(x).to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(np.isnan(back), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(back[ok].view(np.uint32), ref[ok].view(np.uint32))  # bit for bit, signs of zero too


def test_bf16_kernel_equals_its_python_twin():
    x = values()
    a, b = np.empty(x.size, np.uint16), np.empty(x.size, np.uint16)
    bf16_encode_kernel(x.view(np.uint32), a)
    bf16_encode_kernel.py_func(x.view(np.uint32), b)
    np.testing.assert_array_equal(a, b)


def test_fp32_is_the_identity_and_unknown_dtypes_are_named():
    x = values()
    assert encode(x, np.empty(0, np.uint16), "fp32") is x and decode(x, np.empty(0, np.float32), "fp32") is x
    with pytest.raises(ValueError, match="push dtype 'int8'"):
        encode(x, np.empty(x.size, np.uint16), "int8")
