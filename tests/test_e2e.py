"""End to end on real Split MNIST (a subset): EideticNets learns every task and forgets nothing;
fine-tuning on the same stream forgets."""

import pytest

from sparsecl.data import load_benchmark
from sparsecl.methods import EideticConfig, EideticNets, Finetune
from sparsecl.models import mlp
from sparsecl.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def split_mnist(data_root):
    return load_benchmark("split-mnist", data_root=data_root, max_train_per_task=2000,
                          max_test_per_task=1000, seed=0)


def test_eidetic_on_real_split_mnist(split_mnist):
    method = EideticNets(EideticConfig(score="taylor", patience=3, prune_step=0.1, tolerance=0.005))
    result = Trainer(method, TrainConfig(epochs=5, batch_size=64, lr=1e-3, seed=0)).fit(
        mlp((1, 28, 28), (100, 100), 2), split_mnist)
    assert result.acc >= 0.97
    assert result.max_logit_change == 0.0
    assert result.bwt == 0.0 and result.forgetting == 0.0
    assert all(0 < used[-1] < 1 for used in result.capacity.values())


def test_finetune_on_real_split_mnist_forgets(split_mnist):
    result = Trainer(Finetune(), TrainConfig(epochs=5, batch_size=64, lr=1e-3, seed=0)).fit(
        mlp((1, 28, 28), (100, 100), 2), split_mnist)
    assert result.forgetting > 0 and result.max_logit_change > 0
