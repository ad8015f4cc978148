"""CLNP's capacity hypotheses as options (issue 21, table 1): (a) ``reinit_input=False`` keeps the
input weights of free units across a task boundary; (b) ``l1='proximal'``, a soft-threshold step
that gives exact zeros; (c) the per-task log's count of units read through non-negligible weights."""

import pytest
import torch

from sparsecl.errors import ConfigError
from sparsecl.ledger import CapacityLedger
from sparsecl.methods import CLNP, CLNPConfig
from sparsecl.methods.clnp import read_units
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import ChecksOldLogits, cluster_benchmark

OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=1e-2),
    "adamw-wd": dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
    "sgd-momentum": dict(optimizer="sgd", lr=5e-2, momentum=0.9, weight_decay=0.01),
}


def _run(method, single_head=False, tasks=2, epochs=4, hidden=(32, 32), **opt):
    bench = cluster_benchmark(num_tasks=tasks, n_train=160, n_test=120)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), hidden, 3), single_head=single_head)
    config = TrainConfig(epochs=epochs, batch_size=32, seed=1, **(opt or OPTIMIZERS["adam"]))
    return net, Trainer(method, config).fit(net, bench)


# ---- (a) input weights of free units across the task boundary ------------------------------------
class Boundary(CLNP):
    """Records the first layer's weights when task 0's units are selected (before pruning: the
    θ scan does not touch the weights) and right after task 1 began."""

    def select(self, session):
        if session.t == 0:
            fc1 = session.net.graph.layers["fc1"].module
            self.trained = (fc1.weight.detach().clone(), fc1.bias.detach().clone())
        super().select(session)

    def begin_task(self, net, t, task):
        super().begin_task(net, t, task)
        if t == 1:
            fc1 = net.graph.layers["fc1"].module
            self.started = (fc1.weight.detach().clone(), fc1.bias.detach().clone())
            self.free_at_start = self.ledger.free("fc1").clone()


@pytest.mark.parametrize("single_head", [False, True], ids=["multi-head", "single-head"])
def test_no_reinit_input_keeps_trained_input_weights_of_free_units(single_head):
    kept = Boundary(CLNPConfig(alpha="3e-3", margin=0.02, reinit_input=False))
    _run(kept, single_head=single_head)
    default = Boundary(CLNPConfig(alpha="3e-3", margin=0.02))
    _run(default, single_head=single_head)
    for method in (kept, default):
        free = method.free_at_start
        assert 0 < int(free.sum()) < len(free)  # task 0 pruned some units and kept others
        # owned rows are frozen with task 0's values either way; the kept-vs-default difference
        # is the free rows (zeroed by pruning at the end of task 0)
        assert torch.equal(method.started[0][~free], default.started[0][~free])
    w, b = kept.trained
    # --no-reinit-input: the free units start task 1 with the input weights task 0 trained
    free = kept.free_at_start
    assert torch.equal(kept.started[0][free], w[free])
    assert torch.equal(kept.started[1][free], b[free])
    assert (w[free] != 0).any()
    # default: re-initialized (neither the trained values nor the pruned zeros)
    free = default.free_at_start
    assert not torch.equal(default.started[0][free], default.trained[0][free])
    assert (default.started[0][free] != 0).all()


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_no_reinit_input_keeps_zero_forgetting(opt):
    class Recording(ChecksOldLogits, CLNP):
        pass
    method = Recording(CLNPConfig(alpha="3e-3", margin=0.02, reinit_input=False))
    net, result = _run(method, tasks=3, **OPTIMIZERS[opt])
    assert result.max_logit_change == 0.0 and len(method.records) == 3
    assert min(result.accuracy_matrix[-1]) > 0.8


def test_no_reinit_input_state_round_trip_and_missing_weights_refused():
    method = CLNP(CLNPConfig(alpha="3e-3", margin=0.02, reinit_input=False))
    net, _ = _run(method, tasks=1)
    tensors, meta = method.state()
    assert torch.equal(tensors["revive.fc1.weight"], method._revive["fc1"][0])
    again = CLNP(CLNPConfig(alpha="3e-3", margin=0.02, reinit_input=False))
    again.setup(net)
    again.load_state(net, tensors, meta)
    assert torch.equal(again._revive["fc1"][0], method._revive["fc1"][0])
    assert torch.equal(again._revive["fc1"][1], method._revive["fc1"][1])
    # a state written with input re-initialization has no trained input weights to keep
    plain = CLNP(CLNPConfig(alpha="3e-3", margin=0.02))
    net2, _ = _run(plain, tasks=1)
    tensors, meta = plain.state()
    assert not any(k.startswith("revive.") for k in tensors)
    late = CLNP(CLNPConfig(alpha="3e-3", margin=0.02, reinit_input=False))
    late.setup(net2)
    late.load_state(net2, tensors, meta)
    bench = cluster_benchmark(num_tasks=2, n_train=160, n_test=120)
    net2.add_head(3)
    with pytest.raises(ConfigError, match="--no-reinit-input.*fc1"):
        late.begin_task(net2, 1, bench.tasks[1])


