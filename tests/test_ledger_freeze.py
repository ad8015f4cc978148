"""The capacity ledger and the freezer on their own."""

import pytest
import torch
from torch import nn

from sparsecl.errors import CapacityError
from sparsecl.freeze import Freezer
from sparsecl.ledger import CapacityLedger


def test_ledger_assigns_and_records_usage():
    ledger = CapacityLedger({"a": 4, "b": 2})
    assert ledger.owner["a"].dtype == torch.int16 and ledger.free("a").all()
    ledger.assign("a", torch.tensor([True, False, True, False]), 0)
    ledger.record()
    ledger.assign("a", torch.tensor([False, True, False, False]), 1)
    ledger.assign("b", torch.tensor([True, True]), 1)
    ledger.record()
    assert ledger.owner["a"].tolist() == [0, 1, 0, -1]
    assert ledger.owned_through("a", 0).tolist() == [True, False, True, False]
    assert ledger.capacity() == {"a": [0.5, 0.75], "b": [0.0, 1.0]}


def test_ledger_never_reassigns_owned_units():
    ledger = CapacityLedger({"a": 3})
    ledger.assign("a", torch.tensor([True, False, False]), 0)
    with pytest.raises(CapacityError, match="layer 'a': units \\[0\\] are already owned"):
        ledger.assign("a", torch.tensor([True, True, False]), 1)
    assert ledger.owner["a"].tolist() == [0, -1, -1]


def test_full_layer_error_names_layer_and_usage():
    ledger = CapacityLedger({"fc1": 2})
    ledger.assign("fc1", torch.tensor([True, True]), 0)
    with pytest.raises(CapacityError, match="layer 'fc1' has no free units left for task 1.*100%"):
        ledger.require_free("fc1", 1)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
])
def test_freezer_holds_rows_and_zero_columns_exactly(make_opt):
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    rows = torch.tensor([True, False, True, False])
    cols = torch.tensor([False, False, False, True, True])
    freezer = Freezer()
    with torch.no_grad():
        layer.weight[(~rows)[:, None] & cols[None, :]] = 0.0
    freezer.fix(layer.weight, rows, cols)
    freezer.fix(layer.bias, rows)
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = make_opt(layer.parameters())
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, 5)).pow(2).sum().backward()
        opt.step()
        freezer.restore()
    assert torch.equal(layer.weight[rows], before_w[rows])
    assert torch.equal(layer.bias[rows], before_b[rows])
    assert torch.equal(layer.weight[~rows][:, cols], torch.zeros(2, 2))
    assert not torch.equal(layer.weight[~rows][:, ~cols], before_w[~rows][:, ~cols])  # others trained


def test_freezer_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="does not match dimension 0"):
        Freezer().fix(nn.Linear(3, 2).weight, torch.ones(3, dtype=torch.bool))
