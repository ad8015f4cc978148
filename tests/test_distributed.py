"""Data-parallel training (``sparsecl.distributed``): two gloo processes launched by torchrun on
a real Split MNIST subset hold bitwise-identical networks and ledgers, forget nothing, and reach
the single-process accuracy; the trainer refuses ranks that diverge; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsecl import distributed
from sparsecl.distributed import World
from sparsecl.errors import ConfigError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
WORKER = Path(__file__).with_name("ddp_worker.py")


def _launch(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(TORCHRUN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode,ledger", [("train", "method.owner."), ("wsn", "net.subnetworks.owner"),
                                         ("dst", "net.subnetworks.owner"), ("tinysubnets", "net.subnetworks.owner")])
def test_two_ranks_hold_identical_networks_and_ledgers(tmp_path, data_root, mode, ledger):
    """EideticNets (unit ledger), WSN (scores all-reduced with the network) and DST (drop and
    regrow from all-reduced gradients and momenta) under AdamW weight decay."""
    proc = _launch([str(WORKER), str(tmp_path), str(data_root), mode], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith(ledger) for k in ranks[0])
    if mode in ("wsn", "tinysubnets"):
        assert any(k.startswith("method.own.") for k in ranks[0])  # the scores
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    owned = [int((v >= 0).sum()) for k, v in ranks[0].items() if k.startswith(ledger)]
    assert all(n > 0 for n in owned)  # the ranks agree on a ledger that is really in use
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["max_logit_change"] == 0.0
    # sharded evaluation (151 + 150 samples) sums to exactly the whole-set accuracy
    assert results[0]["test_samples"] % 2 == 1
    assert results[0]["sharded_accuracy"] == pytest.approx(results[0]["whole_accuracy"], abs=1e-12)
    assert results[0]["acc"] > 0.9


def test_diverging_ranks_are_refused(tmp_path, data_root):
    proc = _launch([str(WORKER), str(tmp_path), str(data_root), "diverge"], tmp_path)
    assert proc.returncode != 0
    assert "after task 0: ranks [1] hold a different state from rank 0" in proc.stderr
    assert not list(tmp_path.glob("rank*.safetensors"))


def test_cli_under_torchrun_matches_one_process(tmp_path, data_root):
    """The launcher path: ``torchrun -m sparsecl run``; rank 0 alone writes; the accuracy is
    within one point of the single-process run with the same global batch."""
    common = ["run", "--benchmark", "split-mnist", "--data-root", str(data_root), "--method", "eidetic",
              "--tasks", "3", "--max-train-per-task", "1000", "--max-test-per-task", "500", "--epochs", "2",
              "--batch-size", "32", "--hidden", "64,64", "--no-progress"]
    proc = _launch(["-m", "sparsecl", *common, "--out", str(tmp_path / "ddp")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ACC ") == 1  # rank 1 printed nothing
    single = subprocess.run([sys.executable, "-m", "sparsecl", *common, "--out", str(tmp_path / "one")],
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert ddp["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    assert ddp["max_logit_change"] == 0.0
    assert abs(ddp["acc"] - one["acc"]) <= 0.01, (ddp["acc"], one["acc"])


def test_sampler_covers_every_sample_once_and_marks_repeats():
    n, size = 11, 3
    parts = [distributed.sampler_indices(n, World(r, size), seed=5, epoch=2) for r in range(size)]
    assert all(len(idx) == 4 for idx, _ in parts)  # ceil(11 / 3)
    real = torch.cat([idx[mask] for idx, mask in parts])
    assert sorted(real.tolist()) == list(range(n))
    assert sum(int((~mask).sum()) for _, mask in parts) == 4 * size - n
    again = distributed.sampler_indices(n, World(0, size), seed=5, epoch=3)[0]
    assert not torch.equal(again, parts[0][0]) or n < 4  # a new epoch reshuffles


def test_global_batches_are_the_single_process_batches():
    """Rank r's k-th batch of b/size indices, over all ranks, is the k-th global batch of b."""
    n, size, b = 50, 2, 8
    parts = [distributed.sampler_indices(n, World(r, size), seed=1, epoch=0)[0] for r in range(size)]
    interleaved = torch.stack(parts, 1).flatten()  # the sampler's padded permutation
    local = b // size
    for k in range(0, len(parts[0]), local):
        together = torch.cat([p[k:k + local] for p in parts])
        assert sorted(together.tolist()) == sorted(interleaved[k * size:(k + local) * size].tolist())


def test_shards_cover_the_set_without_padding():
    for n in (0, 1, 7, 100):
        for size in (1, 2, 3):
            covered = [i for r in range(size) for i in range(n)[distributed.shard(n, World(r, size))]]
            assert covered == list(range(n))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="--batch-size 33 is the global batch"):
        distributed.local_batch_size(33, World(0, 2))
    assert distributed.local_batch_size(64, World(1, 2)) == 32
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            mp.delenv(k, raising=False)
        with pytest.raises(ConfigError, match="--dist-backend gloo needs a launch by torchrun"):
            distributed.init_from_env("cpu", "gloo")
        assert distributed.init_from_env("cpu") == (None, "cpu")
    assert env is not None


def test_checksum_sees_every_bit():
    a = {"w": torch.zeros(3), "owner": torch.tensor([-1, 0], dtype=torch.int16)}
    base = distributed.state_checksum(a, {"log": [1]})
    assert base == distributed.state_checksum({k: v.clone() for k, v in a.items()}, {"log": [1]})
    assert base != distributed.state_checksum({**a, "w": torch.tensor([0.0, -0.0, 0.0])}, {"log": [1]})
    assert base != distributed.state_checksum(a, {"log": [2]})
    assert base != distributed.state_checksum({**a, "owner": torch.tensor([-1, 1], dtype=torch.int16)}, {"log": [1]})


def test_state_checksum_leaves_out_wall_clock_timings():
    """Each rank measures its own clock: a method log's ``seconds`` may differ, its decisions may not."""
    a = {"w": torch.tensor([1.0, 2.0])}
    one = {"log": [{"kept": {"fc1": 3}, "seconds": 1.25, "select_seconds": 0.5}]}
    other = {"log": [{"kept": {"fc1": 3}, "seconds": 1.31, "select_seconds": 0.7}]}
    assert distributed.state_checksum(a, one) == distributed.state_checksum(a, other)
    assert distributed.state_checksum(a, one) != distributed.state_checksum(a, {"log": [{"kept": {"fc1": 4},
                                                                                        "seconds": 1.25}]})
