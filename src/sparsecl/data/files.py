"""Where each data set's files are: folder and file names under the data root, shared by the
readers (``formats``) and the downloader (``download``) so that neither imports the other's
module for them."""

from __future__ import annotations

#: Data sets stored in the MNIST layout (``<root>/<name>/raw/<file>[.gz]``).
MNIST_LIKE_DATASETS = ("MNIST", "FashionMNIST")

#: CIFAR data sets read from the official Python pickles.
CIFAR_DATASETS = ("CIFAR10", "CIFAR100")

#: Folder (under the data root) of each CIFAR data set, as extracted from the official archive.
CIFAR_FOLDERS: dict[str, str] = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}


def mnist_like_file_names(train: bool) -> tuple[str, str]:
    """File names (without ``.gz``) of the images and labels of the train or test split."""
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def cifar_file_names(dataset: str, train: bool) -> tuple[str, ...]:
    """Names of the files holding the train or test split of ``dataset`` in its folder."""
    if dataset == "CIFAR10":
        return tuple(f"data_batch_{i}" for i in range(1, 6)) if train else ("test_batch",)
    return ("train",) if train else ("test",)
