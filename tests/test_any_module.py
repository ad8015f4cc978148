"""Any nn.Module: weight-level methods on a transformer (LayerNorm, MultiheadAttention, GELU,
embeddings, a class token), a MobileNet (depthwise convolutions) and a zoo of layer kinds, bitwise
under Adam, AdamW with weight decay and SGD with momentum; the unit graph's depthwise couplings
and concatenation ranges for the neuron-level methods; LayerNorm and attention refused with the
reason; whole-model export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecl.data.types import Benchmark, TaskData
from sparsecl.errors import UnsupportedModelError
from sparsecl.export import task_model
from sparsecl.graph import trace
from sparsecl.ledger import FREE
from sparsecl.methods import (CLNP, DST, WSN, CLNPConfig, DSTConfig, EideticConfig, EideticNets, PackNet,
                              PackNetConfig, TinySubNets, TinySubNetsConfig, WSNConfig)
from sparsecl.models import InvertedResidual, build
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import ChecksOldLogits, image_benchmark

METHODS = {
    "packnet": lambda: PackNet(PackNetConfig(prune=0.5, retrain_epochs=1)),
    "wsn": lambda: WSN(WSNConfig(density=0.3)),
    "dst": lambda: DST(DSTConfig(sparsity=0.7, update_interval=3, growth="momentum")),
    "tinysubnets": lambda: TinySubNets(TinySubNetsConfig(density=0.3, prune_rounds=2, max_levels=4)),
}
OPTIMIZERS = {"adam": dict(optimizer="adam", lr=1e-2), "adamw-wd": dict(optimizer="adamw", lr=1e-2, weight_decay=0.05),
              "sgd-momentum": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.01)}


class TinyTransformer(nn.Module):
    """Token and position embeddings (``nn.Embedding``), a class token marked per task, one
    pre-norm block (LayerNorm, ``nn.MultiheadAttention``, GELU MLP), LayerNorm, Linear head."""

    sparsecl_per_task = ("cls_token",)

    def __init__(self, vocab: int = 12, length: int = 6, dim: int = 16, heads: int = 2, classes: int = 3):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1], device=x.device))
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm(h)[:, 0])


class TinyMobileNet(nn.Module):
    """A stem and three inverted residual blocks (t = 1; expansion with a strided depthwise
    convolution; a residual one), global pooling, head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.b1 = InvertedResidual(8, 8, 1, 1)
        self.b2 = InvertedResidual(8, 12, 2, 2)
        self.b3 = InvertedResidual(12, 12, 1, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(self.pool(self.b3(self.b2(self.b1(self.stem(x))))).flatten(1))


class Zoo(nn.Module):
    """Conv3d, GroupNorm, a grouped and a depthwise Conv1d, InstanceNorm with running
    statistics, a custom matrix and a custom 1-D parameter."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.grouped = nn.Conv1d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv1d(8, 8, 3, padding=1, groups=8, bias=False)
        self.inorm = nn.InstanceNorm1d(8, affine=True, track_running_stats=True)
        self.mix = nn.Parameter(torch.randn(8, 8) / 3)
        self.shift = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = F.relu(self.gn(self.c3(x))).flatten(2)  # (N, 4, 64)
        h = self.inorm(self.depthwise(F.relu(self.grouped(h))))
        return self.head(torch.tanh(h.mean(2) @ self.mix + self.shift))


def token_benchmark(num_tasks: int = 3, classes: int = 3, vocab: int = 12, length: int = 6, n_train: int = 60,
                    n_test: int = 30, seed: int = 0) -> Benchmark:
    """Each class a prototype token sequence; samples replace 20% of its tokens at random;
    inputs int64 ``(N, length)``."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(num_tasks):
        protos = torch.randint(0, vocab, (classes, length), generator=g)

        def draw(n):
            y = torch.randint(0, classes, (n,), generator=g)
            x = protos[y].clone()
            noise = torch.rand(n, length, generator=g) < 0.2
            x[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
            return x, y

        (xtr, ytr), (xva, yva), (xte, yte) = draw(n_train), draw(n_test // 2), draw(n_test)
        tasks.append(TaskData(t, f"tokens:{t}", tuple(range(classes)), xtr, ytr, xva, yva, xte, yte))
    return Benchmark("tokens", tasks, (length,), {"seed": seed})


def volume_benchmark() -> Benchmark:
    return image_benchmark(num_tasks=3, shape=(2, 4, 4, 4), n_train=60, n_test=30)


CASES = {
    "transformer": (TinyTransformer, token_benchmark, lambda: torch.randint(0, 12, (32, 6))),
    "mobilenet": (TinyMobileNet, lambda: image_benchmark(num_tasks=3, shape=(3, 8, 8), n_train=60, n_test=30),
                  lambda: torch.randn(32, 3, 8, 8)),
}


def _frozen(net) -> list[torch.Tensor]:
    sub = net.subnetworks
    return [torch.where(sub.owner(i) != FREE, sub.weight(net.body, i), torch.nan).clone() for i in range(len(sub.params))]


def _run_checked(model_cls, bench, inputs, method, config):
    """Train, and after every task check: every earlier task's logits on its own inputs, its
    per-task tensors (LayerNorm and BatchNorm parameters, statistics, class token, masks) and
    every frozen weight are bitwise what they were when it ended."""
    torch.manual_seed(0)
    net = ContinualNetwork(model_cls())
    records: list[tuple[torch.Tensor, torch.Tensor, dict, list]] = []

    def after(net_, state):
        t = len(records)
        net_.eval()
        with torch.no_grad():
            for i, (x, logits, tensors, frozen) in enumerate(records):
                assert torch.equal(net_(x, i), logits), f"task {i}'s logits moved during task {t}"
                now = net_.subnetworks.tasks[i].state_dict()
                assert all(torch.equal(v, now[k]) for k, v in tensors.items()), f"task {i}'s own tensors moved"
                for j, (before, after_) in enumerate(zip(frozen, _frozen(net_))):
                    was = ~torch.isnan(before)
                    assert torch.equal(before[was], after_[was]), f"a frozen weight of '{net_.subnetworks.layers[j]}' moved"
            x = inputs()
            records.append((x, net_(x, t), {k: v.clone() for k, v in net_.subnetworks.tasks[t].state_dict().items()},
                            _frozen(net_)))

    result = Trainer(method, TrainConfig(epochs=2, batch_size=16, probe_size=16, **config)).fit(net, bench, on_task_end=after)
    assert result.max_logit_change == 0.0 and len(records) == 3
    return net, result


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_level_methods_forget_nothing_on_any_module(case, method_name, opt):
    model_cls, bench, inputs = CASES[case]
    net, result = _run_checked(model_cls, bench(), inputs, METHODS[method_name](), OPTIMIZERS[opt])
    sub = net.subnetworks
    assert any((sub.owner(i) == 2).any() for i in range(len(sub.params)))  # the last task took weights too
    # the per-task LayerNorm / BatchNorm parameters were trained: tasks 0 and 2 differ
    key = next(k for k in sub.tasks[0].state_dict() if k.startswith(("extra.", "norm_weight.")))
    assert not torch.equal(sub.tasks[0].state_dict()[key], sub.tasks[2].state_dict()[key])


def test_every_parameter_of_a_transformer_is_masked_or_per_task():
    net = ContinualNetwork(TinyTransformer())
    sub = net.install_subnetworks("masks")
    assert net.graph.refusal is not None  # no unit graph: the weight-level methods do not need one
    assert sub.layers == ["tokens", "positions", "attn.in_proj_weight", "attn.out_proj", "mlp.0", "mlp.2"]
    assert sub.biases == {3: "attn.out_proj.bias", 4: "mlp.0.bias", 5: "mlp.2.bias"}
    assert sub.task_params == ["cls_token", "norm1.weight", "norm1.bias", "attn.in_proj_bias", "norm2.weight",
                               "norm2.bias", "norm.weight", "norm.bias"]
    covered = set(sub.params) | set(sub.biases.values()) | set(sub.task_params)
    assert covered == {n for n, _ in net.body.named_parameters()}


def test_a_zoo_of_layer_kinds_forgets_nothing():
    net, _ = _run_checked(Zoo, volume_benchmark(), lambda: torch.randn(16, 2, 4, 4, 4), WSN(WSNConfig(density=0.4)),
                          OPTIMIZERS["adamw-wd"])
    sub = net.subnetworks
    assert sub.layers == ["c3", "grouped", "depthwise", "mix"]
    assert sub.task_params == ["gn.weight", "gn.bias", "inorm.weight", "inorm.bias", "shift"]
    assert sub.task_buffers == ["inorm.running_mean", "inorm.running_var", "inorm.num_batches_tracked"]
    assert not torch.equal(sub.tasks[0].buffer0, sub.tasks[1].buffer0)  # per-task InstanceNorm statistics


def test_the_vit_and_mobilenetv2_of_the_model_registry():
    vit = ContinualNetwork(build("vit", (3, 32, 32), 10, width=32, depth=2, heads=2))
    sub = vit.install_subnetworks("masks")
    assert {"cls_token", "pos_embed"} <= set(sub.task_params)  # marked per task by the model
    assert "blocks.1.attn.in_proj_weight" in sub.layers and "blocks.1.attn.out_proj" in sub.layers
    vit.add_head(10)
    assert vit(torch.randn(2, 3, 32, 32), 0).shape == (2, 10)
    mobile = ContinualNetwork(build("mobilenetv2", (3, 32, 32), 10, width=8))
    assert mobile.graph.refusal is None
    dw = [n for n, l in mobile.graph.layers.items() if l.depthwise]
    assert len(dw) == 17 and all(mobile.graph.layers[n].source is None for n in dw)


@pytest.mark.parametrize("model, fragments", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(144, 2)),
     ["module '1'", "track_running_stats=False", "depend on the batch"]),
])
def test_what_weight_level_methods_cannot_make_exact_is_refused_before_training(model, fragments):
    bench = image_benchmark(num_tasks=2, n_train=30, n_test=10)
    with pytest.raises(UnsupportedModelError) as err:
        Trainer(WSN(), TrainConfig(epochs=1)).fit(model, bench)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_untrained_parameters_are_constants():
    class FixedProjection(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(20, 6), nn.Linear(6, 3)
            self.projection = nn.Parameter(torch.randn(6, 6), requires_grad=False)

        def forward(self, x):
            return self.head(torch.relu(self.fc(x)) @ self.projection)

    from synthetic import cluster_benchmark
    torch.manual_seed(0)
    net = ContinualNetwork(FixedProjection())
    before = net.body.projection.clone()
    result = Trainer(WSN(WSNConfig(density=0.5)), TrainConfig(epochs=1, batch_size=32)).fit(net, cluster_benchmark(2))
    assert net.subnetworks.params == ["fc.weight"] and net.subnetworks.task_params == []
    assert torch.equal(net.body.projection, before) and result.max_logit_change == 0.0


def test_export_of_a_weight_level_transformer_is_the_task_subnetwork():
    bench = token_benchmark()
    torch.manual_seed(0)
    net = ContinualNetwork(TinyTransformer())
    Trainer(WSN(WSNConfig(density=0.3)), TrainConfig(epochs=1, batch_size=16)).fit(net, bench)
    net.eval()
    x = bench.tasks[1].test_x
    model = task_model(net, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x, 1), atol=1e-6)
    in_proj = model.body.get_parameter("attn.in_proj_weight")
    assert torch.equal(in_proj != 0, net.subnetworks.mask(1, 2) & (net.body.attn.in_proj_weight != 0))


