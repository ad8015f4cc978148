"""Compact storage of the per-weight bookkeeping of weight-level methods, and its size in bits.

Weight-level isolation methods must remember, for every weight of a layer, which tasks use it:

* **owner ids** (PackNet): task ``t`` uses the weights whose owner is ``<= t``. The ledger keeps
  ``owner`` as ``-1`` (free) or a task id in ``0..T-1``; stored as the symbol ``owner + 1`` in
  ``{0..T}``, that is ``owner_bits(T) = ceil(log2(T + 1))`` bits per weight raw (``pack_uint``).
* **per-task masks** (WSN, DST): task ``t`` uses an arbitrary subset of the weights. The symbol of
  a weight is the integer whose bit ``t`` says whether task ``t`` uses it (WSN's packed task
  bits): ``T`` bits per weight raw (one ``pack_bits`` bitmap per task).

Both symbol streams are highly skewed (most weights are free, or used by one task), so
``entropy_encode`` (a static categorical model with exact symbol counts, coded by an ANS stack
from ``constriction``) brings them near their Shannon bound ``shannon_bits``; e.g. a 10%-dense
mask costs about 0.47 bits per weight instead of 1. ``mask_storage_bits`` reports the raw, coded
and bound sizes of one layer and stores whichever of raw and coded is smaller.

Byte layouts (all little-endian):

* ``pack_bits``: ``ceil(n / 8)`` bytes, element ``i`` of the row-major flattened mask in bit
  ``i % 8`` (least significant first) of byte ``i // 8``; padding bits are 0.
* ``pack_uint``: ``ceil(n · bits / 8)`` bytes, the ``bits`` bits of value ``i`` (least significant
  first) at bit offsets ``i·bits .. i·bits + bits - 1`` of the same bit stream.
* ``entropy_encode``: a 30-byte header (magic ``b"SCE\\x01"``; CRC32 of every byte after the
  first 8; CRC32 of the symbols as ``uint16``; count ``n`` as ``uint64``; alphabet size ``K``,
  number of distinct symbols ``m`` as ``uint32``; symbol-set mode, count width as ``uint8``), then
  the symbol set (a ``K``-bit presence bitmap or ``m`` values of ``bit_length(K - 1)`` bits,
  whichever is smaller), the ``m`` exact counts (``pack_uint``), and the ANS words (``uint32``).
  With at most one distinct symbol (entropy 0) the header and the set are all there is.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch

from .errors import CheckpointError, ConfigError

MAX_ALPHABET = 1 << 16  # entropy-coded symbols are < 65536 (WSN's packed bits of up to 16 tasks)
MAX_PACKED_TASKS = 16  # more tasks than this: each task's mask is coded on its own

_MAGIC = b"SCE\x01"
_HEADER = struct.Struct("<4sIIQIIBB")  # magic, crc(rest), crc(symbols), n, K, m, set mode, count width
_SET_BITMAP, _SET_LIST = 0, 1
_CHUNK = 1 << 20  # elements per numpy block in pack_uint/unpack_uint (a multiple of 8: blocks stay byte-aligned)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Row-major flat numpy view/copy of ``x`` (a CPU copy of a tensor)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x)).reshape(-1)


def pack_bits(mask: torch.Tensor) -> bytes:
    """Bitmap of a bool ``mask`` of any shape, flattened row-major: ``ceil(numel / 8)`` bytes,
    little bit order.

    Raises:
        ConfigError: ``mask`` is not boolean.
    """
    if mask.dtype != torch.bool:
        raise ConfigError(f"pack_bits expects a bool mask, got dtype {mask.dtype}")
    return np.packbits(_as_numpy(mask), bitorder="little").tobytes()


def unpack_bits(data: bytes, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: bool tensor of shape ``(numel,)`` (reshape it to the mask's shape).

    Raises:
        CheckpointError: ``data`` is not exactly ``ceil(numel / 8)`` bytes, or a padding bit is set.
    """
    if numel < 0:
        raise ConfigError(f"unpack_bits: numel must be >= 0, got {numel}")
    need = (numel + 7) // 8
    if len(data) != need:
        raise CheckpointError(
            f"bitmap of {numel} elements must be {need} bytes, got {len(data)} "
            f"({'truncated' if len(data) < need else 'trailing bytes'})")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[numel:].any():
        raise CheckpointError(f"bitmap of {numel} elements has nonzero padding bits: corrupt data")
    return torch.from_numpy(bits[:numel].astype(bool))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``pack_bits`` in torch, on ``mask``'s device: a ``uint8`` tensor ``(ceil(numel / 8),)`` with
    the same bytes. How task masks are kept in memory and in checkpoints (1 bit per weight)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_mask``: a bool tensor of ``shape`` on ``packed``'s device."""
    numel = math.prod(shape)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].view(shape).bool()


