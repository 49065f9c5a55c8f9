#!/usr/bin/env python3
"""Generate GGUF reader fixtures for the cotlab test-suite.

The GGUF files are written by the reference ``gguf`` Python package (gguf-py
from llama.cpp, ``pip install gguf``) through ``gguf.GGUFWriter``, and the
expected values are produced by gguf-py itself: tensors are read back with
``gguf.GGUFReader`` and dequantised with ``gguf.quants.dequantize``.  No
dequantisation code of our own is involved, so the fixtures are an independent
check of cotlab's GGUF reader.  Everything is seeded, so running the script
twice with the same library versions produces identical files.

Usage::

    python3 tools/make_gguf_fixtures.py [OUTPUT_DIR]

``OUTPUT_DIR`` defaults to ``tests/fixtures/gguf`` under the repository root
(located from this file's path).  The numpy and gguf versions in use are
printed first, then one line per file written with its size.  The fixtures
currently in the tree were generated with gguf 0.19.0 and numpy 2.4.6.

Files written
-------------
``types_v3.gguf``       GGUF v3, default alignment 32 (no ``general.alignment``
                        key).  Metadata: ``general.architecture`` = "llama"
                        (always added by the writer) followed by the
                        ``test.*`` keys listed in ``META_V3`` below, one per
                        scalar type plus typed arrays.  Tensors (ggml ne in
                        brackets, ne0 first):

                        ``t.f32`` F32, ``t.f16`` F16, ``t.bf16`` BF16,
                        ``t.q8_0``, ``t.q4_0``, ``t.q4_1``, ``t.q5_0``,
                        ``t.q5_1``, ``t.q4_k``, ``t.q5_k``, ``t.q6_k``: all of
                        numpy shape (3, 512), i.e. ne = [512, 3];
                        ``t.vec`` F32 (7,), ne = [7];
                        ``t.cube`` F16 (2, 3, 32), ne = [32, 3, 2].

                        F32/F16 values are random normal floats.  BF16 values
                        are random normal floats converted with gguf-py's own
                        ``gguf.quants.quantize(x, BF16)`` (round to nearest
                        even, the same as ggml_compute_fp32_to_bf16).
                        Quantised tensors are random raw blocks: random bytes
                        for qs/qh/scales, and the fp16 d/dmin/m fields set to
                        random normal * 0.01 (finite, occasionally subnormal).
``types_ref.bin``       Expected values for ``types_v3.gguf`` (format below).
``aligned64_v2.gguf``   GGUF version 2 with ``general.alignment`` = u32 64 and
                        ``test.str`` = "v2".  GGUFWriter only writes version
                        3, so the u32 version field at byte offset 4 is
                        patched to 2 afterwards (v2 and v3 layouts are
                        identical).  Tensors: ``a`` F32 (5,) = 0..4, ne = [5];
                        ``b`` Q8_0 (2, 64) random blocks, ne = [64, 2].
``aligned64_ref.bin``   Expected values for ``aligned64_v2.gguf``.
``encode_ref.bin``      Expected results of *encoding* float32 values
                        (f32 -> F16, BF16, Q8_0); see "Encoding reference"
                        below.  No GGUF file goes with it.

Reference file records (in this order)
--------------------------------------
``meta/header``        int32 [version, tensor_count, kv_count, alignment]
``meta/data_offset``   int32 [absolute file offset of the tensor data section]
then, for each tensor in file order:
``meta/ne/<name>``     int32 [ne0, ne1, ne2, ne3]  (missing dims are 1)
``meta/type/<name>``   int32 [ggml type id]
``meta/offset/<name>`` int32 [tensor offset relative to the data section]
``deq/<name>``         f32   dequantised values, numpy shape (ne reversed)

kv_count includes ``general.architecture`` (and ``general.alignment`` in the
v2 file).  The ``test.*`` metadata values are the constants in ``META_V3`` /
``META_V2``; the C tests hard-code them.

Encoding reference (``encode_ref.bin`` records, in this order)
--------------------------------------------------------------
``input``       f32 (4, 64)  values to encode, built by ``build_encode_input``
                from its own seeded generator (``ENCODE_SEED``).  Row 0 holds
                the special cases listed in ``ROW0_SPECIALS`` (0.0, -0.0, f16
                and bf16 halfway points, f16 subnormals / underflow / overflow
                incl. 70000.0) with random fill; row 1's first Q8_0 block has
                max |x| = 127 (so d = 1, id = 1 and x*id is exact) and holds
                exact Q8_0 halfway points (+-0.5, +-2.5, ...), its second
                block is random normal; row 2 spans magnitudes 1e-9 .. 1e5
                (its first block is small enough for the Q8_0 d to be an f16
                subnormal, its second overflows f16); row 3 is all +0.0 (a
                Q8_0 block with max 0, so d = 0 and id = 0).
``f16_bits``    i32 (4, 64)  IEEE half bit patterns of ``input.astype(float16)``
                (numpy: round to nearest even, overflow to +-inf),
                zero-extended.
``bf16_bits``   i32 (4, 64)  bf16 bit patterns from
                ``gguf.quants.quantize(input, BF16)``, zero-extended.
``q8_0_bytes``  i32 (272,)   the raw Q8_0 bytes from
                ``gguf.quants.quantize(input, Q8_0)``, one byte per int32
                (zero-extended), in file order: 4 rows x 2 blocks x 34 bytes
                (f16 d little-endian, then 32 int8 q).

All three encodings are cross-checked by the script against independent
implementations (``struct``'s 'e' format for f16; an exact nearest-even
search for bf16; a scalar transcription of ggml's quantize_row_q8_0_ref with
C ``roundf`` semantics for Q8_0).

gguf-py behaviour worth knowing
-------------------------------
* ``GGUFWriter.add_array`` has no element-type argument: ints become INT32,
  floats FLOAT32, strings STRING.  Arrays of other element types are written
  with ``add_key_value(key, values, ARRAY, sub_type=...)``.
* Empty arrays cannot be written: ``add_array`` silently drops them and the
  packer raises on an empty list.  ``add_string`` silently drops "" as well
  (an empty string inside a string array is fine).  So there is no empty
  array key in the fixtures.
* With ``raw_dtype`` and a uint8 array, ``add_tensor``'s shape (``raw_shape``
  or the array's own shape) is the *byte* shape in numpy order, e.g.
  (3, 288) for Q4_K with 512 columns; the writer converts its last dimension
  from bytes to elements and reverses the order into ne.
* ``quantize(x, Q8_0)`` computes, all in float32, ``d = max|x| / 127``,
  ``id = 0 if d == 0 else 1 / d`` and ``q = np_roundf(x * id)``, where
  ``np_roundf`` is ``np.sign(n) * (floor(|n|) + floor(2 * (|n| - floor(|n|))))``:
  round half *away from zero*, exactly like C ``roundf`` in ggml's
  quantize_row_q8_0_ref (not numpy's half-to-even ``np.round``).  ``d`` is
  stored as ``d.astype(float16)`` (round to nearest even); ``id`` uses the
  float32 ``d``, not the rounded f16 one, again as ggml does.
* ``quantize(x, BF16)`` is ggml_compute_fp32_to_bf16: NaN becomes
  ``(bits >> 16) | 0x40`` (quiet, sign and upper payload kept), everything
  else ``(bits + 0x7fff + ((bits >> 16) & 1)) >> 16``: round to nearest even,
  inf stays inf, and finite values past the largest bf16 round to inf.

Reference file format (CTLFIX01, little-endian)
-----------------------------------------------
::

    char     magic[8]  = "CTLFIX01"
    u32      record_count
    record_count times:
        u32      name_len
        char     name[name_len]          ASCII, no terminating NUL
        u32      dtype                   0 = float32, 1 = int32
        u32      ndim
        i64      shape[ndim]
        4-byte   data[numel]             row-major (C order)
"""

