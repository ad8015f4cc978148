"""Task-agnostic inference (``sparsecl.routing``): routing never changes the task-incremental
results, the batched pass equals a per-sample reference, entropy routing picks the lowest-entropy
head, the exemplar buffer is deterministic and bounded, and on real Split MNIST the task classifier
keeps routed accuracy within 10% of the oracle's."""

import dataclasses
import re
import json

import pytest
import torch
from click.testing import CliRunner

from sparsecl.cli import main
from sparsecl.data import load_benchmark
from sparsecl.data.types import Benchmark
from sparsecl.errors import ConfigError
from sparsecl.methods import CLNP, CLNPConfig, EideticConfig, EideticNets, Finetune
from sparsecl.models import build as build_model
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.routing import (ExemplarBuffer, TaskRouter, evaluate_routing, fit_router, free_units_of,
                              head_entropies, route, routed_predict)
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import cluster_benchmark, image_benchmark

FAST = dict(epochs=4, batch_size=32)


def _eidetic():
    return EideticNets(EideticConfig(score="taylor", patience=2, prune_step=0.2, tolerance=0.02))


def _run(method, routing, bench, single_head=False, **extra):
    """A seeded run that keeps the network and the run state after every task."""
    torch.manual_seed(7)
    net = ContinualNetwork(mlp((20,), (24, 24), 3, 0.1), single_head=single_head)
    seen = []
    result = Trainer(method, TrainConfig(seed=7, routing=routing, **FAST, **extra)).fit(
        net, bench, on_task_end=lambda n, s: seen.append(s))
    return result, net, seen[-1]


@pytest.mark.parametrize("make, single_head", [(_eidetic, False), (lambda: CLNP(CLNPConfig(alpha="3e-3", margin=0.02)), True),
                                               (Finetune, False)], ids=["eidetic", "clnp-single-head", "finetune"])
def test_routing_never_changes_the_task_incremental_results(make, single_head):
    bench = cluster_benchmark(num_tasks=3)
    oracle, net, state = _run(make(), "oracle", bench, single_head)
    assert "routing" not in oracle.to_dict()
    for mode in ("classifier", "entropy"):
        routed, routed_net, routed_state = _run(make(), mode, bench, single_head)
        assert routed.accuracy_matrix == oracle.accuracy_matrix
        assert routed.capacity == oracle.capacity and routed.max_logit_change == oracle.max_logit_change
        for (x, logits), (x2, logits2) in zip(state.probes, routed_state.probes):
            assert torch.equal(x, x2) and torch.equal(logits, logits2)
        a, b = net.state_dict(), routed_net.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the network is untouched
        r = routed.to_dict()["routing"]
        assert set(r) >= {"mode", "buffer_per_task", "accuracy_matrix", "acc", "routing_accuracy", "per_class",
                          "mean_class_drop"}
        assert r["mode"] == mode and r["buffer_per_task"] == (200 if mode == "classifier" else None)
        assert [[v is None for v in row] for row in r["accuracy_matrix"]] == \
               [[v is None for v in row] for row in oracle.accuracy_matrix]
        assert r["acc"] == pytest.approx(sum(r["accuracy_matrix"][-1]) / 3)
        # per class, oracle accuracies average back to the oracle row of the accuracy matrix
        for i in range(3):
            rows = [c for c in r["per_class"] if c["task"] == i]
            assert [c["class"] for c in rows] == list(bench.tasks[i].classes)
            mean = sum(c["oracle"] * c["samples"] for c in rows) / sum(c["samples"] for c in rows)
            assert mean == pytest.approx(oracle.accuracy_matrix[-1][i], abs=1e-6)
            assert all(c["routed"] <= c["oracle"] + 1e-12 for c in rows)  # routed right implies oracle right
        assert r["mean_class_drop"] == pytest.approx(
            sum(c["oracle"] - c["routed"] for c in r["per_class"]) / len(r["per_class"]))


def test_routing_leaves_a_resnet_with_batchnorm_bitwise_unchanged():
    """The router's own units in a ResNet: BatchNorm channels and residual unit groups."""
    bench = image_benchmark(num_tasks=2, shape=(3, 16, 16))
    runs = {}
    for mode in ("oracle", "classifier"):
        torch.manual_seed(0)
        net = ContinualNetwork(build_model("reduced-resnet18", (3, 16, 16), 3, width=4))
        states = []
        method = EideticNets(EideticConfig(score="l1", patience=1, prune_step=0.25, tolerance=0.05))
        result = Trainer(method, TrainConfig(epochs=2, batch_size=32, seed=1, routing=mode, router_epochs=5)).fit(
            net, bench, on_task_end=lambda n, s: states.append(s))
        runs[mode] = result, states[-1], net.state_dict()
    (a, sa, na), (b, sb, nb) = runs["oracle"], runs["classifier"]
    assert a.accuracy_matrix == b.accuracy_matrix and b.max_logit_change == 0.0
    assert all(torch.equal(p[1], q[1]) for p, q in zip(sa.probes, sb.probes))
    assert all(torch.equal(na[k], nb[k]) for k in na)  # running statistics included
    assert any("bn" in k for k in sb.routing.router.units)  # free BatchNorm channels trained too
    assert min(b.routing["routing_accuracy"][-1]) > 0.5


