"""CLNP's θ scan (issue "Fast protocols"): the cached scan, which masks pruned units where they
are read and computes the layers a threshold cannot change once, picks exactly the θ of the plain
scan (prune the weights, measure, roll back), in every scan mode; ``--theta-scan full`` finds
the highest θ within the margin where the first-fail scan stops early."""

import pytest
import torch

from sparsecl.errors import ConfigError
from sparsecl.methods import CLNP, CLNPConfig
from sparsecl.methods import clnp as clnp_module
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TaskSession, TrainConfig, Trainer
from synthetic import cluster_benchmark, image_benchmark
from test_conv import TinyResNet, tiny_convnet


def _fit(theta_eval, model, bench, single_head=False, **options):
    method = CLNP(CLNPConfig(theta_eval=theta_eval, **options))
    torch.manual_seed(0)
    net = ContinualNetwork(model(), single_head=single_head)
    result = Trainer(method, TrainConfig(epochs=3, batch_size=32, seed=1, lr=1e-2)).fit(net, bench)
    return method, net, result


def _decisions(method):
    return [(e["theta"], e["kept"], e["pruned"], e["val_accuracy_pruned"],
             [(g.get("theta"), g.get("kept"), g.get("pruned_val_accuracy")) for g in e["grid"]]) for e in method.log]


@pytest.mark.parametrize("scan", ["first-fail", "full"])
@pytest.mark.parametrize("per_layer,order", [(False, None), (True, None), (True, "first")],
                         ids=["one-theta", "per-layer", "per-layer-first"])
@pytest.mark.parametrize("single_head", [False, True], ids=["multi-head", "single-head"])
def test_cached_scan_picks_the_plain_scans_theta_exactly(scan, per_layer, order, single_head):
    bench = cluster_benchmark(num_tasks=3, n_train=240, n_test=240)
    options = dict(alpha="1e-3;3e-3", margin=0.02, theta_steps=6, theta_per_layer=per_layer, theta_order=order,
                   theta_scan=scan)
    runs = [_fit(kind, lambda: mlp((20,), (40, 32), 3), bench, single_head, **options) for kind in ("plain", "cached")]
    (plain, plain_net, plain_result), (cached, cached_net, cached_result) = runs
    assert _decisions(cached) == _decisions(plain)
    assert any(sum(e["pruned"].values()) > 0 for e in plain.log)  # the scans did prune
    assert cached_result.accuracy_matrix == plain_result.accuracy_matrix
    for (name, a), b in zip(plain_net.state_dict().items(), cached_net.state_dict().values()):
        assert torch.equal(a, b), name
    assert cached_result.max_logit_change == 0.0


@pytest.mark.parametrize("model", [TinyResNet, tiny_convnet], ids=["resnet", "convnet"])
def test_cached_scan_matches_the_plain_scan_on_conv_nets_with_batchnorm_and_shortcuts(model):
    bench = image_benchmark(num_tasks=2)
    options = dict(alpha="1e-3", margin=0.1, theta_steps=6, theta_per_layer=True, reuse_full=True)
    (plain, _, plain_result), (cached, _, cached_result) = [_fit(kind, model, bench, **options)
                                                            for kind in ("plain", "cached")]
    assert _decisions(cached) == _decisions(plain)
    assert any(sum(e["pruned"].values()) > 0 for e in plain.log)
    assert cached_result.accuracy_matrix == plain_result.accuracy_matrix


def _trained_session(single_head=False):
    """Task 1 of a 2-task CLNP run, trained, with task 0's units frozen."""
    bench = cluster_benchmark(num_tasks=2, n_train=240, n_test=240)
    method = CLNP(CLNPConfig(alpha="3e-3", margin=0.02))
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (40, 32), 3), single_head=single_head)
    first = cluster_benchmark(num_tasks=1, n_train=240, n_test=240)
    Trainer(method, TrainConfig(epochs=3, batch_size=32, seed=1, lr=1e-2)).fit(net, first)
    net.add_head(3)
    method.begin_task(net, 1, bench.tasks[1])
    session = TaskSession(net, method, 1, bench.tasks, TrainConfig(batch_size=32, lr=1e-2), None)
    session.fit(2)
    return method, session


@pytest.mark.parametrize("single_head", [False, True], ids=["multi-head", "single-head"])
def test_masked_accuracy_equals_the_pruned_networks_on_random_prunings(single_head, monkeypatch):
    method, session = _trained_session(single_head)
    cand = {n: method.candidates(n) for n in method.pruned}
    plain = method._plain_evaluator(session, cand)
    gen = torch.Generator().manual_seed(0)
    names = list(cand)
    for scanned in ([names[0]], [names[1]], names):
        for cache_bytes in (clnp_module.CACHE_BYTES, 0):  # kept values, or recomputed every call
            monkeypatch.setattr(clnp_module, "CACHE_BYTES", cache_bytes)
            base = {n: (cand[n] & (torch.rand(len(cand[n]), generator=gen) < 0.3)) if n not in scanned
                    else torch.zeros_like(cand[n]) for n in cand}
            masked = clnp_module._MaskedAccuracy(session, base, scanned)
            assert (masked.cache is None) == (cache_bytes == 0)
            try:
                for fraction in (0.0, 0.2, 0.5, 0.8, 1.0):
                    units = {n: base[n] | (cand[n] & (torch.rand(len(cand[n]), generator=gen) < fraction))
                             if n in scanned else base[n] for n in cand}
                    assert masked(units) == plain(units)
            finally:
                masked.close()
    # the hooks are gone: the network computes as before
    assert all(not layer.module._forward_pre_hooks for layer in session.net.graph.layers.values())


def test_full_scan_finds_the_highest_theta_within_the_margin():
    """A validation curve that dips below the margin at one threshold and recovers above it: the
    first-fail scan stops before the dip, the full scan goes past it."""
    method = CLNP(CLNPConfig(theta_steps=10, theta_scan="first-fail"))
    scores = {"a": torch.arange(20, dtype=torch.float32)}
    cand = {"a": torch.ones(20, dtype=torch.bool)}
    base = {"a": torch.zeros(20, dtype=torch.bool)}

    def val_with(units):  # pruned units 0..k: accuracy 1 except a dip when 5..6 units are pruned
        n = int(units["a"].sum())
        return 0.5 if n in (5, 6) or n > 15 else 1.0
    theta, units, acc = method._raise_theta(["a"], scores, cand, base, 1.0, 0.9, val_with)
    assert theta == 3.0 and int(units["a"].sum()) == 4
    method.config.theta_scan = "full"
    theta, units, acc = method._raise_theta(["a"], scores, cand, base, 1.0, 0.9, val_with)
    assert theta == 14.0 and int(units["a"].sum()) == 15 and acc == 1.0


def test_bad_scan_options_are_refused():
    with pytest.raises(ConfigError, match=r"CLNPConfig\(theta_scan=\.\.\.\) must be one of first-fail, full, got 'all'"):
        CLNPConfig(theta_scan="all")
    with pytest.raises(ConfigError, match=r"CLNPConfig\(theta_eval=\.\.\.\) must be one of cached, plain, got 'fast'"):
        CLNPConfig(theta_eval="fast")
