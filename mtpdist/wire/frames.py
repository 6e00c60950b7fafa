"""The ring's frames: one per unit, a small binary header and the activation bytes as they are.

A unit frame is
    fixed  <B B H I Q I I B>: kind, dtype, sequences, route tag, unit id, rows, hidden, stages done
    per stage done:  <Q I>  compute microseconds, rows in its (possibly merged) forward
    per sequence:    its SequenceRows header (`encode_header`), then <q> its position after
    the activation:  rows x hidden x itemsize bytes, little-endian
A result frame (the last stage's, back to the coordinator, which knows the unit's sequences)
has the same fixed part and stages, then <q> each sequence's position after, then the
activation. An error frame is <B I Q H> kind, route tag, unit id, stage index, then UTF-8 JSON
{"kind", "details"}. No protobuf here: this module is plain struct packing, and decoding
hands out memoryviews of the frame (no copy) that np.frombuffer reads directly.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import typing
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import RequestError
from .types import ACTIVATION_DTYPES, Activation, SequenceRows

UNIT, ERROR, RESULT = 1, 2, 3
_FIXED = struct.Struct("<BBHIQIIB")
_STAGE = struct.Struct("<QI")
_ERROR = struct.Struct("<BIQH")
_POS = struct.Struct("<q")
_U16 = struct.Struct("<H")
_INT = struct.Struct("<q")
_DTYPE_CODE = {name: i for i, name in enumerate(ACTIVATION_DTYPES)}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_SEQUENCES = 4096


def _field_kinds() -> tuple[tuple[str, str], ...]:
    """(name, kind) of every SequenceRows field, kind one of str/int/ints, from its annotation."""
    hints = typing.get_type_hints(SequenceRows)
    kinds = []
    for f in dataclasses.fields(SequenceRows):
        t = hints[f.name]
        kind = "str" if t is str else "int" if t is int else "ints" if typing.get_origin(t) is tuple else None
        if kind is None:
            raise TypeError(f"SequenceRows.{f.name}: no frame encoding for {t}")
        kinds.append((f.name, kind))
    return tuple(kinds)


_FIELDS = _field_kinds()


def _steps() -> tuple[tuple[str, struct.Struct | None], ...]:
    """How to read a header: runs of int fields as one struct each, then each str or ints field
    (fewer calls per frame: each costs several times more when the code is cold, as at every hop)."""
    steps: list = []
    for _, kind in _FIELDS:
        if kind == "int" and steps and steps[-1][0] == "int":
            steps[-1] = ("int", struct.Struct(steps[-1][1].format + "q"))
        else:
            steps.append((kind, struct.Struct("<q") if kind == "int" else None))
    return tuple(steps)


_STEPS = _steps()
# Both ends of a link must agree on the frames: a hello carries this and a mismatch is refused.
_FORMAT = 2     # 2: result frames
SCHEMA = f"{zlib.crc32(repr((_FORMAT, _FIELDS)).encode()):08x}"


def encode_header(s: SequenceRows) -> bytes:
    """Every field of one sequence's header, in declaration order (ints as signed 64-bit)."""
    out = []
    for name, kind in _FIELDS:
        v = getattr(s, name)
        if kind == "int":
            out.append(_INT.pack(v))
        elif kind == "str":
            b = v.encode()
            out += [_U16.pack(len(b)), b]
        else:
            out += [_U16.pack(len(v)), struct.pack(f"<{len(v)}q", *v)]
    return b"".join(out)


def decode_header(buf, off: int) -> tuple[SequenceRows, int]:
    """The inverse of `encode_header`: the header at `off` and the offset after it."""
    values: list = []
    for kind, run in _STEPS:
        if run is not None:
            values += run.unpack_from(buf, off)
            off += run.size
            continue
        (n,) = _U16.unpack_from(buf, off)
        off += 2
        if kind == "str":
            values.append(str(buf[off:off + n], "utf-8"))
            off += n
        else:
            values.append(struct.unpack_from(f"<{n}q", buf, off) if n else ())
            off += 8 * n
    return SequenceRows(*values), off


def route_tag(route: str) -> int:
    """The 32-bit tag of a route id that every frame carries."""
    return zlib.crc32(route.encode())


class UnitFrame(NamedTuple):
    """A unit on its way round the ring (decoded; `hidden.data` is a view of the frame). A named
    tuple, not a dataclass: one is built at every hop, and a tuple is the cheapest to build."""
    route: int
    unit: int
    sequences: tuple[SequenceRows, ...]
    hidden: Activation
    positions: tuple[int, ...] = ()
    compute_us: tuple[int, ...] = ()
    batch_rows: tuple[int, ...] = ()
    # Each sequence's header as it came off the wire: a stage passes the same sequences on, and
    # sending these bytes again costs less than encoding them anew at every hop.
    headers: tuple = ()