# ---- neuron level ---------------------------------------------------------------------------------

class Inception(nn.Module):
    """Two branches concatenated under one BatchNorm, a layer reading the concatenation, and a
    dense connection concatenating a block's output with its input."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.c = nn.Conv2d(9, 8, 3, padding=1)
        self.d = nn.Conv2d(8 + 6, 10, 3, padding=1, stride=2)
        self.fc = nn.Linear(10 * 16, 12)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        s = F.relu(self.stem(x))
        h = F.relu(self.bn(torch.cat([self.a(s), self.b(s)], 1)))
        h = F.relu(self.c(h))
        h = F.relu(self.d(torch.cat([h, s], 1)))
        return self.head(F.relu(self.fc(h.flatten(1))))


class Grouped(nn.Module):
    """A grouped convolution (2 groups), a depthwise one with a channel multiplier of 2 (a grouped
    convolution too) and a depthwise one reading the input."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1, groups=3)  # depthwise on the input
        self.expand = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.twice = nn.Conv2d(8, 16, 3, padding=1, stride=2, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.grouped(F.relu(self.expand(self.stem(x))))))
        return self.head(self.pool(F.relu(self.twice(h))).flatten(1))


def test_grouped_convolutions_are_held_block_diagonal():
    from sparsecl.graph import BlockDiagonalConv2d

    torch.manual_seed(0)
    model = Grouped().eval()
    body, g, _ = trace(model)
    assert {n: (l.source, l.group) for n, l in g.layers.items()} == {
        "stem": (None, "stem"), "expand": ("stem", "expand"), "grouped": ("expand", "grouped"),
        "twice": ("grouped", "twice")}
    grouped, twice = body.get_submodule("grouped"), body.get_submodule("twice")
    assert isinstance(grouped, BlockDiagonalConv2d) and grouped.weight.shape == (8, 8, 3, 3)
    assert isinstance(twice, BlockDiagonalConv2d) and twice.blocks == 8 and type(body.stem) is nn.Conv2d
    off = grouped.block_mask == 0
    assert off.sum() == 8 * 4 * 9 and not grouped.weight[off].any()  # output channel 0 reads inputs 0..3 only
    net = ContinualNetwork(model).eval()
    net.add_head(3)
    net.heads[0].load_state_dict(model.head.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x, 0), model(x), atol=1e-5)


