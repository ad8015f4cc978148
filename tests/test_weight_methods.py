"""Weight-level methods (PackNet, WSN, DST-CL) on one weight ledger: zero forgetting bitwise under
every optimizer with BatchNorm, per-task BatchNorm independent of the evaluation batch size, the
methods' mask rules, storage figures, checkpoints and export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from click.testing import CliRunner

from sparsecl.checkpoint import load_checkpoint
from sparsecl.cli import main
from sparsecl.errors import CapacityError, ConfigError
from sparsecl.export import task_model
from sparsecl.ledger import FREE
from sparsecl.methods import DST, WSN, DSTConfig, PackNet, PackNetConfig, WSNConfig
from sparsecl.methods.weight import largest, mask_of
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.runs import RunSpec, build_stream
from sparsecl.sparsity import erk_densities, uniform_densities
from sparsecl.storage import owner_bits
from sparsecl.trainer import TrainConfig, Trainer, predict
from interrupted import run_with_checkpoints
from synthetic import ChecksOldLogits, cluster_benchmark, image_benchmark
from test_conv import TinyResNet, tiny_convnet

METHODS = {
    "packnet": lambda: PackNet(PackNetConfig(prune=0.5, retrain_epochs=1)),
    "wsn": lambda: WSN(WSNConfig(density=0.3)),
    "dst": lambda: DST(DSTConfig(sparsity=0.7, update_interval=3, growth="momentum")),
}
OPTIMIZERS = [dict(optimizer="adam"), dict(optimizer="adamw", weight_decay=0.05),
              dict(optimizer="sgd", momentum=0.9, lr=0.05)]


def _checked(name: str, input_shape):
    base = type(METHODS[name]())
    checked = type(f"Checked{base.__name__}", (ChecksOldLogits, base), {"input_shape": input_shape})
    method = METHODS[name]()
    method.__class__ = checked
    return method


def _frozen_values(net: ContinualNetwork) -> list[torch.Tensor]:
    sub = net.subnetworks
    return [torch.where(sub.owner(i) != FREE, sub.weight(net.body, i), torch.nan).clone() for i in range(len(sub.layers))]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["optimizer"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_zero_forgetting_bitwise_with_batchnorm(name, opt):
    """A conv net with BatchNorm in train mode and a residual ResNet, every optimizer: earlier
    tasks' logits on their own random inputs stay bitwise equal, frozen weights never move."""
    bench = image_benchmark(num_tasks=3, shape=(3, 8, 8), n_train=60, n_test=30)
    cfg = {"epochs": 2, "batch_size": 16, "probe_size": 16, "lr": 1e-2, **opt}
    for model in (tiny_convnet(), TinyResNet(width=4)):
        method = _checked(name, (3, 8, 8))
        torch.manual_seed(0)
        net = ContinualNetwork(model)
        frozen: list[list[torch.Tensor]] = []

        def after(net_, state):
            for i, (before, now) in enumerate(zip(frozen[-1] if frozen else [], _frozen_values(net_))):
                was = ~torch.isnan(before)
                assert torch.equal(before[was], now[was]), f"layer {i}: a frozen weight moved"
            frozen.append(_frozen_values(net_))

        result = Trainer(method, TrainConfig(**cfg)).fit(net, bench, on_task_end=after)
        assert result.max_logit_change == 0.0 and result.bwt == 0.0
        assert len(method.records) == 3
        owned = [float((net.subnetworks.owner(i) != FREE).float().mean()) for i in range(len(net.subnetworks.layers))]
        assert all(0 < o <= 1 for o in owned)


