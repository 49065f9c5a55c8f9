"""The CTLFIX01 fixture format the C tests read (tests/test.c, fx_load), shared by the tools.

    char magic[8] = "CTLFIX01"; u32 count; count records of:
    u32 name_len; name; u32 dtype (0 float32, 1 int32, 2 uint8); u32 ndim; i64 shape[ndim];
    data (C order)
All little-endian.
"""
import os
import struct

import numpy as np

MAGIC = b"CTLFIX01"
DT_F32, DT_I32, DT_U8 = 0, 1, 2
NUMPY = {DT_F32: "<f4", DT_I32: "<i4", DT_U8: "u1"}


def write_fixture(path, records):
    """Write records, a list of (name, float32, int32 or uint8 array); returns the file size."""
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<I", len(records)))
        for name, arr in records:
            arr = np.asarray(arr)
            if arr.dtype == np.float32:
                dt = DT_F32
            elif arr.dtype == np.int32:
                dt = DT_I32
            elif arr.dtype == np.uint8:
                dt = DT_U8
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
    """Read a file back as a list of (name, array)."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:8] != MAGIC:
        raise ValueError(f"{path}: bad magic")
    (n,) = struct.unpack_from("<I", buf, 8)
    pos, out = 12, []
    for _ in range(n):
        (ln,) = struct.unpack_from("<I", buf, pos)
        name = buf[pos + 4:pos + 4 + ln].decode("ascii")
        pos += 4 + ln
        dt, nd = struct.unpack_from("<II", buf, pos)
        shape = struct.unpack_from("<%dq" % nd, buf, pos + 8)
        pos += 8 + 8 * nd
        cnt = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(buf, dtype=NUMPY[dt], count=cnt, offset=pos).reshape(shape)
        pos += arr.itemsize * cnt
        out.append((name, arr))
    if pos != len(buf):
        raise ValueError(f"{path}: {len(buf) - pos} trailing bytes")
    return out
