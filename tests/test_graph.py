"""Tracing users' MLPs into unit graphs, and refusing what the graph cannot follow."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecl.errors import UnsupportedModelError
from sparsecl.graph import trace
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork


class CustomMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 7)
        self.fc2 = nn.Linear(7, 5)
        self.out = nn.Linear(5, 3)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = self.drop(F.gelu(self.fc1(x)))
        x = torch.tanh(self.fc2(x))
        return self.out(x)


def test_sequential_mlp_chain():
    _, g, _ = trace(mlp((1, 4, 4), (8, 6), 3, dropout=0.1))
    assert list(g.layers) == ["fc1", "fc2"]  # named layers, not Sequential indices
    assert g.layers["fc1"].source is None and g.layers["fc2"].source == "fc1"
    assert [g.layers[n].num_units for n in g.layers] == [8, 6]
    assert g.head_source == "fc2" and (g.head_in_features, g.head_out_features) == (6, 3)
    assert g.readers("fc1") == ["fc2"] and g.readers("fc2") == []


def test_custom_forward_is_traced_like_sequential():
    _, g, _ = trace(CustomMLP())
    assert {n: l.source for n, l in g.layers.items()} == {"fc1": None, "fc2": "fc1"}
    assert g.head_source == "fc2"


def test_head_is_cut_and_body_matches_the_model():
    torch.manual_seed(0)
    model = CustomMLP().eval()
    net = ContinualNetwork(model).eval()
    net.add_head(3)
    net.heads[0].load_state_dict(model.out.state_dict())
    x = torch.randn(9, 12)
    assert torch.equal(net(x, 0), model(x))
    assert not any(isinstance(m, nn.Linear) and m.out_features == 3 for m in net.body.modules())


def test_linear_model_has_no_unit_layers():
    _, g, _ = trace(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)))
    assert g.layers == {} and g.head_source is None


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.out(h + self.b(h))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.a(F.relu(self.a(x))))


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return F.log_softmax(self.out(F.relu(self.a(x))), dim=1)


class ReshapeBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.a(x).view(-1, 4))


def test_residual_add_couples_the_units_of_both_branches():
    _, g, _ = trace(Residual())
    assert g.groups["a"].layers == ("a", "b") and g.layers["b"].source == "a"
    assert g.head_source == "a"


@pytest.mark.parametrize("model, fragments", [
    (Shared(), ["module 'a'", "more than once"]),
    (Softmaxed(), ["final nn.Linear", "log_softmax"]),
    (ReshapeBetween(), ["node 'view'", "reshapes the units of Linear 'a'"]),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
     ["module '1'", "LayerNorm normalizes each sample over many units", "frozen unit's output would move",
      "weight-level method"]),
    (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1), nn.Linear(4, 2)), ["Softmax", "not supported"]),
])
def test_unsupported_models_are_refused_with_the_node_named(model, fragments):
    with pytest.raises(UnsupportedModelError) as err:
        trace(model)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_untraceable_model_names_the_model():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return self.out(x)

    with pytest.raises(UnsupportedModelError, match="DataDependent"):
        trace(DataDependent())


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.dropout(F.relu(self.a(x)), 0.5, self.training))


class ViewIdiomWithDeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.aux, self.out = nn.Linear(12, 5), nn.Linear(12, 3), nn.Linear(5, 2, bias=False)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        self.aux(x)  # computed, never used: holds no capacity
        return self.out(F.relu(self.a(x)))


def test_functional_dropout_is_refused_with_the_fix_named():
    with pytest.raises(UnsupportedModelError, match="node 'dropout'.*use nn.Dropout instead"):
        trace(FunctionalDropout())


def test_view_idiom_dead_layers_and_head_settings():
    _, g, head = trace(ViewIdiomWithDeadBranch())
    assert list(g.layers) == ["a"] and g.layers["a"].source is None
    assert g.head_bias is False and head.out_features == 2
    net = ContinualNetwork(ViewIdiomWithDeadBranch())
    assert net.add_head(4).bias is None
    assert net(torch.randn(3, 3, 4), 0).shape == (3, 4)


def test_heads_follow_the_model_dtype_even_without_hidden_layers():
    net = ContinualNetwork(nn.Sequential(nn.Linear(6, 2)).double())
    net.add_head(3)
    assert net(torch.randn(2, 6, dtype=torch.float64), 0).dtype == torch.float64
    net.float()
    assert net.add_head(2).weight.dtype == torch.float32
