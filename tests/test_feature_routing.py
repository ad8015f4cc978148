"""Feature-statistics routing (``--routing lda``, ``sparsecl.feature_routing``) and routing of
weight-level methods through every task's subnetwork: well-separated Gaussian tasks are routed
right, only statistics are kept (checkpoint tensor shapes), routing never changes the
task-incremental results of any method family, and the batched path equals a per-sample loop."""

import dataclasses
import re

import pytest
import torch

from sparsecl.data.types import Benchmark, TaskData
from sparsecl.errors import CheckpointError, ConfigError
from sparsecl.feature_routing import FeatureStatistics, unit_features, unit_layers, unit_owner
from sparsecl.methods import (CLNP, DST, WSN, CLNPConfig, DSTConfig, EideticConfig, EideticNets, Finetune,
                              PackNet, PackNetConfig, SingleTask, TinySubNets, TinySubNetsConfig, WSNConfig)
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.routing import (RoutingRecord, evaluate_routing, head_entropies, routed_predict, task_outputs,
                              update_statistics)
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import cluster_benchmark

FAST = dict(epochs=3, batch_size=32)


def _two_gaussian_tasks(dim: int = 20, n: int = 300, seed: int = 0) -> Benchmark:
    """Two tasks of 2 classes each; every class a unit-variance Gaussian, the tasks' centres
    8 apart along their own axes (well separated)."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(2):
        centres = torch.zeros(2, dim)
        centres[:, t] = 8.0  # the task's own direction
        centres[0, 2 + t], centres[1, 2 + t] = 3.0, -3.0  # its two classes

        def draw(m):
            y = torch.randint(0, 2, (m,), generator=g)
            return centres[y] + torch.randn(m, dim, generator=g), y

        (a, ya), (b, yb), (c, yc) = draw(n), draw(n // 4), draw(n)
        tasks.append(TaskData(t, f"gauss:{t}", (2 * t, 2 * t + 1), a, ya, b, yb, c, yc))
    return Benchmark("gauss", tasks, (dim,))


def test_statistics_route_two_separated_gaussian_tasks():
    """Directly on the features (identity body): plain LDA over both tasks, shared and per task."""
    bench = _two_gaussian_tasks()
    for shared in (True, False):
        stats = FeatureStatistics(shared, 20)
        for task in bench.tasks:
            stats.add_task(task.train_x, task.train_y, 2)
        for t, task in enumerate(bench.tasks):
            x = task.test_x
            scores = stats.task_scores(x if shared else [x, x])
            assert scores.shape == (len(x), 2)
            assert float((scores.argmax(1) == t).double().mean()) >= 0.99
        assert stats.means.shape == (4, 20) and stats.class_task.tolist() == [0, 0, 1, 1]
        assert stats.scatter.shape == ((20, 20) if shared else (2, 20, 20))
    # the pooled covariance is the within-class covariance: unit variance here
    cov = stats.scatter[0] / stats.dof[0]
    assert torch.allclose(cov.diagonal(), torch.ones(20, dtype=torch.float64), atol=0.35)


def test_lda_run_routes_well_separated_tasks_and_keeps_no_inputs():
    bench = _two_gaussian_tasks()
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (32, 32), 2))
    states = []
    method = EideticNets(EideticConfig(score="taylor", patience=2, prune_step=0.2, tolerance=0.02))
    result = Trainer(method, TrainConfig(seed=0, routing="lda", **FAST)).fit(
        net, bench, on_task_end=lambda n, s: states.append(s))
    r = result.routing
    # through a heavily pruned network task 0's view keeps a few units: less than the >= 99% of
    # the statistics on the raw features (test above), still far above chance
    assert min(r["routing_accuracy"][-1]) >= 0.9, r["routing_accuracy"]
    assert r["kept"].startswith("feature statistics, no inputs")
    tensors, meta = states[-1].to_checkpoint()
    saved = {k: v for k, v in tensors.items() if k.startswith("router.")}
    # the features: the outputs of every unit layer (fc1, fc2: 32 units each)
    assert states[-1].routing.router.layers == [("fc1", 32), ("fc2", 32)]
    d = 64
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "router.means": (4, d), "router.class_task": (4,), "router.scatter": (d, d), "router.dof": (2,),
        "router.owner": (d,)}  # O(d^2) once, O(d) per class: no input of shape (N, 20)
    again = RoutingRecord.from_checkpoint(tensors, meta["routing"])
    x = bench.tasks[1].test_x
    u = unit_features(net, x, ["fc1", "fc2"])[1]
    assert torch.equal(again.router.task_scores(u), states[-1].routing.router.task_scores(u))
    # every feature's view is the units owned through its task (EideticNets' ledger)
    owner = states[-1].routing.router.owner
    assert set(owner.tolist()) <= {-1, 0, 1} and (owner == 0).any()


def test_views_are_frozen_features_of_the_owning_tasks():
    """Features of units owned by later tasks are left out of an earlier task's statistics."""
    h = torch.randn(40, 4, dtype=torch.float64)
    y = torch.arange(40) % 2
    stats = FeatureStatistics(True, 4)
    stats.add_task(h, y, 2, owner=torch.tensor([0, 0, -1, -1]))
    assert stats.means[:, 2:].abs().sum() == 0 and stats.scatter[2:].abs().sum() == 0
    stats.add_task(h + 1, y, 2, owner=torch.tensor([0, 0, 1, -1]))
    assert stats.owner.tolist() == [0, 0, 1, -1]
    assert stats.means[2:, 3].abs().sum() == 0 and stats.means[2:, 2].abs().sum() > 0
    wide = torch.cat([h, torch.randn(40, 1, dtype=torch.float64)], 1)
    stats.add_task(wide, y, 2, owner=torch.tensor([0, 0, 1, 2, 2]))  # a widened layer: padded with zeros
    assert stats.means.shape == (6, 5) and stats.scatter.shape == (5, 5) and stats.owner.tolist() == [0, 0, 1, 2, 2]
    scores = stats.task_scores(torch.randn(7, 5))
    assert scores.shape == (7, 3) and torch.allclose(scores.exp().sum(1), torch.ones(7, dtype=torch.float64))
    with pytest.raises(ConfigError, match="no training sample of class"):
        stats.add_task(wide[:3], torch.zeros(3, dtype=torch.int64), 2)
    with pytest.raises(CheckpointError, match="incomplete"):
        FeatureStatistics.restore(stats.describe(), {"means": stats.means})


