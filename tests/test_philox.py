"""The PyTorch Philox oracle against an independent plain-Python Philox4x32-10 and Triton itself."""
import math
import os

import pytest
import torch
from tolerances import TOL

from vittle_fast.ops.philox import normal_noise, philox_uint32, uint32_to_uniform

M32 = 0xFFFFFFFF


def philox4x32_10_python(key: int, counter: int) -> list[int]:
    """Textbook Philox4x32-10 (Salmon et al., SC'11) on Python ints, counter (c_lo, c_hi, 0, 0)."""
    k0, k1 = key & M32, (key >> 32) & M32
    x = [counter & M32, (counter >> 32) & M32, 0, 0]
    for _ in range(10):
        p0 = 0xD2511F53 * x[0]
        p1 = 0xCD9E8D57 * x[2]
        x = [((p1 >> 32) ^ x[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ x[3] ^ k1) & M32, p0 & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return x


def test_known_answer_vector():
    """Random123's published known-answer test for philox4x32-10 with a zero key and counter."""
    assert philox4x32_10_python(0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, 2**32 + 7, 2**64 - 1])
def test_oracle_equals_plain_python(seed):
    counters = [0, 1, 2, 12345, 2**32 - 1, 2**32, 2**40 + 17, 2**63 - 1]
    got = philox_uint32(seed, torch.tensor(counters, dtype=torch.int64))
    expected = torch.tensor([philox4x32_10_python(seed, c) for c in counters], dtype=torch.int64)
    assert torch.equal(got, expected)


def test_uniform_mapping_edges():
    """Triton's mapping: int32 bitcast, negatives folded with ~x, times 2**-31 (rounded constant)."""
    x = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = uint32_to_uniform(x)
    assert u[0] == 0.0 and u[4] == 0.0  # 0xffffffff is -1 -> ~(-1) = 0
    assert u[2] == u[3]  # 2**31 - 1 and 2**31 (= -2**31 -> 2**31 - 1) fold together
    assert 0.0 <= u.min() and u.max() < 1.0 + 1e-6


def test_noise_layout_matches_contract():
    """Element k of an [n, d] call is lane k % 4 of counter offset + k // 4, whatever the shape."""
    flat = normal_noise(3, 10, 1, 24).flatten()
    assert torch.equal(normal_noise(3, 10, 4, 6).flatten(), flat)
    assert torch.equal(normal_noise(3, 12, 1, 16).flatten(), flat[8:])


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _philox_kernel(out_ptr, seed, offset, n_counters, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
    """Triton's own stream: ``tl.randn4x`` (NORMAL) or ``tl.randint4x`` lanes, four per counter."""
    idx = tl.arange(0, BLOCK)
    mask = idx < n_counters
    counters = offset + idx.to(tl.int64)
    if NORMAL:
        lanes = tl.randn4x(seed, counters)
    else:
        lanes = tl.randint4x(seed, counters)
    for lane, value in enumerate(lanes):
        if not NORMAL:
            value = value.to(tl.int64) & 0xFFFFFFFF
        tl.store(out_ptr + idx * 4 + lane, value, mask=mask)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789, 5), (2**40 + 3, 2**33 + 1), (2**63 + 9, 7)])
def test_oracle_equals_triton_randint4x_and_randn4x(seed, offset):
    n_counters = 64
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    seed_int64 = seed - 2**64 if seed >= 2**63 else seed
    ints = torch.zeros(n_counters * 4, dtype=torch.int64, device=device)
    _philox_kernel[(1,)](ints, seed_int64, offset, n_counters, NORMAL=False, BLOCK=n_counters)
    counters = offset + torch.arange(n_counters, dtype=torch.int64)
    assert torch.equal(ints.cpu().view(-1, 4), philox_uint32(seed, counters))

    normals = torch.zeros(n_counters * 4, dtype=torch.float32, device=device)
    _philox_kernel[(1,)](normals, seed_int64, offset, n_counters, NORMAL=True, BLOCK=n_counters)
    torch.testing.assert_close(normals.cpu(), normal_noise(seed, offset, 1, n_counters * 4).flatten(),
                               **TOL["noise"])
    assert math.isfinite(normals.abs().max().item())
