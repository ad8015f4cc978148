"""Starting a run from pretrained weights (``sparsecl.pretrained.load_initial_weights``): the
EideticNets workflow — train task A, save, start a new run from it with A as its task 0 — keeps
task A's logits bitwise while new tasks train; bad files name the keys at fault."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sparsecl.checkpoint import CHECKPOINT_NAME
from sparsecl.data.types import Benchmark
from sparsecl.errors import CheckpointError, ConfigError
from sparsecl.methods import DST, DSTConfig, EideticConfig, EideticNets
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.pretrained import load_initial_weights
from sparsecl.runs import CheckpointWriter, RunSpec
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import ChecksOldLogits, cluster_benchmark, image_benchmark
from test_any_module import Grouped, Inception

SPEC = RunSpec([], {"name": "mlp", "options": {"hidden": [32, 32], "dropout": 0.0}, "single_head": False}, "eidetic")
CONFIG = TrainConfig(epochs=4, batch_size=32, lr=1e-2)


class CheckedEidetic(ChecksOldLogits, EideticNets):
    pass


def _eidetic():
    return CheckedEidetic(EideticConfig(score="l2", patience=2, prune_step=0.25, tolerance=0.05))


def _save(tensors: dict[str, torch.Tensor], path) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


@pytest.mark.parametrize("form", ["checkpoint", "model-state-dict", "body-state-dict"])
def test_pretraining_task_stays_bitwise_while_new_tasks_train(tmp_path, form):
    stream = cluster_benchmark(num_tasks=3, seed=5)
    task_a = Benchmark("clusters", stream.tasks[:1], stream.input_shape, stream.info)
    # run 1: learn task A alone and save it
    torch.manual_seed(0)
    first = ContinualNetwork(mlp((20,), (32, 32), 3))
    method = _eidetic()
    writer = CheckpointWriter(tmp_path / CHECKPOINT_NAME, SPEC, method, (20,), 1)
    pretrained = Trainer(method, CONFIG).fit(first, task_a, on_task_end=writer)
    if form == "checkpoint":
        source = tmp_path  # the run folder
    elif form == "body-state-dict":
        source = tmp_path / "body.safetensors"
        _save(first.body.state_dict(), source)
    else:  # the user's model, final Linear included (skipped: every task has its own head)
        model = mlp((20,), (32, 32), 3)
        model.load_state_dict({**first.body.state_dict(), **{f"head.{k}": v for k, v in first.heads[0].state_dict().items()}})
        source = tmp_path / "model.safetensors"
        _save(model.state_dict(), source)

    # run 2: another initialization, replaced by task A's weights before task 0
    torch.manual_seed(1)
    net = ContinualNetwork(mlp((20,), (32, 32), 3))
    report = load_initial_weights(net, source)
    assert report["loaded"] == sorted(first.body.state_dict())
    assert report["skipped"] == (["head.bias", "head.weight"] if form == "model-state-dict" else [])
    assert all(torch.equal(v, first.body.state_dict()[k]) for k, v in net.body.state_dict().items())
    method = _eidetic()
    result = Trainer(method, CONFIG).fit(net, stream)  # task 0 is task A again: the pretraining task
    assert result.max_logit_change == 0.0 and len(method.records) == 3
    R = result.accuracy_matrix
    assert R[2][0] == R[1][0] == R[0][0] >= pretrained.accuracy_matrix[0][0] - 0.05
    assert min(R[2]) > 0.8


def test_a_weight_level_run_starts_from_the_loaded_weights(tmp_path):
    """DST re-initializes free weights only from task 1 on: task 0 trains the loaded ones."""
    bench = cluster_benchmark(num_tasks=2)
    torch.manual_seed(0)
    donor = mlp((20,), (16,), 3)
    _save(donor.state_dict(), tmp_path / "w.safetensors")
    torch.manual_seed(1)
    net = ContinualNetwork(mlp((20,), (16,), 3))
    load_initial_weights(net, tmp_path / "w.safetensors")
    seen = {}

    class Peek(DST):
        def begin_task(self, net_, t, task):
            super().begin_task(net_, t, task)
            if t == 0:  # the active weights of task 0 are the loaded ones
                w = self.weight(net_, 0)
                seen["kept"] = torch.equal(w[self.active[0]], donor.fc1.weight.detach()[self.active[0]])

    Trainer(Peek(DSTConfig(sparsity=0.5, update_interval=100)), TrainConfig(epochs=1, batch_size=32)).fit(net, bench)
    assert seen["kept"]


def test_wrong_files_name_the_missing_unexpected_and_mismatched_keys(tmp_path):
    net = ContinualNetwork(mlp((20,), (16, 8), 3))
    good = net.body.state_dict()
    bad = {k: v for k, v in good.items() if k != "fc2.bias"}
    bad["fc1.weight"] = torch.zeros(16, 21)
    bad["extra.weight"] = torch.zeros(2)
    _save(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_initial_weights(net, tmp_path / "bad.safetensors")
    message = str(err.value)
    for fragment in ("bad.safetensors", "missing keys: fc2.bias", "unexpected keys: extra.weight",
                     "mismatched shapes: fc1.weight (file (16, 21), model (16, 20))"):
        assert fragment in message
    assert torch.equal(net.body.state_dict()["fc2.weight"], good["fc2.weight"])  # nothing was written
    with pytest.raises(CheckpointError, match="do not exist"):
        load_initial_weights(net, tmp_path / "nowhere.safetensors")
    (tmp_path / "text.safetensors").write_text("not tensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_initial_weights(net, tmp_path / "text.safetensors")
    net.add_head(3)
    _save(good, tmp_path / "good.safetensors")
    with pytest.raises(ConfigError, match="before the first task"):
        load_initial_weights(net, tmp_path / "good.safetensors")


def test_a_model_state_dict_fills_the_layers_split_at_a_concatenation(tmp_path):
    torch.manual_seed(0)
    model = Inception().eval()
    with torch.no_grad():  # running statistics that differ per channel
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked.fill_(7)
    _save(model.state_dict(), tmp_path / "inception.safetensors")
    torch.manual_seed(1)
    net = ContinualNetwork(Inception()).eval()
    report = load_initial_weights(net, tmp_path / "inception.safetensors")
    assert {"c__cat1.weight", "bn__cat1.running_var", "bn__cat1.num_batches_tracked"} <= set(report["loaded"])
    net.add_head(3)
    net.heads[0].load_state_dict(model.head.state_dict())
    x = image_benchmark(num_tasks=1).tasks[0].test_x[:10]
    with torch.no_grad():
        assert torch.allclose(net(x, 0), model(x), atol=1e-5)
    # and a checkpoint-style body (already split) loads as it is
    _save(net.body.state_dict(), tmp_path / "body.safetensors")
    other = ContinualNetwork(Inception())
    load_initial_weights(other, tmp_path / "body.safetensors")
    assert all(torch.equal(v, net.body.state_dict()[k]) for k, v in other.body.state_dict().items())


def test_the_state_dict_of_another_model_is_refused(tmp_path):
    _save(nn.Linear(20, 16).state_dict(), tmp_path / "w.safetensors")
    net = ContinualNetwork(mlp((20,), (16,), 3))
    with pytest.raises(CheckpointError, match="missing keys: fc1.weight, fc1.bias; unexpected keys: bias, weight"):
        load_initial_weights(net, tmp_path / "w.safetensors")


def test_a_grouped_kernel_loads_into_its_block_diagonal_form(tmp_path):
    torch.manual_seed(0)
    model = Grouped().eval()
    _save(model.state_dict(), tmp_path / "grouped.safetensors")
    torch.manual_seed(1)
    net = ContinualNetwork(Grouped()).eval()
    load_initial_weights(net, tmp_path / "grouped.safetensors")
    assert net.body.grouped.weight.shape == (8, 8, 3, 3) and model.grouped.weight.shape == (8, 4, 3, 3)
    net.add_head(3)
    net.heads[0].load_state_dict(model.head.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x, 0), model(x), atol=1e-5)