def test_unit_layer_statistics_are_exact_after_later_tasks_and_beat_the_penultimate_features():
    """Statistics of every unit layer's frozen units: a task's statistics taken again after a
    later task are the same (its units are frozen), the features are one body pass (the head's
    features and logits unchanged), and routing is at least as good as with the penultimate
    features alone."""
    bench = cluster_benchmark(num_tasks=3, n_train=150, n_test=60, seed=2)
    torch.manual_seed(2)
    net = ContinualNetwork(mlp((20,), (24, 24), 3))
    method = _eidetic()
    first = {}

    def keep(n, state):
        if state.tasks_done == 1:
            first["stats"] = update_statistics(n, bench.tasks[:1], method=method)

    Trainer(method, TrainConfig(seed=2, **FAST)).fit(net, bench, on_task_end=keep)
    net.eval()
    assert unit_layers(net, method) == [("fc1", 24), ("fc2", 24)]
    again = update_statistics(net, bench.tasks[:1], method=method)
    before = first["stats"]
    view = before.owner >= 0
    assert view.any() and torch.equal(again.owner, unit_owner(net, method, ["fc1", "fc2"]).where(
        unit_owner(net, method, ["fc1", "fc2"]) <= 0, torch.tensor(-1)))
    assert torch.allclose(again.means[:, view], before.means[:, view], atol=1e-9, rtol=0)
    assert torch.allclose(again.scatter[view][:, view], before.scatter[view][:, view], atol=1e-7, rtol=0)
    x = bench.tasks[1].test_x
    h, u = unit_features(net, x, ["fc1", "fc2"])
    assert torch.equal(h, net.features(x)) and u.shape == (len(x), 48)
    assert torch.equal(u[:, :24], net.body.fc1(x.flatten(1)))
    full = update_statistics(net, bench.tasks, method=method)
    head = update_statistics(net, bench.tasks, method=method, all_layers=False)
    assert head.layers == [] and head.num_features == 24 and full.num_features == 48
    routed = [evaluate_routing(net, bench.tasks, "lda", s) for s in (full, head)]
    assert sum(routed[0].routing) >= sum(routed[1].routing) - 0.05, (routed[0].routing, routed[1].routing)
    assert sum(routed[0].routing) / 3 > 0.9
    for r in routed:
        assert r.oracle == routed[0].oracle
    restored = FeatureStatistics.restore(full.describe(), full.tensors())
    assert restored.layers == full.layers
    assert torch.equal(routed_predict(net, x, "lda", restored)[0], routed_predict(net, x, "lda", full)[0])