def test_depthwise_convolutions_are_coupled_with_the_layer_they_read():
    _, g, _ = trace(TinyMobileNet())
    assert {n: (gr.layers, gr.norms) for n, gr in g.groups.items()} == {
        # t = 1: b1's depthwise conv reads the stem directly, and its projection adds to the stem
        "stem.0": (("stem.0", "b1.dw.conv", "b1.project.conv"), ("stem.1", "b1.dw.bn", "b1.project.bn")),
        "b2.expand.conv": (("b2.expand.conv", "b2.dw.conv"), ("b2.expand.bn", "b2.dw.bn")),
        "b2.project.conv": (("b2.project.conv", "b3.project.conv"), ("b2.project.bn", "b3.project.bn")),
        "b3.expand.conv": (("b3.expand.conv", "b3.dw.conv"), ("b3.expand.bn", "b3.dw.bn")),
    }
    assert [n for n, l in g.layers.items() if l.depthwise] == ["b1.dw.conv", "b2.dw.conv", "b3.dw.conv"]
    assert all(g.layers[n].source is None for n in ("b1.dw.conv", "b2.dw.conv"))  # reads its own group only
    assert g.layers["b2.project.conv"].source == "b2.expand.conv"


def test_concatenations_are_unit_ranges():
    body, g, _ = trace(Inception())
    assert {n: (gr.layers, gr.norms) for n, gr in g.groups.items()} == {
        "stem": (("stem",), ()), "a": (("a",), ("bn",)), "b": (("b",), ("bn__cat1",)),
        "c": (("c", "c__cat1"), ()), "d": (("d", "d__cat1"), ()), "fc": (("fc",), ())}
    assert {n: (l.source, l.group) for n, l in g.layers.items() if "__cat" in n or n in ("c", "d")} == {
        "c": ("a", "c"), "c__cat1": ("b", "c"), "d": ("c", "d"), "d__cat1": ("stem", "d")}
    assert body.get_submodule("c").in_channels == 4 and body.get_submodule("c__cat1").in_channels == 5
    assert body.get_submodule("c__cat1").bias is None  # the split layer's bias stays with its first range
    # the split body computes what the model computes
    torch.manual_seed(0)
    model = Inception().eval()
    net = ContinualNetwork(model).eval()
    net.add_head(3)
    net.heads[0].load_state_dict(model.head.state_dict())
    x = torch.randn(5, 3, 8, 8)
    sd = model.state_dict()
    with torch.no_grad():
        for name in ("c", "d"):
            w = sd[f"{name}.weight"]
            k = net.body.get_submodule(name).in_channels
            net.body.get_submodule(name).weight.copy_(w[:, :k])
            net.body.get_submodule(f"{name}__cat1").weight.copy_(w[:, k:])
        assert torch.allclose(net(x, 0), model(x), atol=1e-5)


