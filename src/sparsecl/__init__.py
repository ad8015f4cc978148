"""sparsecl: continual learning with sparse subnetworks — prune, freeze, recycle; zero forgetting
verified bit for bit.

The names below are imported on first use (PEP 562), so that ``import sparsecl.<module>`` (the
command line, the report) does not pay for torch and every method unless it needs them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:  # one source of the version: pyproject.toml, through the installed package's metadata
    __version__ = version("sparsecl")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

#: public name -> the submodule that defines it
_EXPORTS = {
    "Benchmark": ".data",
    "TaskData": ".data",
    "load_benchmark": ".data",
    "ContinualNetwork": ".network",
    "RunResult": ".trainer",
    "TrainConfig": ".trainer",
    "Trainer": ".trainer",
    **{name: ".methods" for name in (
        "CLNP", "CLNPConfig", "DST", "DSTConfig", "EWC", "EWCConfig", "EideticConfig", "EideticNets", "Finetune",
        "Joint", "LwF", "LwFConfig", "Method", "PackNet", "PackNetConfig", "SI", "SIConfig", "SingleTask",
        "TinySubNets", "TinySubNetsConfig", "WSN", "WSNConfig")},
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsecl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .data import Benchmark, TaskData, load_benchmark
    from .methods import (CLNP, DST, EWC, SI, WSN, CLNPConfig, DSTConfig, EideticConfig, EideticNets, EWCConfig,
                          Finetune, Joint, LwF, LwFConfig, Method, PackNet, PackNetConfig, SIConfig, SingleTask,
                          TinySubNets, TinySubNetsConfig, WSNConfig)
    from .network import ContinualNetwork
    from .trainer import RunResult, TrainConfig, Trainer
