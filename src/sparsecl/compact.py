"""The compact on-disk form of a weight-level network with per-task masks (WSN, DST-CL and
TinySubNets-style quantized WSN): everything needed to run every task, and nothing else.

For a ``ContinualNetwork`` whose subnetworks are in ``"masks"`` mode, with ``T`` tasks:

* **masks** (section ``masks/{i}``, kind ``"masks"``): per masked layer i, the tasks' masks coded
  jointly with ``storage.entropy_encode`` as WSN's packed task bits, the symbol of a weight being
  ``Σ_t mask_t << t`` (as ``storage.mask_storage_bits`` counts them). With more than
  ``storage.MAX_PACKED_TASKS`` (16) tasks each task's mask is coded on its own (sections
  ``masks/{i}/{t}``, kind ``"mask"``). A weight's owner is not stored: it is the first task whose
  mask holds it (``compact_payload`` checks that the network agrees).
* **values** of the weights task t owns (``owner == t``) in layer i, in row-major order: with a
  codebook of L levels, their indices in it bit-packed at ``max(1, ceil(log2 L))`` bits
  (``storage.pack_uint``; section ``values/{t}/{i}``, kind ``"indices"``) plus the codebook as
  float32 (``codebook/{t}/{i}``, kind ``"codebook"``); without one, raw float32
  (``values/{t}/{i}``, kind ``"raw"``). A (task, layer) owning no weight has no section. Free
  weights (no owner) are not stored: they read back as 0.0.
* **per-task tensors** of task t (``task/{t}/{key}``, kind ``"tensor"``; ``key`` as in
  ``subnetworks.tasks[t].state_dict()``: biases, BatchNorm and other normalization affine
  parameters, running statistics and batch counts, any other per-task parameter or buffer such as a
  class token; the masks are in the mask sections) and its head (``head/{t}/{key}``, kind
  ``"head"``), raw bytes in their own dtype, native byte order (little-endian on every platform
  torch supports).

``write_compact`` writes the sections concatenated as one uint8 tensor ``payload`` of a
``checkpoint.save_checkpoint`` file, with the section table, the run spec, the input shape and
the network structure in its manifest: the checkpoint's SHA-256 over manifest and payload refuses
a truncated or corrupted file. ``read_compact`` rebuilds the network from the spec's model and
checks every section; any inconsistency is a ``CheckpointError`` naming the file and the section.

Sizes (``CompactModel.bits_per_parameter``) count the payload only (the JSON manifest, a few KB
that does not grow with the weights, is left out), against a dense float32 multi-head model of the
same shape: see ``CompactModel``.

The manifest names its content in ``compact_format`` / ``compact_version`` (``format`` and
``version`` are the checkpoint container's own, which ``load_checkpoint`` checks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .data.types import normalization_record
from .errors import CheckpointError, ConfigError
from .ledger import FREE
from .network import ContinualNetwork
from .storage import MAX_PACKED_TASKS, entropy_decode, entropy_encode, pack_uint, unpack_uint

FORMAT = "sparsecl-compact"
VERSION = 1
MAX_LEVELS = 1 << 16  # codebook indices are at most 16 bits

#: codebooks[(task, layer index)] -> sorted 1-D float32 tensor, or None (raw float32)
Codebooks = dict[tuple[int, int], "torch.Tensor | None"]


def index_bits(levels: int) -> int:
    """Bits of one codebook index for ``levels`` entries: ``ceil(log2(levels))``, at least 1."""
    return max(1, (int(levels) - 1).bit_length())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _float32_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


@dataclass
class CompactModel:
    """The compact form of a masks-mode network, in memory (``compact_payload``).

    ``sections``: name → bytes, in payload order; ``description``: one JSON-able dict per
    section (``name``, ``offset`` and ``length`` in the payload in bytes, ``kind``, ``dtype``,
    ``shape``, ``bits``, ``levels``, ``task``, ``layer``; ``None`` where it does not apply). For
    ``indices``: ``shape`` ``[count]``, ``bits`` per index, ``levels`` of the codebook; for
    ``masks``/``mask``: ``shape`` the layer's weight shape, ``levels`` the alphabet (``2**T`` / 2).

    Sizes, with ``payload bytes`` the sum of the sections' lengths:

    * ``total_bits = 8 · payload bytes``.
    * ``dense_parameters``: what a dense float32 multi-head model of the same shape stores (32
      bits each): every weight of every masked layer (once), plus for every task its per-task
      float parameters (``subnetworks.tasks[t].parameters()``: the masked layers' biases, the
      normalization affine weights and biases and any other per-task parameter) and its head's
      parameters (weight and bias). Running statistics and batch counts are buffers, not
      parameters: they are in the payload but not in the count, as the body's own (unused)
      per-task tensors are in neither.
    * ``task_dense_parameters[t]``: every masked-layer weight + task t's per-task float parameters
      + task t's head parameters.
    * ``task_bits[t]``: bits to run task t alone: its masks, each layer's coded on its own with
      ``storage.entropy_encode`` (0/1 symbols), plus every ``values``/``codebook`` section of a
      (task t' <= t, layer i) of which task t's mask uses at least one weight (counted whole),
      plus task t's ``task/`` and ``head/`` sections.
    """

    sections: dict[str, bytes]
    description: list[dict]
    num_tasks: int
    dense_parameters: int
    task_dense_parameters: list[int]
    task_bits: list[int]

    @property
    def payload(self) -> bytes:
        """Every section concatenated, in ``description`` order."""
        return b"".join(self.sections.values())

    @property
    def payload_bytes(self) -> int:
        return sum(len(b) for b in self.sections.values())

    @property
    def total_bits(self) -> int:
        """``8 · payload bytes`` (the manifest is not counted)."""
        return 8 * self.payload_bytes

    def bits_by_kind(self) -> dict[str, int]:
        """Payload bits per section kind (``masks``/``mask``, ``indices``, ``codebook``, ``raw``,
        ``tensor``, ``head``)."""
        out: dict[str, int] = {}
        for d in self.description:
            out[d["kind"]] = out.get(d["kind"], 0) + 8 * d["length"]
        return out

    def bits_per_parameter(self) -> dict:
        """``{"total": total_bits / dense_parameters, "per_task": [task_bits[t] /
        task_dense_parameters[t] for each task], "parts": {kind: bits of that kind /
        dense_parameters}}`` (definitions in the class doc; a dense float32 model is 32)."""
        return {"total": self.total_bits / self.dense_parameters,
                "per_task": [b / n for b, n in zip(self.task_bits, self.task_dense_parameters)],
                "parts": {k: v / self.dense_parameters for k, v in self.bits_by_kind().items()}}


def _masks_subnetworks(net) -> None:
    sub = getattr(net, "subnetworks", None)
    if not isinstance(net, ContinualNetwork) or sub is None or sub.mode != "masks":
        what = ("not a ContinualNetwork" if not isinstance(net, ContinualNetwork) else
                "a network without weight-level subnetworks (a neuron-level or dense method)" if sub is None else
                f"a network with '{sub.mode}' subnetworks")
        raise ConfigError(f"the compact form stores weight-level networks with per-task masks (WSN, DST, "
                          f"TinySubNets); got {what}")
    if sub.num_tasks != net.num_tasks or net.num_tasks == 0:
        raise ConfigError(f"the network has {net.num_tasks} heads and {sub.num_tasks} task subnetworks; the "
                          "compact form needs at least one finished task and one subnetwork per head")


def _indices(values: torch.Tensor, codebook, task: int, i: int, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook as float32 CPU tensor, index of each value), exact bitwise matches only."""
    where = f"task {task}, layer {i} ('{layer}')"
    if not isinstance(codebook, torch.Tensor):
        raise ConfigError(f"codebook of {where} must be a torch.Tensor or None, got {type(codebook).__name__}")
    cb = codebook.detach().cpu()
    if cb.dtype != torch.float32 or cb.dim() != 1 or not 1 <= cb.numel() <= MAX_LEVELS:
        raise ConfigError(f"codebook of {where} must be a 1-D float32 tensor of 1..{MAX_LEVELS} values, got "
                          f"{cb.dtype} of shape {tuple(cb.shape)}")
    if not torch.isfinite(cb).all() or (cb.numel() > 1 and not (cb[1:] >= cb[:-1]).all()):
        raise ConfigError(f"codebook of {where} must be finite and sorted ascending")
    cb = cb.contiguous()
    idx = torch.searchsorted(cb, values).clamp_(max=cb.numel() - 1)
    exact = cb[idx].view(torch.int32) == values.view(torch.int32)  # bitwise: never a rounding
    if not exact.all():
        bad = values[~exact]
        raise ConfigError(f"task {task}, layer {i} ('{layer}'): {bad.numel()} of its {values.numel()} weights are "
                          f"not values of its codebook of {cb.numel()} levels (e.g. {float(bad[0])!r}); quantize "
                          "the task's weights to the codebook before storing it")
    return cb, idx


@torch.no_grad()
def compact_payload(net: ContinualNetwork, codebooks: Codebooks | None = None) -> CompactModel:
    """Build the compact form of ``net`` (masks-mode subnetworks) in memory (layout in the module
    doc). ``codebooks[(t, i)]``: the sorted float32 codebook that every weight task t owns in
    masked layer i is a value of; missing or ``None``: those weights are stored as raw float32.

    Raises:
        ConfigError: ``net`` has no masks-mode subnetworks; a codebook key names no (task, layer);
            a codebook is not a sorted finite 1-D float32 tensor of 1..65536 values; a weight is
            not exactly (bitwise) a value of its codebook (the message names task and layer); an
            owner id is not the first task whose mask holds the weight; a masked weight is not
            float32.
    """
    _masks_subnetworks(net)
    sub = net.subnetworks
    T, L = net.num_tasks, len(sub.layers)
    codebooks = dict(codebooks or {})
    for key in codebooks:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key)
                and 0 <= key[0] < T and 0 <= key[1] < L):
            raise ConfigError(f"codebook key {key!r} is not a (task, layer index) of the network "
                              f"(tasks 0..{T - 1}, layers 0..{L - 1})")
    sections: dict[str, bytes] = {}
    description: list[dict] = []

    def add(name, data, kind, dtype=None, shape=None, bits=None, levels=None, task=None, layer=None):
        description.append({"name": name, "offset": sum(len(b) for b in sections.values()), "length": len(data),
                            "kind": kind, "dtype": dtype, "shape": None if shape is None else list(shape),
                            "bits": bits, "levels": levels, "task": task, "layer": layer})
        sections[name] = data

    owners, masks = [], []  # per layer: owner (flat int64), per-task flat bool masks
    for i, layer in enumerate(sub.layers):
        weight = sub.weight(net.body, i)
        if weight.dtype != torch.float32:
            raise ConfigError(f"layer {i} ('{layer}') has {weight.dtype} weights; the compact form stores float32")
        owner = sub.owner(i).detach().cpu().reshape(-1).long()
        task_masks = [sub.mask(t, i).detach().cpu().reshape(-1) for t in range(T)]
        first = torch.full_like(owner, FREE)
        for t in reversed(range(T)):
            first[task_masks[t]] = t
        if not torch.equal(first, owner):
            n = int((first != owner).sum())
            raise ConfigError(f"layer {i} ('{layer}'): {n} weights have an owner id that is not the first task "
                              "whose mask holds them; the compact form derives owners from the masks")
        owners.append(owner)
        masks.append(task_masks)
        shape = tuple(sub.owner(i).shape)
        if T <= MAX_PACKED_TASKS:
            symbols = torch.zeros(owner.numel(), dtype=torch.int64)
            for t, m in enumerate(task_masks):
                symbols |= m.long() << t
            add(f"masks/{i}", entropy_encode(symbols), "masks", shape=shape, levels=1 << T, layer=i)
        else:
            for t, m in enumerate(task_masks):
                add(f"masks/{i}/{t}", entropy_encode(m), "mask", shape=shape, levels=2, task=t, layer=i)

    value_bits = [[0] * L for _ in range(T)]  # bits of the values/codebook sections of (t, i)
    for t in range(T):
        for i, layer in enumerate(sub.layers):
            own = owners[i] == t
            if not own.any():
                continue
            values = sub.weight(net.body, i).detach().cpu().reshape(-1)[own].contiguous()
            codebook = codebooks.get((t, i))
            if codebook is None:
                add(f"values/{t}/{i}", _float32_bytes(values), "raw", "float32", (values.numel(),), task=t, layer=i)
                value_bits[t][i] = 8 * len(sections[f"values/{t}/{i}"])
                continue
            cb, idx = _indices(values, codebook, t, i, layer)
            bits = index_bits(cb.numel())
            add(f"values/{t}/{i}", pack_uint(idx, bits), "indices", "uint", (values.numel(),), bits, cb.numel(), t, i)
            add(f"codebook/{t}/{i}", _float32_bytes(cb), "codebook", "float32", (cb.numel(),), 32, cb.numel(), t, i)
            value_bits[t][i] = 8 * (len(sections[f"values/{t}/{i}"]) + len(sections[f"codebook/{t}/{i}"]))

    task_tensor_bits = []
    mask_keys = {f"mask{i}" for i in range(L)}
    for t in range(T):
        start = sum(len(b) for b in sections.values())
        for key, tensor in sub.tasks[t].state_dict().items():
            if key not in mask_keys:
                add(f"task/{t}/{key}", _tensor_bytes(tensor), "tensor", _dtype_name(tensor.dtype), tensor.shape, task=t)
        for key, tensor in net.heads[t].state_dict().items():
            add(f"head/{t}/{key}", _tensor_bytes(tensor), "head", _dtype_name(tensor.dtype), tensor.shape, task=t)
        task_tensor_bits.append(8 * (sum(len(b) for b in sections.values()) - start))

    body = sum(o.numel() for o in owners)
    own_params = [sum(p.numel() for p in sub.tasks[t].parameters() if p.is_floating_point())
                  + sum(p.numel() for p in net.heads[t].parameters()) for t in range(T)]
    task_bits = []
    for t in range(T):
        bits = task_tensor_bits[t]
        for i in range(L):
            bits += 8 * len(entropy_encode(masks[i][t]))
            used = owners[i][masks[i][t]]
            bits += sum(value_bits[s][i] for s in range(t + 1) if (used == s).any())
        task_bits.append(bits)
    return CompactModel(sections, description, T, body + sum(own_params), [body + p for p in own_params], task_bits)