# ---- (b) proximal L1 ---------------------------------------------------------------------------------
class Zeros(CLNP):
    """Counts exact zeros among the first layer's trained entries when training ends (before
    pruning zeroes whole rows)."""

    def select(self, session):
        if session.t == 0:
            self.zeros = int((session.net.graph.layers["fc1"].module.weight == 0).sum())
        super().select(session)


def test_proximal_l1_gives_exact_zeros_where_the_gradient_does_not():
    counts = {}
    for l1 in ("gradient", "proximal"):
        # a strong L1 on the first layer only: under Adam the gradient form still learns the task
        method = Zeros(CLNPConfig(alpha="0.3,1e-3,1e-3", margin=0.02, l1=l1))
        net, result = _run(method, tasks=1, epochs=10)
        counts[l1] = method.zeros
        assert result.accuracy_matrix[0][0] > 0.8
    total = 32 * 20
    assert counts["gradient"] < total // 100
    assert counts["proximal"] > total // 5


class Step(CLNP):
    """Records the entries around the first optimizer step of task 1: after the optimizer (the
    soft-threshold's input), after ``after_step``, and the rows frozen by task 0."""

    probe = None

    def begin_task(self, net, t, task):
        super().begin_task(net, t, task)
        if t == 1:
            self.frozen_rows = ~self.ledger.free("fc1")
            self.frozen_values = net.graph.layers["fc1"].module.weight.detach().clone()

    def _proximal_step(self):
        if self.probe is None and self.frozen_rows is not None:
            w = self.net.graph.layers["fc1"].module.weight
            before = w.detach().clone()
            super()._proximal_step()
            self.probe = (before, w.detach().clone())
        else:
            super()._proximal_step()

    def setup(self, net):
        super().setup(net)
        self.net, self.frozen_rows = net, None


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_proximal_step_is_the_soft_threshold_on_trained_rows_only(opt):
    method = Step(CLNPConfig(alpha="0.05", margin=0.02, l1="proximal"))
    _run(method, **OPTIMIZERS[opt])
    before, after = method.probe
    frozen = method.frozen_rows
    assert frozen.any() and (~frozen).any()
    tau = OPTIMIZERS[opt]["lr"] * 0.05
    free = ~frozen
    expected = before[free].sign() * (before[free].abs() - tau).clamp(min=0)
    assert torch.allclose(after[free], expected, rtol=1e-6, atol=0)
    assert torch.equal(after[free] == 0, before[free].abs() <= tau)  # exact zeros, exactly there
    # frozen rows: the soft-threshold leaves them as the optimizer left them (the freezer then
    # writes back task 0's values)
    assert torch.equal(after[frozen], before[frozen])
    w = method.net.graph.layers["fc1"].module.weight
    assert torch.equal(w[frozen], method.frozen_values[frozen])


