"""TinySubNets: zero forgetting bitwise also after later tasks quantize their new weights;
shared weights are never re-quantized; the adaptive pruning and the chosen number of levels
respect their validation bounds."""

from __future__ import annotations

import pytest
import torch

from sparsecl.errors import ConfigError
from sparsecl.ledger import FREE
from sparsecl.methods import TinySubNets, TinySubNetsConfig
from sparsecl.methods.tinysubnets import kmeans_codebook, quantize
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import ChecksOldLogits, cluster_benchmark, image_benchmark
from test_conv import tiny_convnet

OPTIMIZERS = [dict(optimizer="adam"), dict(optimizer="adamw", weight_decay=0.05),
              dict(optimizer="sgd", momentum=0.9, lr=0.05)]


class CheckedTSN(ChecksOldLogits, TinySubNets):
    """Also checks that quantizing task t touches no weight an earlier task owns."""

    def _quantize(self, session, reference):
        net = session.net
        sub = net.subnetworks
        owned = [(sub.owner(i) != FREE).clone() for i in range(len(sub.layers))]
        before = [self.weight(net, i).detach().clone() for i in range(len(sub.layers))]
        out = super()._quantize(session, reference)
        for i, (o, b) in enumerate(zip(owned, before)):
            assert torch.equal(self.weight(net, i)[o], b[o]), "a shared weight was re-quantized"
        return out


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["optimizer"])
def test_zero_forgetting_bitwise_after_quantizing_later_tasks(opt):
    bench = image_benchmark(num_tasks=3, shape=(3, 8, 8), n_train=60, n_test=40)
    method = CheckedTSN(TinySubNetsConfig(density=0.4, prune_rounds=3, quant_margin=0.05, max_levels=16))
    method.input_shape = (3, 8, 8)
    torch.manual_seed(0)
    net = ContinualNetwork(tiny_convnet())
    cfg = {"epochs": 2, "batch_size": 16, "lr": 1e-2, **opt}
    result = Trainer(method, TrainConfig(**cfg)).fit(net, bench)
    assert result.max_logit_change == 0.0 and result.bwt == 0.0 and len(method.records) == 3
    assert method.codebooks  # something was quantized


def test_levels_and_pruning_respect_their_validation_bounds():
    bench = cluster_benchmark(num_tasks=3, n_train=240, n_test=200)
    cfg = TinySubNetsConfig(density=0.5, prune_rounds=6, prune_tolerance=0.01, quant_margin=0.01, max_levels=64)
    method = TinySubNets(cfg)
    torch.manual_seed(0)
    net = ContinualNetwork(mlp((20,), (32, 24), 3))
    Trainer(method, TrainConfig(epochs=3, batch_size=32)).fit(net, bench)
    sub = net.subnetworks
    for entry in method.log:
        t = entry["task"]
        for r in entry["pruning"]:  # a kept round stays within the tolerance of the unpruned model
            assert r["kept"] == (r["val_accuracy"] >= entry["val_accuracy"] - cfg.prune_tolerance)
        ref = entry["val_accuracy_pruned"]
        assert entry["val_accuracy_quantized"] >= ref - cfg.quant_margin
        for q in entry["quantization"]:
            *failed, last = q["tried"]
            assert all(f["val_accuracy"] < ref - cfg.quant_margin for f in failed)  # fewer levels: outside
            if q["levels"] is not None:
                assert last["val_accuracy"] >= ref - cfg.quant_margin and q["levels"] <= last["levels"]
                i = sub.layers.index(q["layer"])
                values = sub.weight(net.body, i)[sub.owner(i) == t]
                assert len(torch.unique(values)) <= last["levels"]
                assert torch.isin(values, method.codebooks[(t, i)]).all()  # every new weight is a codebook entry


def test_kmeans_codebook_and_quantize():
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)])
    assert torch.equal(kmeans_codebook(values, 4, seed=0), torch.tensor([-1.0, 0.5, 2.0]))
    x = torch.randn(1000)
    cb = kmeans_codebook(x, 8, seed=0)
    assert len(cb) == 8 and torch.equal(cb, cb.sort().values)
    q = quantize(x, cb)
    assert torch.isin(q, cb).all()
    nearest = cb[(x[:, None] - cb[None, :]).abs().argmin(1)]
    assert torch.equal(q, nearest)


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"TinySubNetsConfig\(max_levels=\.\.\.\) must be a power of two"):
        TinySubNetsConfig(max_levels=100)
    with pytest.raises(ConfigError, match=r"TinySubNetsConfig\(prune_fraction=\.\.\.\) must be in"):
        TinySubNetsConfig(prune_fraction=1.0)
    assert TinySubNetsConfig(max_levels=16).levels == [2, 4, 8, 16]


def test_cli_compact_export_reads_back_bitwise(tmp_path):
    """sparsecl run --method tinysubnets, export --compact, read back: every task's logits are
    bitwise those of the saved model; eval reads the file; a flipped byte is refused."""
    from click.testing import CliRunner

    from sparsecl.checkpoint import load_checkpoint
    from sparsecl.cli import main
    from sparsecl.compact import compact_payload, read_compact
    from sparsecl.data import load_benchmark
    from sparsecl.runs import restore

    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args])  # noqa: E731
    result = run("run", "--method", "tinysubnets", "--epochs", "2", "--hidden", "32,32", "--max-levels", "16",
                 "--no-progress", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert run("export", tmp_path / "run", "--compact", "--task", "0", "--out", tmp_path / "x").exit_code != 0
    result = run("export", tmp_path / "run", "--compact", "--out", tmp_path / "model.compact")
    assert result.exit_code == 0, result.output
    net, _, _ = restore(load_checkpoint(tmp_path / "run"))
    net.eval()
    small, _ = read_compact(tmp_path / "model.compact")
    bench = load_benchmark("split-digits", seed=0)
    with torch.no_grad():
        for t, task in enumerate(bench.tasks):
            x = task.prepare(task.test_x)
            assert torch.equal(small(x, t), net(x, t))
    metrics = __import__("json").loads((tmp_path / "run" / "metrics.json").read_text())
    compact = metrics["bits_per_parameter"]["compact"][-1]
    unquantized = compact_payload(net, {}).bits_per_parameter()["total"]  # the same masks, float32 values
    assert compact == compact_payload(net, restore(load_checkpoint(tmp_path / "run"))[1].codebooks
                                      ).bits_per_parameter()["total"]
    assert compact < unquantized / 2 and unquantized < 32
    with torch.inference_mode():  # a model read in inference mode runs too
        again, _ = read_compact(tmp_path / "model.compact")
        x = bench.tasks[0].prepare(bench.tasks[0].test_x)
        assert torch.equal(again(x, 0), small(x, 0))
    result = run("eval", tmp_path / "model.compact")
    assert result.exit_code == 0 and f"{100 * metrics['acc']:.2f}%" in result.output
    data = bytearray((tmp_path / "model.compact").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.compact").write_bytes(bytes(data))
    result = run("eval", tmp_path / "bad.compact")
    assert result.exit_code != 0 and "bad.compact" in result.output
    result = run("export", tmp_path / "model.compact", "--task", "0", "--out", tmp_path / "t0.pt2")
    assert result.exit_code != 0 and "is a compact model" in result.output