def test_per_task_batchnorm_does_not_depend_on_the_evaluation_batch():
    bench = image_benchmark(num_tasks=2, shape=(3, 8, 8), n_train=60, n_test=40)
    torch.manual_seed(0)
    net = ContinualNetwork(tiny_convnet())
    Trainer(WSN(WSNConfig(density=0.5)), TrainConfig(epochs=2, batch_size=16)).fit(net, bench)
    x = bench.tasks[0].test_x
    for t in range(2):
        one = predict(net, x, t, batch_size=1, device="cpu")
        big = predict(net, x, t, batch_size=40, device="cpu")
        odd = predict(net, x, t, batch_size=7, device="cpu")
        assert torch.allclose(one, big, atol=1e-5) and torch.allclose(odd, big, atol=1e-5)
        assert torch.equal(one.argmax(1), big.argmax(1))
    # every task has its own statistics, and the body's own BatchNorm is never used
    stats = [getattr(net.subnetworks.tasks[t], "mean0") for t in range(2)]
    assert not torch.equal(stats[0], stats[1])
    bn = net.body.get_submodule(net.subnetworks.norms[0])
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_wsn_mask_is_exactly_the_top_fraction_of_scores():
    bench = cluster_benchmark(num_tasks=3, n_train=120)
    method = WSN(WSNConfig(density=0.3))
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16, 12), 3))
    Trainer(method, TrainConfig(epochs=2, batch_size=32)).fit(net, bench)
    sub = net.subnetworks
    for i, scores in enumerate(method.scores):
        mask = sub.mask(2, i)  # the last task's stored mask, from the final scores
        k = round(0.3 * scores.numel())
        assert int(mask.sum()) == k
        magnitude = scores.detach().abs()
        assert magnitude[mask].min() >= magnitude[~mask].max()
        for t in range(3):
            assert int(sub.mask(t, i).sum()) == k  # each task selected exactly c of the layer
        owner = sub.owner(i)
        assert ((owner >= 0) == (sub.mask(0, i) | sub.mask(1, i) | sub.mask(2, i))).all()


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([5, 1000, 140_000, 300_000]), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["normal", "ties", "sorted", "constant", "sample-misleading"]))
def test_largest_selects_exactly_the_k_largest_and_the_first_of_ties(n, fraction, seed, kind):
    # n >= 131072 takes the strided-sample bracket; "sample-misleading" puts every sampled entry far
    # above the rest, so that the bracket misses and the whole-tensor selection answers
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        values = torch.randint(0, 4, (n,), generator=g).float()
    elif kind == "sorted":
        values = torch.arange(n, dtype=torch.float32)
    elif kind == "constant":
        values = torch.ones(n)
    else:
        values = torch.randn(n, generator=g)
        if kind == "sample-misleading":
            values[::max(1, n // 16384)] += 100.0  # the stride of largest's sample
    values = values.view(5, -1)
    k = round(fraction * n)
    mask = largest(values, k)
    assert mask.dtype == torch.bool and mask.shape == values.shape and int(mask.sum()) == k
    if 0 < k < n:
        cut = values[mask].min()
        assert values[~mask].max() <= cut
        chosen = mask.flatten()[(values.flatten() == cut).nonzero().squeeze(1)]
        assert not (chosen[1:] & ~chosen[:-1]).any()  # among ties at the cut, the first ones
    if kind == "normal":  # no ties: exactly torch.topk's set
        assert torch.equal(mask, mask_of(torch.topk(values.flatten(), k).indices, values))


def test_largest_refuses_an_impossible_count_and_nan():
    with pytest.raises(ValueError, match="cannot select 6 of 5"):
        largest(torch.zeros(5), 6)
    with pytest.raises(ValueError, match="cannot select -1 of 5"):
        largest(torch.zeros(5), -1)
    for k in (0, 1, 4):
        with pytest.raises(ValueError, match="some are NaN"):
            largest(torch.tensor([1.0, float("nan"), 2.0, 0.0]), k)
    big = torch.randn(300_000)
    big[5] = float("nan")
    with pytest.raises(ValueError, match="some are NaN"):
        largest(big, 10)


def test_wsn_reuses_frozen_weights_and_trains_only_new_ones():
    bench = cluster_benchmark(num_tasks=2, n_train=120)
    method = WSN(WSNConfig(density=0.6))
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16,), 3))
    result = Trainer(method, TrainConfig(epochs=2, batch_size=32)).fit(net, bench)
    first = result.reuse[net.subnetworks.layers[0]]
    assert first["reused"][1] > 0  # 60% twice cannot avoid overlap
    assert first["owned"][1] == first["used"][1] - first["reused"][1]


