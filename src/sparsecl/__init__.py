"""sparsecl: continual learning with sparse subnetworks — prune, freeze, recycle; zero forgetting
verified bit for bit."""

__version__ = "0.1.0"

from .data import load_benchmark  # noqa: E402
from .methods import EideticConfig, EideticNets, Finetune, Joint, Method  # noqa: E402
from .network import ContinualNetwork  # noqa: E402
from .trainer import RunResult, TrainConfig, Trainer  # noqa: E402

__all__ = ["ContinualNetwork", "EideticConfig", "EideticNets", "Finetune", "Joint", "Method",
           "RunResult", "TrainConfig", "Trainer", "load_benchmark", "__version__"]
