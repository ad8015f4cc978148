"""The non-isolation baselines (EWC, SI, LwF) and single-task training: each formula checked
against the paper's literal form (EWC's penalty gradient by finite differences, SI's path
integral on a hand-made trajectory, LwF's distillation at rest), honest forgetting on real Split
MNIST beside an isolation method, single-task's untouched earlier tasks, and bit-for-bit resume."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from sparsecl.checkpoint import load_checkpoint
from sparsecl.cli import main
from sparsecl.data import load_benchmark
from sparsecl.errors import ConfigError
from sparsecl.export import task_model
from sparsecl.methods import EWC, SI, EWCConfig, LwF, LwFConfig, PackNet, PackNetConfig, SIConfig, SingleTask
from sparsecl.methods.lwf import distillation
from sparsecl.methods.single_task import reinitialize
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.runs import RunSpec, build_stream
from sparsecl.trainer import TaskSession, TrainConfig, Trainer
from interrupted import run_with_checkpoints
from synthetic import ChecksOldLogits, cluster_benchmark, image_benchmark
from test_conv import tiny_convnet

def _tiny_net(tasks: int = 3, dtype=torch.float64) -> ContinualNetwork:
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((4,), (3,), 2)).to(dtype)
    for _ in range(tasks):
        net.add_head(2)
    return net


def _random_like(params: dict[str, torch.Tensor], seed: int, positive: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in params.items():
        r = torch.randn(p.shape, generator=g, dtype=p.dtype)
        out[name] = r.abs() if positive else r
    return out


def _penalty_gradient(method, net, t: int) -> dict[str, torch.Tensor]:
    """The gradient the training step adds for the penalty: ``loss`` then ``before_step``
    with no task gradient, as a training step of task ``t`` runs them."""
    method.begin_task(net, t, None)
    x = torch.zeros(1, 4, dtype=torch.float64)
    method.loss(net, x, torch.zeros(1, dtype=torch.long), torch.full((1,), t))
    for p in net.parameters():
        p.grad = None
    method.before_step(net)
    return {name: p.grad for name, p in net.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------- EWC

@pytest.mark.parametrize("online", [False, True], ids=["ewc", "online-ewc"])
def test_ewc_penalty_matches_the_paper_and_its_gradient_finite_differences(online):
    """After two tasks, the merged penalty equals the literal sum of Eq. 3 (one quadratic per
    earlier task; online EWC: one running Fisher gamma F_0 + F_1 around the latest parameters),
    and the gradient the training step adds equals central finite differences of that sum
    (float64)."""
    net = _tiny_net()
    lam, gamma = 3.0, 0.7
    method = EWC(EWCConfig(ewc_lambda=lam, ewc_online=online, ewc_gamma=gamma if online else 1.0))
    body = {n: p.detach() for n, p in net.named_parameters() if n.startswith("body.")}
    fishers = [_random_like(body, 1, positive=True), _random_like(body, 2, positive=True)]
    anchors = [_random_like(body, 3), _random_like(body, 4)]
    # task 1's head is its own: it enters task 1's Fisher but no later task trains it
    for t in range(2):
        method.begin_task(net, t, None)
        params = dict(anchors[t])
        fisher = dict(fishers[t])
        for n, p in net.named_parameters():
            if n.startswith(f"heads.{t}."):
                params[n], fisher[n] = p.detach() + 1.0, torch.ones_like(p)
        method.consolidate(params, fisher)

    def literal() -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for n, p in net.named_parameters():
            if n not in body:
                continue
            if online:
                total = total + ((gamma * fishers[0][n] + fishers[1][n]) * (p - anchors[1][n]) ** 2).sum()
            else:
                total = total + sum((f[n] * (p - a[n]) ** 2).sum() for f, a in zip(fishers, anchors))
        return lam / 2 * total

    grads = _penalty_gradient(method, net, 2)
    assert set(grads) == set(body)  # the old heads are not penalized: task 2 does not train them
    assert torch.allclose(method.penalty(), literal(), rtol=1e-12, atol=0)
    eps = 1e-6
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n not in body:
                continue
            fd = torch.empty_like(p)
            for i in range(p.numel()):
                flat = p.view(-1)
                keep = flat[i].item()
                flat[i] = keep + eps
                up = literal()
                flat[i] = keep - eps
                down = literal()
                flat[i] = keep
                fd.view(-1)[i] = (up - down) / (2 * eps)
            assert torch.allclose(grads[n], fd, rtol=1e-6, atol=1e-8), n


def _fisher_net(model: str) -> tuple[ContinualNetwork, object]:
    torch.manual_seed(0)
    if model == "convnet":  # conv and BatchNorm by vmap, the Linears by the outer-product rule
        bench = image_benchmark(num_tasks=1, shape=(3, 8, 8), n_train=40)
        net = ContinualNetwork(tiny_convnet(3))
    else:  # every parameter a Linear's; with a single head its shared weight goes through vmap
        bench = cluster_benchmark(num_tasks=1, dim=6, n_train=40)
        net = ContinualNetwork(mlp((6,), (5,), 3), single_head=model == "single-head")
    net.add_head(3)
    net.eval()
    with torch.no_grad():  # BatchNorm statistics of their own, so that eval mode is not the identity
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net, bench


@pytest.mark.parametrize("model", ["mlp", "single-head", "convnet"])
@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_ewc_fisher_is_the_mean_squared_per_sample_gradient(kind, model):
    """``EWC.fisher`` (one backward pass per batch for the Linears, vmap for the rest) equals a
    plain loop over samples: ``(d log p(y|x) / d theta)^2``, y the label (empirical) or every
    class weighted by p(y|x) (true), averaged over the first ``ewc_fisher_samples`` training
    samples, batches of 7."""
    net, bench = _fisher_net(model)
    method = EWC(EWCConfig(ewc_fisher=kind, ewc_fisher_samples=25))
    method.begin_task(net, 0, bench.tasks[0])
    session = TaskSession(net, method, 0, bench.tasks, TrainConfig(eval_batch_size=7), None)
    fisher = method.fisher(session)
    params = dict(method.trained_parameters(net, 0))
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    task = bench.tasks[0]
    for x, y in zip(task.train_x[:25], task.train_y[:25]):
        logp = F.log_softmax(net(x[None], 0)[0], -1)
        classes = [(int(y), 1.0)] if kind == "empirical" else [(c, float(logp[c].detach().exp())) for c in range(3)]
        for c, weight in classes:
            grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True)
            for n, g in zip(params, grads):
                expected[n] += weight * g * g / 25
    assert fisher.keys() == expected.keys()
    for n in fisher:
        assert torch.allclose(fisher[n], expected[n], rtol=1e-4, atol=1e-7), n
    assert all(p.grad is None for p in net.parameters())  # the training gradients are left alone


# -------------------------------------------------------------------------------------- SI

def test_si_importance_is_the_path_integral_of_a_hand_made_trajectory():
    """Three steps with chosen task gradients g_s and updates d_s per task: omega = -sum g_s * d_s
    (Eq. 3), then Omega += omega / (Delta^2 + xi), Delta = sum d_s, clipped at zero (Eq. 5). On
    the second task the step applies g_s + 2 c Omega (theta - anchor) (Eq. 4) while the path
    integral still reads the task loss's own gradient g_s."""
    net = _tiny_net(tasks=2)
    c, xi = 0.5, 0.01
    method = SI(SIConfig(si_c=c, si_xi=xi))
    params = {n: p for n, p in net.named_parameters() if n.startswith("body.")}
    x, y = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    expected: dict[str, torch.Tensor] = {}
    for t in range(2):
        grads = [_random_like(params, 10 * t + s) for s in range(3)]
        steps = [_random_like(params, 100 + 10 * t + s) for s in range(3)]
        method.begin_task(net, t, None)
        start = {n: p.detach().clone() for n, p in params.items()}
        for g, d in zip(grads, steps):
            method.loss(net, x, y, torch.full((1,), t))
            for n, p in net.named_parameters():  # as backward leaves them: the heads get none here
                p.grad = g[n].clone() if n in g else None
            method.before_step(net)
            for n, p in params.items():
                applied = g[n] if t == 0 else g[n] + 2 * c * expected[n] * (p.detach() - method.anchor[n])
                assert torch.allclose(p.grad, applied, rtol=1e-12), n
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(d[n])  # the optimizer's update
            method.after_step(net)
        for n in params:
            omega = -sum(g[n] * d[n] for g, d in zip(grads, steps))
            assert torch.allclose(method.omega[n], omega, rtol=1e-12), n
            delta = params[n].detach() - start[n]
            gain = omega / (delta ** 2 + xi)
            expected[n] = (gain if t == 0 else expected[n] + gain).clamp(min=0)
        method.end_task(None)
        for n in params:
            assert torch.allclose(method.importance[n], expected[n], rtol=1e-12), n
            assert torch.equal(method.anchor[n], params[n].detach())
        assert any((expected[n] == 0).any() for n in params)  # the clip at zero was exercised
        assert all((method.importance[n] == 0).all() for n in method.importance if n.startswith("heads."))