def test_packnet_task_uses_the_weights_of_tasks_up_to_it():
    bench = cluster_benchmark(num_tasks=3, n_train=120)
    method = PackNet(PackNetConfig(prune=0.6, retrain_epochs=1))
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16, 12), 3))
    result = Trainer(method, TrainConfig(epochs=2, batch_size=32)).fit(net, bench)
    sub = net.subnetworks
    for i, name in enumerate(sub.layers):
        owner = sub.owner(i)
        for t in range(3):
            assert torch.equal(sub.mask(t, i), (owner >= 0) & (owner <= t))
        # each task keeps round(40%) of the weights that were free when it began
        free = owner.numel()
        for t in range(3):
            kept = int((owner == t).sum())
            assert kept == free - round(0.6 * free)
            free -= kept
        # freed weights restart from zero, as in PackNet
        assert torch.equal(sub.weight(net.body, i)[owner == FREE], torch.zeros(int((owner == FREE).sum())))
    assert result.bits_per_parameter["raw"] == [owner_bits(t + 1) for t in range(3)]


def test_packnet_shares_split_each_layer_equally_and_refuse_an_unplanned_task():
    bench = cluster_benchmark(num_tasks=4, n_train=120)
    method = PackNet(PackNetConfig(shares=3, retrain_epochs=1))
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16, 12), 3))
    trainer = Trainer(method, TrainConfig(epochs=1, batch_size=32))
    with pytest.raises(CapacityError, match="task 3 is beyond the 3 tasks --shares planned"):
        trainer.fit(net, bench)
    for i in range(len(net.subnetworks.layers)):
        owner = net.subnetworks.owner(i)
        free, kept = owner.numel(), []
        for t in range(3):
            kept.append(int((owner == t).sum()))
            assert kept[-1] == free - round((1 - 1 / (3 - t)) * free)
            free -= kept[-1]
        assert free == 0 and max(kept) - min(kept) <= 1  # equal shares; the last task takes the rest
    with pytest.raises(ConfigError, match=r"PackNetConfig\(prune=\.\.\.\) 0.5 and PackNetConfig\(shares=\.\.\.\) 3 exclude each other"):
        PackNetConfig(prune=0.5, shares=3)


def test_dst_density_stays_exact_and_regrowth_never_takes_frozen_weights():
    bench = cluster_benchmark(num_tasks=3, n_train=240)
    checks = []

    class Watched(DST):
        def update(self, net):
            before = [a.clone() for a in self.active]
            frozen = [(net.subnetworks.owner(i) != FREE).clone() for i in range(len(self.active))]
            values = [self.weight(net, i).detach().clone() for i in range(len(self.active))]
            super().update(net)
            for i, (b, a, f, v) in enumerate(zip(before, self.active, frozen, values)):
                assert int(a.sum()) == int(b.sum())  # as many regrown as dropped
                assert torch.equal(a & f, b & f)  # frozen weights are neither dropped nor grown
                assert torch.equal(self.weight(net, i)[f], v[f])
                checks.append(int((a ^ b).sum()))

    for growth in ("random", "unfired", "gradient", "momentum"):
        method = Watched(DSTConfig(sparsity=0.75, update_interval=2, growth=growth, init="erk"))
        torch.manual_seed(0)
        net = ContinualNetwork(mlp((20,), (32, 24), 3))
        result = Trainer(method, TrainConfig(epochs=2, batch_size=32)).fit(net, bench)
        assert result.max_logit_change == 0.0
        sub = net.subnetworks
        shapes = {n: tuple(sub.weight(net.body, i).shape) for i, n in enumerate(sub.layers)}
        assert method.densities == erk_densities(shapes, 0.25)
        for t in range(3):
            for i, name in enumerate(sub.layers):
                assert int(sub.mask(t, i).sum()) == math.floor(method.densities[name] * math.prod(shapes[name]) + 0.5)
    assert sum(checks) > 0  # the topology really moved


