"""Bit-packing, entropy coding and the per-layer storage report of sparsecl.storage."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsecl.errors import CheckpointError, ConfigError
from sparsecl.storage import (entropy_decode, entropy_encode, mask_storage_bits, owner_bits, pack_bits,
                              pack_uint, shannon_bits, unpack_bits, unpack_uint)

shapes = st.lists(st.integers(0, 7), min_size=1, max_size=4)


@settings(max_examples=50, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_bits_round_trip(shape, seed):
    mask = torch.from_numpy(np.random.default_rng(seed).random(shape) < 0.3)
    data = pack_bits(mask)
    assert len(data) == math.ceil(mask.numel() / 8)
    out = unpack_bits(data, mask.numel())
    assert out.dtype == torch.bool and out.shape == (mask.numel(),)
    assert torch.equal(out.view(mask.shape), mask)


def test_pack_bits_layout_is_row_major_little_endian():
    mask = torch.tensor([[True, False, False], [False, False, False], [False, True, True]])
    assert pack_bits(mask) == bytes([0b1000_0001, 0b1])  # elements 0, 7 and 8


def test_unpack_bits_wrong_length_raises():
    data = pack_bits(torch.ones(20, dtype=torch.bool))  # 3 bytes
    with pytest.raises(CheckpointError, match="truncated"):
        unpack_bits(data[:2], 20)
    with pytest.raises(CheckpointError, match="trailing"):
        unpack_bits(data + b"\0", 20)
    with pytest.raises(CheckpointError, match="padding"):
        unpack_bits(data, 17)  # same byte count, but bits 17..19 are set
    with pytest.raises(ConfigError):
        pack_bits(torch.ones(3))


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_uint_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = torch.from_numpy(rng.integers(0, 1 << bits, size=(3, 37)))
    values[0, 0] = (1 << bits) - 1  # the largest value that fits
    values[0, 1] = 0
    data = pack_uint(values, bits)
    assert len(data) == math.ceil(values.numel() * bits / 8)
    out = unpack_uint(data, values.numel(), bits)
    assert out.dtype == torch.int64
    assert torch.equal(out, values.flatten())


def test_pack_uint_layout_and_errors():
    assert pack_uint(torch.tensor([1, 2, 3]), 2) == bytes([0b11_10_01])
    assert pack_uint(torch.tensor([0x1234, 0x00FF]), 16) == bytes([0x34, 0x12, 0xFF, 0x00])
    assert unpack_uint(b"", 0, 5).numel() == 0
    with pytest.raises(ConfigError):
        pack_uint(torch.tensor([4]), 2)  # does not fit
    with pytest.raises(ConfigError):
        pack_uint(torch.tensor([-1]), 4)
    with pytest.raises(ConfigError):
        pack_uint(torch.tensor([1]), 0)
    with pytest.raises(CheckpointError):
        unpack_uint(pack_uint(torch.arange(10), 4)[:-1], 10, 4)


def test_owner_bits():
    assert [owner_bits(t) for t in (0, 1, 2, 3, 4, 7, 8, 15, 16)] == [1, 1, 2, 2, 3, 3, 4, 4, 5]
    with pytest.raises(ConfigError):
        owner_bits(-1)


def skewed(n: int, k: int, seed: int) -> np.ndarray:
    p = 0.5 ** np.arange(k)  # geometric: most mass on the first few symbols
    return np.random.default_rng(seed).choice(k, size=n, p=p / p.sum())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 3000), k=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_entropy_round_trip(n, k, seed):
    symbols = skewed(n, k, seed) * 3  # gaps in the alphabet
    out = entropy_decode(entropy_encode(symbols))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, symbols)


def test_entropy_edge_cases():
    empty = entropy_encode(np.zeros(0, dtype=np.int64))
    assert entropy_decode(empty).shape == (0,)
    one = entropy_encode(torch.full((1000,), 7))
    np.testing.assert_array_equal(entropy_decode(one), np.full(1000, 7))
    assert len(one) <= 40  # entropy 0: header and symbol set only, no payload
    assert len(entropy_encode(torch.full((100_000,), 7))) == len(one) + 1  # only the count grows
    assert shannon_bits(torch.full((1000,), 7)) == 0.0
    flags = torch.rand(1000) < 0.1
    np.testing.assert_array_equal(entropy_decode(entropy_encode(flags)), flags.numpy().astype(np.int64))


def test_entropy_large_alphabet():
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 65536, size=200_000)  # nearly every symbol present: bitmap set
    np.testing.assert_array_equal(entropy_decode(entropy_encode(dense)), dense)
    sparse = rng.choice(np.array([0, 1, 40_000, 65_535]), size=5000)  # few symbols: value-list set
    data = entropy_encode(sparse)
    np.testing.assert_array_equal(entropy_decode(data), sparse)
    assert len(data) < 5000 * 2 / 8 + 100  # ~2 bits a symbol, not 16, and no 8 KiB bitmap
    with pytest.raises(ConfigError):
        entropy_encode(np.array([65536]))
    with pytest.raises(ConfigError):
        entropy_encode(np.array([-1, 2]))


def test_entropy_coding_pays():
    symbols = skewed(100_000, 12, seed=1)
    bound = shannon_bits(symbols)
    coded = 8 * len(entropy_encode(symbols))
    assert bound < 0.55 * 100_000 * math.ceil(math.log2(12))  # skewed: ~2 bits a symbol, not 4
    assert bound <= coded <= 1.01 * bound + 8 * 100
    # The bound itself, from counts: -Σ c log2(c / n).
    c = np.bincount(symbols).astype(float)
    c = c[c > 0]
    assert shannon_bits(torch.from_numpy(symbols)) == pytest.approx(-(c * np.log2(c / c.sum())).sum())


def test_entropy_corruption_and_truncation_raise():
    symbols = skewed(20_000, 6, seed=2)
    data = entropy_encode(symbols)
    for pos in (len(data) // 2, len(data) - 1, 10, 13):  # payload, last word, symbol CRC, count
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(CheckpointError, match="fails its CRC32"):  # caught before decoding
            entropy_decode(bytes(bad))
    for cut in (len(data) - 4, len(data) - 1, 31, 20, 0):
        with pytest.raises(CheckpointError, match="truncated"):
            entropy_decode(data[:cut])
    with pytest.raises(CheckpointError, match="expected"):
        entropy_decode(b"XXXX" + data[4:])
    # A forged byte CRC still leaves the symbol CRC: a corrupt payload never decodes silently.
    bad = bytearray(data)
    bad[-9] ^= 0x01
    bad[4:8] = zlib.crc32(bytes(bad[8:])).to_bytes(4, "little")
    with pytest.raises(CheckpointError):
        entropy_decode(bytes(bad))


def test_mask_storage_bits_owner():
    # 16 weights, 3 tasks: 8 free, 4 owned by task 0, 2 by task 1, 2 by task 2.
    owner = torch.tensor([-1] * 8 + [0] * 4 + [1] * 2 + [2] * 2, dtype=torch.int16).view(4, 4)
    r = mask_storage_bits(owner=owner)
    assert r["weights"] == 16 and r["tasks"] == 3
    assert r["raw_bits"] == 16 * 2
    # Symbols owner+1 with counts 8, 4, 2, 2: 8·1 + 4·2 + 2·3 + 2·3 = 28 bits.
    assert r["entropy_bits"] == pytest.approx(28.0)
    assert r["coded_bits"] == 8 * len(entropy_encode(owner.flatten().long() + 1))
    assert r["stored_bits"] == min(r["raw_bits"], r["coded_bits"]) == 32  # the header does not pay here
    assert mask_storage_bits(owner=owner, num_tasks=4)["raw_bits"] == 16 * 3  # owner_bits(4) = 3
    with pytest.raises(ConfigError):
        mask_storage_bits(owner=owner, num_tasks=2)
    with pytest.raises(ConfigError):
        mask_storage_bits()
    with pytest.raises(ConfigError):
        mask_storage_bits(owner=owner, masks=[owner >= 0])


def test_mask_storage_bits_masks():
    # 8 weights, 2 tasks; packed symbols m0 + 2·m1 = [3, 1, 1, 2, 0, 0, 0, 0].
    m0 = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    m1 = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    r = mask_storage_bits(masks=[m0, m1])
    assert (r["weights"], r["tasks"], r["raw_bits"]) == (8, 2, 16)
    # counts 4, 2, 1, 1: 4·1 + 2·2 + 1·3 + 1·3 = 14 bits.
    assert r["entropy_bits"] == pytest.approx(14.0)
    assert r["coded_bits"] == 8 * len(entropy_encode(np.array([3, 1, 1, 2, 0, 0, 0, 0])))
    assert r["stored_bits"] == 16


def test_mask_storage_bits_coding_pays_on_a_real_layer():
    gen = torch.Generator().manual_seed(0)
    n, tasks = 50_000, 20  # more than 16 tasks: each mask coded on its own
    masks = [torch.rand(n, generator=gen) < 0.05 for _ in range(tasks)]
    r = mask_storage_bits(masks=masks)
    assert r["raw_bits"] == n * tasks
    per_task = [8 * len(entropy_encode(m)) for m in masks]
    assert r["coded_bits"] == sum(per_task)
    assert r["entropy_bits"] == pytest.approx(sum(shannon_bits(m) for m in masks))
    assert r["stored_bits"] == r["coded_bits"] < 0.35 * r["raw_bits"]  # H(0.05) ≈ 0.29 bits
    # PackNet-style ownership of the same layer: 90% free, the rest split over 4 tasks.
    owner = torch.full((n,), -1, dtype=torch.int16)
    owner[: n // 10] = torch.arange(n // 10) % 4
    r = mask_storage_bits(owner=owner)
    assert r["raw_bits"] == n * 3 and r["stored_bits"] == r["coded_bits"] < 0.25 * r["raw_bits"]