def test_widened_unit_layers_pad_each_block():
    """A widened layer's new units join the end of its own block, zero in the earlier views."""
    stats = FeatureStatistics(True, 5, layers=[("a", 2), ("b", 3)])
    y = torch.arange(30) % 2
    h = torch.randn(30, 5, dtype=torch.float64)
    stats.add_task(h, y, 2, owner=torch.tensor([0, -1, 0, 0, -1]), widths=[2, 3])
    wide = torch.randn(30, 7, dtype=torch.float64)
    stats.add_task(wide, y, 2, owner=torch.tensor([0, 1, 1, 0, 0, 1, 1]), widths=[3, 4])
    assert stats.layers == [("a", 3), ("b", 4)] and stats.owner.tolist() == [0, 1, 1, 0, 0, 1, 1]
    kept = [0, 1, 3, 4, 5]  # the old features' new positions
    assert torch.equal(stats.means[:2][:, kept], torch.zeros(2, 5, dtype=torch.float64).index_add_(
        0, y, h * torch.tensor([1., 0, 1, 1, 0], dtype=torch.float64)) / 15)
    assert stats.means[:2, [2, 6]].abs().sum() == 0 and stats.scatter.shape == (7, 7)
    with pytest.raises(ConfigError, match="can only grow"):
        stats.add_task(wide[:, :6], y, 2, owner=torch.zeros(6, dtype=torch.int64), widths=[2, 4])
    with pytest.raises(ConfigError, match="shared layout"):
        FeatureStatistics(True, 4, layers=[("a", 2), ("b", 3)])


def _eidetic():
    return EideticNets(EideticConfig(score="taylor", patience=2, prune_step=0.2, tolerance=0.02))


FAMILIES = {
    "eidetic": (_eidetic, ("classifier", "classifier-all", "entropy", "lda")),
    "clnp-single-head": (lambda: CLNP(CLNPConfig(alpha="3e-3", margin=0.02)), ("lda",)),
    "finetune": (Finetune, ("lda",)),
    "wsn": (lambda: WSN(WSNConfig(density=0.3)), ("entropy", "lda")),
    "packnet": (lambda: PackNet(PackNetConfig(prune=0.5, retrain_epochs=1)), ("lda",)),
    "dst": (lambda: DST(DSTConfig(sparsity=0.7, update_interval=3)), ("lda",)),
    "tinysubnets": (lambda: TinySubNets(TinySubNetsConfig(density=0.5, prune_rounds=1, max_levels=4)), ("entropy",)),
    "single-task": (SingleTask, ("lda",)),
}


