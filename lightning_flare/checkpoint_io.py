"""Checkpoints written to a temporary file in the target folder, then renamed: a crash mid-save leaves the old file.

Lightning's ``TorchCheckpointIO`` writes local checkpoints through an fsspec transaction whose temporary file lives
in the system temp folder (``/tmp``); when that is another file system the final "rename" is a copy straight into
``last.ckpt``, and a job killed during the copy leaves a truncated checkpoint (and an orphan in ``/tmp``).

Use it with ``trainer.plugins``::

    trainer:
      plugins:
        - class_path: lightning_flare.checkpoint_io.AtomicCheckpointIO

or ``--trainer.plugins lightning_flare.checkpoint_io.AtomicCheckpointIO`` on the command line.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.NAME.XXXX.tmp`` next to ``NAME`` (fsync'ed), then ``os.replace``.

    The temporary name starts with a dot and does not end in ``.ckpt``, so ``--ckpt_path last`` never picks it up.
    Non-local paths (``s3://``, ...) fall back to Lightning's own saving. ``fsync``: flush the bytes to disk before
    the rename, so that a power loss (not only a killed process) cannot leave an empty file under the final name.
    """

    def __init__(self, fsync: bool = True):
        super().__init__()
        self.fsync = fsync

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by {type(self).__name__}")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        path = os.fspath(path)
        if path.startswith("file://"):
            path = path[len("file://"):]

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())

        remove_stale_temporaries(path)
        atomic_write(path, write, suffix="")
        if self.fsync:
            _fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete ``.NAME.*.tmp`` left next to ``NAME`` by a save that was killed. Only one process saves a given
    checkpoint path at a time (rank 0 of one job), so such a temporary, seen before our own save, is an orphan."""
    directory, name = os.path.split(os.path.abspath(path))
    removed = []
    try:
        candidates = os.listdir(directory)
    except OSError:
        return removed
    for entry in candidates:
        if entry.startswith(f".{name}.") and ".tmp" in entry[len(name) + 2:]:
            try:
                os.unlink(os.path.join(directory, entry))
                removed.append(entry)
            except OSError:
                pass
    return removed


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (best effort: not every platform/file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