import importlib.metadata
import math
import os
import struct
import sys

import numpy as np

from ctlfix import read_fixture, write_fixture
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

MAGIC = b"CTLFIX01"
DT_F32 = 0
DT_I32 = 1

SEED = 1234
ROWS, COLS = 3, 512          # COLS must be a multiple of 256 (K-quants)

# (key, GGUF value type, value[, array element type])
META_V3 = [
    ("test.u8", VT.UINT8, 200),
    ("test.i8", VT.INT8, -100),
    ("test.u16", VT.UINT16, 60000),
    ("test.i16", VT.INT16, -30000),
    ("test.u32", VT.UINT32, 4000000000),
    ("test.i32", VT.INT32, -2000000000),
    ("test.f32", VT.FLOAT32, 3.25),
    ("test.bool", VT.BOOL, True),
    ("test.str", VT.STRING, "h\u00e9llo w\u00f6rld \u2713"),
    ("test.u64", VT.UINT64, 2**40 + 5),
    ("test.i64", VT.INT64, -(2**40)),
    ("test.f64", VT.FLOAT64, -1.0e100),
    ("test.arr_i32", VT.ARRAY, [1, -2, 3], VT.INT32),
    ("test.arr_f32", VT.ARRAY, [0.5, -1.5], VT.FLOAT32),
    ("test.arr_str", VT.ARRAY, ["a", "", "bc", "\u2713\u2713"], VT.STRING),
    ("test.arr_u8", VT.ARRAY, [0, 255], VT.UINT8),
]

