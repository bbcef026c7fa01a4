"""nifti_check: truncated NIfTI files (which SimpleITK reads without an error, zero-filled) are refused by name."""
import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from lightning_flare import nifti_check
from lightning_flare.io import ImageReadError, read_image
from lightning_flare.nifti_check import declared_bytes, incomplete_reason


def _scan(path, shape=(20, 24, 16), seed=0):
    arr = np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(path))
    return arr


def test_complete_files_pass_and_read(tmp_path):
    for name in ("a.nii.gz", "a.nii"):
        arr = _scan(tmp_path / name)
        assert incomplete_reason(tmp_path / name) is None
        assert np.array_equal(sitk.GetArrayFromImage(read_image(tmp_path / name)), arr)


def test_declared_bytes_is_the_size_of_an_uncompressed_file(tmp_path):
    _scan(tmp_path / "a.nii")
    data = (tmp_path / "a.nii").read_bytes()
    assert declared_bytes(data[:544]) == len(data) == 352 + 20 * 24 * 16 * 2


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.99])
def test_truncated_gzip_is_refused_naming_the_file(tmp_path, keep):
    _scan(tmp_path / "whole.nii.gz")
    data = (tmp_path / "whole.nii.gz").read_bytes()
    cut = tmp_path / "case_0000.nii.gz"
    cut.write_bytes(data[: max(int(len(data) * keep), 200)])
    sitk.ReadImage(str(cut))  # the reason for this module: SimpleITK itself raises nothing
    assert "truncated gzip stream" in incomplete_reason(cut)
    with pytest.raises(ImageReadError, match=r"case_0000\.nii\.gz: truncated gzip stream: it ends after \d+ of the 15712 bytes"):
        read_image(cut)


def test_truncated_uncompressed_file_is_refused(tmp_path):
    _scan(tmp_path / "whole.nii")
    data = (tmp_path / "whole.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:5000])
    with pytest.raises(ImageReadError, match=r"cut\.nii: truncated NIfTI file: 5000 bytes where its header declares 15712"):
        read_image(tmp_path / "cut.nii")


def test_multi_member_and_trailing_bytes_are_complete(tmp_path):
    _scan(tmp_path / "a.nii")
    raw = (tmp_path / "a.nii").read_bytes()
    two = tmp_path / "two.nii.gz"  # two gzip members (e.g. bgzip, or concatenated writes): ISIZE is the last one's
    two.write_bytes(gzip.compress(raw[:7000]) + gzip.compress(raw[7000:]))
    assert incomplete_reason(two) is None
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(gzip.compress(raw) + b"\0" * 100)
    assert incomplete_reason(padded) is None
    short = tmp_path / "short.nii.gz"  # a complete stream with too little data in it
    short.write_bytes(gzip.compress(raw[:9000]))
    assert incomplete_reason(short) == "NIfTI data too short: 9000 bytes where its header declares 15712"


def test_complete_single_member_files_skip_the_full_decompression(tmp_path, monkeypatch):
    _scan(tmp_path / "a.nii.gz")
    monkeypatch.setattr(nifti_check, "_decompressed_size", lambda path: pytest.fail("decompressed a complete file"))
    assert incomplete_reason(tmp_path / "a.nii.gz") is None


def test_big_endian_nifti1_and_nifti2_headers(tmp_path):
    arr = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    header = nib.Nifti1Header(endianness=">")
    big = nib.Nifti1Image(arr, np.eye(4), header=header)
    nib.save(big, tmp_path / "big.nii")
    data = (tmp_path / "big.nii").read_bytes()
    assert data[:4] == (348).to_bytes(4, "big") and declared_bytes(data[:544]) == len(data)
    nib.save(nib.Nifti2Image(arr.astype(np.float32), np.eye(4)), tmp_path / "two.nii")
    data = (tmp_path / "two.nii").read_bytes()
    assert declared_bytes(data[:544]) == len(data)
    (tmp_path / "two_cut.nii").write_bytes(data[:-10])
    assert "truncated NIfTI file" in incomplete_reason(tmp_path / "two_cut.nii")


def test_pairs_and_other_formats_are_left_to_the_reader(tmp_path):
    arr = _scan(tmp_path / "pair.hdr")  # a .hdr/.img pair: the voxels live in pair.img
    assert incomplete_reason(tmp_path / "pair.hdr") is None
    assert np.array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "pair.hdr")), arr)
    _scan(tmp_path / "a.mha")
    assert incomplete_reason(tmp_path / "a.mha") is None
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    assert incomplete_reason(tmp_path / "empty.nii.gz") is None
    with pytest.raises(ImageReadError, match="empty.nii.gz: unreadable or truncated image"):
        read_image(tmp_path / "empty.nii.gz")


def test_a_corrupt_vox_offset_leaves_the_verdict_to_the_reader(tmp_path):
    import struct

    _scan(tmp_path / "a.nii")
    data = bytearray((tmp_path / "a.nii").read_bytes())
    data[108:112] = struct.pack("<f", float("nan"))
    assert declared_bytes(bytes(data[:544])) is None
