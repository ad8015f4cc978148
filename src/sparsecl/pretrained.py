"""Starting a continual run from pretrained weights.

EideticNets' own workflow (and an engineer's with a deployed model) is: pre-train, then add tasks
without moving what the pre-training learned. ``load_initial_weights`` writes a state dict into a
``ContinualNetwork``'s body before its first task; the run's task 0 is then trained (or, for the
pretraining task itself, fine-tuned) from those weights, and every later task leaves it bitwise
intact as usual.

Accepted files:

* a safetensors state dict of the user's model (``safetensors.torch.save_file(model.state_dict(),
  path)``), keyed as ``model.state_dict()``: the keys of the model's final Linear (the head
  prototype, replaced by one head per task) are skipped, a layer or BatchNorm that the unit graph
  split at a concatenation (``sparsecl.graph``) is filled from the model's whole tensor, and a
  grouped convolution held block-diagonal from the model's grouped kernel;
* a safetensors state dict of a ``ContinualNetwork``'s body (``net.body.state_dict()``);
* a sparsecl checkpoint (``checkpoint.safetensors`` or the run folder holding it): its body
  (tensors ``net.body.*``), after the checkpoint's SHA-256 check.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .errors import CheckpointError, ConfigError
from .graph import CAT_SUFFIX, BlockDiagonalConv2d
from .network import ContinualNetwork


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, what)``: the body tensors of ``path`` and a description of the file."""
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"initial weights {path} do not exist (expected a safetensors state dict or a "
                              f"sparsecl checkpoint: a run's --out folder or its {CHECKPOINT_NAME})")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "sparsecl" not in metadata:
                return {k: f.get_tensor(k) for k in f.keys()}, "state dict"
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"initial weights {path} are not a readable safetensors file ({exc})") from None
    try:
        manifest = json.loads(metadata["sparsecl"])
    except ValueError:
        manifest = {}
    if manifest.get("compact_format"):
        raise CheckpointError(f"initial weights {path} are a compact model (sparsecl export --compact), which holds "
                              "only the tasks' masked weights; use the run's checkpoint (its --out folder)")
    ckpt = load_checkpoint(path)
    body = ckpt.group("net.body")
    if not body:
        raise CheckpointError(f"checkpoint {path} holds no network body (no tensor named net.body.*)")
    return body, "checkpoint body"


def _split_parts(body_state: dict[str, torch.Tensor], key: str) -> list[str]:
    """The body keys of a tensor whose module was split at a concatenation: ``{module}.{attr}``,
    ``{module}__cat1.{attr}``, … (just ``[key]`` when not split)."""
    module, _, attr = key.rpartition(".")
    parts, k = [key], 1
    while f"{module}{CAT_SUFFIX}{k}.{attr}" in body_state:
        parts.append(f"{module}{CAT_SUFFIX}{k}.{attr}")
        k += 1
    return parts


def _listed(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@torch.no_grad()
def load_initial_weights(net: ContinualNetwork, path: str | Path) -> dict[str, list[str]]:
    """Load the weights in ``path`` (module doc: a safetensors state dict of the model or of a
    body, or a sparsecl checkpoint's body) into ``net.body`` before the first task. Every tensor
    of the body must be given, with its shape; values are copied (cast to the body's dtype, on
    its device).

    Returns ``{"loaded": body keys written, "skipped": keys of the model's final Linear}``.

    Raises:
        ConfigError: ``net`` already has tasks (the weights must be in place before task 0).
        CheckpointError: the file is missing or unreadable, a compact model, or does not fit the
            body: the message names the file and the missing, unexpected and mismatched keys
            (with both shapes).
    """
    path = Path(path)
    if net.num_tasks:
        raise ConfigError(f"initial weights are loaded before the first task; the network already has "
                          f"{net.num_tasks} task(s)")
    given, what = _read(path)
    body_state = net.body.state_dict()
    head = net.graph.head_name
    values: dict[str, torch.Tensor] = {}
    skipped, unexpected, mismatched = [], [], []
    for key, tensor in given.items():
        if head and key.startswith(head + "."):
            skipped.append(key)
            continue
        parts = _split_parts(body_state, key)
        if parts[0] not in body_state:
            unexpected.append(key)
        elif len(parts) > 1 and parts[1] not in given:
            # the user model's whole tensor of a module split at a concatenation: its columns
            # (a layer's weight) or channels (a BatchNorm's tensors) go to the ranges in order
            if tensor.dim() == 0:
                values.update({part: tensor for part in parts})
                continue
            dim = 1 if body_state[key].dim() >= 2 else 0
            widths = [body_state[p].shape[dim] for p in parts]
            if tensor.dim() <= dim or tensor.shape[dim] != sum(widths):
                mismatched.append(f"{key} (file {tuple(tensor.shape)}, model {tuple(body_state[key].shape)} "
                                  f"split at a concatenation into {widths} along dim {dim})")
                continue
            values.update(zip(parts, torch.split(tensor, widths, dim)))
        else:
            module = net.body.get_submodule(key.rpartition(".")[0])
            if isinstance(module, BlockDiagonalConv2d) and key.endswith(".weight") and tensor.shape != module.weight.shape \
                    and tensor.dim() == 4 and tensor.shape[1] * module.blocks == module.in_channels:
                tensor = module.expand(tensor.to(module.weight.dtype))  # the model's grouped kernel
            values[key] = tensor
    for key, tensor in list(values.items()):
        if tuple(tensor.shape) != tuple(body_state[key].shape):
            mismatched.append(f"{key} (file {tuple(tensor.shape)}, model {tuple(body_state[key].shape)})")
    missing = [k for k in body_state if k not in values]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if mismatched:
        problems.append(f"mismatched shapes: {_listed(mismatched)}")
    if problems:
        raise CheckpointError(f"initial weights {path} ({what}, {len(given)} tensors) do not fit the model's body "
                              f"({len(body_state)} tensors): " + "; ".join(problems))
    for key, tensor in values.items():
        body_state[key].copy_(tensor)
    return {"loaded": sorted(values), "skipped": sorted(skipped)}
