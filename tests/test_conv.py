"""Convolutional networks: channels as units, BatchNorm exact per task, residual coupling — and the
zero-forgetting promise on them (DESIGN §2.4, issue: conv nets)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecl.errors import CapacityError, ConfigError, UnsupportedModelError
from sparsecl.export import task_model
from sparsecl.graph import trace
from sparsecl.methods import CLNP, CLNPConfig, EideticConfig, EideticNets
from sparsecl.models import MODELS
from sparsecl.network import ContinualNetwork
from sparsecl.norm import TaskBatchNorm2d
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import ChecksOldLogits, image_benchmark

OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=1e-2),
    "adamw-wd": dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
    "sgd-momentum": dict(optimizer="sgd", lr=5e-2, momentum=0.9, weight_decay=0.01),
}


class TinyResNet(nn.Module):
    """Stem, an identity-shortcut block, a strided block with a 1x1-conv shortcut, global
    average pooling, a Linear with BatchNorm1d and dropout, and the head."""

    def __init__(self, width: int = 8, classes: int = 3):
        super().__init__()
        w = width
        conv = lambda i, o, s=1: nn.Conv2d(i, o, 3, s, 1, bias=False)  # noqa: E731
        self.stem, self.bn = conv(3, w), nn.BatchNorm2d(w)
        self.c1, self.b1, self.c2, self.b2 = conv(w, w), nn.BatchNorm2d(w), conv(w, w), nn.BatchNorm2d(w)
        self.d1, self.bd1 = conv(w, 2 * w, 2), nn.BatchNorm2d(2 * w)
        self.d2, self.bd2 = conv(2 * w, 2 * w), nn.BatchNorm2d(2 * w)
        self.sc, self.bsc = nn.Conv2d(w, 2 * w, 1, 2, bias=False), nn.BatchNorm2d(2 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc, self.bnf, self.drop = nn.Linear(2 * w, 16), nn.BatchNorm1d(16), nn.Dropout(0.1)
        self.out = nn.Linear(16, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.b2(self.c2(F.relu(self.b1(self.c1(h))))))
        h = F.relu(self.bd2(self.d2(F.relu(self.bd1(self.d1(h))))) + self.bsc(self.sc(h)))
        h = self.pool(h).flatten(1)
        return self.out(self.drop(F.relu(self.bnf(self.fc(h)))))


def tiny_convnet(classes: int = 3) -> nn.Sequential:
    """Conv → ReLU → MaxPool → Conv → BN → ReLU → Dropout2d → Flatten (16 features per channel)
    → Linear → head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Dropout2d(0.1),
        nn.Flatten(), nn.Linear(12 * 16, 24), nn.ReLU(), nn.Linear(24, classes))


MODELS_UNDER_TEST = {"resnet": TinyResNet, "convnet": tiny_convnet}


# ---- the unit graph -----------------------------------------------------------------------------

def test_tiny_resnet_couplings():
    _, g, _ = trace(TinyResNet())
    assert {n: (gr.layers, gr.norms) for n, gr in g.groups.items()} == {
        "stem": (("stem", "c2"), ("bn", "b2")),  # identity shortcut: stem and c2 add up
        "c1": (("c1",), ("b1",)),
        "d1": (("d1",), ("bd1",)),
        "d2": (("d2", "sc"), ("bd2", "bsc")),  # the projection shortcut adds to d2
        "fc": (("fc",), ("bnf",)),
    }
    assert {n: (l.source, l.group, l.fan) for n, l in g.layers.items()} == {
        "stem": (None, "stem", 1), "c1": ("stem", "c1", 1), "c2": ("c1", "stem", 1),
        "d1": ("stem", "d1", 1), "d2": ("d1", "d2", 1), "sc": ("stem", "d2", 1), "fc": ("d2", "fc", 1)}
    assert g.head_source == "fc" and g.readers("stem") == ["c1", "d1", "sc"]


def test_flatten_maps_each_channel_to_its_spatial_block():
    _, g, _ = trace(tiny_convnet())
    assert g.layers["8"].source == "3" and g.layers["8"].fan == 16
    cols = g.layers["8"].columns(torch.tensor([False, True] + [False] * 10))
    assert cols.nonzero().flatten().tolist() == list(range(16, 32))
    assert g.groups["3"].norms == ("4",)