def _mixed_benchmark():
    """Three tasks with 2, 3 and 4 classes: heads of different widths."""
    tasks = [cluster_benchmark(num_tasks=1, classes=c, seed=s).tasks[0] for c, s in ((2, 1), (3, 2), (4, 3))]
    tasks = [dataclasses.replace(t, task_id=i, name=f"clusters{i}") for i, t in enumerate(tasks)]
    return Benchmark("mixed", tasks, (20,))


@pytest.fixture(scope="module")
def trained():
    bench = _mixed_benchmark()
    method = _eidetic()
    torch.manual_seed(3)
    net = ContinualNetwork(mlp((20,), (24, 24), 2))
    Trainer(method, TrainConfig(seed=3, **FAST)).fit(net, bench)
    return bench, method, net.eval()


@pytest.mark.parametrize("units", [True, False], ids=["own-units", "frozen-features"])
def test_batched_routing_equals_a_per_sample_reference(trained, units):
    bench, method, net = trained
    router = fit_router(net, bench.tasks, ExemplarBuffer(50, seed=0), epochs=5, batch_size=32,
                        free_units=free_units_of(method) if units else None)
    assert bool(router.units) == units
    routing_net = router.install(net)
    x = torch.cat([t.test_x[:40] for t in bench.tasks])
    for mode in ("classifier", "entropy"):
        tasks, classes = routed_predict(routing_net, x, mode, router)
        assert tasks.shape == classes.shape == (len(x),) and tasks.dtype == classes.dtype == torch.int64
        with torch.no_grad():
            for n in range(len(x)):  # the reference: one sample at a time, every head separately
                xn = x[n:n + 1]
                logits = [routing_net(xn, t)[0] for t in range(net.num_tasks)]
                if mode == "classifier":
                    task = int(router(routing_net.features(xn)).argmax(1))
                else:
                    ent = [float(-(torch.softmax(z, 0) * torch.log_softmax(z, 0)).sum()) for z in logits]
                    task = min(range(len(ent)), key=lambda i: ent[i])
                assert int(tasks[n]) == task, (mode, n)
                assert int(classes[n]) == int(logits[task].argmax()), (mode, n)
                assert 0 <= int(classes[n]) < net.head_classes[task]


def test_a_router_with_units_needs_the_network_it_installs(trained):
    bench, method, net = trained
    router = fit_router(net, bench.tasks, ExemplarBuffer(20), epochs=1, free_units=free_units_of(method))
    x = bench.tasks[0].test_x[:5]
    with pytest.raises(ConfigError, match=r"route with the network it installs, router.install\(net\)"):
        routed_predict(net, x, "classifier", router)
    routing_net = router.install(net)
    with torch.no_grad():  # the router's units never reach a task's logits
        for t in range(net.num_tasks):
            assert torch.equal(routing_net(x, t), net(x, t))
    assert routing_net is not net and not any(torch.equal(routing_net.state_dict()[k], net.state_dict()[k])
                                              for k in router.units)
    with pytest.raises(ConfigError, match="trained on 3 tasks but the network has heads for 2"):
        route(torch.zeros(1, net.head_features), [torch.zeros(1, 2)] * 2, "classifier", router)


