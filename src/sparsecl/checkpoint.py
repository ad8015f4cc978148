"""Checkpoints: one safetensors file holding every tensor of a run at a task boundary, with a JSON
manifest in the file's header metadata (network structure, method state, the task loop's rows
and probes, the run's options, versions, the torch RNG state), and a SHA-256 of the manifest and
of every tensor.

Written atomically (``atomic.write_atomic``): a crash leaves the previous checkpoint in place,
never half of a new one. Loading parses the header as JSON and the tensors with safetensors, so
nothing in the file is ever executed (no pickle). A truncated file, a flipped byte (the SHA-256
covers the manifest and every tensor byte; the header must parse and match the data), a file of
another format or version, and a checkpoint that does not fit the model or method raise
``CheckpointError``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from . import metrics
from .atomic import write_atomic
from .errors import CheckpointError

FORMAT = "sparsecl-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``manifest`` (JSON) and ``tensors`` (name → tensor)."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``prefix + '.'``, with the prefix removed."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def _digest(manifest_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(manifest_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (moved to CPU) and ``manifest`` to ``path`` atomically; returns ``path``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps({"format": FORMAT, "version": VERSION, "versions": metrics.versions(), **manifest},
                      allow_nan=False)
    data = save_tensors(tensors, metadata={"sparsecl": text, "sha256": _digest(text, tensors)})
    return write_atomic(Path(path), lambda f: f.write(data))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a checkpoint file (or ``RUN_DIR/checkpoint.safetensors`` for a folder).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or not a sparsecl checkpoint of
            this version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (a run writes it to --out DIR/{CHECKPOINT_NAME} "
                              "after every task)")
    data = path.read_bytes()
    bad = lambda why: CheckpointError(f"checkpoint {path} is unreadable: {why}; it is truncated, "  # noqa: E731
                                      "corrupt or not a sparsecl checkpoint")
    if len(data) < 8:
        raise bad(f"{len(data)} bytes, fewer than a safetensors header needs")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise bad(f"the header claims {size} bytes but the file has {len(data) - 8} after it")
    try:
        metadata = json.loads(data[8:8 + size])["__metadata__"]
        text, digest = metadata["sparsecl"], metadata["sha256"]
        manifest = json.loads(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise bad(f"its header is not valid ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad("its manifest does not name the sparsecl checkpoint format")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {manifest.get('version')}; this "
                              f"sparsecl reads version {VERSION}")
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise bad(f"safetensors cannot read its tensors ({exc})") from None
    if _digest(text, tensors) != digest:
        raise bad("the SHA-256 of its manifest and tensors does not match the one recorded when it was written")
    return Checkpoint(path, manifest, tensors)


def save_network(net, path: Path, info: dict | None = None) -> Path:
    """Save a trained ``ContinualNetwork`` (e.g. ``RunResult.network``) to ``path`` (safetensors,
    atomically): its ``state_dict`` and its ``structure()`` (heads, widened layers, subnetworks),
    plus ``info`` (JSON-serializable, yours). Read it back with :func:`load_network` and the
    same model class.

    Raises:
        OutputError: the file cannot be written."""
    from .errors import OutputError

    manifest = {"network": net.structure(), "tasks_done": net.num_tasks, "info": info or {}}
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    try:
        return save_checkpoint(Path(path), manifest, tensors)
    except OSError as exc:
        raise OutputError(f"cannot write the network to {path} ({exc.strerror or exc})") from None


def load_network(model, path: Path):
    """The ``ContinualNetwork`` saved in ``path`` by :func:`save_network` (or the network of a
    run's checkpoint, ``RUN_DIR/checkpoint.safetensors``), rebuilt around ``model`` — an
    untrained instance of the same ``nn.Module`` class and shape — with every task's head,
    in eval mode. ``net(x, t)`` then gives task t's logits, bitwise those of the saved network
    on the same device.

    Raises:
        CheckpointError: the file is missing or corrupt, holds no network, or does not fit
            ``model`` (the message names the tensors)."""
    from .errors import ConfigError
    from .network import ContinualNetwork

    ckpt = load_checkpoint(path)
    structure = ckpt.manifest.get("network", ckpt.manifest.get("structure"))
    if not isinstance(structure, dict):
        raise CheckpointError(f"{ckpt.path} holds no network (it was not written by save_network or a run)")
    try:
        net = ContinualNetwork.restore(model, structure)
        net.load_state_dict(ckpt.group("net"))
    except (RuntimeError, KeyError, IndexError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{ckpt.path} does not fit the model given to load_network "
                              f"({type(model).__name__}): {' '.join(str(exc).split())[:400]}") from None
    return net.eval()