META_V2 = [
    ("test.str", VT.STRING, "v2"),
]

# Byte offsets of the fp16 fields (d, dmin / m) inside one block.
HALF_FIELDS = {
    QT.Q8_0: (0,),
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}

QUANT_TENSORS = [
    ("t.q8_0", QT.Q8_0),
    ("t.q4_0", QT.Q4_0),
    ("t.q4_1", QT.Q4_1),
    ("t.q5_0", QT.Q5_0),
    ("t.q5_1", QT.Q5_1),
    ("t.q4_k", QT.Q4_K),
    ("t.q5_k", QT.Q5_K),
    ("t.q6_k", QT.Q6_K),
]

ENCODE_SEED = 4321           # separate generator: the files above do not move
ENC_ROWS, ENC_COLS = 4, 64   # two Q8_0 blocks per row

# Row 0 of the encoding input: (column, value).  Columns 0..31 form the first
# Q8_0 block, 32..63 the second; the large values live in the second block so
# that the first one still quantises the small ones to non-trivial q values.
ROW0_SPECIALS = [
    (0, 0.0),
    (1, 1.0 + 2.0**-11),         # f16 halfway, rounds down to 1.0 (even)
    (2, 1.0 + 3 * 2.0**-11),     # f16 halfway, rounds up to 1 + 2**-9 (even)
    (3, 1.0 + 2.0**-8),          # bf16 halfway, rounds down to 1.0
    (4, 1.0 + 3 * 2.0**-8),      # bf16 halfway, rounds up to 1 + 2**-6
    (5, -0.0),
    (6, 3e-6),                   # f16 subnormal
    (7, -(1.0 + 3 * 2.0**-11)),  # negative f16 halfway
    (8, -(1.0 + 3 * 2.0**-8)),   # negative bf16 halfway
    (9, 2.0**-25),               # halfway between 0 and the smallest f16 subnormal -> +0
    (10, 3 * 2.0**-25),          # halfway between f16 subnormals 1 and 2 (x 2**-24) -> 2
    (11, -3e-6),
    (12, 1e-8),                  # f16 underflow to +0
    (13, 6.1035156e-05),         # ~ smallest normal f16 (2**-14) in f32
    (14, 1.0 + 2.0**-11 + 2.0**-23),  # just above the f16 halfway point: rounds up
    (15, 1.0 + 2.0**-8 + 2.0**-23),   # just above the bf16 halfway point: rounds up
    (32, 70000.0),               # above the f16 max -> +inf
    (33, 65520.0),               # f16 halfway between 65504 and 2**16 -> +inf (even)
    (34, 65519.0),               # -> 65504
    (35, -65504.0),              # exact f16 -max
    (36, -70000.0),              # -> -inf
]

# Row 1, first block: exact Q8_0 halfway points (d = 1, id = 1).
ROW1_HALVES = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -3.5, 64.5, -64.5,
               126.5, -126.5, 0.49999997, -0.49999997, 100.0, -127.0]


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------

# --------------------------------------------------------------------------
# Tensor data
# --------------------------------------------------------------------------