def test_dst_init_modes_and_options():
    assert DSTConfig(sparsity=0.8, init="auto").resolved_init == "erk"
    assert DSTConfig(sparsity=0.95, init="auto").resolved_init == "uniform"
    bench = cluster_benchmark(num_tasks=1)
    method = DST(DSTConfig(sparsity=0.9, init="uniform", reuse_frozen=False))
    net = ContinualNetwork(mlp((20,), (16,), 3))
    Trainer(method, TrainConfig(epochs=1)).fit(net, bench)
    shapes = {n: tuple(net.subnetworks.weight(net.body, i).shape) for i, n in enumerate(net.subnetworks.layers)}
    assert method.densities == uniform_densities(shapes, 1 - 0.9)
    with pytest.raises(ConfigError, match=r"DSTConfig\(growth=\.\.\.\) must be one of"):
        DSTConfig(growth="magic")
    with pytest.raises(ConfigError, match=r"DSTConfig\(sparsity=\.\.\.\) must be in"):
        DSTConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="--growth momentum needs"):
        Trainer(DST(DSTConfig(growth="momentum")), TrainConfig(epochs=1, optimizer="sgd")).fit(
            mlp((20,), (16,), 3), bench)


def test_weight_methods_refuse_what_they_cannot_isolate():
    bench = cluster_benchmark(num_tasks=1)
    with pytest.raises(ConfigError, match="drop --single-head"):
        Trainer(WSN(), TrainConfig(epochs=1)).fit(ContinualNetwork(mlp((20,), (8,), 3), single_head=True), bench)

    with pytest.raises(ConfigError, match="--routing classifier reads the features of one shared body pass"):
        Trainer(WSN(), TrainConfig(epochs=1, routing="classifier")).fit(mlp((20,), (8,), 3), bench)
    net = ContinualNetwork(mlp((20,), (8,), 3))
    net.install_subnetworks("owner")
    net.add_head(3)
    net.subnetworks.commit(0, [torch.ones_like(net.subnetworks.owner(i), dtype=torch.bool) for i in range(1)])
    with pytest.raises(CapacityError, match="must use every weight of the earlier tasks"):
        net.add_head(3)
        net.subnetworks.commit(1, [torch.zeros_like(net.subnetworks.owner(0), dtype=torch.bool)])


def test_masks_are_bit_packed_and_storage_is_reported():
    bench = cluster_benchmark(num_tasks=3, n_train=120)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16, 12), 3))
    result = Trainer(WSN(WSNConfig(density=0.1)), TrainConfig(epochs=1, batch_size=32)).fit(net, bench)
    packed = net.subnetworks.tasks[0].mask0
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(16 * 20 / 8)
    assert net.subnetworks.owner(0).dtype == torch.int16  # 2 bytes per weight: up to 32,767 tasks
    bits = result.bits_per_parameter
    assert bits["raw"] == [1.0, 2.0, 3.0]  # one bit per weight per task
    assert all(s <= r for s, r in zip(bits["stored"], bits["raw"]))
    assert all(e <= c for e, c in zip(bits["entropy"], bits["coded"]))


@pytest.mark.parametrize("name,options", [("wsn", {"density": 0.4}),
                                          ("dst", {"sparsity": 0.7, "update_interval": 5, "growth": "gradient"}),
                                          ("tinysubnets", {"density": 0.4, "prune_rounds": 3, "max_levels": 16})])
