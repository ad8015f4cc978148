"""Scale in tasks: weight-level owner ids are int16 (2 bytes per weight, 32,767 tasks) with masks
still bit-packed; a stream of 300 tasks forgets nothing bit for bit; checkpoints written with the
former int8 owners (and the MLP's numbered layers) still load and continue."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsecl.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from sparsecl.errors import CapacityError
from sparsecl.methods import PackNet, PackNetConfig
from sparsecl.methods.weight import WeightIsolation
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.runs import RunSpec, build_stream, restore
from sparsecl.subnetworks import MAX_TASKS
from sparsecl.trainer import TaskSession, TrainConfig, Trainer
from interrupted import run_with_checkpoints
from synthetic import cluster_benchmark


def test_three_hundred_tasks_forget_nothing_bitwise():
    """PackNet splitting a tiny MLP among 300 tasks (each keeps 1/(300 - t) of the free weights),
    AdamW with weight decay: every task's logits, checked every 50 tasks and at the end, are the
    ones it had when it ended, and task ids above 127 own weights."""
    T = 300
    bench = cluster_benchmark(num_tasks=T, classes=2, dim=8, n_train=16, n_test=8)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((8,), (64,), 2))
    method = PackNet(PackNetConfig(shares=T, retrain_epochs=0))
    method.setup(net)
    config = TrainConfig(epochs=1, batch_size=16, optimizer="adamw", lr=1e-2, weight_decay=0.05)
    probes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t, task in enumerate(bench.tasks):  # the trainer's task loop, without its O(T²) evaluation
        net.add_head(task.num_classes)
        method.begin_task(net, t, task)
        session = TaskSession(net, method, t, bench.tasks[: t + 1], config, None)
        method.train_task(session)
        method.end_task(session)
        net.eval()
        with torch.no_grad():
            probes.append((task.test_x, net(task.test_x, t)))
            if t % 50 == 49:
                for i, (x, logits) in enumerate(probes):
                    assert torch.equal(net(x, i), logits), f"task {i} moved by task {t}"
    owner = net.subnetworks.owner(0)
    assert owner.dtype == torch.int16 and owner.element_size() == 2
    assert int(owner.max()) >= 250 and len({int(o) for o in owner.flatten()} - {-1}) >= 250


def test_one_model_holds_a_thousand_tasks_at_two_bytes_per_weight_with_packed_masks():
    net = ContinualNetwork(mlp((10,), (12,), 2))
    sub = net.install_subnetworks("masks")
    for t in range(1001):
        net.add_head(2)
    used = [torch.zeros_like(sub.owner(i), dtype=torch.bool) for i in range(len(sub.params))]
    used[0][3, 4] = True
    sub.commit(1000, used)
    assert int(sub.owner(0)[3, 4]) == 1000 and sub.owner(0).element_size() == 2
    packed = sub.tasks[1000].mask0
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(12 * 10 / 8)  # 1 bit per weight
    assert torch.equal(sub.mask(1000, 0), used[0])
    assert MAX_TASKS == 32767 and WeightIsolation.max_tasks == MAX_TASKS


def test_tasks_beyond_the_owner_range_are_refused(monkeypatch):
    import sparsecl.subnetworks as subnetworks
    monkeypatch.setattr(subnetworks, "MAX_TASKS", 2)  # adding 32,767 heads would take a while
    net = ContinualNetwork(mlp((4,), (3,), 2))
    net.install_subnetworks("owner")
    net.add_head(2)
    net.add_head(2)
    with pytest.raises(CapacityError, match="owner ids as int16: at most 2 tasks"):
        net.add_head(2)


def test_a_checkpoint_with_int8_owners_and_numbered_layers_continues_bitwise(tmp_path):
    """A WSN run stopped after 2 tasks, its checkpoint rewritten as the former format wrote it
    (int8 owner ids, no owner dtype in the structure, the MLP's layers numbered ``body.1``),
    continues to the same accuracy matrix as an uninterrupted run, with int16 owners after."""
    spec = RunSpec([{"benchmark": "split-digits", "seed": 0, "options": {}}],
                   {"name": "mlp", "options": {"hidden": [16], "dropout": 0.0}, "single_head": False}, "wsn",
                   {"density": 0.3}, {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 1e-2, "seed": 0})
    bench = build_stream(spec)
    full = run_with_checkpoints(spec, bench, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_with_checkpoints(spec, bench, tmp_path / "cut", stop_after=2)
    ckpt = load_checkpoint(tmp_path / "cut")
    tensors = {}
    for key, value in ckpt.tensors.items():
        if key.startswith("net.subnetworks.owner"):
            value = value.to(torch.int8)
        tensors[key.replace("net.body.fc1.", "net.body.1.")] = value
    manifest = {k: v for k, v in ckpt.manifest.items() if k not in ("format", "version", "versions")}
    structure = dict(manifest["structure"], layers={"1": None}, subnetworks={"mode": "masks"})
    del structure["task_bodies"]
    manifest["structure"] = structure
    (tmp_path / "legacy").mkdir()
    save_checkpoint(tmp_path / "legacy" / CHECKPOINT_NAME, manifest, tensors)

    net, method, state = restore(load_checkpoint(tmp_path / "legacy"), continue_on="cpu")
    assert net.subnetworks.owner(0).dtype == torch.int8
    assert torch.equal(net.body.fc1.weight, ckpt.tensors["net.body.fc1.weight"])
    result = Trainer(method, spec.train_config()).fit(net, bench, state)
    assert result.accuracy_matrix == full.accuracy_matrix and result.max_logit_change == 0.0
    assert net.subnetworks.owner(0).dtype == torch.int16


def test_a_neuron_level_checkpoint_with_numbered_layers_continues_bitwise(tmp_path):
    """An EideticNets run stopped after 2 tasks, its checkpoint rewritten with the MLP's layers
    numbered as the former format wrote them (``body.1``, ledger ``owner.1``, capacity ``1``),
    continues to the same accuracy matrix and capacity as an uninterrupted run."""
    spec = RunSpec([{"benchmark": "split-digits", "seed": 0, "options": {}}],
                   {"name": "mlp", "options": {"hidden": [16], "dropout": 0.0}, "single_head": False}, "eidetic",
                   {"patience": 1, "prune_step": 0.3}, {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 1e-2,
                                                      "seed": 0})
    bench = build_stream(spec)
    full = run_with_checkpoints(spec, bench, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_with_checkpoints(spec, bench, tmp_path / "cut", stop_after=2)
    ckpt = load_checkpoint(tmp_path / "cut")
    tensors = {k.replace("net.body.fc1.", "net.body.1.").replace("method.owner.fc1", "method.owner.1"): v
               for k, v in ckpt.tensors.items()}
    manifest = {k: v for k, v in ckpt.manifest.items() if k not in ("format", "version", "versions")}
    manifest = json.loads(json.dumps(manifest).replace('"fc1"', '"1"'))
    (tmp_path / "legacy").mkdir()
    save_checkpoint(tmp_path / "legacy" / CHECKPOINT_NAME, manifest, tensors)

    net, method, state = restore(load_checkpoint(tmp_path / "legacy"), continue_on="cpu")
    result = Trainer(method, spec.train_config()).fit(net, bench, state)
    assert result.accuracy_matrix == full.accuracy_matrix and result.max_logit_change == 0.0
    assert result.capacity == full.capacity
