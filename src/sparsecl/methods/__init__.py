"""Continual-learning methods, one module each, all following ``base.Method``."""

import dataclasses
import re

from ..errors import ConfigError
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



def _argument_terms(config_cls: type) -> None:
    """Method configs check their fields in ``__post_init__`` with messages in the command
    line's terms (``--prune-step``), which the CLI prints; a Python caller gets the same message
    in argument terms (``EideticConfig(prune_step=...)``), the flag wording kept as ``cli``."""
    check = config_cls.__dict__.get("__post_init__")
    if check is None:
        return
    fields = {f.name for f in dataclasses.fields(config_cls)}

    def api(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        return f"{config_cls.__name__}({name}=...)" if name in fields else match.group(0)

    def __post_init__(self) -> None:
        try:
            check(self)
        except ConfigError as exc:
            if exc.cli is not None:  # already in both terms (a config built on another one)
                raise
            text = str(exc)
            raise ConfigError(re.sub(r"--([a-z][a-z0-9-]*)", api, text), cli=text) from None

    config_cls.__post_init__ = __post_init__


for _, _config in METHODS.values():
    if _config is not None:
        _argument_terms(_config)

__all__ = ["METHODS", "CLNP", "CLNPConfig", "DST", "DSTConfig", "EWC", "EWCConfig", "EideticConfig", "EideticNets",
           "Finetune", "Joint", "LwF", "LwFConfig", "Method", "PackNet", "PackNetConfig", "SI", "SIConfig",
           "SingleTask", "TinySubNets", "TinySubNetsConfig", "WSN", "WSNConfig"]
