"""How dense each layer's sparse mask is, and how many weights dynamic sparse training regrows.

Densities are fractions in ``[0, 1]`` of a layer's weights, keyed by layer name; a layer's shape is
its weight's shape, ``(n_out, n_in)`` or ``(n_out, n_in, k_h, k_w)``.
"""

from __future__ import annotations

import math

from .errors import ConfigError

INITS = ("erk", "uniform")


def _check(shapes: dict[str, tuple[int, ...]], density: float, dense) -> dict[str, int]:
    """Number of weights of each layer, after validating the arguments."""
    if not shapes:
        raise ConfigError("shapes is empty: give the weight shape of at least one layer")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    unknown = sorted(set(dense) - set(shapes))
    if unknown:
        raise ConfigError(f"dense names layers that are not in shapes: {unknown}")
    sizes = {}
    for name, shape in shapes.items():
        if len(shape) == 0 or any(int(d) < 1 for d in shape):
            raise ConfigError(f"layer '{name}' has weight shape {tuple(shape)}; every dimension must be >= 1")
        sizes[name] = math.prod(int(d) for d in shape)
    return sizes


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float, power_scale: float = 1.0,
                  dense: set[str] | frozenset[str] = frozenset()) -> dict[str, float]:
    """Erdős–Rényi-Kernel density of each layer (Evci et al. 2020, RigL, Sec. 3 and Appendix; the
    Erdős–Rényi rule of Mocanu et al. 2018 extended to kernels, as in sparselearning's ERK).

    A layer with weight shape ``(d_1, ..., d_k)`` gets density ``ε · ((Σ d_i) / (Π d_i)) ** power_scale``,
    with one ``ε`` solved so that the layers' nonzeros sum to ``density × (total weights)``. A layer
    whose density would exceed 1 is made dense (1) and ``ε`` is re-solved over the others, until
    none exceeds 1 (``ε`` only grows as layers are capped, so capping every offender at once
    reaches the same fixed point as RigL's one-at-a-time loop). Layers in ``dense`` are always 1
    and their weights count toward the total. ``power_scale=0`` gives every non-dense layer the
    same density with the total matched.

    Raises:
        ConfigError: ``density`` is not in (0, 1], ``power_scale`` is negative, ``dense`` names an
            unknown layer, or the dense layers alone hold ``density × total`` weights or more
            while sparse layers remain (the target is unreachable).
    """
    sizes = _check(shapes, density, dense)
    if not (math.isfinite(power_scale) and power_scale >= 0):
        raise ConfigError(f"power_scale must be a finite number >= 0, got {power_scale!r}")
    target = density * sum(sizes.values())
    raw = {name: (sum(int(d) for d in shapes[name]) / sizes[name]) ** power_scale for name in shapes}
    capped = set(dense)
    while True:
        sparse = [name for name in shapes if name not in capped]
        budget = target - sum(sizes[name] for name in capped)
        if not sparse:
            # Everything is dense: reachable only when the target is (to rounding) every weight.
            if budget < -1e-9 * target:
                raise ConfigError(
                    f"density {density} is unreachable: the dense layers {sorted(dense)} alone hold "
                    f"{sum(sizes[n] for n in dense)} of the {target:.0f} weights allowed")
            break
        if budget <= 0:
            raise ConfigError(
                f"density {density} is unreachable: the dense layers {sorted(dense)} hold "
                f"{sum(sizes[n] for n in dense)} weights, at least the {target:.0f} allowed in all, "
                f"leaving nothing for layers {sparse}")
        eps = budget / sum(raw[name] * sizes[name] for name in sparse)
        over = {name for name in sparse if eps * raw[name] > 1}
        if not over:
            break
        capped |= over
    return {name: 1.0 if name in capped else eps * raw[name] for name in shapes}


def uniform_densities(shapes: dict[str, tuple[int, ...]], density: float,
                      dense: set[str] | frozenset[str] = frozenset()) -> dict[str, float]:
    """``density`` for every layer, except the layers in ``dense`` (1).

    As in RigL's uniform baseline (Evci et al. 2020, Sec. 3), the dense layers come on top, so the
    total exceeds ``density × total`` by their share; ``erk_densities(..., power_scale=0)`` gives
    one density to the other layers with the total matched instead.

    Raises:
        ConfigError: ``density`` is not in (0, 1] or ``dense`` names an unknown layer.
    """
    _check(shapes, density, dense)
    return {name: 1.0 if name in dense else float(density) for name in shapes}


def layer_budget(density_by_layer: dict[str, float], sizes: dict[str, int],
                 available: dict[str, int] | None = None) -> dict[str, int]:
    """Number of weights each layer's mask takes: ``density × size`` rounded half up, clipped to
    ``available[layer]`` (e.g. the weights still free) when given.

    Rounding is per layer, so the total may differ from the sum of the products by up to half a
    weight per layer.

    Raises:
        ConfigError: a layer has no size, a density outside [0, 1], or a negative size or availability.
    """
    out = {}
    for name, d in density_by_layer.items():
        if name not in sizes:
            raise ConfigError(f"layer '{name}' has a density but no size")
        if not 0 <= d <= 1:
            raise ConfigError(f"layer '{name}': density must be in [0, 1], got {d}")
        n = int(sizes[name])
        if n < 0:
            raise ConfigError(f"layer '{name}': size must be >= 0, got {n}")
        k = min(n, math.floor(d * n + 0.5))  # half up, not Python's half-to-even: no parity surprises
        if available is not None:
            a = int(available.get(name, n))
            if a < 0:
                raise ConfigError(f"layer '{name}': available must be >= 0, got {a}")
            k = min(k, a)
        out[name] = k
    return out


def cosine_drop_fraction(step: int, end_step: int, initial: float) -> float:
    """Fraction of a layer's active weights that a dynamic sparse training update drops (and
    regrows): RigL's cosine decay (Evci et al. 2020, Eq. 1),
    ``f(t) = initial / 2 · (1 + cos(π · t / end_step))`` for ``t < end_step`` and 0 from then on
    (``initial`` at step 0, ``initial / 2`` halfway).

    Raises:
        ConfigError: ``step`` is negative, ``end_step`` is not positive, or ``initial`` is not in [0, 1].
    """
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    if end_step <= 0:
        raise ConfigError(f"end_step must be > 0, got {end_step}")
    if not 0 <= initial <= 1:
        raise ConfigError(f"initial drop fraction must be in [0, 1], got {initial}")
    if step >= end_step:
        return 0.0
    return initial / 2 * (1 + math.cos(math.pi * step / end_step))


def auto_init(sparsity: float, threshold: float = 0.9) -> str:
    """``'erk'`` below ``threshold`` sparsity, ``'uniform'`` at or above it.

    DST-CL (Yildirim et al. 2023, "Continual Learning with Dynamic Sparse Training") found ERK
    better at low sparsity (~80%) and uniform more robust at high sparsity (~95%); the 0.9
    threshold between the two is our choice, not the paper's.

    Raises:
        ConfigError: ``sparsity`` is not in [0, 1) or ``threshold`` not in (0, 1].
    """
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
    return "erk" if sparsity < threshold else "uniform"
