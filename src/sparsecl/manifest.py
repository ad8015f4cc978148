"""Schema of a run checkpoint's manifest, checked when the checkpoint is loaded.

A checkpoint's SHA-256 only detects accidents: anyone can edit the manifest and recompute it. So
the manifest is untrusted input: :func:`validate_run_manifest` checks every field's type and
range (and the shapes of the probe and RNG tensors) before anything is built from it, and the
error names the field (``spec.train.lr``, ``run.rows[1][0]``...). Run-time options (data root,
download, device, output paths) are never read from a manifest: :data:`RUNTIME_OPTIONS` are
dropped from the stream's options (:func:`stream_options`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

#: Options that say where a run reads data, not what it learns: only the command line or the
#: API call gives them, never a file.
RUNTIME_OPTIONS = frozenset({"data_root", "download"})


class _Bad(Exception):
    def __init__(self, field: str, expected: str, got: Any = ...):
        self.field, self.expected, self.got = field, expected, got


def _fail(field: str, expected: str, got: Any = ...):
    raise _Bad(field, expected, got)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _dict(field: str, x: Any) -> dict:
    if not isinstance(x, dict):
        _fail(field, "an object", x)
    if not all(isinstance(k, str) for k in x):
        _fail(field, "an object with string keys", x)
    return x


def _list(field: str, x: Any) -> list:
    if not isinstance(x, list):
        _fail(field, "a list", x)
    return x


def _int(field: str, x: Any, minimum: int | None = None) -> int:
    if not _is_int(x) or (minimum is not None and x < minimum):
        _fail(field, "an integer" + ("" if minimum is None else f" >= {minimum}"), x)
    return x


def _num(field: str, x: Any, lo: float | None = None, hi: float | None = None) -> float:
    if not _is_num(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = "" if lo is None and hi is None else f" in [{lo}, {hi if hi is not None else 'inf'}]"
        _fail(field, "a finite number" + rng, x)
    return x


def _scalar(field: str, x: Any) -> None:
    """An option value: null, a bool, a string, an integer or a finite number."""
    if x is None or isinstance(x, (bool, str)) or _is_int(x):
        return
    _num(field, x)


def validate_spec(spec: Any, path: Path) -> None:
    """Check the ``spec`` field alone (what ``runs.RunSpec`` is built from).

    Raises:
        CheckpointError: naming the file and the field.
    """
    try:
        _validate_spec(spec)
    except _Bad as bad:
        raise _error(bad, path) from None


def _error(bad: _Bad, path: Path) -> CheckpointError:
    got = "" if bad.got is ... else f", got {_show(bad.got)}"
    return CheckpointError(f"checkpoint {path}: manifest field '{bad.field}' must be {bad.expected}{got}")


def _validate_spec(spec: Any) -> None:
    from .data.benchmarks import BENCHMARKS
    from .methods import METHODS
    from .config import TrainConfig

    spec = _dict("spec", spec)
    for key in ("stream", "model", "method"):
        if key not in spec:
            _fail(f"spec.{key}", "present")
    extra = sorted(set(spec) - {"stream", "model", "method", "method_options", "train"})
    if extra:
        _fail(f"spec.{extra[0]}", "absent (not a run spec field)")
    stream = _list("spec.stream", spec["stream"])
    if not stream:
        _fail("spec.stream", "a non-empty list of benchmark segments", stream)
    for i, seg in enumerate(stream):
        f = f"spec.stream[{i}]"
        _dict(f, seg)
        if seg.get("benchmark") not in BENCHMARKS:
            _fail(f"{f}.benchmark", f"one of {', '.join(BENCHMARKS)}", seg.get("benchmark"))
        _int(f"{f}.seed", seg.get("seed"))
        for k, v in _dict(f"{f}.options", seg.get("options", {})).items():
            _scalar(f"{f}.options.{k}", v)
    model = _dict("spec.model", spec["model"])
    if "name" in model:
        if not isinstance(model["name"], str):
            _fail("spec.model.name", "a string", model["name"])
        for k, v in _dict("spec.model.options", model.get("options")).items():
            if isinstance(v, list):
                for j, w in enumerate(v):
                    _int(f"spec.model.options.{k}[{j}]", w, 1)
            else:
                _scalar(f"spec.model.options.{k}", v)
    else:  # runs saved before models had names: the MLP
        for j, w in enumerate(_list("spec.model.hidden", model.get("hidden"))):
            _int(f"spec.model.hidden[{j}]", w, 1)
        _num("spec.model.dropout", model.get("dropout"), 0.0, 1.0)
    if not isinstance(model.get("single_head"), bool):
        _fail("spec.model.single_head", "true or false", model.get("single_head"))
    if model.get("init_weights") is not None:  # --init-weights: where the initial weights came from
        init = _dict("spec.model.init_weights", model["init_weights"])
        for k in ("path", "sha256"):
            if not isinstance(init.get(k), str):
                _fail(f"spec.model.init_weights.{k}", "a string", init.get(k))
    if spec["method"] not in METHODS:
        _fail("spec.method", f"one of {', '.join(sorted(METHODS))}", spec["method"])
    for k, v in _dict("spec.method_options", spec.get("method_options", {})).items():
        _scalar(f"spec.method_options.{k}", v)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for k, v in _dict("spec.train", spec.get("train", {})).items():
        f = f"spec.train.{k}"
        if k not in fields or k in ("device", "progress", "loss"):
            _fail(f, "absent (not a saved training option)")
        kind = str(fields[k].type)
        if kind == "int":
            _int(f, v)
        elif kind == "float":
            _num(f, v)
        elif kind == "bool":
            if not isinstance(v, bool):
                _fail(f, "true or false", v)
        elif not isinstance(v, str):
            _fail(f, "a string", v)


def _validate_run(run: Any, tasks_done: int) -> None:
    run = _dict("run", run)
    rows = _list("run.rows", run.get("rows"))
    if len(rows) != tasks_done:
        _fail("run.rows", f"a list of {tasks_done} rows (tasks_done)", f"{len(rows)} rows")
    for t, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != t + 1:
            _fail(f"run.rows[{t}]", f"a list of {t + 1} accuracies", row)
        for i, a in enumerate(row):
            if a is None and i < t:  # an earlier task not re-evaluated after task t (--eval-every)
                continue
            _num(f"run.rows[{t}][{i}]", a, 0.0, 1.0)
    for name, values in _dict("run.capacity", run.get("capacity")).items():
        for j, v in enumerate(_list(f"run.capacity.{name}", values)):
            _num(f"run.capacity.{name}[{j}]", v, 0.0)
    for name, entry in _dict("run.reuse", run.get("reuse")).items():
        for key, counts in _dict(f"run.reuse.{name}", entry).items():
            for j, n in enumerate(_list(f"run.reuse.{name}.{key}", counts)):
                _int(f"run.reuse.{name}.{key}[{j}]", n, 0)
    seconds = _list("run.seconds", run.get("seconds"))
    for j, s in enumerate(seconds):
        _num(f"run.seconds[{j}]", s, 0.0)
    change = run.get("max_change")
    if change != "inf":
        _num("run.max_change", change, 0.0)
    for key, values in _dict("run.bits", run.get("bits", {})).items():
        for j, v in enumerate(_list(f"run.bits.{key}", values)):
            _num(f"run.bits.{key}[{j}]", v, 0.0)
    if run.get("routing") is not None:
        _dict("run.routing", run["routing"])


def validate_run_manifest(manifest: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Check a run checkpoint's manifest and the shapes of its probe and RNG tensors.

    Raises:
        CheckpointError: naming the file, the field (e.g. ``spec.train.lr``) and what it must be.
    """
    try:
        _validate_spec(manifest.get("spec"))
        done = _int("tasks_done", manifest.get("tasks_done"), 1)
        _int("total_tasks", manifest.get("total_tasks"), max(done, 1))
        shape = _list("input_shape", manifest.get("input_shape"))
        if not 1 <= len(shape) <= 4:
            _fail("input_shape", "a list of 1 to 4 positive integers", shape)
        for j, d in enumerate(shape):
            _int(f"input_shape[{j}]", d, 1)
        structure = _dict("structure", manifest.get("structure"))
        heads = _list("structure.head_classes", structure.get("head_classes"))
        if len(heads) != done:
            _fail("structure.head_classes", f"a list of {done} class counts (tasks_done)", heads)
        for j, c in enumerate(heads):
            _int(f"structure.head_classes[{j}]", c, 1)
        if not isinstance(manifest.get("method"), str):
            _fail("method", "a string", manifest.get("method"))
        _dict("method_state", manifest.get("method_state", {}))
        if not isinstance(manifest.get("device", "cpu"), str):
            _fail("device", "a string", manifest.get("device"))
        _int("world_size", manifest.get("world_size", 1), 1)
        norms = manifest.get("normalize")
        if norms is not None:
            for j, n in enumerate(_list("normalize", norms)):
                if n is None:
                    continue
                if not (isinstance(n, list) and len(n) == 2 and all(isinstance(v, list) and v for v in n)):
                    _fail(f"normalize[{j}]", "null or [means, stds]", n)
                for v in n[0]:
                    _num(f"normalize[{j}][0]", v)
                for v in n[1]:
                    if not (_is_num(v) and v > 0):
                        _fail(f"normalize[{j}][1]", "a list of positive numbers", n[1])
        _validate_run(manifest.get("run"), done)
        _validate_tensors(tensors, tuple(shape), heads, done)
    except _Bad as bad:
        raise _error(bad, path) from None


