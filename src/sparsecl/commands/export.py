"""``sparsecl export``: one task's subnetwork as a standalone ``torch.export`` program, or every
task's in one compact file."""

from __future__ import annotations

from pathlib import Path

import click

from ..checkpoint import load_checkpoint
from ..compact import write_compact
from ..errors import ConfigError, SparseCLError
from ..export import export_task
from ..runs import restore, spec_of
from .common import check_parent, fail


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--task", "task", type=int, default=None, help="the task whose subnetwork is exported")
@click.option("--compact", is_flag=True, default=False,
              help="instead: every task's subnetwork in one compact file (weight-level methods with task "
                   "masks: WSN, DST, TinySubNets), read back with sparsecl.compact.read_compact or sparsecl eval")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="file to write (a torch.export program, e.g. task3.pt2; with --compact, e.g. model.compact)")
def export(checkpoint, task, compact, out) -> None:
    """Write task TASK's subnetwork, only the units it uses, as a standalone model that plain
    PyTorch loads: ``torch.export.load(OUT).module()(x)`` gives the task's logits for float32
    inputs ``x`` with image pixels divided by 255 (a benchmark's per-channel normalization, if
    any, is part of the exported model).

    With --compact, every task's subnetwork in one file: codebook indices bit-packed at their bit
    width (TinySubNets) or float32 values, codebooks, entropy-coded task masks, and each task's
    biases, BatchNorm and head; read back, every task's logits are bitwise those of the saved model."""
    if compact == (task is not None):
        raise click.ClickException("give --task T (one task's subnetwork) or --compact (every task), not both"
                                   if compact else "give --task T, or --compact for every task")
    try:
        check_parent(out, "--out")
        ckpt = load_checkpoint(checkpoint)
        net, method, _ = restore(ckpt)
        net.eval()
        if compact:
            model = write_compact(out, net, getattr(method, "codebooks", None), spec_of(ckpt),
                                  tuple(ckpt.manifest["input_shape"]), ckpt.manifest.get("normalize"))
            bits = model.bits_per_parameter()
            click.echo(f"wrote {out}: {net.num_tasks} tasks in {out.stat().st_size} bytes, "
                       f"{bits['total']:.3f} bits per parameter of the dense float32 model's "
                       f"{model.dense_parameters} (32 bits each)")
            return
        if not 0 <= task < net.num_tasks:
            raise ConfigError(f"--task {task} is out of range: {ckpt.path} has tasks 0..{net.num_tasks - 1}")
        normalize = (ckpt.manifest.get("normalize") or [None] * net.num_tasks)[task]
        small = export_task(net, task, tuple(ckpt.manifest["input_shape"]), out, normalize)
    except SparseCLError as exc:
        raise fail(exc) from exc
    full = sum(p.numel() for p in net.body.parameters()) + sum(p.numel() for p in net.head_parameters(task))
    kept = sum(p.numel() for p in small.parameters())
    click.echo(f"wrote {out}: task {task}'s subnetwork, {kept} parameters of the full model's {full} "
               f"({100 * kept / full:.1f}%), {out.stat().st_size} bytes; input: float32 of shape "
               f"(N, {', '.join(map(str, ckpt.manifest['input_shape']))}), pixels scaled to [0, 1]")



command = export
