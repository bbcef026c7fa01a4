"""Whether a NIfTI file holds all the voxels its header declares.

SimpleITK reads a truncated ``.nii`` or ``.nii.gz`` (a broken copy or upload) without an error and fills the
missing voxels with zeros, so a half-written scan would be trained on or predicted as if it were whole. This
module compares the data a file holds with its header: for ``.nii`` the file size; for gzip files first the
gzip trailer's uncompressed size (ISIZE, the size modulo 2^32 of the last member: a cheap check that holds for
every complete single-member file), and only when that does not match a full decompression, which tells a
truncated stream (no end-of-stream marker) from a multi-member or padded one. Other formats are not checked.
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def nifti_header(head: bytes) -> tuple[int, int, np.dtype | None] | None:
    """(vox_offset, voxel data bytes, float dtype or None) of a single-file NIfTI-1 / NIfTI-2 header (either byte
    order); None for anything else (other formats, the .hdr of a .hdr/.img pair, whose voxels live in another file,
    a header this module does not understand: the reader then has the last word)."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:348] == b"n+1\0":
            dim, (code, bitpix) = struct.unpack(order + "8h", head[40:56]), struct.unpack(order + "2h", head[70:74])
            vox_offset = struct.unpack(order + "f", head[108:112])[0]
            if not math.isfinite(vox_offset):  # a corrupt header: the reader has the last word
                return None
            offset, header_size = int(vox_offset), 348
        elif len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:8] == b"n+2\0":
            dim, (code, bitpix) = struct.unpack(order + "8q", head[16:80]), struct.unpack(order + "2h", head[12:16])
            offset, header_size = struct.unpack(order + "q", head[168:176])[0], 540
        else:
            continue
        if not 1 <= dim[0] <= 7 or bitpix <= 0:
            return None
        nbytes = (math.prod(max(int(d), 1) for d in dim[1 : dim[0] + 1]) * bitpix + 7) // 8
        dtype = np.dtype(order + {16: "f4", 64: "f8"}[code]) if code in (16, 64) else None  # float32/64: NaN/inf scan
        return max(offset, header_size), nbytes, dtype
    return None


def declared_bytes(head: bytes) -> int | None:
    """vox_offset + voxel data bytes of a single-file NIfTI header (``nifti_header``), or None."""
    header = nifti_header(head)
    return None if header is None else header[0] + header[1]


def _decompressed_size(path: Path) -> tuple[int, bool]:
    """(bytes, complete) of all gzip members of ``path``; complete is False when the stream ends early."""
    total, data = 0, b""
    with open(path, "rb") as f:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while True:
            chunk = data or f.read(_CHUNK)
            data = b""
            if not chunk:
                return total, d.eof
            total += len(d.decompress(chunk))
            if d.eof:
                data = d.unused_data
                if not data:
                    data = f.read(_CHUNK)
                    if not data:
                        return total, True
                if not data.startswith(GZIP_MAGIC):
                    return total, True  # trailing bytes after the last member: gzip itself ignores them
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)


def incomplete_reason(path: str | Path) -> str | None:
    """Why ``path`` holds fewer voxels than its NIfTI header declares, or None (complete, or not NIfTI)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if not head.startswith(GZIP_MAGIC):
            expected, size = declared_bytes(head[:544]), path.stat().st_size
            if expected is not None and size < expected:
                return f"truncated NIfTI file: {size} bytes where its header declares {expected}"
            return None
        try:  # the header from the stream's start, even when the stream ends soon after it
            expected = declared_bytes(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 544))
        except zlib.error:
            return None  # not a gzip stream after all: the reader's own error says what it is
        if expected is None:
            return None
        f.seek(-4, 2)
        if struct.unpack("<I", f.read(4))[0] == expected % 2**32:  # the trailer's ISIZE: a complete single member
            return None
    total, complete = _decompressed_size(path)
    if not complete:
        return f"truncated gzip stream: it ends after {total} of the {expected} bytes its NIfTI header declares"
    if total < expected:
        return f"NIfTI data too short: {total} bytes where its header declares {expected}"
    return None