@pytest.mark.parametrize("single_head", [False, True], ids=["multi-head", "single-head"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_proximal_l1_keeps_zero_forgetting(opt, single_head):
    class Recording(ChecksOldLogits, CLNP):
        pass
    method = Recording(CLNPConfig(alpha="3e-2", margin=0.02, l1="proximal", finetune_epochs=1))
    # a wider final hidden layer: a weak proximal L1 leaves many units alive, and a single head
    # never shares them
    net, result = _run(method, single_head=single_head, tasks=3, hidden=(48, 96), **OPTIMIZERS[opt])
    assert result.max_logit_change == 0.0 and len(method.records) == 3
    assert min(result.accuracy_matrix[-1]) > 0.8


def test_proximal_l1_leaves_the_loss_without_the_l1_term():
    net = ContinualNetwork(mlp((20,), (8, 8), 3))
    net.add_head(3)
    x, y, tasks = torch.randn(4, 20), torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.long)
    for l1, extra in (("gradient", True), ("proximal", False)):
        method = CLNP(CLNPConfig(alpha="1.0", l1=l1))
        method.setup(net)
        method.begin_task(net, 0, cluster_benchmark(num_tasks=1).tasks[0])
        method._set_alpha(net, (1.0,))
        loss, _ = method.loss(net, x, y, tasks)
        plain, _ = net.task_loss(x, y, tasks)
        assert (loss > plain + 1) == extra


def test_bad_l1_and_read_threshold_refused():
    with pytest.raises(ConfigError, match="l1.*gradient, proximal.*soft"):
        CLNPConfig(l1="soft")
    with pytest.raises(ConfigError, match="read.threshold"):
        CLNPConfig(read_threshold=1.5)


# ---- (c) units read through non-negligible weights ---------------------------------------------------
def test_read_units_equals_a_hand_count():
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((4,), (3, 3), 2))
    for _ in range(2):
        net.add_head(2)
    ledger = CapacityLedger({"fc1": 3, "fc2": 3})
    # task 0 owns fc1 units 0, 1 and fc2 unit 0; task 1 owns fc1 unit 2 and fc2 unit 1; fc2 unit 2 is free
    ledger.assign("fc1", torch.tensor([True, True, False]), 0)
    ledger.assign("fc2", torch.tensor([True, False, False]), 0)
    ledger.assign("fc1", torch.tensor([False, False, True]), 1)
    ledger.assign("fc2", torch.tensor([False, True, False]), 1)
    with torch.no_grad():
        fc2 = net.graph.layers["fc2"].module.weight
        fc2.copy_(torch.tensor([[2.0, 0.0, 0.0],      # task 0 reads fc1 unit 0 only
                                [0.0, 1e-4, 0.0],     # task 1 reads fc1 unit 1 below 1e-3 · 2
                                [0.0, 0.0, 5.0]]))    # a free row: not counted, nor its max
        net.heads[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
        net.heads[1].weight.copy_(torch.tensor([[0.0, 3e-3, 0.0], [0.0, -1.0, 0.0]]))
    read = read_units(net, ledger, 1e-3)
    assert read["fc1"].tolist() == [True, False, False]  # unit 1's only read is 1e-4 < 2e-3; unit 2 unread
    assert read["fc2"].tolist() == [True, True, False]   # fc2 unit 2 is free: never counted
    assert read_units(net, ledger, 0.0)["fc1"].tolist() == [True, True, False]
    with torch.no_grad():
        net.heads[1].weight[1, 1] = 0.0  # head 1 now reads unit 1 through 3e-3 = its max: 3e-3 > 3e-6
    assert read_units(net, ledger, 1e-3)["fc2"].tolist() == [True, True, False]
    assert read_units(net, ledger, 0.999)["fc2"].tolist() == [True, True, False]


@pytest.mark.parametrize("single_head", [False, True], ids=["multi-head", "single-head"])
def test_log_reports_owned_and_read_units(single_head):
    method = CLNP(CLNPConfig(alpha="3e-3", margin=0.02, read_threshold=0.05))
    net, result = _run(method, single_head=single_head, tasks=2)
    read = read_units(net, method.ledger, 0.05)
    for t, entry in enumerate(method.log):
        assert entry["read_threshold"] == 0.05
        for name, counts in entry["units_read"].items():
            assert counts["read"] <= counts["owned"] and counts["read_new"] <= counts["owned_new"]
            assert counts["owned_new"] == int(method.ledger.owned_by(name, t).sum()) == entry["kept"][name]
    last = method.log[-1]["units_read"]
    for name in net.graph.layers:
        assert last[name]["owned"] == int((~method.ledger.free(name)).sum())
        assert last[name]["read"] == int(read[name].sum())


def test_options_reach_the_cli_and_the_method_config():
    from click.testing import CliRunner

    from sparsecl.commands.run import run
    from sparsecl.runs import build_method

    out = CliRunner().invoke(run, ["--help"]).output
    for flag in ("--reinit-input / --no-reinit-input", "--l1 [gradient|proximal]", "--read-threshold"):
        assert flag in out
    method = build_method("clnp", {"reinit_input": False, "l1": "proximal", "read_threshold": 0.01})
    assert (method.config.reinit_input, method.config.l1, method.config.read_threshold) == (False, "proximal", 0.01)