def _stream(prefix, blocks, shortcut):
    layers = [f"{prefix}.0.conv2"] + ([f"{prefix}.0.shortcut.0"] if shortcut else []) + \
        [f"{prefix}.{b}.conv2" for b in range(1, blocks)]
    norms = [f"{prefix}.0.bn2"] + ([f"{prefix}.0.shortcut.1"] if shortcut else []) + \
        [f"{prefix}.{b}.bn2" for b in range(1, blocks)]
    return tuple(layers), tuple(norms)


@pytest.mark.parametrize("name, width, head_fan", [("reduced-resnet18", 20, 4), ("resnet18", 64, 1)])
def test_resnet18_couplings(name, width, head_fan):
    _, g, _ = trace(MODELS[name]((3, 32, 32), 10))
    expected = {"conv1": (("conv1", "layer1.0.conv2", "layer1.1.conv2"), ("bn1", "layer1.0.bn2", "layer1.1.bn2"))}
    for stage in range(1, 5):
        for block in range(2):
            name_ = f"layer{stage}.{block}.conv1"
            expected[name_] = ((name_,), (f"layer{stage}.{block}.bn1",))
        if stage > 1:  # a strided stage: its 1x1 shortcut and both blocks' second convs
            expected[f"layer{stage}.0.conv2"] = _stream(f"layer{stage}", 2, True)
    assert {n: (gr.layers, gr.norms) for n, gr in g.groups.items()} == expected
    widths = {n: gr.num_units for n, gr in g.groups.items()}
    assert widths["conv1"] == width and widths["layer4.0.conv2"] == 8 * width
    assert g.head_source == "layer4.0.conv2" and g.head_fan == head_fan
    # the second block of a stage reads the stage's residual stream, not the first block's conv1
    assert g.layers["layer2.1.conv1"].source == "layer2.0.conv2"
    assert g.layers["layer2.0.shortcut.0"].source == "conv1"


@pytest.mark.parametrize("name, chain, fans, head_fan", [
    ("alexnet-like", ["0", "5", "10", "16", "20"], [1, 1, 1, 4, 1], 1),
    ("clnp-cifar-narrow", ["0", "2", "6", "8", "13"], [1, 1, 1, 1, 64], 1),
    ("clnp-cifar-wide", ["0", "3", "6", "9", "12"], [1, 1, 1, 1, 1], 9),
])
def test_plain_cifar_nets_are_chains(name, chain, fans, head_fan):
    _, g, _ = trace(MODELS[name]((3, 32, 32), 10))
    assert list(g.groups) == chain and all(len(gr.layers) == 1 for gr in g.groups.values())
    assert [g.layers[n].source for n in chain] == [None] + chain[:-1]
    assert [g.layers[n].fan for n in chain] == fans
    assert g.head_source == chain[-1] and g.head_fan == head_fan
    has_bn = name != "clnp-cifar-narrow"
    assert all(bool(gr.norms) == has_bn for gr in g.groups.values())


class AddsConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.out = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.adaptive_avg_pool2d(self.c(x) + 1.0, 1).flatten(1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(F.adaptive_avg_pool2d(torch.cat([self.a(x), self.b(x)], 1), 1).flatten(1))


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.out = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(F.adaptive_avg_pool2d(x + self.c(x), 1).flatten(1))


@pytest.mark.parametrize("model, fragments", [
    (AddsConstant(), ["node 'add'", "constant"]),
    (Concat(), ["node 'out'", "the head reads a concatenation", "put a Linear or Conv2d after"]),
    (InputResidual(), ["node 'add'", "model input"]),
    (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)),
     ["module '0'", "model input"]),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(4, 2)),
     ["module '1'", "track_running_stats=True"]),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(6, 2)), ["module '1'", "without flattening"]),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(30, 2)), ["30 flattened features from 4 channels"]),
])
def test_unsupported_conv_models_are_refused_with_the_node_named(model, fragments):
    with pytest.raises(UnsupportedModelError) as err:
        trace(model)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_conv_layers_cannot_be_widened():
    net = ContinualNetwork(tiny_convnet())
    with pytest.raises(ConfigError, match="cannot widen layer '3'"):
        net.widen("3", 4)


# ---- BatchNorm exact per task --------------------------------------------------------------------