def _validate_tensors(tensors: dict[str, torch.Tensor], input_shape: tuple, heads: list, done: int) -> None:
    rng = tensors.get("rng.torch")
    want = torch.get_rng_state()
    if rng is None or rng.dtype != want.dtype or tuple(rng.shape) != tuple(want.shape):
        got = "missing" if rng is None else f"{rng.dtype} of shape {tuple(rng.shape)}"
        _fail("tensor rng.torch", f"{want.dtype} of shape {tuple(want.shape)} (the torch RNG state)", got)
    for i in range(done):
        x, logits = tensors.get(f"run.probe_x.{i}"), tensors.get(f"run.probe_logits.{i}")
        if x is None or logits is None:
            _fail(f"tensor run.probe_x.{i} / run.probe_logits.{i}", "present (task {i}'s probe)", "missing")
        if x.dim() != 1 + len(input_shape) or tuple(x.shape[1:]) != input_shape:
            _fail(f"tensor run.probe_x.{i}", f"of shape (n, {', '.join(map(str, input_shape))})", tuple(x.shape))
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            _fail(f"tensor run.probe_x.{i}", "uint8 or floating point", str(x.dtype))
        if not logits.is_floating_point() or tuple(logits.shape) != (x.shape[0], heads[i]):
            _fail(f"tensor run.probe_logits.{i}", f"floating point of shape ({x.shape[0]}, {heads[i]})",
                  f"{logits.dtype} {tuple(logits.shape)}")


def _show(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def stream_options(options: dict) -> dict:
    """A saved segment's benchmark options without the run-time ones (:data:`RUNTIME_OPTIONS`)."""
    return {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}