def random_blocks(rng, qtype, rows, cols):
    """Random but valid raw blocks for ``qtype``: uint8 array (rows, row_bytes)."""
    blk, tsize = gguf.GGML_QUANT_SIZES[qtype]
    assert cols % blk == 0
    nblocks = rows * cols // blk
    raw = rng.integers(0, 256, size=(nblocks, tsize), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        h = (rng.standard_normal(nblocks) * 0.01).astype(np.float16)
        assert np.all(np.isfinite(h))
        raw[:, off:off + 2] = h.view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(rows, cols // blk * tsize)


def bf16_rne(x):
    """f32 -> bf16 bits, round to nearest even (used only as a cross-check)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


SCALAR_ADDERS = {
    VT.UINT8: "add_uint8", VT.INT8: "add_int8", VT.UINT16: "add_uint16",
    VT.INT16: "add_int16", VT.UINT32: "add_uint32", VT.INT32: "add_int32",
    VT.FLOAT32: "add_float32", VT.BOOL: "add_bool", VT.STRING: "add_string",
    VT.UINT64: "add_uint64", VT.INT64: "add_int64", VT.FLOAT64: "add_float64",
}


def add_metadata(w, meta):
    for item in meta:
        key, vtype, val = item[:3]
        if vtype == VT.ARRAY:
            # add_array() cannot choose the element type, so go one level down
            w.add_key_value(key, val, VT.ARRAY, sub_type=item[3])
        else:
            getattr(w, SCALAR_ADDERS[vtype])(key, val)


def write_gguf(path, tensors, meta, alignment=None, version=3):
    """Write ``tensors`` (list of (name, array, raw_dtype or None)) with GGUFWriter."""
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    add_metadata(w, meta)
    for name, arr, raw_dtype in tensors:
        if raw_dtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        with open(path, "r+b") as f:
            f.seek(4)
            assert struct.unpack("<I", f.read(4))[0] == 3
            f.seek(4)
            f.write(struct.pack("<I", version))


# --------------------------------------------------------------------------
# Reference values and checks
# --------------------------------------------------------------------------

def reference_records(path):
    """Expected values for ``path``, all taken from gguf-py's reader/dequantiser."""
    r = gguf.GGUFReader(path)
    version = int(r.fields["GGUF.version"].parts[0][0])
    n_kv = int(r.fields["GGUF.kv_count"].parts[0][0])
    recs = [
        ("meta/header", np.array([version, len(r.tensors), n_kv, r.alignment], dtype=np.int32)),
        ("meta/data_offset", np.array([r.data_offset], dtype=np.int32)),
    ]
    for t in r.tensors:
        ne = [int(d) for d in t.shape] + [1] * (4 - len(t.shape))
        deq = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        deq = np.array(deq, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        recs += [
            (f"meta/ne/{t.name}", np.array(ne, dtype=np.int32)),
            (f"meta/type/{t.name}", np.array([int(t.tensor_type)], dtype=np.int32)),
            (f"meta/offset/{t.name}", np.array([t.data_offset - r.data_offset], dtype=np.int32)),
            (f"deq/{t.name}", deq),
        ]
    return r, recs


def check_gguf(r, tensors, meta, alignment, version):
    """Check what GGUFReader sees against what was meant to be written."""
    assert int(r.fields["GGUF.version"].parts[0][0]) == version
    assert r.alignment == alignment and r.data_offset % alignment == 0
    has_align_key = "general.alignment" in r.fields
    assert has_align_key == (alignment != 32)
    for item in meta:
        key, vtype, val = item[:3]
        f = r.fields[key]
        assert f.types[0] == vtype, (key, f.types)
        if vtype == VT.ARRAY:
            assert f.types[-1] == item[3], (key, f.types)
            got = [f.contents(i) for i in range(len(f.data))]
        else:
            got = f.contents()
        if isinstance(val, list):
            assert len(got) == len(val) and all(g == v for g, v in zip(got, val)), (key, got, val)
        else:
            assert got == val, (key, got, val)
    assert [t.name for t in r.tensors] == [n for n, _, _ in tensors]
    expect_off = 0
    for t, (name, arr, raw_dtype) in zip(r.tensors, tensors):
        qt = raw_dtype if raw_dtype is not None else {np.dtype(np.float32): QT.F32,
                                                       np.dtype(np.float16): QT.F16}[arr.dtype]
        blk, tsize = gguf.GGML_QUANT_SIZES[qt]
        np_shape = arr.shape[:-1] + (arr.shape[-1] // tsize * blk,) if raw_dtype is not None else arr.shape
        assert t.tensor_type == qt, (name, t.tensor_type)
        assert [int(d) for d in t.shape] == list(reversed(np_shape)), (name, t.shape)
        assert t.data_offset - r.data_offset == expect_off, (name, t.data_offset)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).ravel(), arr.view(np.uint8).ravel())
        expect_off += -(-arr.nbytes // alignment) * alignment


def check_reference(path, recs, tensors):
    back = read_fixture(path)
    assert [n for n, _ in back] == [n for n, _ in recs]
    for (n, a), (_, b) in zip(recs, back):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), n
    d = dict(recs)
    for name, arr, raw_dtype in tensors:
        deq = d[f"deq/{name}"]
        assert np.all(np.isfinite(deq)), name
        # dequantising the in-memory bytes must agree with the file round trip
        direct = gguf.quants.dequantize(arr, raw_dtype if raw_dtype is not None else
                                        {np.dtype(np.float32): QT.F32, np.dtype(np.float16): QT.F16}[arr.dtype])
        assert np.array_equal(np.asarray(direct, dtype=np.float32).reshape(deq.shape), deq), name


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

def build_types(rng):
    tensors = []
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    tensors.append(("t.f32", x, None))
    tensors.append(("t.f16", rng.standard_normal((ROWS, COLS)).astype(np.float16), None))
    xb = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    bf = gguf.quants.quantize(xb, QT.BF16)
    assert bf.dtype == np.uint8 and bf.shape == (ROWS, 2 * COLS)
    assert np.array_equal(bf.view(np.uint16), bf16_rne(xb))
    tensors.append(("t.bf16", bf, QT.BF16))
    for name, qt in QUANT_TENSORS:
        tensors.append((name, random_blocks(rng, qt, ROWS, COLS), qt))
    tensors.append(("t.vec", rng.standard_normal(7).astype(np.float32), None))
    tensors.append(("t.cube", rng.standard_normal((2, 3, 32)).astype(np.float16), None))
    return tensors


def build_aligned(rng):
    return [
        ("a", np.arange(5, dtype=np.float32), None),
        ("b", random_blocks(rng, QT.Q8_0, 2, 64), QT.Q8_0),
    ]


def build_encode_input():
    rng = np.random.default_rng(ENCODE_SEED)
    x = np.zeros((ENC_ROWS, ENC_COLS), dtype=np.float32)
    # row 0: random fill (moderate in block 0, up to 1e4 in block 1), then the specials
    x[0, :32] = rng.standard_normal(32) * 0.5
    x[0, 32:] = rng.standard_normal(32) * 10.0 ** rng.uniform(-2, 4, 32)
    for col, val in ROW0_SPECIALS:
        x[0, col] = np.float32(val)
    # row 1: block 0 = multiples of 0.5 in [-127, 127] plus the fixed halves, max |x| = 127
    x[1, :32] = rng.integers(-253, 254, 32) * 0.5
    x[1, :len(ROW1_HALVES)] = np.array(ROW1_HALVES, dtype=np.float32)
    x[1, 32:] = rng.standard_normal(32)
    # row 2: several magnitudes; block 0 tiny (f16 subnormal d), block 1 up to ~1e5
    x[2, :32] = rng.standard_normal(32) * 10.0 ** rng.uniform(-9, -3, 32)
    x[2, 32:] = rng.standard_normal(32) * 10.0 ** rng.uniform(-1, 5, 32)
    # row 3 stays all zero
    x = x.astype(np.float32)
    # the specials must have survived as exact float32 values
    for col, val in ROW0_SPECIALS:
        assert x[0, col] == np.float32(val) and np.signbit(x[0, col]) == np.signbit(val), col
    assert np.max(np.abs(x[1, :32])) == 127.0
    assert np.all(x[3] == 0)
    return x


def f16_bits_struct(v):
    """f32 -> f16 bits through Python's struct 'e' (round half to even, own code path)."""
    v = float(v)
    try:
        return struct.unpack("<H", struct.pack("<e", v))[0]
    except OverflowError:
        return 0xFC00 if v < 0 else 0x7C00


def bf16_bits_exact(v):
    """f32 -> bf16 bits: NaN as ggml does, else the nearest bf16, ties to even."""
    (u,) = struct.unpack("<I", struct.pack("<f", float(v)))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    sign, mag = u & 0x80000000, u & 0x7FFFFFFF
    if mag == 0x7F800000:
        return (sign | mag) >> 16
    lo = mag >> 16
    val = struct.unpack("<f", struct.pack("<I", mag))[0]
    lo_val = struct.unpack("<f", struct.pack("<I", lo << 16))[0]
    # the next bf16 up; above 0x7f7f it is inf, whose rounding boundary is 2**128
    hi_val = 2.0**128 if lo + 1 == 0x7F80 else struct.unpack("<f", struct.pack("<I", (lo + 1) << 16))[0]
    dlo, dhi = val - lo_val, hi_val - val        # exact in double
    pick = lo if dlo < dhi else lo + 1 if dhi < dlo else (lo if lo % 2 == 0 else lo + 1)
    return (sign >> 16) | pick


def q8_0_ggml_ref(x):
    """Scalar transcription of ggml's quantize_row_q8_0_ref: bytes of every block."""
    out = bytearray()
    for blk in np.asarray(x, dtype=np.float32).reshape(-1, 32):
        amax = np.float32(0.0)
        for v in blk:
            amax = max(amax, np.float32(abs(v)))
        d = np.float32(amax / np.float32(127))
        idv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
        out += struct.pack("<H", f16_bits_struct(d))
        for v in blk:
            t = float(np.float32(v * idv))                      # float product, as in C
            r = math.trunc(t + math.copysign(0.5, t))           # C roundf: half away from zero
            out += struct.pack("<b", r)
    return np.frombuffer(bytes(out), dtype=np.uint8)


def check_encodings(x, f16, bf, q8):
    flat = x.ravel()
    # f16: numpy vs struct
    assert [f16_bits_struct(v) for v in flat] == [int(b) for b in f16.ravel()]
    # bf16: gguf-py vs the exact search and vs the bit formula
    assert [bf16_bits_exact(v) for v in flat] == [int(b) for b in bf.ravel()]
    assert np.array_equal(bf16_rne(x), bf)
    # bf16 on NaN / inf / extremes / halfway cases that are not in the fixture
    probe = {
        0x7FC00000: 0x7FC0,   # qNaN
        0x7F800001: 0x7FC0,   # sNaN with payload only in the low half (naive RNE would give inf)
        0xFFBFFFFF: 0xFFFF,   # negative NaN, payload kept and quiet bit set
        0x7F810000: 0x7FC1,   # sNaN with payload in the upper half
        0x7F800000: 0x7F80,   # +inf
        0xFF800000: 0xFF80,   # -inf
        0x7F7FFFFF: 0x7F80,   # FLT_MAX rounds to +inf
        0x7F7F7FFF: 0x7F7F,   # just below the halfway point under the largest bf16
        0x7F7F8000: 0x7F80,   # halfway, odd -> rounds up to inf
        0x3F808000: 0x3F80,   # 1 + 2**-8: halfway, even -> down
        0x3F818000: 0x3F82,   # 1 + 3 * 2**-8: halfway, odd -> up
        0xBF818000: 0xBF82,   # negative halfway
        0x00008000: 0x0000,   # subnormal halfway to 0
        0x00018000: 0x0002,   # subnormal halfway, odd -> up
        0x80000000: 0x8000,   # -0
    }
    pin = np.array(list(probe), dtype=np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):
        pout = gguf.quants.quantize(pin, QT.BF16).view(np.uint16)
    got = {k: int(v) for k, v in zip(probe, pout)}
    assert got == probe, {hex(k): hex(v) for k, v in got.items() if probe[k] != v}
    assert [bf16_bits_exact(v) for v in pin] == list(probe.values())
    # Q8_0: gguf-py vs the ggml transcription
    assert np.array_equal(q8, q8_0_ggml_ref(x))
    # the fixture really contains Q8_0 halfway cases, and they round away from zero
    blocks = q8.reshape(-1, 34)
    qs = blocks[:, 2:].view(np.int8).astype(np.int32).reshape(ENC_ROWS, ENC_COLS)
    halves = x[1, :32] * np.float32(1.0)          # d = 1 and id = 1 for this block
    assert blocks[2, :2].view(np.float16)[0] == 1.0
    is_half = (np.abs(halves) % 1) == 0.5
    assert is_half.sum() >= 8
    away = np.sign(halves) * np.floor(np.abs(halves) + 0.5)
    assert np.array_equal(qs[1, :32][is_half], away[is_half])
    assert not np.array_equal(qs[1, :32][is_half], np.round(halves[is_half]))
    # the zero block: d = 0 and all q = 0
    assert not np.any(blocks[6:8])
    # the tiny block of row 2 has an f16-subnormal d
    d22 = int(blocks[4, :2].view(np.uint16)[0])
    assert 0 < d22 < 0x0400, hex(d22)
    return int(is_half.sum())


def make_encode(outdir):
    path = os.path.join(outdir, "encode_ref.bin")
    x = build_encode_input()
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    f16 = h.view(np.uint16)
    bf = gguf.quants.quantize(x, QT.BF16)
    assert bf.dtype == np.uint8 and bf.shape == (ENC_ROWS, 2 * ENC_COLS)
    bf = bf.view(np.uint16)
    q8 = gguf.quants.quantize(x, QT.Q8_0)
    assert q8.dtype == np.uint8 and q8.shape == (ENC_ROWS, ENC_COLS // 32 * 34)
    q8 = q8.ravel()
    n_half = check_encodings(x, f16, bf, q8)
    recs = [
        ("input", x),
        ("f16_bits", f16.astype(np.int32)),
        ("bf16_bits", bf.astype(np.int32)),
        ("q8_0_bytes", q8.astype(np.int32)),
    ]
    size = write_fixture(path, recs)
    back = read_fixture(path)
    assert [n for n, _ in back] == [n for n, _ in recs]
    for (n, a), (_, b) in zip(recs, back):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32)), n
    print(f"wrote {path} ({size} bytes, {len(recs)} records: "
          + ", ".join(f"{n} {a.dtype} {a.shape}" for n, a in recs) + ")")
    print(f"  f16: {int(np.sum(np.isinf(h)))} inf, {int(np.sum((f16 & 0x7C00) == 0) - np.sum((f16 & 0x7FFF) == 0))} "
          f"subnormal; Q8_0: gguf-py matches ggml quantize_row_q8_0_ref bit for bit, "
          f"{n_half} exact halfway q values rounded away from zero; "
          f"BF16: NaN/inf/halfway probes match round to nearest even")


def make(outdir, stem_gguf, stem_ref, tensors, meta, alignment, version):
    gpath = os.path.join(outdir, stem_gguf)
    rpath = os.path.join(outdir, stem_ref)
    write_gguf(gpath, tensors, meta, alignment=None if alignment == 32 else alignment, version=version)
    r, recs = reference_records(gpath)
    check_gguf(r, tensors, meta, alignment, version)
    rsize = write_fixture(rpath, recs)
    check_reference(rpath, recs, tensors)
    print(f"wrote {gpath} ({os.path.getsize(gpath)} bytes, v{version}, {len(tensors)} tensors, "
          f"alignment {alignment}, data section at {r.data_offset})")
    print(f"wrote {rpath} ({rsize} bytes, {len(recs)} records)")
    return dict(recs)


def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outdir = argv[1] if len(argv) > 1 else os.path.join(root, "tests", "fixtures", "gguf")
    os.makedirs(outdir, exist_ok=True)
    print(f"gguf {importlib.metadata.version('gguf')}, numpy {np.__version__}")

    rng = np.random.default_rng(SEED)
    make(outdir, "types_v3.gguf", "types_ref.bin", build_types(rng), META_V3, 32, 3)
    make(outdir, "aligned64_v2.gguf", "aligned64_ref.bin", build_aligned(rng), META_V2, 64, 2)
    make_encode(outdir)


if __name__ == "__main__":
    main(sys.argv)