def write_compact(path: Path, net: ContinualNetwork, codebooks: Codebooks | None, spec,
                  input_shape, normalize: list | None = None) -> CompactModel:
    """Write the compact form of ``net`` (``compact_payload``) to ``path`` atomically, as a
    ``checkpoint.save_checkpoint`` file: tensor ``payload`` (uint8, every section concatenated)
    and a manifest with ``compact_format`` "sparsecl-compact", ``compact_version`` 1, the run
    ``spec`` (a ``runs.RunSpec`` or its dict, taken as data; ``read_compact`` rebuilds its
    model), ``input_shape``, ``structure``
    (``net.structure()``), ``normalize`` (each task's ``TaskData.normalize`` as
    ``data.types.normalization_record``; ``None`` → none for every task), ``sections`` (the section
    table), ``bits_per_parameter`` and ``dense_parameters``. Returns the ``CompactModel``.

    Raises:
        ConfigError: as ``compact_payload``; ``normalize`` does not have one entry per task.
    """
    compact = compact_payload(net, codebooks)
    if normalize is not None and len(normalize) != net.num_tasks:
        raise ConfigError(f"normalize has {len(normalize)} entries; the network has {net.num_tasks} tasks")
    records = [normalization_record(n) for n in (normalize or [None] * net.num_tasks)]
    manifest = {"compact_format": FORMAT, "compact_version": VERSION, "spec": dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec),
                "input_shape": list(input_shape), "structure": net.structure(), "normalize": records,
                "sections": compact.description, "dense_parameters": compact.dense_parameters,
                "bits_per_parameter": compact.bits_per_parameter()}
    payload = compact.payload
    tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    save_checkpoint(Path(path), manifest, {"payload": tensor})
    return compact