@dataclass(frozen=True)
class ErrorFrame:
    """A unit that failed at stage `stage` (0 = the first worker), with the domain error kind."""
    route: int
    unit: int
    stage: int
    kind: str
    details: str


def encode_unit(f: UnitFrame) -> bytes:
    """One frame: header, then the activation bytes (one join, no other copy)."""
    rows, hidden = f.hidden.shape
    positions = f.positions or (0,) * len(f.sequences)
    parts = [_FIXED.pack(UNIT, _DTYPE_CODE[f.hidden.dtype], len(f.sequences), f.route, f.unit, rows, hidden,
                         len(f.compute_us))]
    parts += [_STAGE.pack(c, b) for c, b in zip(f.compute_us, f.batch_rows)]
    headers = f.headers if len(f.headers) == len(f.sequences) else [encode_header(s) for s in f.sequences]
    for h, p in zip(headers, positions):
        parts += [h, _POS.pack(p)]
    parts.append(f.hidden.data)
    return b"".join(parts)


def encode_result(f: UnitFrame) -> bytes:
    """The last stage's frame: like `encode_unit` without the sequences' headers (only their
    positions after), which the coordinator does not need back."""
    rows, hidden = f.hidden.shape
    n = len(f.positions)
    return b"".join([_FIXED.pack(RESULT, _DTYPE_CODE[f.hidden.dtype], n, f.route, f.unit, rows, hidden,
                                 len(f.compute_us)),
                     *[_STAGE.pack(c, b) for c, b in zip(f.compute_us, f.batch_rows)],
                     struct.pack(f"<{n}q", *f.positions), f.hidden.data])


def encode_error(route: int, unit: int, stage: int, kind: str, details: str) -> bytes:
    return _ERROR.pack(ERROR, route, unit, stage) + json.dumps({"kind": kind, "details": details}).encode()


@dataclass(frozen=True)
class Hello:
    """The first message on a link: which plan's ring, which way, who sends, whom it dialed.
    `role` "feed" carries units into stage `stage`; "sink" is the coordinator's link to the last
    stage, over which finished units come back."""
    route: str
    role: str
    sender: str      # the dialer's planned address ("": the coordinator)
    to: str          # the address the dialer used for this stage (the stage learns its own name)
    stage: int
    schema: str = SCHEMA


def encode_hello(h: Hello) -> bytes:
    return json.dumps(dataclasses.asdict(h)).encode()


def decode_hello(raw: bytes) -> Hello:
    try:
        d = json.loads(bytes(raw))
        return Hello(str(d["route"]), str(d["role"]), str(d["sender"]), str(d["to"]), int(d["stage"]),
                     str(d["schema"]))
    except (ValueError, KeyError, TypeError) as e:
        raise RequestError("invalid", f"a link must start with a hello: {e}") from None


def decode(frame: bytes) -> UnitFrame | ErrorFrame:
    """A frame from the wire; RequestError("invalid") for anything malformed."""
    try:
        buf = memoryview(frame)
        if buf[0] == ERROR:
            _, route, unit, stage = _ERROR.unpack_from(buf, 0)
            d = json.loads(bytes(buf[_ERROR.size:]))
            return ErrorFrame(route, unit, stage, str(d["kind"]), str(d["details"]))
        kind, dcode, nseq, route, unit, rows, hidden, stages = _FIXED.unpack_from(buf, 0)
        if kind not in (UNIT, RESULT) or dcode >= len(ACTIVATION_DTYPES) or nseq > MAX_SEQUENCES:
            raise ValueError(f"kind {kind}, dtype {dcode}, {nseq} sequences")
        off = _FIXED.size
        trail = struct.unpack_from("<" + "QI" * stages, buf, off)
        off += stages * _STAGE.size
        if kind == RESULT:
            positions = struct.unpack_from(f"<{nseq}q", buf, off)
            off += 8 * nseq
            seqs = headers = ()
        else:
            seqs, positions, headers = [], [], []
            for _ in range(nseq):
                start = off
                s, off = decode_header(buf, off)
                headers.append(buf[start:off])
                seqs.append(s)
                positions.append(_POS.unpack_from(buf, off)[0])
                off += 8
            seqs, positions, headers = tuple(seqs), tuple(positions), tuple(headers)
        dtype = ACTIVATION_DTYPES[dcode]
        if len(buf) - off != rows * hidden * _ITEMSIZE[dtype]:
            raise ValueError(f"{len(buf) - off} activation bytes for [{rows}, {hidden}] {dtype}")
        return UnitFrame(route, unit, seqs, Activation(buf[off:], dtype, (rows, hidden)), positions,
                         trail[0::2], trail[1::2], headers)
    except (struct.error, ValueError, KeyError, IndexError, UnicodeDecodeError, TypeError) as e:
        raise RequestError("invalid", f"malformed ring frame: {e}") from None