class RecordingEidetic(ChecksOldLogits, EideticNets):
    input_shape = (3, 8, 8)


class RecordingCLNP(ChecksOldLogits, CLNP):
    input_shape = (3, 8, 8)


@pytest.mark.parametrize("method_name", ["eidetic", "clnp"])
@pytest.mark.parametrize("model", [TinyMobileNet, Inception, Grouped], ids=["depthwise", "concatenation", "grouped"])
def test_neuron_level_methods_forget_nothing_on_depthwise_and_concatenating_nets(model, method_name):
    bench = image_benchmark(num_tasks=3)
    if method_name == "eidetic":
        method = RecordingEidetic(EideticConfig(score="taylor", patience=2, prune_step=0.25, tolerance=0.05))
    else:
        method = RecordingCLNP(CLNPConfig(alpha="1e-3", margin=0.1, theta_steps=8, theta_per_layer=True, reuse_full=True))
    torch.manual_seed(0)
    net = ContinualNetwork(model())
    result = Trainer(method, TrainConfig(epochs=3, batch_size=32, seed=1, **OPTIMIZERS["adamw-wd"])).fit(net, bench)
    assert result.max_logit_change == 0.0 and len(method.records) == 3
    for module in net.body.modules():  # a grouped kernel stayed grouped: weight decay never filled a zero
        if hasattr(module, "block_mask"):
            assert not module.weight[module.block_mask == 0].any()
    net.eval()
    for t in range(3):  # the exported, physically smaller subnetwork computes the same logits
        x = bench.tasks[t].test_x[:16]
        with torch.no_grad():
            assert torch.allclose(task_model(net, t)(x), net(x, t), atol=1e-5)


