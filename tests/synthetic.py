"""Small learnable tasks made of Gaussian clusters, for fast engine tests (real data is tested in
test_e2e.py and the data-layer tests)."""

from __future__ import annotations

import torch

from sparsecl.data.types import Benchmark, TaskData


def cluster_benchmark(num_tasks: int = 3, classes: int = 3, dim: int = 20, n_train: int = 240,
                      n_test: int = 120, seed: int = 0, noise: float = 0.6) -> Benchmark:
    """Each task: ``classes`` Gaussian clusters in ``dim`` dimensions with task-specific centres;
    inputs are float32 ``(N, dim)``, labels int64 ``(N,)``."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(num_tasks):
        centres = torch.randn(classes, dim, generator=g) * 1.5

        def draw(n):
            y = torch.randint(0, classes, (n,), generator=g)
            return centres[y] + noise * torch.randn(n, dim, generator=g), y

        (xtr, ytr), (xva, yva), (xte, yte) = draw(n_train), draw(n_test // 2), draw(n_test)
        tasks.append(TaskData(t, f"clusters:{t}", tuple(range(classes)), xtr, ytr, xva, yva, xte, yte))
    return Benchmark("clusters", tasks, (dim,), {"seed": seed})


class ChecksOldLogits:
    """Mixin for an isolation method: at the end of every task, every earlier task's logits on
    its own random inputs ``(64, dim)`` must be bitwise equal to those recorded when it ended (a
    check independent of the trainer's probe batches)."""

    input_shape: tuple[int, ...] = (20,)

    def end_task(self, session):
        super().end_task(session)
        net = session.net.eval()
        records = self.__dict__.setdefault("records", [])
        with torch.no_grad():
            for i, (x, logits) in enumerate(records):
                assert torch.equal(net(x, i), logits), f"task {i} changed after task {session.t}"
            x = torch.randn(64, *self.input_shape)
            records.append((x, net(x, session.t)))


def image_benchmark(num_tasks: int = 3, classes: int = 3, shape: tuple[int, int, int] = (3, 8, 8),
                    n_train: int = 150, n_test: int = 90, seed: int = 0, noise: float = 0.8) -> Benchmark:
    """Each task: ``classes`` random prototype images ``shape`` with task-specific values, plus
    noise; inputs float32 ``(N, *shape)``, labels int64 ``(N,)``. For convolutional engine tests."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(num_tasks):
        protos = torch.randn(classes, *shape, generator=g)

        def draw(n):
            y = torch.randint(0, classes, (n,), generator=g)
            return protos[y] + noise * torch.randn(n, *shape, generator=g), y

        (xtr, ytr), (xva, yva), (xte, yte) = draw(n_train), draw(n_test // 2), draw(n_test)
        tasks.append(TaskData(t, f"images:{t}", tuple(range(classes)), xtr, ytr, xva, yva, xte, yte))
    return Benchmark("images", tasks, shape, {"seed": seed})