# ------------------------------------------------------------------------------------- LwF

def test_lwf_distillation_is_zero_while_the_old_heads_answer_as_before():
    bench = cluster_benchmark(num_tasks=2)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16,), 3))
    method = LwF()
    Trainer(method, TrainConfig(epochs=1, batch_size=32)).fit(net, cluster_benchmark(num_tasks=1))
    logits = torch.randn(8, 3)
    assert distillation(logits, logits, 2.0) == 0
    net.add_head(3)
    method.begin_task(net, 1, bench.tasks[1])
    x, y = bench.tasks[1].train_x[:32], bench.tasks[1].train_y[:32]
    ids = torch.ones(32, dtype=torch.long)
    net.train()
    loss, _ = method.loss(net, x, y, ids)
    assert torch.equal(loss, net.task_loss(x, y, ids)[0])  # the distillation term is exactly 0
    with torch.no_grad():
        next(net.body.parameters()).add_(0.1)
    moved, _ = method.loss(net, x, y, ids)
    assert moved > net.task_loss(x, y, ids)[0]
    # the paper's L_old (cross-entropy) differs from the KL by the targets' entropy only
    old, new = torch.randn(5, 3), torch.randn(5, 3, requires_grad=True)
    target = F.softmax(old / 2, -1)
    paper = -(target * F.log_softmax(new / 2, -1)).sum(-1).mean()
    entropy = -(target * target.log()).sum(-1).mean()
    assert torch.allclose(distillation(new, old, 2.0), paper - entropy, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(distillation(new, old, 2.0), new)[0],
                          torch.autograd.grad(paper, new)[0], atol=1e-7)


