"""A stand-in accelerator for CPU-only machines, so that host/device slips fail a test without a GPU.

Inside ``StandInDevice()`` a tensor placed explicitly (``.to(device)``, ``device=`` in a factory: what Lightning's
``transfer_batch_to_device`` and ``LightningModule.to`` do) counts as on the accelerator, and so does everything
computed from it. Towards the code under test such tensors behave as CUDA tensors do:

- ``.numpy()`` and ``np.asarray(t)`` raise (``Tensor.cpu()`` first, as on CUDA);
- an operation mixing them with host tensors raises (0-dim host tensors are allowed, as on CUDA; so are
  indexing, ``copy_``, the module's parameters and the optimizer's ``_foreach`` updates of their gradients, which
  autograd makes outside this mode);
- ``.cpu()`` returns a host copy.

The machine's device stays ``cpu``, so a ``.to("cpu")`` meant as a host copy reads here as a placement on the
device: the code under test uses ``.cpu()`` for host copies.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_FLAG = "_on_standin_device"
_HOST_READS = {torch.Tensor.numpy, torch.Tensor.__array__}
_MIXING_ALLOWED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_}


def on_device(x) -> bool:
    return isinstance(x, torch.Tensor) and bool(getattr(x, _FLAG, False))


def _place(x):
    if isinstance(x, torch.Tensor):
        setattr(x, _FLAG, True)
    return x


class StandInDevice(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = any(on_device(t) for t in tensors)
        if func in _HOST_READS and on_device(args[0]):
            raise TypeError("can't convert stand-in device tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                            "host memory first.")
        if func is torch.Tensor.cpu:
            out = func(*args, **kwargs)
            return out.clone() if on_device(args[0]) else out  # a host copy: a new, unflagged tensor
        if func is torch.Tensor.to and torch._C._nn._parse_to(*args[1:], **kwargs)[0] is not None:
            out = func(*args, **kwargs)
            if not on_device(args[0]):
                out = out.clone() if out is args[0] else out  # the host original stays on the host
            return _place(out)
        if on and func not in _MIXING_ALLOWED and not getattr(func, "__name__", "").startswith("_foreach"):
            host = [t for t in tensors if not on_device(t) and t.dim() > 0 and not isinstance(t, torch.nn.Parameter)]
            if host:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"stand-in device and cpu! ({getattr(func, '__name__', func)} with a host tensor of "
                                   f"shape {tuple(host[0].shape)})")
        out = func(*args, **kwargs)
        if on or kwargs.get("device") is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not any(t is h for h in tensors if not on_device(h)):
                    _place(t)
        return out