def test_frozen_channels_keep_statistics_and_use_them_in_train_mode():
    torch.manual_seed(0)
    bn = TaskBatchNorm2d(6, momentum=0.5)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.frozen[:3] = True
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(16, 6, 5, 5) * 3 + 1
    y = bn.train()(x)
    assert torch.equal(bn.running_mean[:3], mean0[:3]) and torch.equal(bn.running_var[:3], var0[:3])
    assert not torch.equal(bn.running_mean[3:], mean0[3:])  # free channels learn their statistics
    expected_frozen = F.batch_norm(x, mean0, var0, bn.weight, bn.bias, False, 0.0, bn.eps)[:, :3]
    assert torch.equal(y[:, :3], expected_frozen)
    plain = nn.BatchNorm2d(6, momentum=0.5)
    plain.load_state_dict({**bn.state_dict(), "running_mean": mean0, "running_var": var0,
                           "num_batches_tracked": torch.tensor(0)})
    assert torch.equal(y[:, 3:], plain.train()(x)[:, 3:])  # free channels: batch statistics
    assert "frozen" not in bn.state_dict()


def test_network_uses_task_batchnorm_with_the_same_state_dict_keys():
    model = TinyResNet()
    net = ContinualNetwork(model)
    assert isinstance(net.body.get_submodule("b2"), TaskBatchNorm2d)
    body_keys = {k for k in net.body.state_dict()}
    assert body_keys == {k for k in model.state_dict() if not k.startswith("out.")}


# ---- zero forgetting -----------------------------------------------------------------------------

class RecordingEidetic(ChecksOldLogits, EideticNets):
    input_shape = (3, 8, 8)


class RecordingCLNP(ChecksOldLogits, CLNP):
    input_shape = (3, 8, 8)


def _bn_states(net):
    return {name: (m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone())
            for name, m in net.body.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model", sorted(MODELS_UNDER_TEST))
@pytest.mark.parametrize("method_name", ["eidetic", "clnp"])
def test_zero_forgetting_bitwise_with_batchnorm_and_shortcuts(method_name, model, opt):
    bench = image_benchmark(num_tasks=3)
    if method_name == "eidetic":
        method = RecordingEidetic(EideticConfig(score="taylor", patience=2, prune_step=0.25, tolerance=0.05))
    else:
        method = RecordingCLNP(CLNPConfig(alpha="1e-3", margin=0.1, theta_steps=8, theta_per_layer=True,
                                           reuse_full=True))
    config = TrainConfig(epochs=4, batch_size=32, seed=1, **OPTIMIZERS[opt])
    torch.manual_seed(0)
    net = ContinualNetwork(MODELS_UNDER_TEST[model]())
    states = []
    result = Trainer(method, config).fit(net, bench, on_task_end=lambda *a: states.append(_bn_states(net)))
    assert result.max_logit_change == 0.0 and len(method.records) == 3
    assert min(result.accuracy_matrix[-1]) > 0.45  # every task was learned (chance: 1/3)
    # BatchNorm channels of task 0 kept their statistics and affine parameters bit for bit,
    # while the channels left free were retrained by later tasks
    retrained = False
    for name, (mean, var, weight) in states[0].items():
        group = next(g for g in net.graph.groups.values() if name in g.norms)
        owned = method.ledger.owned_by(group.name, 0)
        last_mean, last_var, last_weight = states[-1][name]
        assert torch.equal(mean[owned], last_mean[owned]) and torch.equal(var[owned], last_var[owned])
        assert torch.equal(weight[owned], last_weight[owned])
        retrained |= not torch.equal(mean[~owned], last_mean[~owned])
    assert retrained
    assert any(used[-1] > used[0] for used in result.capacity.values())


def test_single_head_clnp_on_a_resnet_keeps_tasks_apart():
    bench = image_benchmark(num_tasks=3)
    method = RecordingCLNP(CLNPConfig(alpha="1e-3", margin=0.1, theta_steps=8, theta_per_layer=True,
                                           reuse_full=True))
    torch.manual_seed(0)
    net = ContinualNetwork(TinyResNet(), single_head=True)
    result = Trainer(method, TrainConfig(epochs=4, batch_size=32, seed=2, optimizer="adamw",
                                         lr=1e-2, weight_decay=0.1)).fit(net, bench)
    assert result.max_logit_change == 0.0
    masks = torch.stack([h.mask for h in net.heads])
    assert (masks.sum(0) <= 1).all()  # no final hidden unit is read by two tasks


def test_a_full_group_stops_the_run_unless_the_task_may_reuse_it():
    bench = image_benchmark(num_tasks=2)

    class KeepsEverything(CLNP):  # θ = none: task 0 takes every unit
        def select(self, session):
            pass

    for reuse_full in (False, True):
        torch.manual_seed(0)
        net = ContinualNetwork(TinyResNet())
        method = KeepsEverything(CLNPConfig(alpha="0", reuse_full=reuse_full))
        trainer = Trainer(method, TrainConfig(epochs=3, batch_size=32, seed=0, lr=1e-2))
        if not reuse_full:
            with pytest.raises(CapacityError, match="layer 'stem' has no free units left for task 1.*--reuse-full"):
                trainer.fit(net, bench)
            continue
        bodies = []
        result = trainer.fit(net, bench, on_task_end=lambda n, state: bodies.append(
            {k: v.clone() for k, v in n.body.state_dict().items() if not k.endswith("num_batches_tracked")}))
        assert result.max_logit_change == 0.0
        assert all(used == [1.0, 1.0] for used in result.capacity.values())
        # task 1 trained only its head on task 0's frozen units: the body did not move a bit
        assert all(torch.equal(bodies[0][k], bodies[1][k]) for k in bodies[0])
        assert result.accuracy_matrix[1][1] > 0.45  # its head learned on task 0's features (chance 1/3)


def _tiny_resnet_in_task0():
    """A seeded TinyResNet with EideticNets set up and task 0 begun (nothing trained)."""
    torch.manual_seed(0)
    net = ContinualNetwork(TinyResNet())
    method = EideticNets(EideticConfig())
    method.setup(net)
    net.add_head(3)
    method.begin_task(net, 0, None)
    return net, method


@torch.no_grad()
def test_pruned_channels_output_exact_zeros_in_train_and_eval_mode():
    net, method = _tiny_resnet_in_task0()
    method.prune(net, 0, {"stem": torch.tensor([True, False] * 4), "d2": torch.zeros(16, dtype=torch.bool)})
    seen = {}
    net.body.get_submodule("c1").register_forward_pre_hook(lambda m, i: seen.setdefault(m.training, i[0]))
    x = torch.randn(8, 3, 8, 8)
    net.train()(x, 0)
    net.eval()(x, 0)
    for stream in seen.values():  # c1 reads the stem's residual stream (after BN and ReLU)
        assert torch.equal(stream[:, 0::2], torch.zeros_like(stream[:, 0::2]))
        assert stream[:, 1::2].abs().sum() > 0


# ---- export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", sorted(MODELS_UNDER_TEST))
def test_exported_conv_subnetwork_matches_and_is_smaller(model):
    bench = image_benchmark(num_tasks=2)
    torch.manual_seed(0)
    net = ContinualNetwork(MODELS_UNDER_TEST[model]())
    method = EideticNets(EideticConfig(score="l1", patience=2, prune_step=0.3, tolerance=0.1))
    Trainer(method, TrainConfig(epochs=3, batch_size=32, seed=0, lr=1e-2)).fit(net, bench)
    net.eval()
    x = bench.tasks[0].test_x[:32]
    for t in range(2):
        small = task_model(net, t)
        assert torch.allclose(small(x), net(x, t), atol=1e-5, rtol=1e-4)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.body.parameters())


