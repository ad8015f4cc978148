"""Continual-learning methods, one module each, all following ``base.Method``."""

from .base import Method
from .clnp import CLNP, CLNPConfig
from .dst import DST, DSTConfig
from .eidetic import EideticConfig, EideticNets
from .finetune import Finetune
from .joint import Joint
from .packnet import PackNet, PackNetConfig
from .tinysubnets import TinySubNets, TinySubNetsConfig
from .wsn import WSN, WSNConfig

#: CLI name → (method class, its hyperparameter dataclass or None)
METHODS = {
    "clnp": (CLNP, CLNPConfig),
    "dst": (DST, DSTConfig),
    "eidetic": (EideticNets, EideticConfig),
    "finetune": (Finetune, None),
    "joint": (Joint, None),
    "packnet": (PackNet, PackNetConfig),
    "tinysubnets": (TinySubNets, TinySubNetsConfig),
    "wsn": (WSN, WSNConfig),
}

__all__ = ["METHODS", "CLNP", "CLNPConfig", "DST", "DSTConfig", "EideticConfig", "EideticNets", "Finetune",
           "Joint", "Method", "PackNet", "PackNetConfig", "TinySubNets", "TinySubNetsConfig", "WSN", "WSNConfig"]
