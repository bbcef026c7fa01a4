"""Reading and writing medical images with SimpleITK, with clear errors and atomic writes."""
from __future__ import annotations

import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .nifti_check import incomplete_reason


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


@dataclass
class Geometry:
    """Physical grid of an image, SimpleITK conventions: size/spacing (x, y, z), LPS origin/direction."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        return cls(tuple(int(v) for v in data["size"]), tuple(map(float, data["spacing"])), tuple(map(float, data["origin"])), tuple(map(float, data["direction"])))


def read_image(path: str | Path) -> sitk.Image:
    """Read a 3D image file or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file does not exist")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise ImageReadError(f"{path}: folder holds no DICOM series")
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            reason = incomplete_reason(path)  # SimpleITK reads a truncated NIfTI silently, zero-filled
            if reason:
                raise ImageReadError(f"{path}: {reason}")
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ImageReadError(f"{path}: unreadable or truncated image ({first[-1] if first else err})") from err
    if image.GetDimension() != 3:
        raise ImageReadError(f"{path}: expected a 3D image, got {image.GetDimension()}D of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: expected one channel, got {image.GetNumberOfComponentsPerPixel()} components per voxel")
    return image


def to_array(image: sitk.Image, dtype=np.float32) -> np.ndarray:
    """Voxel array in (x, y, z) order (SimpleITK's own array is (z, y, x))."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0), dtype=dtype)


def from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    if tuple(array.shape) != tuple(geometry.size):
        raise ValueError(f"array shape {array.shape} does not match the geometry size {geometry.size}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str | None = None) -> Path:
    """Call ``write(tmp_path)`` then rename to ``path``: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{HOST}-{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[a-z0-9_]+\.tmp")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries of ``atomic_write`` in ``folder`` left by killed processes of this machine
    (their pid is gone); those of live writers (other ranks, other jobs) and of other machines are kept."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        match = _TEMPORARY.match(tmp.name)
        if match and match["host"] == HOST and not pid_alive(int(match["pid"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (a writer whose temporaries must be kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, compress))


def write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write, suffix="")


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return atomic_write(path, write, suffix="")