@pytest.mark.parametrize("model, fragments", [
    (TinyTransformer(), ["module 'norm1'", "LayerNorm normalizes each sample over many units",
                         "frozen unit's output would move", "weight-level method"]),
    (nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 2)), ["GroupNorm normalizes"]),
])
def test_layernorm_is_refused_for_neuron_level_methods_with_the_reason(model, fragments):
    net = ContinualNetwork(model)
    with pytest.raises(UnsupportedModelError) as err:
        net.require_unit_graph("eidetic")
    assert "--method eidetic prunes and freezes units" in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("method", ["eidetic", "clnp"])
def test_neuron_level_methods_refuse_a_layernorm_model_before_training(method):
    from sparsecl.config import TrainConfig
    from sparsecl.methods import METHODS
    from sparsecl.trainer import Trainer

    method_cls, config_cls = METHODS[method]
    started = []
    method_obj = method_cls(config_cls())
    method_obj.train_task = lambda session: started.append(session)  # must never be reached
    with pytest.raises(UnsupportedModelError, match=f"--method {method} prunes and freezes units"):
        Trainer(method_obj, TrainConfig(epochs=1)).fit(TinyTransformer(), token_benchmark(num_tasks=1))
    assert started == []


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h)[0].mean(1))


def test_attention_heads_are_refused_for_neuron_level_methods_with_the_reason():
    with pytest.raises(UnsupportedModelError) as err:
        trace(Attention())
    for fragment in ("module 'attn'", "query, key and value rows", "out_proj", "single rows", "weight-level method"):
        assert fragment in str(err.value)


def test_a_tinysubnets_transformer_round_trips_through_the_compact_form(tmp_path):
    """The compact file (codebook indices, entropy-coded masks, per-task tensors: LayerNorm,
    attention biases, the class token) runs every task bitwise as the trained network."""
    from sparsecl.compact import read_compact, write_compact
    from sparsecl.runs import RunSpec

    bench = token_benchmark()
    torch.manual_seed(0)
    net = ContinualNetwork(TinyTransformer())
    method = TinySubNets(TinySubNetsConfig(density=0.3, prune_rounds=2, max_levels=16))
    Trainer(method, TrainConfig(epochs=2, batch_size=16)).fit(net, bench)
    spec = RunSpec([], {"name": "tiny-transformer", "options": {}, "single_head": False}, "tinysubnets")
    compact = write_compact(tmp_path / "t.compact", net, method.codebooks, spec, (6,))
    back, _ = read_compact(tmp_path / "t.compact", model=TinyTransformer())
    assert method.codebooks and compact.bits_per_parameter()["total"] < 32
    net.eval()
    with torch.no_grad():
        for t in range(3):
            x = bench.tasks[t].test_x
            assert torch.equal(back(x, t), net(x, t))
