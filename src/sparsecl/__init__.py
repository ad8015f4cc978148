"""sparsecl: continual learning with sparse subnetworks — prune, freeze, recycle; zero forgetting
verified bit for bit."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of the version: pyproject.toml, through the installed package's metadata
    __version__ = version("sparsecl")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

from .data import load_benchmark  # noqa: E402
from .methods import CLNP, CLNPConfig, EideticConfig, EideticNets, Finetune, Joint, Method  # noqa: E402
from .network import ContinualNetwork  # noqa: E402
from .trainer import RunResult, TrainConfig, Trainer  # noqa: E402

__all__ = ["CLNP", "CLNPConfig", "ContinualNetwork", "EideticConfig", "EideticNets", "Finetune", "Joint", "Method",
           "RunResult", "TrainConfig", "Trainer", "load_benchmark", "__version__"]