def _model_of(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The untrained model a saved run spec names (``models.build``), read as data: the compact
    format does not import the run machinery (which imports every method, TinySubNets this
    module). Specs saved before models had names (``{"hidden", "dropout"}``) read as the MLP."""
    from .models import build

    model = spec["model"]
    if "name" not in model:
        model = {"name": "mlp", "options": {"hidden": list(model["hidden"]), "dropout": model["dropout"]}}
    return build(model["name"], input_shape, num_classes, **model["options"])


def _from_bytes(data: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    if not data:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


@torch.no_grad()
def read_compact(path: Path, model: nn.Module | None = None) -> tuple[ContinualNetwork, dict]:
    """Read a ``write_compact`` file: the network (CPU, eval mode) that runs every saved task as
    the written one did (owners, masks, weights, per-task tensors and heads; free weights 0.0),
    and the manifest. The user model is built from the manifest's run spec as ``runs.restore``
    does; ``model``: an untrained instance of the user's model instead (a model the registry in
    ``sparsecl.models`` does not build).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt (``load_checkpoint``), is not
            a compact model of this version, does not fit the model, or a section is missing,
            unexpected, of the wrong length or inconsistent (an index outside its codebook, an
            entropy-coded mask that does not decode, values that do not match the owners the
            masks give); the message names the file and the section.
    """
    ckpt = load_checkpoint(path)
    path, manifest = ckpt.path, ckpt.manifest
    if manifest.get("compact_format") != FORMAT:
        raise CheckpointError(f"{path} is a sparsecl checkpoint but not a compact model (its manifest names no "
                              f"'compact_format': '{FORMAT}'); write one with write_compact")
    if manifest.get("compact_version") != VERSION:
        raise CheckpointError(f"compact model {path} has version {manifest.get('compact_version')}; this "
                              f"sparsecl reads version {VERSION}")

    def bad(section: str, why: str) -> CheckpointError:
        return CheckpointError(f"compact model {path}: section '{section}' {why}")

    try:
        structure = manifest["structure"]
        if model is None:
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone; a fixed init
                torch.manual_seed(0)
                model = _model_of(manifest["spec"], tuple(manifest["input_shape"]), structure["head_classes"][0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = ContinualNetwork.restore(model, structure)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"compact model {path} does not fit its model: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}") from None
    sub = net.subnetworks
    if sub is None or sub.mode != "masks" or net.num_tasks == 0:
        raise CheckpointError(f"compact model {path}: its structure has no masks-mode subnetworks with tasks")
    T, L = net.num_tasks, len(sub.layers)

    # ---- the section table
    payload = ckpt.tensors.get("payload")
    if payload is None or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise CheckpointError(f"compact model {path}: tensor 'payload' is missing or not 1-D uint8")
    data = payload.numpy().tobytes()
    table = manifest.get("sections")
    if not isinstance(table, list):
        raise CheckpointError(f"compact model {path}: its manifest has no section table")
    sections: dict[str, tuple[dict, bytes]] = {}
    offset = 0
    for d in table:
        name = d.get("name") if isinstance(d, dict) else None
        if not isinstance(name, str) or name in sections:
            raise CheckpointError(f"compact model {path}: section table entry {d!r} has no name or a repeated one")
        off, length = d.get("offset"), d.get("length")
        if not (isinstance(off, int) and isinstance(length, int)) or off != offset or length < 0:
            raise bad(name, f"is at offset {off} with length {length}; expected offset {offset}")
        offset += length
        if offset > len(data):
            raise bad(name, f"ends at byte {offset} of a payload of {len(data)} bytes")
        sections[name] = (d, data[off:offset])
    if offset != len(data):
        raise CheckpointError(f"compact model {path}: the sections cover {offset} bytes of a payload of {len(data)}")
    used: set[str] = set()

    def take(name: str, kinds: tuple[str, ...]) -> tuple[dict, bytes]:
        if name not in sections:
            raise bad(name, "is missing")
        d, b = sections[name]
        if d.get("kind") not in kinds:
            raise bad(name, f"is of kind {d.get('kind')!r}; expected {' or '.join(kinds)}")
        used.add(name)
        return d, b

    def decode(name: str, kind: str, numel: int, limit: int) -> torch.Tensor:
        _, b = take(name, (kind,))
        try:
            symbols = entropy_decode(b)
        except CheckpointError as exc:
            raise bad(name, f"does not decode: {exc}") from None
        if symbols.size != numel or (symbols.size and (symbols.min() < 0 or symbols.max() >= limit)):
            raise bad(name, f"decodes to {symbols.size} symbols in [{symbols.min() if symbols.size else 0}, "
                            f"{symbols.max() if symbols.size else 0}]; expected {numel} in [0, {limit})")
        return torch.from_numpy(symbols)

    # ---- masks and owners (commit in task order: a weight's owner is the first task using it)
    layer_masks = []  # [i][t] bool, the weight's shape
    for i in range(L):
        shape = tuple(sub.owner(i).shape)
        n = math.prod(shape)
        if T <= MAX_PACKED_TASKS:
            symbols = decode(f"masks/{i}", "masks", n, 1 << T)
            layer_masks.append([((symbols >> t) & 1).bool().view(shape) for t in range(T)])
        else:
            layer_masks.append([decode(f"masks/{i}/{t}", "mask", n, 2).bool().view(shape) for t in range(T)])
    for t in range(T):
        sub.commit(t, [layer_masks[i][t] for i in range(L)])

    # ---- weight values
    for i in range(L):
        weight = sub.weight(net.body, i)
        owner = sub.owner(i).reshape(-1).long()
        flat = torch.zeros(owner.numel(), dtype=torch.float32)
        for t in range(T):
            own = owner == t
            count = int(own.sum())
            name = f"values/{t}/{i}"
            if count == 0:
                continue  # a section for it is left unused and refused below
            d, b = take(name, ("indices", "raw"))
            if d["kind"] == "raw":
                if len(b) != 4 * count:
                    raise bad(name, f"holds {len(b)} bytes; the masks give task {t} {count} weights in layer {i} "
                                    f"({4 * count} bytes of float32)")
                flat[own] = torch.from_numpy(np.frombuffer(b, dtype="<f4").astype(np.float32))
                continue
            cname = f"codebook/{t}/{i}"
            _, cb_bytes = take(cname, ("codebook",))
            levels, bits = d.get("levels"), d.get("bits")
            if not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS or bits != index_bits(levels) \
                    or len(cb_bytes) != 4 * levels:
                raise bad(name, f"has {levels} levels at {bits} bits with a codebook of {len(cb_bytes)} bytes; "
                                "they do not agree")
            try:
                idx = unpack_uint(b, count, bits)
            except CheckpointError as exc:
                raise bad(name, f"does not hold the {count} indices the masks give task {t} in layer {i}: "
                                f"{exc}") from None
            if count and int(idx.max()) >= levels:
                raise bad(name, f"holds index {int(idx.max())} of a codebook of {levels} levels")
            codebook = torch.from_numpy(np.frombuffer(cb_bytes, dtype="<f4").astype(np.float32))
            flat[own] = codebook[idx]
        weight.copy_(flat.view(weight.shape))

    # ---- per-task tensors and heads
    mask_keys = {f"mask{i}" for i in range(L)}
    for t in range(T):
        for prefix, module, kind in (("task", sub.tasks[t], "tensor"), ("head", net.heads[t], "head")):
            for key, tensor in module.state_dict().items():
                if prefix == "task" and key in mask_keys:
                    continue
                name = f"{prefix}/{t}/{key}"
                d, b = take(name, (kind,))
                if d.get("dtype") != _dtype_name(tensor.dtype) or d.get("shape") != list(tensor.shape) \
                        or len(b) != tensor.numel() * tensor.element_size():
                    raise bad(name, f"is {d.get('dtype')} of shape {d.get('shape')} in {len(b)} bytes; the model's "
                                    f"tensor is {_dtype_name(tensor.dtype)} of shape {list(tensor.shape)}")
                tensor.copy_(_from_bytes(b, tensor.dtype, tuple(tensor.shape)))
    extra = sorted(set(sections) - used)
    if extra:
        raise bad(extra[0], f"is not part of the network (the masks give its task no weights there, or the "
                            f"model has no such tensor); {len(extra)} such section(s)")
    return net.eval(), manifest
