"""The compact on-disk form of masks-mode weight-level networks (``sparsecl.compact``): a bitwise
round trip of every task's logits, owners and masks; its size in bits per parameter; refusal of
truncated, corrupted and inconsistent files and of values outside their codebook."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sparsecl.checkpoint import load_checkpoint, save_checkpoint
from sparsecl.compact import compact_payload, index_bits, read_compact, write_compact
from sparsecl.errors import CheckpointError, ConfigError
from sparsecl.ledger import FREE
from sparsecl.methods import WSN, WSNConfig
from sparsecl.models import mlp
from sparsecl.network import ContinualNetwork
from sparsecl.runs import RunSpec, _user_model
from sparsecl.storage import entropy_encode, mask_storage_bits
from sparsecl.trainer import TrainConfig, Trainer
from synthetic import cluster_benchmark, image_benchmark
from test_conv import tiny_convnet

HIDDEN = [128, 128]
MLP_SPEC = RunSpec([{"benchmark": "clusters", "seed": 0, "options": {}}],
                   {"name": "mlp", "options": {"hidden": HIDDEN}, "single_head": False}, "wsn", {"density": 0.5})


@pytest.fixture(scope="module")
def trained_mlp():
    """A WSN MLP (20 → 128 → 128 → 3 classes) at c = 0.5 after 3 tasks, and its benchmark."""
    bench = cluster_benchmark(num_tasks=3, n_train=120, n_test=60)
    torch.manual_seed(0)
    net = ContinualNetwork(_user_model(MLP_SPEC, (20,), 3))
    Trainer(WSN(WSNConfig(density=0.5)), TrainConfig(epochs=1, batch_size=32)).fit(net, bench)
    return net, bench


@torch.no_grad()
def quantize(net: ContinualNetwork, levels: int = 16, raw: tuple = ()) -> dict:
    """The test's stand-in for TinySubNets' k-means: every task's owned weights of every layer
    replaced by the nearest of ``levels`` quantiles of them; (task, layer) pairs in ``raw`` keep
    their float32 values (codebook None). Returns the codebooks."""
    sub, codebooks = net.subnetworks, {}
    for t in range(net.num_tasks):
        for i in range(len(sub.layers)):
            if (t, i) in raw:
                codebooks[(t, i)] = None
                continue
            w, own = sub.weight(net.body, i), sub.owner(i) == t
            if not own.any():
                continue
            values = w[own]
            cb = torch.quantile(values, torch.linspace(0, 1, levels)).unique()
            w[own] = cb[(values[:, None] - cb[None]).abs().argmin(1)]
            codebooks[(t, i)] = cb
    return codebooks


def quantized_copy(trained, **kw):
    net = copy.deepcopy(trained[0])
    return net, quantize(net, **kw)


def assert_same_network(a: ContinualNetwork, b: ContinualNetwork, x: torch.Tensor):
    """Every task's logits bitwise equal; owners, packed masks, per-task tensors and heads equal;
    free weights 0 in ``b``."""
    a.eval()
    assert not b.training
    sa, sb = a.subnetworks, b.subnetworks
    assert b.num_tasks == a.num_tasks and sb.mode == "masks"
    with torch.no_grad():
        for t in range(a.num_tasks):
            assert torch.equal(a(x, t), b(x, t)), f"task {t}: logits differ"
    for i in range(len(sa.layers)):
        assert torch.equal(sa.owner(i), sb.owner(i))
        for t in range(a.num_tasks):
            assert torch.equal(getattr(sa.tasks[t], f"mask{i}"), getattr(sb.tasks[t], f"mask{i}"))
        owned = sa.owner(i) != FREE
        wa, wb = sa.weight(a.body, i), sb.weight(b.body, i)
        assert torch.equal(wa[owned], wb[owned])
        assert (~owned).any() and torch.equal(wb[~owned], torch.zeros(int((~owned).sum())))
    for t in range(a.num_tasks):
        for x_, y_ in ((sa.tasks[t], sb.tasks[t]), (a.heads[t], b.heads[t])):
            da, db = x_.state_dict(), y_.state_dict()
            assert da.keys() == db.keys()
            assert all(torch.equal(da[k], db[k]) and da[k].dtype == db[k].dtype for k in da)


def test_mlp_round_trip_is_bitwise(tmp_path, trained_mlp):
    net, codebooks = quantized_copy(trained_mlp, raw=((1, 1),))
    del codebooks[(2, 0)]  # a missing codebook is raw float32 too
    path = tmp_path / "model.compact"
    rng = torch.get_rng_state()
    compact = write_compact(path, net, codebooks, MLP_SPEC, (20,))
    back, manifest = read_compact(path)
    assert torch.equal(torch.get_rng_state(), rng)  # reading builds the model without touching the RNG
    x = torch.cat([t.test_x for t in trained_mlp[1].tasks])
    assert_same_network(net, back, x)
    kinds = {d["name"]: d["kind"] for d in manifest["sections"]}
    assert kinds["values/1/1"] == kinds["values/2/0"] == "raw" and "codebook/1/1" not in kinds
    assert kinds["values/0/0"] == "indices" and kinds["codebook/0/0"] == "codebook"
    assert kinds["masks/0"] == kinds["masks/1"] == "masks"
    assert manifest["sections"] == compact.description
    assert manifest["structure"] == net.structure() and manifest["normalize"] == [None] * 3
    # the file holds the payload, and the payload only the sections
    assert load_checkpoint(path).tensors["payload"].numel() * 8 == compact.total_bits


def test_conv_with_batchnorm_round_trip(tmp_path):
    bench = image_benchmark(num_tasks=2, shape=(3, 8, 8), n_train=60, n_test=30)
    torch.manual_seed(0)
    net = ContinualNetwork(tiny_convnet())
    Trainer(WSN(WSNConfig(density=0.5)), TrainConfig(epochs=1, batch_size=16)).fit(net, bench)
    codebooks = quantize(net, raw=((0, 2),))
    spec = RunSpec([{"benchmark": "images", "seed": 0, "options": {}}],
                   {"name": "tiny-convnet", "options": {}, "single_head": False}, "wsn", {"density": 0.5})
    path = tmp_path / "conv.compact"
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    write_compact(path, net, codebooks, spec, (3, 8, 8), normalize=[norm, None])
    back, manifest = read_compact(path, model=tiny_convnet())
    x = torch.cat([t.test_x for t in bench.tasks])
    assert_same_network(net, back, x)
    assert manifest["normalize"] == [[[0.5] * 3, [0.25] * 3], None]
    # per-task BatchNorm statistics came back (and differ between the tasks)
    assert not torch.equal(back.subnetworks.tasks[0].mean0, back.subnetworks.tasks[1].mean0)
    with pytest.raises(CheckpointError, match="does not fit its model.*tiny-convnet"):
        read_compact(path)  # the spec names a model the registry cannot build


def test_bits_per_parameter(trained_mlp):
    net, codebooks = quantized_copy(trained_mlp)
    compact = compact_payload(net, codebooks)
    sub, T = net.subnetworks, 3
    assert all(len(cb) == 16 for cb in codebooks.values())
    # the dense float32 multi-head model: body weights once, per task its biases and head
    body = 20 * 128 + 128 * 128
    own = (128 + 128) + (128 * 3 + 3)
    dense = body + T * own
    bits = compact.bits_per_parameter()
    assert bits["total"] == compact.total_bits / dense
    # expected size from the pieces: jointly coded masks, 4-bit indices, float32 codebooks and tensors
    masks = sum(mask_storage_bits(masks=[sub.mask(t, i) for t in range(T)])["coded_bits"] for i in range(2))
    values = {(t, i): 8 * math.ceil(int((sub.owner(i) == t).sum()) * 4 / 8) + 32 * 16
              for t in range(T) for i in range(2) if (sub.owner(i) == t).any()}
    assert compact.total_bits == masks + sum(values.values()) + 32 * T * own
    assert 4 < bits["total"] < 8  # 4-bit indices on most weights, ~1 bit of masks, the float32 rest
    assert bits["parts"]["masks"] == masks / dense < 2
    # running task t alone: its masks coded alone, the value sections it reads, its own tensors
    for t in range(T):
        need = 32 * own
        for i in range(2):
            mask = sub.mask(t, i)
            need += 8 * len(entropy_encode(mask))
            need += sum(v for (s, j), v in values.items() if j == i and (mask & (sub.owner(i) == s)).any())
        assert bits["per_task"][t] == need / (body + own)
    assert bits["per_task"][0] < bits["per_task"][2] < 8


def hand_built(num_tasks: int, hidden: list[int], used, levels: int = 4, raw: tuple = ()):
    """A masks-mode MLP (8 inputs, 2 classes) whose task t uses ``used(t, i, shape)`` in layer i,
    committed by hand; every owned weight a value of its task's codebook of ``levels`` values
    (raw random float32 for the (task, layer) pairs in ``raw``). Returns (net, codebooks, spec)."""
    spec = RunSpec([{"benchmark": "clusters", "seed": 0, "options": {}}],
                   {"name": "mlp", "options": {"hidden": hidden}, "single_head": False}, "wsn", {})
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    net = ContinualNetwork(_user_model(spec, (8,), 2))
    sub = net.install_subnetworks("masks")
    codebooks = {}
    with torch.no_grad():
        for t in range(num_tasks):
            net.add_head(2)
            for p in list(sub.tasks[t].parameters()) + list(net.heads[t].parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
            sub.commit(t, [used(t, i, tuple(sub.owner(i).shape)) for i in range(len(sub.layers))])
            for i in range(len(sub.layers)):
                w, own = sub.weight(net.body, i), sub.owner(i) == t
                if (t, i) in raw:
                    w[own] = torch.randn(int(own.sum()), generator=g)
                    continue
                cb = torch.randn(levels, generator=g).sort().values
                w[own] = cb[torch.randint(0, levels, (int(own.sum()),), generator=g)]
                codebooks[(t, i)] = cb
    return net, codebooks, spec


def test_per_task_bits_count_only_the_sections_the_task_reads():
    """Task 1 reuses task 0's weights of layer 1 but none of layer 0: running it alone needs
    the values of (0, 1), (1, 0), (1, 1), not those of (0, 0)."""
    def used(t, i, shape):
        mask = torch.zeros(shape, dtype=torch.bool)
        if i == 0:
            mask[: shape[0] // 2] = t == 0
            mask[shape[0] // 2:] = t == 1
        else:
            mask[:, : 6 + 4 * t] = True  # task 1: task 0's 6 columns and 4 new ones
        return mask

    net, codebooks, _ = hand_built(2, [16, 16], used)
    sub = net.subnetworks
    bits = compact_payload(net, codebooks).bits_per_parameter()
    values = {(t, i): 8 * math.ceil(int((sub.owner(i) == t).sum()) * 2 / 8) + 32 * 4
              for t in range(2) for i in range(2)}
    body = 8 * 16 + 16 * 16
    own = 16 + 16 + 16 * 2 + 2
    for t, sections in ((0, [(0, 0), (0, 1)]), (1, [(1, 0), (0, 1), (1, 1)])):
        masks = sum(8 * len(entropy_encode(sub.mask(t, i))) for i in range(2))
        assert bits["per_task"][t] == (masks + sum(values[k] for k in sections) + 32 * own) / (body + own)


def test_more_than_16_tasks_code_each_mask_on_its_own(tmp_path):
    g = torch.Generator().manual_seed(2)

    def used(t, i, shape):
        return torch.rand(shape, generator=g) < 0.15

    net, codebooks, spec = hand_built(17, [8, 8], used, raw=((3, 0), (16, 1)))
    compact = write_compact(tmp_path / "m", net, codebooks, spec, (8,))
    kinds = {d["name"]: d["kind"] for d in compact.description}
    assert kinds["masks/0/16"] == kinds["masks/1/0"] == "mask" and "masks/0" not in kinds
    assert kinds["values/3/0"] == "raw" and kinds["values/4/0"] == "indices"
    back, _ = read_compact(tmp_path / "m")
    assert_same_network(net, back, torch.randn(32, 8, generator=g))


def _rewrite(path, edit) -> None:
    """Re-save a compact file after ``edit(sections: name -> bytearray, table: name -> entry)``,
    with consistent offsets and a valid SHA-256: what a writer bug, not a disk, would produce."""
    ckpt = load_checkpoint(path)
    payload = ckpt.tensors["payload"].numpy().tobytes()
    table = {d["name"]: dict(d) for d in ckpt.manifest["sections"]}
    sections = {n: bytearray(payload[d["offset"]:d["offset"] + d["length"]]) for n, d in table.items()}
    edit(sections, table)
    offset, out = 0, []
    for name, data in sections.items():
        table[name].update(offset=offset, length=len(data))
        offset += len(data)
        out.append(table[name])
    manifest = {**ckpt.manifest, "sections": out}
    save_checkpoint(path, manifest, {"payload": torch.frombuffer(bytearray(b"".join(sections.values())),
                                                                 dtype=torch.uint8)})


def test_truncated_corrupt_and_inconsistent_files_are_refused(tmp_path, trained_mlp):
    net, codebooks = quantized_copy(trained_mlp)
    good = tmp_path / "good.compact"
    write_compact(good, net, codebooks, MLP_SPEC, (20,))
    data = good.read_bytes()
    bad = tmp_path / "bad.compact"
    header = 8 + int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8, header // 2, header, header + 1, (header + len(data)) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="bad.compact"):
            read_compact(bad)
    for at in (0, 3, 20, header // 2, header - 2, header, (header + len(data)) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[at] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="bad.compact"):
            read_compact(bad)
    # a run checkpoint is not a compact model
    save_checkpoint(bad, {"spec": {}}, {"x": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="not a compact model"):
        read_compact(bad)

    def drop_last_byte(name):
        return lambda s, t: s[name].pop()

    def shrink_codebook(s, t):  # 16 -> 15 levels (still 4 bits): the top index falls outside
        del s["codebook/0/1"][-4:]
        t["values/0/1"]["levels"] = t["codebook/0/1"]["levels"] = 15

    def break_mask(s, t):
        s["masks/1"][-1] ^= 0x10

    def move_weight(s, t):  # task 1's mask loses a weight: the values no longer fit the owners
        s["masks/0"], s["masks/1"] = s["masks/1"], s["masks/0"]

    cases = [(drop_last_byte("values/0/0"), "values/0/0"), (drop_last_byte("task/2/bias.1"), "task/2/bias.1"),
             (drop_last_byte("head/1/weight"), "head/1/weight"), (shrink_codebook, "values/0/1"),
             (break_mask, "masks/1"), (move_weight, "masks/0"),
             (lambda s, t: s.update({"values/9/9": bytearray(b"\0")}) or t.update(
                 {"values/9/9": {"name": "values/9/9", "kind": "raw"}}), "values/9/9")]
    for edit, section in cases:
        bad.write_bytes(data)
        _rewrite(bad, edit)
        with pytest.raises(CheckpointError, match=f"bad.compact: section '{section}'"):
            read_compact(bad)
    bad.write_bytes(data)
    _rewrite(bad, lambda s, t: None)  # the rewrite itself keeps a valid file
    assert_same_network(net, read_compact(bad)[0], trained_mlp[1].tasks[0].test_x)


def test_values_outside_the_codebook_and_other_networks_are_refused(tmp_path, trained_mlp):
    net, codebooks = quantized_copy(trained_mlp)
    sub = net.subnetworks
    with torch.no_grad():  # one weight of task 1 in layer 0 moved by one ulp: never rounded silently
        w, own = sub.weight(net.body, 0), sub.owner(0) == 1
        k = own.flatten().nonzero()[0, 0]
        w.view(-1)[k] = torch.nextafter(w.view(-1)[k], torch.tensor(math.inf))
    with pytest.raises(ConfigError, match=r"task 1, layer 0 \('fc1'\): 1 of its \d+ weights are not values"):
        write_compact(tmp_path / "x", net, codebooks, MLP_SPEC, (20,))
    assert not (tmp_path / "x").exists()
    net, codebooks = quantized_copy(trained_mlp)
    with pytest.raises(ConfigError, match="not a .task, layer index"):
        compact_payload(net, {**codebooks, (3, 0): codebooks[(0, 0)]})
    with pytest.raises(ConfigError, match="sorted ascending"):
        compact_payload(net, {**codebooks, (0, 0): codebooks[(0, 0)].flip(0)})
    with torch.no_grad():  # an owner id that is not the first task using the weight
        free = (sub.owner(1) == FREE).flatten().nonzero()[0, 0]
        net.subnetworks.owner(1).view(-1)[free] = 0
    with pytest.raises(ConfigError, match="not the first task whose mask holds them"):
        compact_payload(net, codebooks)
    # neuron-level (no subnetworks) and PackNet-style owner-mode networks are refused
    plain = ContinualNetwork(mlp((20,), (8,), 3))
    plain.add_head(3)
    with pytest.raises(ConfigError, match="without weight-level subnetworks"):
        write_compact(tmp_path / "y", plain, {}, MLP_SPEC, (20,))
    owner_mode = ContinualNetwork(mlp((20,), (8,), 3))
    owner_mode.install_subnetworks("owner")
    owner_mode.add_head(3)
    with pytest.raises(ConfigError, match="'owner' subnetworks"):
        write_compact(tmp_path / "z", owner_mode, {}, MLP_SPEC, (20,))
    assert index_bits(1) == index_bits(2) == 1 and index_bits(16) == 4 and index_bits(17) == 5
