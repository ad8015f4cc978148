"""Widening a full layer adds free units without moving any earlier output by a single bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsecl.errors import CapacityError
from sparsecl.methods import CLNP, CLNPConfig, EideticConfig, EideticNets
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer
from sparsecl.widen import WidenedLinear
from synthetic import cluster_benchmark


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), m=st.integers(1, 300), batch=st.sampled_from([1, 1, 2, 3, 7, 40]),
       growth=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=3),
       seed=st.integers(0, 10**6))
def test_growing_keeps_old_outputs_bitwise(n, m, batch, growth, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(m, n)
    x = torch.randn(batch, m, generator=g)
    before = layer(x)
    # Odd widths and single samples included: a strided or misaligned product would differ in the
    # last bits. Units added by an earlier growth must keep their outputs too.
    for rows, cols in growth:
        layer = WidenedLinear.grow(layer, rows=rows, cols=cols)
        x = torch.cat([x, torch.randn(batch, cols, generator=g)], 1)
        old = before.shape[1]
        with torch.no_grad():  # the new units are free: any values
            layer.weight[old:] = torch.randn(layer.out_features - old, layer.in_features, generator=g)
        after = layer(x)
        assert torch.equal(after[:, :old], before)
        before = after
    assert layer.weight.shape == (n + sum(r for r, _ in growth), m + sum(c for _, c in growth))


def _keep_everything(widen):
    """EideticNets that prunes nothing: every task takes every free unit, so each later task finds
    every layer full."""
    return EideticNets(EideticConfig(max_pruned_ratio=0.0, patience=2, widen=widen))


def test_full_layer_is_an_error_naming_the_layer_and_its_usage():
    with pytest.raises(CapacityError, match=r"layer 'fc1' has no free units left for task 1: all 16 "
                                            r"units are owned .* \(usage 100%\).*--widen"):
        Trainer(_keep_everything(0), TrainConfig(epochs=2, batch_size=32)).fit(
            mlp((20,), (16, 16), 3), cluster_benchmark(2))


@pytest.mark.parametrize("single_head", [False, True], ids=["multi-head", "single-head"])
@pytest.mark.parametrize("opt", [dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
                                 dict(optimizer="sgd", lr=5e-2, momentum=0.9)], ids=["adamw-wd", "sgd-momentum"])
def test_widened_layers_learn_new_tasks_without_forgetting(single_head, opt):
    method = _keep_everything(widen=8)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16, 16), 3), single_head=single_head)
    result = Trainer(method, TrainConfig(epochs=4, batch_size=32, seed=0, **opt)).fit(net, cluster_benchmark(4))
    assert result.max_logit_change == 0.0  # the trainer compared every earlier task bitwise
    for name, layer in net.graph.layers.items():
        assert layer.num_units == 16 + 3 * 8
        assert isinstance(layer.module, WidenedLinear) and layer.module.row_ends == [16, 24, 32, 40]
        assert result.reuse[name]["units"] == [16, 24, 32, 40]
        assert result.reuse[name]["owned"] == [16, 8, 8, 8]
        assert (method.ledger.owner[name] == torch.arange(4).repeat_interleave(
            torch.tensor([16, 8, 8, 8]))).all()
    assert net.graph.head_in_features == 40
    assert min(result.accuracy_matrix[-1]) > 0.8  # tasks on widened units were really learned


def test_clnp_widens_a_single_head_network():
    method = CLNP(CLNPConfig(alpha="1e-4", margin=0.0, widen=4))
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (6, 6), 3), single_head=True)
    result = Trainer(method, TrainConfig(epochs=4, batch_size=32, lr=1e-2)).fit(net, cluster_benchmark(4))
    assert result.max_logit_change == 0.0
    widths = result.reuse[net.graph.head_source]["units"]
    assert widths[-1] > 6 and widths == sorted(widths)  # the final hidden layer grew


def test_units_added_by_an_earlier_growth_keep_single_sample_outputs():
    # Layer 'fc2' grows first (its new rows start at an odd offset of the weight's storage), then
    # its source grows; task 1 reads the grown rows and must not move, even one sample at a time.
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (15, 7), 3)).eval()
    net.add_head(3)
    net.widen("fc2", 4)
    net.add_head(3)
    x = torch.randn(200, 20)
    with torch.no_grad():
        before = [net(x[j:j + 1], 1) for j in range(200)]
        net.widen("fc1", 4)
        assert all(torch.equal(net(x[j:j + 1], 1), b) for j, b in enumerate(before))