def test_reshapes_that_mix_channels_and_cumulative_batchnorm_are_refused():
    class Folds(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(64, 2)

        def forward(self, x):  # pools pairs of channels after folding them into one map
            h = F.relu(self.c(x)).view(x.size(0), 1, 8, 64)
            return self.fc(F.max_pool2d(h, (2, 8)).flatten(1))

    with pytest.raises(UnsupportedModelError, match="node 'view'.*flattened whole"):
        trace(Folds())
    with pytest.raises(UnsupportedModelError, match="momentum=None"):
        trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(4, 2)))


@torch.no_grad()
def test_activation_scores_read_a_residual_stream_at_every_depth():
    from sparsecl.scoring import activation_scores
    torch.manual_seed(0)
    net = ContinualNetwork(TinyResNet()).eval()
    x = torch.randn(16, 3, 8, 8)
    seen = []
    for name in ("c1", "d1", "sc"):  # the stem group's readers: before and after the block
        net.body.get_submodule(name).register_forward_pre_hook(lambda m, i: seen.append(i[0].abs().mean((0, 2, 3))))
    scores = activation_scores(net, [x])
    assert torch.allclose(scores["stem"], torch.stack(seen).mean(0), rtol=1e-5)


@torch.no_grad()
def test_export_keeps_a_block_whose_units_the_task_pruned_entirely():
    net, method = _tiny_resnet_in_task0()
    method.prune(net, 0, {"c1": torch.ones(8, dtype=torch.bool)})  # the identity block does nothing
    method.freeze(net, 0)
    net.eval()
    x = torch.randn(8, 3, 8, 8)
    small = task_model(net, 0)
    assert torch.allclose(small(x), net(x, 0), atol=1e-6)
    assert small.body.get_submodule("c1").out_channels == 1
