"""Data layer: IDX readers, checksum-verified downloads and continual-learning benchmarks."""

from .benchmarks import BENCHMARKS, load_benchmark
from .download import download_mnist_like
from .formats import load_mnist_like, read_idx
from .types import Benchmark, TaskData

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "TaskData",
    "download_mnist_like",
    "load_benchmark",
    "load_mnist_like",
    "read_idx",
]