def test_lwf_warmup_trains_the_new_head_alone(monkeypatch):
    bench = cluster_benchmark(num_tasks=2)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16,), 3))
    method = LwF(LwFConfig(lwf_warmup_epochs=1))
    seen = []
    fit = TaskSession.fit

    def recording(session, epochs, tasks=None):
        before = {n: p.detach().clone() for n, p in session.net.named_parameters()}
        out = fit(session, epochs, tasks)
        seen.append({n for n, p in session.net.named_parameters() if not torch.equal(p, before[n])})
        return out

    monkeypatch.setattr(TaskSession, "fit", recording)
    Trainer(method, TrainConfig(epochs=1, batch_size=32, optimizer="adamw", weight_decay=0.1)).fit(net, bench)
    assert seen[1] == {"heads.1.weight", "heads.1.bias"}  # the warm-up of task 1
    assert "heads.0.weight" in seen[2] and any(n.startswith("body.") for n in seen[2])  # then everything learns


# ------------------------------------------------------------------ forgetting on real data

@pytest.fixture(scope="module")
def two_digit_tasks(data_root):
    # 8/7 then 1/5: a pair where fine-tuning task 1 overwrites task 0's features
    return load_benchmark("split-mnist", data_root=data_root, num_tasks=2, max_train_per_task=1000,
                          max_test_per_task=1000, seed=0, class_order_seed=2)


@pytest.mark.parametrize("make", [
    lambda: EWC(), lambda: EWC(EWCConfig(ewc_online=True, ewc_gamma=0.9)), lambda: SI(),
    # with the paper's lambda_o = 1 LwF keeps these two tasks; a weak distillation shows forgetting
    lambda: LwF(LwFConfig(lwf_lambda=0.1)),
], ids=["ewc", "online-ewc", "si", "lwf"])
def test_baselines_forget_on_real_split_mnist_and_the_trainer_says_so(two_digit_tasks, make):
    method = make()
    torch.manual_seed(0)
    result = Trainer(method, TrainConfig(epochs=2, batch_size=32, lr=1e-2, seed=0)).fit(
        mlp((1, 28, 28), (64, 64), 2), two_digit_tasks)
    assert result.forgetting > 0.05 and result.bwt < -0.05
    assert result.max_logit_change > 0
    assert result.accuracy_matrix[0][0] > 0.9 and result.accuracy_matrix[1][1] > 0.9


def test_an_isolation_method_forgets_nothing_on_the_same_tasks(two_digit_tasks):
    torch.manual_seed(0)
    result = Trainer(PackNet(PackNetConfig(prune=0.5, retrain_epochs=1)),
                     TrainConfig(epochs=2, batch_size=32, lr=1e-2, seed=0)).fit(
        mlp((1, 28, 28), (64, 64), 2), two_digit_tasks)
    assert result.forgetting == 0.0 and result.bwt == 0.0 and result.max_logit_change == 0.0
    assert result.accuracy_matrix[1][1] > 0.9


# ----------------------------------------------------------------------------- single-task

class CheckedSingleTask(ChecksOldLogits, SingleTask):
    pass


@pytest.mark.parametrize("opt", [dict(optimizer="adam", lr=1e-2), dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
                                 dict(optimizer="sgd", momentum=0.9, lr=0.05)], ids=lambda o: o["optimizer"])