def test_entropy_routing_picks_the_lowest_entropy_head():
    # three samples, three heads (2, 3 and 2 classes)
    logits = [torch.tensor([[8.0, 0.0], [0.1, 0.0], [0.1, 0.0]]),
              torch.tensor([[0.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 0.0]]),
              torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])]
    ent = head_entropies(logits)
    p = torch.softmax(torch.tensor([8.0, 0.0]), 0)
    assert ent[0, 0] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert ent[2].tolist() == pytest.approx([0.6931, 1.0986, 0.6931], abs=2e-3)  # ~log 2, log 3, log 2
    # sample 0: head 0 is sure; sample 1: head 1 is sure; sample 2: head 0's small margin puts it
    # just below head 2 (exactly uniform over 2 classes), both below head 1 (uniform over 3)
    assert route(torch.zeros(3, 1), logits, "entropy").tolist() == [0, 1, 0]
    tie = [torch.zeros(2, 2), torch.zeros(2, 2)]
    assert route(torch.zeros(2, 1), tie, "entropy").tolist() == [0, 0]  # a tie goes to the lowest task id

    # through a hand-built network: identity body, heads reading the 2 features
    net = ContinualNetwork(mlp((2,), (2,), 2))
    for classes in (2, 3):
        net.add_head(classes)
    with torch.no_grad():
        body = [m for m in net.body.modules() if isinstance(m, torch.nn.Linear)][0]
        body.weight.copy_(torch.eye(2))
        body.bias.zero_()
        net.heads[0].weight.copy_(torch.tensor([[5.0, 0.0], [-5.0, 0.0]]))
        net.heads[0].bias.zero_()
        net.heads[1].weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 5.0], [0.0, -5.0]]))
        net.heads[1].bias.zero_()
    x = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    tasks, classes = routed_predict(net, x, "entropy")
    assert tasks.tolist() == [0, 1, 0] and classes.tolist() == [0, 1, 0]


def test_exemplar_buffer_is_deterministic_bounded_and_draws_nothing_global():
    bench = cluster_benchmark(num_tasks=2, n_train=240)
    before = torch.get_rng_state()
    a, b = ExemplarBuffer(50, seed=1), ExemplarBuffer(50, seed=1)
    for task in bench.tasks:
        ia, ib = a.select(task), b.select(task)
        assert torch.equal(ia, ib) and len(ia) == 50 and len(set(ia.tolist())) == 50
        assert bool((ia[1:] > ia[:-1]).all()) and 0 <= int(ia.min()) and int(ia.max()) < 240
    assert not torch.equal(a.indices[0], a.indices[1])  # each task draws its own
    assert not torch.equal(a.indices[0], ExemplarBuffer(50, seed=2).select(bench.tasks[0]))
    assert torch.equal(ExemplarBuffer(1000).select(bench.tasks[0]), torch.arange(240))  # small tasks: all kept
    assert torch.equal(torch.get_rng_state(), before)
    for bad in (0, -3):
        with pytest.raises(ConfigError, match=f"--router-buffer must be .* at least 1; got {bad}"):
            ExemplarBuffer(bad)


def test_routing_needs_one_input_pipeline_and_says_so_before_training():
    bench = image_benchmark(num_tasks=2)
    tasks = [dataclasses.replace(bench.tasks[0], normalize=((0.5,) * 3, (0.25,) * 3)), bench.tasks[1]]
    method = _eidetic()
    with pytest.raises(ConfigError, match=r"routing needs one input pipeline .* task 0 \('images:0'\) normalizes "
                                          r"with mean \(0.5, 0.5, 0.5\).* task 1 \('images:1'\) with none"):
        Trainer(method, TrainConfig(routing="entropy", **FAST)).fit(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
            dataclasses.replace(bench, tasks=tasks))
    assert method.log == []  # refused before the first task was trained


@pytest.mark.parametrize("field, value, match", [
    ("routing", "foo", "--routing must be one of oracle, classifier, classifier-all, entropy, lda, got 'foo'"),
    ("router_buffer", 0, "--router-buffer must be at least 1, got 0"),
    ("router_epochs", 0, "--router-epochs must be at least 1, got 0"),
    ("router_lr", 0.0, "--router-lr must be above 0, got 0.0"),
    ("router_hidden", -1, "--router-hidden must be non-negative, got -1"),
])
def test_bad_routing_options_name_the_option(field, value, match):
    """The argument in Python, the flag on the command line."""
    with pytest.raises(ConfigError, match=re.escape(f"TrainConfig({field}=...): {field} ")) as info:
        TrainConfig(**{field: value})
    assert info.value.cli_message == match


