"""Data layer: IDX and CIFAR readers, checksum-verified downloads, augmentation and
continual-learning benchmarks."""

from .augment import random_crop_flip
from .benchmarks import BENCHMARKS, load_benchmark
from .download import download_cifar, download_mnist_like
from .formats import cifar_class_names, load_cifar, load_mnist_like, read_cifar_pickle, read_idx
from .types import Benchmark, TaskData

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "TaskData",
    "cifar_class_names",
    "download_cifar",
    "download_mnist_like",
    "load_benchmark",
    "load_cifar",
    "load_mnist_like",
    "random_crop_flip",
    "read_cifar_pickle",
    "read_idx",
]