def test_resume_is_bitwise_for_weight_methods(tmp_path, name, options):
    """A run stopped after 2 of 5 tasks and resumed with ``sparsecl run --resume`` ends with the
    same metrics and checkpoint tensors (ledger, masks, per-task BatchNorm, scores) as an
    uninterrupted run."""
    spec = RunSpec([{"benchmark": "split-digits", "seed": 0, "options": {}}],
                   {"name": "mlp", "options": {"hidden": [16, 16]}, "single_head": False}, name, options,
                   {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01,
                    "momentum": 0.0, "seed": 0})
    bench = build_stream(spec)

    full = run_with_checkpoints(spec, bench, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_with_checkpoints(spec, bench, tmp_path / "cut", stop_after=2)
    result = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "cut"), "--no-progress"])
    assert result.exit_code == 0, result.output
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == full.accuracy_matrix
    assert resumed["bits_per_parameter"] == full.bits_per_parameter
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert any(".mask0" in k for k in a.tensors)
    assert any(k.startswith("method.own.") for k in a.tensors) == (name != "dst")  # WSN's scores
    assert any(k.startswith("method.codebook.") for k in a.tensors) == (name == "tinysubnets")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_keeps_the_task_logits(name):
    bench = image_benchmark(num_tasks=2, shape=(3, 8, 8), n_train=60, n_test=30)
    torch.manual_seed(0)
    net = ContinualNetwork(TinyResNet(width=4))
    Trainer(METHODS[name](), TrainConfig(epochs=1, batch_size=16)).fit(net, bench)
    net.eval()
    x = bench.tasks[0].test_x
    for t in range(2):
        small = task_model(net, t)
        with torch.no_grad():
            assert torch.allclose(small(x), net(x, t), atol=1e-5)


def test_cached_masks_follow_loaded_state_and_devices():
    """Task masks are cached for speed; loading another state (a rollback) must never serve a
    stale mask."""
    bench = cluster_benchmark(num_tasks=2, n_train=120)
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = ContinualNetwork(mlp((20,), (16,), 3))
        Trainer(WSN(WSNConfig(density=0.3)), TrainConfig(epochs=1, batch_size=32, seed=seed)).fit(net, bench)
        nets.append(net.eval())
    x = bench.tasks[0].test_x
    with torch.no_grad():
        nets[0](x, 0)  # fills the cache
        nets[0].load_state_dict(nets[1].state_dict())
        assert torch.equal(nets[0](x, 0), nets[1](x, 0))


@pytest.mark.parametrize("name", ["packnet", "dst"])
def test_channels_last_weights_are_frozen_exactly(name):
    bench = image_benchmark(num_tasks=2, shape=(3, 8, 8), n_train=60, n_test=30)
    torch.manual_seed(0)
    model = tiny_convnet().to(memory_format=torch.channels_last)
    method = _checked(name, (3, 8, 8))
    result = Trainer(method, TrainConfig(epochs=1, batch_size=16, optimizer="adamw", weight_decay=0.05)).fit(
        model, bench)
    assert result.max_logit_change == 0.0 and len(method.records) == 2


def _first_of_ties_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """The reference selection: a stable descending sort, so that ties at the cut go to the
    lowest indices (torch.topk's set when nothing ties)."""
    return mask_of(torch.sort(values.flatten(), descending=True, stable=True).indices[:k], values)


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([7, 3000, 140_000]), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["normal", "ties", "constant"]),
       bracket=st.one_of(st.none(), st.tuples(st.floats(-3, 3), st.floats(0, 2))))
