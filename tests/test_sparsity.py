"""Per-layer density allocation and the drop-fraction schedule of sparsecl.sparsity."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from sparsecl.errors import ConfigError
from sparsecl.sparsity import auto_init, cosine_drop_fraction, erk_densities, layer_budget, uniform_densities

SHAPES = {
    "conv1": (64, 3, 4, 4),
    "conv2": (128, 64, 3, 3),
    "conv3": (256, 128, 2, 2),
    "fc1": (2048, 1024),
    "fc2": (2048, 2048),
}


def size(shape) -> int:
    return math.prod(shape)


def ratio(shape) -> float:
    return sum(shape) / math.prod(shape)


def nonzeros(densities, shapes) -> float:
    return sum(densities[n] * size(s) for n, s in shapes.items())


def test_erk_known_layers():
    d = erk_densities(SHAPES, 0.1)
    total = sum(size(s) for s in SHAPES.values())
    assert nonzeros(d, SHAPES) == pytest.approx(0.1 * total, rel=1e-12)
    capped = {n for n, v in d.items() if v == 1.0}
    assert capped == {"conv1"}  # 3072 weights with ratio 0.027: ε·ratio > 1
    sparse = [n for n in SHAPES if n not in capped]
    eps = {n: d[n] / ratio(SHAPES[n]) for n in sparse}  # one ε for every non-capped layer
    for n in sparse:
        assert eps[n] == pytest.approx(eps[sparse[0]], rel=1e-12)
        assert 0 < d[n] < 1
    assert eps["fc1"] * ratio(SHAPES["conv1"]) > 1  # conv1 really would have exceeded 1
    # ε by hand: the budget left after conv1, over Σ ratio·size = Σ (sum of dims) of the rest.
    expected = (0.1 * total - size(SHAPES["conv1"])) / sum(sum(SHAPES[n]) for n in sparse)
    assert eps["fc2"] == pytest.approx(expected, rel=1e-12)
    # Density follows (sum of dims) / (product): conv3 (390/131072) above conv2 (201/73728).
    assert d["conv3"] > d["conv2"] > d["fc1"] > d["fc2"]


def test_erk_cascading_caps_and_no_caps():
    # At 0.5 the first ε already puts conv1, conv2 and conv3 over 1.
    d = erk_densities(SHAPES, 0.5)
    assert {n for n, v in d.items() if v == 1.0} == {"conv1", "conv2", "conv3"}
    assert nonzeros(d, SHAPES) == pytest.approx(0.5 * sum(size(s) for s in SHAPES.values()), rel=1e-12)
    # A cascade: the first ε caps only "a"; re-solved without it, ε grows and caps "b" too.
    shapes = {"a": (2, 2), "b": (10, 10), "c": (100, 100)}  # ratios 1, 0.2, 0.02
    target = 0.11 * 10104
    eps0 = target / (4 + 20 + 200)  # Σ ratio·size = Σ sum of dims
    assert eps0 * 1 > 1 and eps0 * 0.2 < 1  # "b" fits the first ε ...
    d = erk_densities(shapes, 0.11)
    assert d["a"] == d["b"] == 1.0  # ... but not the re-solved one
    assert d["c"] == pytest.approx((target - 104) / 10000, rel=1e-12)
    # Two equal-ratio layers, no capping: both get exactly the global density.
    same = {"a": (100, 100), "b": (100, 100)}
    assert erk_densities(same, 0.3) == pytest.approx({"a": 0.3, "b": 0.3})
    # ER on fc layers: density ∝ (n_in + n_out) / (n_in · n_out).
    fc = {"a": (10, 1000), "b": (500, 1000)}
    d = erk_densities(fc, 0.02)
    assert d["a"] < 1
    assert d["a"] / d["b"] == pytest.approx(ratio((10, 1000)) / ratio((500, 1000)))


def test_erk_dense_layers_count_toward_total():
    d = erk_densities(SHAPES, 0.1, dense={"conv3"})
    total = sum(size(s) for s in SHAPES.values())
    assert d["conv3"] == d["conv1"] == 1.0
    assert d["fc1"] < erk_densities(SHAPES, 0.1)["fc1"]  # conv3's extra weights come out of the others
    assert nonzeros(d, SHAPES) == pytest.approx(0.1 * total, rel=1e-12)
    # fc1 alone is 2.1M of 6.5M weights: at density 0.1 it exceeds the 0.65M allowed.
    with pytest.raises(ConfigError, match="unreachable"):
        erk_densities(SHAPES, 0.1, dense={"fc1"})
    with pytest.raises(ConfigError, match="unreachable"):
        erk_densities(SHAPES, 0.1, dense=set(SHAPES))
    assert erk_densities(SHAPES, 1.0, dense=set(SHAPES)) == {n: 1.0 for n in SHAPES}


def test_erk_power_scale_and_bad_options():
    d = erk_densities(SHAPES, 0.1, power_scale=0.0, dense={"conv1"})
    sparse = {d[n] for n in SHAPES if n != "conv1"}
    assert len({round(v, 12) for v in sparse}) == 1  # one density for all non-dense layers
    assert nonzeros(d, SHAPES) == pytest.approx(0.1 * sum(size(s) for s in SHAPES.values()))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="density"):
            erk_densities(SHAPES, bad)
    with pytest.raises(ConfigError, match="power_scale"):
        erk_densities(SHAPES, 0.1, power_scale=-1)
    with pytest.raises(ConfigError, match="dense"):
        erk_densities(SHAPES, 0.1, dense={"fc9"})
    with pytest.raises(ConfigError):
        erk_densities({}, 0.1)
    assert erk_densities(SHAPES, 1.0) == pytest.approx({n: 1.0 for n in SHAPES})


@settings(max_examples=40, deadline=None)
@given(dims=st.lists(st.lists(st.integers(1, 64), min_size=2, max_size=4), min_size=1, max_size=6),
       density=st.floats(0.01, 1.0))
def test_erk_properties(dims, density):
    shapes = {f"l{i}": tuple(s) for i, s in enumerate(dims)}
    d = erk_densities(shapes, density)
    total = sum(size(s) for s in shapes.values())
    assert nonzeros(d, shapes) == pytest.approx(density * total, rel=1e-9)
    assert all(0 < v <= 1 for v in d.values())
    sparse = [n for n in shapes if d[n] < 1]
    if sparse:
        eps = d[sparse[0]] / ratio(shapes[sparse[0]])
        for n in shapes:  # capped layers are exactly those at which ε·ratio reaches 1
            assert d[n] == pytest.approx(min(1.0, eps * ratio(shapes[n])), rel=1e-9)


def test_uniform_densities():
    assert uniform_densities(SHAPES, 0.2) == {n: 0.2 for n in SHAPES}
    d = uniform_densities(SHAPES, 0.2, dense={"conv1"})
    assert d["conv1"] == 1.0 and all(d[n] == 0.2 for n in SHAPES if n != "conv1")
    with pytest.raises(ConfigError):
        uniform_densities(SHAPES, 0.0)


def test_layer_budget():
    sizes = {"a": 10, "b": 1000, "c": 7}
    assert layer_budget({"a": 0.25, "b": 0.1, "c": 0.5}, sizes) == {"a": 3, "b": 100, "c": 4}  # 2.5→3, 3.5→4
    assert layer_budget({"a": 0.25, "b": 0.1, "c": 0.5}, sizes, {"a": 1, "b": 5000}) == {"a": 1, "b": 100, "c": 4}
    assert layer_budget({"a": 1.0, "b": 0.0}, sizes) == {"a": 10, "b": 0}
    with pytest.raises(ConfigError):
        layer_budget({"z": 0.1}, sizes)
    with pytest.raises(ConfigError):
        layer_budget({"a": 1.1}, sizes)


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_drop_fraction(25, 100, 0.3) == pytest.approx(0.15 * (1 + math.sqrt(0.5)))
    assert cosine_drop_fraction(99, 100, 0.3) == pytest.approx(0.15 * (1 + math.cos(0.99 * math.pi)))
    assert cosine_drop_fraction(100, 100, 0.3) == 0.0
    assert cosine_drop_fraction(500, 100, 0.3) == 0.0
    values = [cosine_drop_fraction(t, 100, 0.3) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ConfigError):
        cosine_drop_fraction(0, 0, 0.3)
    with pytest.raises(ConfigError):
        cosine_drop_fraction(-1, 100, 0.3)
    with pytest.raises(ConfigError):
        cosine_drop_fraction(0, 100, 1.5)


def test_auto_init():
    assert auto_init(0.8) == "erk"
    assert auto_init(0.9) == "uniform"
    assert auto_init(0.95) == "uniform"
    assert auto_init(0.85, threshold=0.8) == "uniform"
    with pytest.raises(ConfigError):
        auto_init(1.0)
    with pytest.raises(ConfigError):
        auto_init(0.5, threshold=0.0)
