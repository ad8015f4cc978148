"""Continual-learning methods, one module each, all following ``base.Method``."""

from .base import Method
from .clnp import CLNP, CLNPConfig
from .dst import DST, DSTConfig
from .eidetic import EideticConfig, EideticNets
from .ewc import EWC, EWCConfig
from .finetune import Finetune
from .joint import Joint
from .lwf import LwF, LwFConfig
from .packnet import PackNet, PackNetConfig
from .si import SI, SIConfig
from .single_task import SingleTask
from .tinysubnets import TinySubNets, TinySubNetsConfig
from .wsn import WSN, WSNConfig

#: CLI name → (method class, its hyperparameter dataclass or None)
METHODS = {
    "clnp": (CLNP, CLNPConfig),
    "dst": (DST, DSTConfig),
    "eidetic": (EideticNets, EideticConfig),
    "ewc": (EWC, EWCConfig),
    "finetune": (Finetune, None),
    "joint": (Joint, None),
    "lwf": (LwF, LwFConfig),
    "packnet": (PackNet, PackNetConfig),
    "si": (SI, SIConfig),
    "single-task": (SingleTask, None),
    "tinysubnets": (TinySubNets, TinySubNetsConfig),
    "wsn": (WSN, WSNConfig),
}

__all__ = ["METHODS", "CLNP", "CLNPConfig", "DST", "DSTConfig", "EWC", "EWCConfig", "EideticConfig", "EideticNets",
           "Finetune", "Joint", "LwF", "LwFConfig", "Method", "PackNet", "PackNetConfig", "SI", "SIConfig",
           "SingleTask", "TinySubNets", "TinySubNetsConfig", "WSN", "WSNConfig"]