def test_bracketed_selection_is_exactly_the_top_k_whatever_the_bracket(n, fraction, seed, kind, bracket):
    """``largest`` with any bracket (holding the cut, above it, below it, empty) and
    ``TopSelection`` over a drifting tensor (WSN's scores between steps) pick exactly the
    stable-sort top k, ties at the cut to the lowest indices."""
    from sparsecl.methods.weight import TopSelection

    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        values = torch.randint(0, 4, (n,), generator=g).float()
    elif kind == "constant":
        values = torch.full((n,), 0.5)
    else:
        values = torch.randn(n, generator=g)
    k = round(fraction * n)
    window = None if bracket is None else (bracket[0], bracket[0] + bracket[1])
    assert torch.equal(largest(values, k, window), _first_of_ties_top(values, k))
    selection = TopSelection()
    for step in range(6):  # small drifts, then a jump that leaves the previous bracket behind
        drift = 1e-3 * torch.randn(n, generator=g) if step < 5 else 2.0 + torch.randn(n, generator=g)
        values = values + drift if kind == "normal" else values
        assert torch.equal(selection(values.view(1, -1), k), _first_of_ties_top(values, k).view(1, -1))


def test_bracketed_selection_refuses_nan_whatever_the_bracket():
    from sparsecl.methods.weight import TopSelection

    values = torch.randn(200_000)
    values[123] = float("nan")
    for bracket in (None, (-0.1, 0.1), (10.0, 11.0), (-11.0, -10.0)):
        with pytest.raises(ValueError, match="some are NaN"):
            largest(values, 1000, bracket)
    selection = TopSelection()
    selection(values.nan_to_num(), 1000)
    with pytest.raises(ValueError, match="some are NaN"):
        selection(values, 1000)


def test_straight_through_and_dense_gradients_match_their_autograd_expressions():
    """WSN's and DST's hand-written training products give the values and the gradients of the
    expressions they stand for, bitwise."""
    from sparsecl.methods.dst import _DenseGradient
    from sparsecl.methods.wsn import _StraightThrough

    g = torch.Generator().manual_seed(0)
    w0, s0, up = (torch.randn(40, 30, generator=g) for _ in range(3))
    mask = largest(s0.abs(), 500)
    w, s = w0.clone().requires_grad_(), s0.clone().requires_grad_()
    magnitude = s.abs()
    (w * (mask.float() + (magnitude - magnitude.detach()))).backward(up)
    w2, s2 = w0.clone().requires_grad_(), s0.clone().requires_grad_()
    out = _StraightThrough.apply(w2, s2, mask.float())
    out.backward(up)
    assert torch.equal(out, torch.where(mask, w0, 0.0))
    assert torch.equal(w2.grad, w.grad) and torch.equal(s2.grad, s.grad)

    w, w2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    (w - torch.where(mask, 0.0, w).detach()).backward(up)
    out = _DenseGradient.apply(w2, mask.float())
    out.backward(up)
    assert torch.equal(out, torch.where(mask, w0, 0.0)) and torch.equal(w2.grad, w.grad)


@pytest.mark.parametrize("name", sorted(METHODS) + ["tinysubnets"])
def test_the_training_forward_computes_the_stored_subnetwork(name):
    """Each task's logits through the method's training forward (the masks recomputed or cached
    by the method at every step) equal, bitwise, its logits through the stored masks it is
    frozen with: what a task learned is what it keeps."""
    from sparsecl.methods import TinySubNets, TinySubNetsConfig

    make = METHODS.get(name) or (lambda: TinySubNets(TinySubNetsConfig(density=0.4, prune_rounds=2, max_levels=4)))
    base = type(make())

    class Compared(base):
        def end_task(self, session):
            net = session.net.eval()
            x = torch.randn(32, 20)
            with torch.no_grad():
                live = net(x, session.t)
            super().end_task(session)
            with torch.no_grad():
                stored = net(x, session.t)
            self.__dict__.setdefault("compared", []).append(torch.equal(live, stored))

    method = make()
    method.__class__ = Compared
    torch.manual_seed(0)
    bench = cluster_benchmark(num_tasks=3, n_train=120)
    Trainer(method, TrainConfig(epochs=2, batch_size=32)).fit(ContinualNetwork(mlp((20,), (16, 12), 3)), bench)
    assert method.compared == [True, True, True]