def owner_bits(num_tasks: int) -> int:
    """Bits per weight of an owner id in ``{free, 0..num_tasks-1}``: ``ceil(log2(num_tasks + 1))``,
    at least 1."""
    if num_tasks < 0:
        raise ConfigError(f"num_tasks must be >= 0, got {num_tasks}")
    return max(1, int(num_tasks).bit_length())  # bit_length(T) == ceil(log2(T + 1))


def _check_bits(bits: int, limit: int = 32) -> None:
    if not 1 <= bits <= limit:
        raise ConfigError(f"bits must be in 1..{limit}, got {bits}")


def _pack(values: np.ndarray, bits: int) -> bytes:
    shifts = np.arange(bits, dtype=np.uint64)
    out = []
    for start in range(0, len(values), _CHUNK):
        v = values[start:start + _CHUNK].astype(np.uint64)
        planes = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)  # (chunk, bits), LSB first
        out.append(np.packbits(planes.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def _unpack(data: bytes, numel: int, bits: int) -> np.ndarray:
    need = (numel * bits + 7) // 8
    if len(data) != need:
        raise CheckpointError(
            f"{numel} values of {bits} bits must be {need} bytes, got {len(data)} "
            f"({'truncated' if len(data) < need else 'trailing bytes'})")
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    out = np.empty(numel, dtype=np.int64)
    step = _CHUNK * bits // 8  # bytes per block of _CHUNK values
    for i, start in enumerate(range(0, numel, _CHUNK)):
        count = min(_CHUNK, numel - start)
        planes = np.unpackbits(raw[i * step:(i + 1) * step], bitorder="little")
        if planes[count * bits:].any():
            raise CheckpointError(f"{numel} values of {bits} bits: nonzero padding bits, corrupt data")
        out[start:start + count] = (planes[:count * bits].reshape(count, bits).astype(np.uint64) @ weights).astype(np.int64)
    return out


def pack_uint(values: torch.Tensor, bits: int) -> bytes:
    """Fixed-width bit-packing of non-negative integers (any shape, flattened row-major):
    ``ceil(numel · bits / 8)`` bytes. ``bits`` is 1..32 (owner ids, codebook indices).

    Raises:
        ConfigError: ``bits`` is out of range, or a value is negative or does not fit in ``bits``.
    """
    _check_bits(bits)
    v = _as_numpy(values)
    if v.dtype == np.bool_:
        v = v.astype(np.uint8)
    if not np.issubdtype(v.dtype, np.integer):
        raise ConfigError(f"pack_uint expects integer values, got dtype {v.dtype}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ConfigError(
            f"pack_uint: values must be in [0, {1 << bits}) for bits={bits}, "
            f"got range [{int(v.min())}, {int(v.max())}]")
    return _pack(v, bits)


def unpack_uint(data: bytes, numel: int, bits: int) -> torch.Tensor:
    """Inverse of ``pack_uint``: ``int64`` tensor of shape ``(numel,)``.

    Raises:
        CheckpointError: ``data`` is not exactly ``ceil(numel · bits / 8)`` bytes, or a padding bit is set.
    """
    _check_bits(bits)
    if numel < 0:
        raise ConfigError(f"unpack_uint: numel must be >= 0, got {numel}")
    return torch.from_numpy(_unpack(data, numel, bits))


def _symbols(symbols: torch.Tensor | np.ndarray) -> np.ndarray:
    s = _as_numpy(symbols)
    if s.dtype == np.bool_:
        s = s.astype(np.uint8)
    if not np.issubdtype(s.dtype, np.integer):
        raise ConfigError(f"symbols must be integers, got dtype {s.dtype}")
    if s.size and (int(s.min()) < 0 or int(s.max()) >= MAX_ALPHABET):
        raise ConfigError(
            f"symbols must be in [0, {MAX_ALPHABET}), got range [{int(s.min())}, {int(s.max())}]")
    return s.astype(np.int64)


def shannon_bits(symbols: torch.Tensor | np.ndarray) -> float:
    """Empirical entropy of ``symbols`` times their count, in bits: ``-Σ_s c_s · log2(c_s / n)``,
    the lower bound of any code that stores the symbols independently with one static model."""
    s = _symbols(symbols)
    if s.size == 0:
        return 0.0
    c = np.bincount(s)
    c = c[c > 0].astype(np.float64)
    return float(-(c * np.log2(c / s.size)).sum())


def _crc_symbols(s: np.ndarray) -> int:
    return zlib.crc32(s.astype("<u2").tobytes())


def entropy_encode(symbols: torch.Tensor | np.ndarray) -> bytes:
    """Entropy-code integer ``symbols`` in ``[0, 65536)`` (any shape, flattened row-major) into a
    self-describing byte string (layout in the module docstring) that ``entropy_decode`` reads back.

    The model is static and categorical with the symbols' exact counts, coded by an ANS stack
    (Duda et al. 2015; ``constriction.stream.stack.AnsCoder``, 32-bit words, 24-bit precision), so
    the payload is within a fraction of a percent of ``shannon_bits``; the header adds 30 bytes
    plus the symbol set and the counts.

    Raises:
        ConfigError: a symbol is negative or ``>= 65536``, or there are ``2**32`` symbols or more.
    """
    s = _symbols(symbols)
    n = s.size
    if n >= 1 << 32:
        raise ConfigError(f"entropy_encode codes fewer than 2**32 symbols, got {n}")
    counts = np.bincount(s) if n else np.zeros(0, dtype=np.int64)
    alphabet = len(counts)
    present = counts > 0
    values = np.flatnonzero(present)
    m = len(values)
    # The symbol set: a presence bitmap over K, or the values themselves, whichever is smaller.
    width = max(1, (alphabet - 1).bit_length())
    if m == 0:
        mode, symbol_set = _SET_LIST, b""
    elif (alphabet + 7) // 8 <= (m * width + 7) // 8:
        mode, symbol_set = _SET_BITMAP, np.packbits(present, bitorder="little").tobytes()
    else:
        mode, symbol_set = _SET_LIST, _pack(values, width)
    count_width = int(counts.max()).bit_length() if m else 0
    body = symbol_set + (_pack(counts[values], count_width) if m else b"")
    if m > 1:
        import constriction  # imported here: only the entropy coder needs it

        lut = np.cumsum(present) - 1  # symbol -> index among the present symbols
        model = constriction.stream.model.Categorical(counts[values].astype(np.float64), perfect=False)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(lut[s].astype(np.int32), model)
        body += coder.get_compressed().astype("<u4").tobytes()
    rest = _HEADER.pack(_MAGIC, 0, _crc_symbols(s), n, alphabet, m, mode, count_width)[8:] + body
    return _MAGIC + struct.pack("<I", zlib.crc32(rest)) + rest


def entropy_decode(data: bytes) -> np.ndarray:
    """Inverse of ``entropy_encode``: the symbols as an ``int64`` array of shape ``(n,)``.

    Raises:
        CheckpointError: ``data`` is truncated, corrupt (a CRC32 mismatch: of the bytes, checked
            before decoding, or of the decoded symbols) or not an ``entropy_encode`` string.
    """
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise CheckpointError(
            f"entropy-coded data of {len(data)} bytes is shorter than its {_HEADER.size}-byte header: truncated")
    magic, crc_rest, crc_sym, n, alphabet, m, mode, count_width = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CheckpointError(f"entropy-coded data starts with {magic!r}, expected {_MAGIC!r}")
    if zlib.crc32(data[8:]) != crc_rest:
        raise CheckpointError(
            f"entropy-coded data of {len(data)} bytes fails its CRC32 check: truncated or corrupt")
    if alphabet > MAX_ALPHABET or m > alphabet or mode not in (_SET_BITMAP, _SET_LIST) or count_width > 32 \
            or (m == 0) != (n == 0) or (m > 0 and count_width == 0):
        raise CheckpointError(f"entropy-coded data has an inconsistent header (n={n}, K={alphabet}, m={m})")
    pos = _HEADER.size
    width = max(1, (alphabet - 1).bit_length())
    if mode == _SET_BITMAP:
        size = (alphabet + 7) // 8
        values = np.flatnonzero(np.unpackbits(np.frombuffer(data[pos:pos + size], dtype=np.uint8),
                                              count=alphabet, bitorder="little"))
    else:
        size = (m * width + 7) // 8
        values = _unpack(data[pos:pos + size], m, width) if m else np.zeros(0, dtype=np.int64)
    pos += size
    size = (m * count_width + 7) // 8
    counts = _unpack(data[pos:pos + size], m, count_width) if m else np.zeros(0, dtype=np.int64)
    pos += size
    payload = data[pos:]
    if len(values) != m or (m and (values.max() >= alphabet or np.any(np.diff(values) <= 0))) \
            or np.any(counts <= 0) or int(counts.sum()) != n or len(payload) % 4 or (m <= 1 and payload):
        raise CheckpointError(f"entropy-coded data has an inconsistent symbol table (n={n}, K={alphabet}, m={m})")
    if m == 0:
        out = np.zeros(0, dtype=np.int64)
    elif m == 1:
        out = np.full(n, values[0], dtype=np.int64)
    else:
        import constriction

        model = constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
        try:
            out = values[coder.decode(model, n)]
        except Exception as e:  # constriction raises on an exhausted or invalid stream
            raise CheckpointError(f"entropy-coded data does not decode: {e}") from e
    # Guards against what the byte CRC cannot see: a model built differently when decoding (a
    # different constriction version) decodes garbage without complaint.
    if _crc_symbols(out) != crc_sym:
        raise CheckpointError("entropy-decoded symbols fail their CRC32 check: corrupt data or an "
                              "incompatible entropy coder")
    return out


def _coded_bits(symbols: np.ndarray) -> int:
    return 8 * len(entropy_encode(symbols))


def mask_storage_bits(owner: torch.Tensor | None = None, masks: list[torch.Tensor] | None = None,
                      *, num_tasks: int | None = None) -> dict:
    """Bits needed to store what one layer's weights need to run every task.

    Give exactly one of
      * ``owner``: int tensor (any shape) of owner ids, ``-1`` free or a task id in
        ``0..num_tasks-1`` (PackNet; ``num_tasks`` defaults to ``owner.max() + 1``). Raw is
        ``n · owner_bits(T)``; coded is the entropy-coded ``owner + 1``.
      * ``masks``: one bool tensor per task, all of the layer's weight shape (WSN, DST). Raw is
        ``n · T`` (one bitmap per task); coded is the entropy-coded packed task bits
        (``Σ_t mask_t << t``) when ``T <= 16``, else the sum of each task's mask coded on its own.

    Returns ``{"weights": n, "tasks": T, "raw_bits", "coded_bits", "entropy_bits", "stored_bits"}``:
    ``entropy_bits`` is the Shannon bound (``shannon_bits``) of the symbols that were coded,
    ``coded_bits`` includes the coder's header, and ``stored_bits = min(raw_bits, coded_bits)``
    (entropy-coded where that pays).

    Raises:
        ConfigError: both or neither given, masks of different shapes or not bool, owner ids
            outside ``-1..num_tasks-1``.
    """
    if (owner is None) == (masks is None):
        raise ConfigError("mask_storage_bits: give exactly one of owner (owner ids) and masks (per-task masks)")
    if owner is not None:
        o = _as_numpy(owner).astype(np.int64)
        top = int(o.max()) if o.size else -1
        if o.size and int(o.min()) < -1:
            raise ConfigError(f"owner ids must be >= -1 (free), got {int(o.min())}")
        tasks = top + 1 if num_tasks is None else num_tasks
        if top >= tasks:
            raise ConfigError(f"owner ids must be in -1..{tasks - 1} for num_tasks={tasks}, got {top}")
        n = o.size
        symbols = o + 1
        raw = n * owner_bits(tasks)
        coded = _coded_bits(symbols)
        entropy = shannon_bits(symbols)
    else:
        if not masks:
            raise ConfigError("mask_storage_bits: masks is empty; give one bool mask per task")
        shape = masks[0].shape
        for t, mk in enumerate(masks):
            if mk.dtype != torch.bool or mk.shape != shape:
                raise ConfigError(f"mask of task {t} must be bool of shape {tuple(shape)}, "
                                  f"got {mk.dtype} of shape {tuple(mk.shape)}")
        tasks = len(masks)
        if num_tasks is not None and num_tasks != tasks:
            raise ConfigError(f"num_tasks={num_tasks} but {tasks} masks were given")
        n = masks[0].numel()
        raw = n * tasks
        if tasks <= MAX_PACKED_TASKS:
            symbols = np.zeros(n, dtype=np.int64)
            for t, mk in enumerate(masks):
                symbols |= _as_numpy(mk).astype(np.int64) << t
            coded, entropy = _coded_bits(symbols), shannon_bits(symbols)
        else:
            bits = [_as_numpy(mk).astype(np.int64) for mk in masks]
            coded = sum(_coded_bits(b) for b in bits)
            entropy = sum(shannon_bits(b) for b in bits)
    return {"weights": n, "tasks": tasks, "raw_bits": raw, "coded_bits": coded,
            "entropy_bits": entropy, "stored_bits": min(raw, coded)}
