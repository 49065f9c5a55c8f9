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
import os
import struct
import sys

import numpy as np
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


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------

def write_fixture(path, records):
    """Write ``records`` (list of (name, ndarray)) to ``path``."""
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<I", len(records)))
        for name, arr in records:
            arr = np.asarray(arr)
            if arr.dtype == np.float32:
                dt = DT_F32
            elif arr.dtype == np.int32:
                dt = DT_I32
            else:
                raise TypeError(f"{name}: unsupported dtype {arr.dtype}")
            nb = name.encode("ascii")
            f.write(struct.pack("<I", len(nb)))
            f.write(nb)
            f.write(struct.pack("<II", dt, arr.ndim))
            f.write(struct.pack("<%dq" % arr.ndim, *arr.shape))
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
    return os.path.getsize(path)


def read_fixture(path):
    """Read a CTLFIX01 file back into a list of (name, ndarray)."""
    with open(path, "rb") as f:
        buf = f.read()
    assert buf[:8] == MAGIC
    (n,) = struct.unpack_from("<I", buf, 8)
    pos = 12
    out = []
    for _ in range(n):
        (ln,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        name = buf[pos:pos + ln].decode("ascii")
        pos += ln
        dt, nd = struct.unpack_from("<II", buf, pos)
        pos += 8
        shape = struct.unpack_from("<%dq" % nd, buf, pos)
        pos += 8 * nd
        dtype = np.dtype("<f4") if dt == DT_F32 else np.dtype("<i4")
        cnt = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(buf, dtype=dtype, count=cnt, offset=pos).reshape(shape)
        pos += 4 * cnt
        out.append((name, arr))
    assert pos == len(buf)
    return out


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


if __name__ == "__main__":
    main(sys.argv)