def _run(make, routing, bench, single_head):
    torch.manual_seed(7)
    net = ContinualNetwork(mlp((20,), (16, 16), 3, 0.1), single_head=single_head)
    seen = []
    result = Trainer(make(), TrainConfig(seed=7, routing=routing, router_epochs=3, **FAST)).fit(
        net, bench, on_task_end=lambda n, s: seen.append(s))
    return result, net, seen[-1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routing_never_changes_the_task_incremental_results_of_any_method_family(family):
    make, modes = FAMILIES[family]
    bench = cluster_benchmark(num_tasks=2, n_train=120, n_test=60)
    single_head = family == "clnp-single-head"
    oracle, net, state = _run(make, "oracle", bench, single_head)
    for mode in modes:
        routed, routed_net, routed_state = _run(make, mode, bench, single_head)
        assert routed.accuracy_matrix == oracle.accuracy_matrix, mode
        assert routed.capacity == oracle.capacity and routed.max_logit_change == oracle.max_logit_change
        for (x, logits), (x2, logits2) in zip(state.probes, routed_state.probes):
            assert torch.equal(x, x2) and torch.equal(logits, logits2)
        a, b = net.state_dict(), routed_net.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        r = routed.to_dict()["routing"]
        assert r["mode"] == mode and len(r["per_class"]) == 6
        assert all(set(c) == {"task", "class", "samples", "oracle", "routed", "routing"} for c in r["per_class"])
        assert all(0.0 <= v <= 1.0 for v in r["routing_accuracy"][-1])


def test_classifier_routing_refuses_weight_level_methods_before_training():
    bench = cluster_benchmark(num_tasks=2, n_train=60, n_test=30)
    method = WSN(WSNConfig(density=0.3))
    with pytest.raises(ConfigError, match="--routing classifier reads the features of one shared body pass.*"
                                          "--routing entropy or --routing lda"):
        Trainer(method, TrainConfig(routing="classifier", **FAST)).fit(ContinualNetwork(mlp((20,), (8,), 3)), bench)
    assert method.log == []


@pytest.fixture(scope="module")
def wsn_trained():
    bench = cluster_benchmark(num_tasks=3, n_train=150, n_test=40, seed=4)
    torch.manual_seed(4)
    net = ContinualNetwork(mlp((20,), (16, 16), 3))
    Trainer(WSN(WSNConfig(density=0.4)), TrainConfig(seed=4, **FAST)).fit(net, bench)
    return bench, net.eval()


def test_weight_level_batched_routing_equals_a_per_sample_loop(wsn_trained):
    bench, net = wsn_trained
    stats = update_statistics(net, bench.tasks)
    assert not stats.shared and stats.scatter.shape == (3, 16, 16)
    x = torch.cat([t.test_x[:20] for t in bench.tasks])
    for mode, router in (("entropy", None), ("lda", stats)):
        tasks, classes = routed_predict(net, x, mode, router)
        with torch.no_grad():
            feats, logits = task_outputs(net, x)
            score = stats.task_scores(feats) if mode == "lda" else -head_entropies(logits).double()
            for n in range(len(x)):  # the reference: one sample at a time, every subnetwork separately
                xn = x[n:n + 1]
                own = [net(xn, t) for t in range(net.num_tasks)]
                for t in range(net.num_tasks):
                    assert torch.allclose(own[t], logits[t][n:n + 1], atol=1e-5)
                if mode == "lda":
                    s = stats.task_scores([net.features(xn, t) for t in range(net.num_tasks)])[0]
                else:
                    s = -head_entropies(own)[0].double()
                assert torch.allclose(s, score[n], rtol=1e-4, atol=1e-4)
                top = s.topk(2).values
                if float(top[0] - top[1]) > 1e-3:  # a near-tie may go either way across batch sizes
                    assert int(tasks[n]) == int(s.argmax()), (mode, n)
                    assert int(classes[n]) == int(own[int(tasks[n])].argmax()), (mode, n)


def test_weight_level_lda_routes_better_than_chance_and_round_trips(wsn_trained):
    bench, net = wsn_trained
    stats = update_statistics(net, bench.tasks)
    result = evaluate_routing(net, bench.tasks, "lda", stats)
    assert sum(result.routing) / 3 > 0.9
    again = FeatureStatistics.restore(stats.describe(), stats.tensors())
    x = bench.tasks[0].test_x
    assert torch.equal(routed_predict(net, x, "lda", again)[0], routed_predict(net, x, "lda", stats)[0])
    with pytest.raises(ConfigError, match="per task: pass a list of 3"):
        stats.task_scores(torch.zeros(2, 16))


@pytest.mark.parametrize("method", ["eidetic", "wsn"])
def test_lda_through_the_cli_run_eval_and_report(tmp_path, method):
    import json

    from click.testing import CliRunner

    from sparsecl.cli import main

    out = tmp_path / "run"
    args = ["run", "--method", method, "--tasks", "2", "--epochs", "2", "--hidden", "32,32", "--batch-size", "32",
            "--max-train-per-task", "300", "--max-test-per-task", "200", "--no-progress", "--routing", "lda",
            "--out", str(out)]
    if method == "eidetic":
        args += ["--patience", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    r = json.loads((out / "metrics.json").read_text())["routing"]
    assert r["mode"] == "lda" and r["buffer_per_task"] is None and "no inputs" in r["kept"]
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--routing", "lda", "--json", str(tmp_path / "e.json")])
    assert evaluated.exit_code == 0, evaluated.output
    assert "routing accuracy" in evaluated.output and "mean per-class drop" in evaluated.output
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [row["routed_accuracy"] for row in saved["tasks"]] == r["accuracy_matrix"][-1]
    assert [row["routing_accuracy"] for row in saved["tasks"]] == r["routing_accuracy"][-1]
    assert saved["routing"]["per_class"] == r["per_class"]
    shrunk = CliRunner().invoke(main, ["eval", str(out), "--routing", "lda", "--lda-shrinkage", "0.5"])
    assert shrunk.exit_code == 0 and "mean routed accuracy (lda)" in shrunk.output, shrunk.output
    for extra, why in ((["--routing", "lda", "--lda-shrinkage", "2"], r"--lda-shrinkage\) must lie in \[0, 1\]"),
                       (["--routing", "entropy", "--lda-shrinkage", "0.5"], "--lda-shrinkage sets the covariance")):
        bad = CliRunner().invoke(main, ["eval", str(out), *extra])
        assert bad.exit_code != 0 and re.search(why, bad.output), bad.output
    refused = CliRunner().invoke(main, ["eval", str(out), "--routing", "classifier"])
    assert refused.exit_code != 0 and "holds no task router of --routing classifier" in refused.output
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    assert (out / "routing.png").read_bytes().startswith(b"\x89PNG")
    assert f"| data kept for routing | {r['kept']} |" in (out / "report.md").read_text()


def test_run_lda_shrinkage_equals_rescoring_a_saved_run(tmp_path):
    """``run --lda-shrinkage a`` routes as ``eval --lda-shrinkage a`` on a run made with the default
    (the scatter is kept unshrunk); the option is refused without --routing lda, or out of range."""
    import json

    from click.testing import CliRunner

    from sparsecl.cli import main

    base = ["run", "--method", "eidetic", "--patience", "1", "--tasks", "2", "--epochs", "2", "--hidden", "32,32",
            "--batch-size", "32", "--max-train-per-task", "300", "--max-test-per-task", "200", "--no-progress",
            "--routing", "lda"]
    for name, extra in (("default", []), ("shrunk", ["--lda-shrinkage", "0.5"])):
        result = CliRunner().invoke(main, [*base, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    shrunk = json.loads((tmp_path / "shrunk" / "metrics.json").read_text())
    assert shrunk["config"]["lda_shrinkage"] == 0.5
    rescored = CliRunner().invoke(main, ["eval", str(tmp_path / "default"), "--routing", "lda", "--lda-shrinkage",
                                         "0.5", "--json", str(tmp_path / "e.json")])
    assert rescored.exit_code == 0, rescored.output
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [row["routed_accuracy"] for row in saved["tasks"]] == shrunk["routing"]["accuracy_matrix"][-1]
    for extra, why in ((["--lda-shrinkage", "0.5", "--routing", "entropy"], "--lda-shrinkage configures --routing lda"),
                       (["--lda-shrinkage", "1.5", "--routing", "lda"], "--lda-shrinkage must lie in [0, 1]")):
        bad = CliRunner().invoke(main, [*base[:-2], *extra, "--out", str(tmp_path / "bad")])
        assert bad.exit_code != 0 and why in bad.output, bad.output
        assert not (tmp_path / "bad").exists()