def test_real_split_mnist_classifier_routing_keeps_90_percent_of_oracle_accuracy(data_root):
    """EideticNets on Split MNIST (the subset of test_e2e.py). The task classifier keeps 500
    training samples per task and trains units of its own in the free capacity; entropy routing
    keeps no data and is only reported (on this benchmark it does far worse)."""
    bench = load_benchmark("split-mnist", data_root=data_root, max_train_per_task=2000, max_test_per_task=1000,
                           seed=0)
    method = EideticNets(EideticConfig(score="taylor", patience=3, prune_step=0.1, tolerance=0.005))
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((1, 28, 28), (100, 100), 2))
    config = TrainConfig(epochs=5, batch_size=64, lr=1e-3, seed=0, routing="classifier", router_buffer=500)
    result = Trainer(method, config).fit(net, bench)
    r = result.routing
    entropy = evaluate_routing(net, bench.tasks, "entropy")
    entropy_acc = sum(entropy.routed) / len(entropy.routed)
    frozen = fit_router(net, bench.tasks, ExemplarBuffer(500), batch_size=64)  # a head on the frozen features only
    frozen_acc = sum(evaluate_routing(net, bench.tasks, "classifier", frozen).routed) / len(bench.tasks)
    print(f"\nSplit MNIST, EideticNets: oracle ACC {result.acc:.4f}; classifier routed ACC {r['acc']:.4f} "
          f"(routing accuracy {[round(a, 3) for a in r['routing_accuracy'][-1]]}, mean per-class drop "
          f"{100 * r['mean_class_drop']:.2f} points); head on frozen features only {frozen_acc:.4f}; "
          f"entropy routed ACC {entropy_acc:.4f} (routing accuracy {[round(a, 3) for a in entropy.routing]})")
    assert result.max_logit_change == 0.0 and result.acc >= 0.97
    assert r["acc"] >= 0.9 * result.acc
    assert all(0.0 <= a <= 1.0 for a in entropy.routed + entropy.routing)
    assert entropy_acc <= result.acc


def test_run_with_routing_through_the_cli_writes_metrics_report_and_eval(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--epochs", "3", "--hidden", "32,32", "--batch-size", "32", "--patience", "2", "--no-progress",
            "--routing", "classifier", "--router-buffer", "100", "--router-epochs", "10", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "routed ACC" in result.output and "routing accuracy" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    r = metrics["routing"]
    assert set(r) == {"mode", "buffer_per_task", "kept", "accuracy_matrix", "acc", "bwt", "forgetting",
                      "routing_accuracy", "per_class", "mean_class_drop", "seconds_per_task"}
    assert r["mode"] == "classifier" and r["buffer_per_task"] == 100 and len(r["per_class"]) == 10
    assert {"task", "class", "samples", "oracle", "routed", "routing"} == set(r["per_class"][0])
    assert metrics["config"]["routing"] == "classifier" and metrics["config"]["router_epochs"] == 10
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--routing", "classifier", "--json", str(tmp_path / "e.json")])
    assert evaluated.exit_code == 0, evaluated.output
    rows = json.loads((tmp_path / "e.json").read_text())["tasks"]
    assert [row["routed_accuracy"] for row in rows] == r["accuracy_matrix"][-1]  # the saved router, bit for bit
    assert [row["routing_accuracy"] for row in rows] == r["routing_accuracy"][-1]
    assert CliRunner().invoke(main, ["eval", str(out), "--routing", "entropy"]).exit_code == 0
    reported = CliRunner().invoke(main, ["report", str(out)])
    assert reported.exit_code == 0, reported.output
    assert (out / "routing.png").read_bytes().startswith(b"\x89PNG")
    md = (out / "report.md").read_text()
    assert "## Task-agnostic inference (classifier routing)" in md and "mean per-class drop" in md
    assert "![routing](routing.png)" in md


def test_bad_routing_flags_are_clear_errors(tmp_path):
    fast = ["--epochs", "1", "--hidden", "8", "--no-progress"]
    result = CliRunner().invoke(main, ["run", *fast, "--routing", "foo"])
    assert result.exit_code != 0 and "--routing" in result.output and "'foo' is not one of" in result.output
    result = CliRunner().invoke(main, ["run", *fast, "--routing", "classifier", "--router-buffer", "0"])
    assert result.exit_code != 0 and "--router-buffer must be at least 1, got 0" in result.output
    assert "accuracy matrix" not in result.output  # refused before training
    result = CliRunner().invoke(main, ["run", *fast, "--router-buffer", "50"])
    assert result.exit_code != 0 and "--router-buffer configure(s) the task classifier of --routing classifier" \
        in result.output
    oracle = tmp_path / "oracle"
    assert CliRunner().invoke(main, ["run", *fast, "--method", "finetune", "--tasks", "2", "--out", str(oracle)]).exit_code == 0
    result = CliRunner().invoke(main, ["eval", str(oracle), "--routing", "classifier"])
    assert result.exit_code != 0 and "holds no task router" in result.output


def test_router_checkpoint_round_trip(trained):
    bench, method, net = trained
    router = fit_router(net, bench.tasks, ExemplarBuffer(20), epochs=2, free_units=free_units_of(method))
    again = TaskRouter.restore(router.describe(), router.tensors())
    x = bench.tasks[1].test_x[:30]
    assert torch.equal(routed_predict(again.install(net), x, "classifier", again)[0],
                       routed_predict(router.install(net), x, "classifier", router)[0])