def test_single_task_leaves_earlier_tasks_bitwise_unchanged(opt):
    bench = cluster_benchmark(num_tasks=3)
    torch.manual_seed(0)
    method = CheckedSingleTask()
    net = ContinualNetwork(mlp((20,), (16, 16), 3, dropout=0.1))
    result = Trainer(method, TrainConfig(epochs=2, batch_size=32, **opt)).fit(net, bench)
    assert result.max_logit_change == 0.0
    R = result.accuracy_matrix
    assert all(R[t][i] == R[i][i] for i in range(3) for t in range(i, 3))  # each column constant
    assert min(R[i][i] for i in range(3)) > 0.8
    kept = [net.task_bodies[str(i)] for i in range(3)]
    first = [p for p in kept[0].parameters()][0]
    assert not any(torch.equal(first, [p for p in b.parameters()][0]) for b in kept[1:])


def test_single_task_export_keeps_each_task_logits():
    bench = cluster_benchmark(num_tasks=2)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (16,), 3))
    Trainer(SingleTask(), TrainConfig(epochs=1, batch_size=32)).fit(net, bench)
    net.eval()
    for t in range(2):
        x = bench.tasks[t].test_x
        with torch.no_grad():
            assert torch.allclose(task_model(net, t)(x), net(x, t), atol=1e-5)


def test_single_task_initializations_are_seeded_and_fresh():
    torch.manual_seed(0)
    body = mlp((6,), (5,), 2)
    trained = {k: v.clone() for k, v in body.state_dict().items()}
    params = list(body.parameters())
    rng = torch.get_rng_state()
    reinitialize(body, 7)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's own random stream is untouched
    assert list(body.parameters()) == params  # in place: an optimizer built on them stays valid
    first = {k: v.clone() for k, v in body.state_dict().items()}
    w = next(iter(first))  # the first layer's weight
    assert not torch.equal(first[w], trained[w])
    reinitialize(body, 7)
    assert all(torch.equal(first[k], v) for k, v in body.state_dict().items())
    reinitialize(body, 8)
    assert not torch.equal(first[w], body.state_dict()[w])


def test_single_task_refuses_a_single_head():
    with pytest.raises(ConfigError, match="single-head"):
        SingleTask().setup(ContinualNetwork(mlp((4,), (3,), 2), single_head=True))


# --------------------------------------------------------------------------------- resume

RESUMABLE = [("ewc", {"ewc_lambda": 50.0}), ("ewc", {"ewc_online": True, "ewc_gamma": 0.8, "ewc_fisher": "true"}),
             ("si", {}), ("lwf", {"lwf_warmup_epochs": 1}),
             ("single-task", {})]


@pytest.mark.parametrize("name,options", RESUMABLE, ids=["ewc", "online-ewc", "si", "lwf", "single-task"])
def test_resume_is_bitwise_for_baselines(tmp_path, name, options):
    """Stopped after 2 of 5 tasks and resumed with ``sparsecl run --resume``: the same metrics
    and checkpoint tensors (importance and anchors of EWC/SI, every task's body) as an
    uninterrupted run."""
    spec = RunSpec([{"benchmark": "split-digits", "seed": 0, "options": {}}],
                   {"name": "mlp", "options": {"hidden": [16, 16], "dropout": 0.1}, "single_head": False}, name,
                   options, {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.01,
                             "momentum": 0.0, "seed": 0})
    bench = build_stream(spec)
    full = run_with_checkpoints(spec, bench, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_with_checkpoints(spec, bench, tmp_path / "cut", stop_after=2)
    result = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "cut"), "--no-progress"])
    assert result.exit_code == 0, result.output
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == full.accuracy_matrix
    assert full.max_logit_change > 0 if name != "single-task" else full.max_logit_change == 0
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    if name in ("ewc", "si"):
        assert any(k.startswith("method.importance.body.") for k in a.tensors)
        assert a.manifest["method_state"] == b.manifest["method_state"]
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ---------------------------------------------------------------------------------- options

@pytest.mark.parametrize("args,message", [
    (["--method", "ewc", "--ewc-gamma", "0.5"], "--ewc-online"),
    (["--method", "ewc", "--ewc-fisher", "sampled"], "--ewc-fisher"),
    (["--method", "ewc", "--ewc-lambda", "-1"], "--ewc-lambda"),
    (["--method", "si", "--si-xi", "0"], "--si-xi"),
    (["--method", "lwf", "--lwf-temperature", "0"], "--lwf-temperature"),
    (["--method", "si", "--ewc-lambda", "1"], "--ewc-lambda"),
])
def test_bad_baseline_options_are_refused_by_flag(args, message):
    result = CliRunner().invoke(main, ["run", "--tasks", "2", "--epochs", "1", "--no-progress", *args])
    assert result.exit_code != 0
    assert message in result.output
