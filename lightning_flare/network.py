"""4-stage 3D U-Net with the module layout of nnU-Net's ``PlainConvUNet``.

Module structure and parameter names follow dynamic-network-architectures 0.3.1 exactly
(including the duplicate ``all_modules.*`` entries and ``decoder.encoder.*``), so that nnU-Net
checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

Triple = tuple[int, int, int]


def count_parameters(module: nn.Module) -> int:
    """Number of unique parameters (modules registered twice are counted once)."""
    return sum(p.numel() for p in module.parameters())


def _as_triple(name: str, value: int | Sequence[int]) -> Triple:
    """An int or a 3-sequence of positive ints as a 3-tuple."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a 3-tuple of ints, got {value!r}")
    if isinstance(value, int):
        value = (value,) * 3
    value = tuple(value)
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ValueError(f"{name} must be a positive int or a 3-tuple of positive ints, got {value!r}")
    return value  # type: ignore[return-value]


def _per_stage(name: str, value, n: int) -> list:
    """Broadcast a scalar to ``n`` entries, or check that a sequence has ``n`` entries."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} entries, got {value!r}")
    return list(value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that is faster on the CPU and keeps a channels-last input channels-last.

    CPU: group norm with one group per channel, which is instance norm (per sample and channel statistics, the
    same affine weight and bias). Its native kernel works in either layout, and its output is a tensor of its
    own: torch's instance_norm returns a view of a reshaped batch norm, so the in-place LeakyReLU after it
    makes autograd copy the whole gradient twice per layer (a training step takes about 10 % less with group
    norm, fp32 on an AVX-512 CPU without AMX; ``benchmarks/norm_speed.py``).
    Exported graphs (ONNX, TorchScript) keep torch's instance norm (ONNX InstanceNormalization). Elsewhere (CUDA):
    torch's instance_norm for contiguous tensors; for one channels-last sample, batch norm with
    batch statistics, which works in either layout (the CUDA paths are the measured ones, left as they were).
    Same parameters and state_dict keys as the parent.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
        if x.device.type == "cpu" and x.ndim == 5 and not self.track_running_stats and not exporting:
            return nn.functional.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        if x.ndim != 5 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
            return super().forward(x)
        if x.shape[0] == 1:
            return self._one(x)
        out = torch.empty_like(x)  # keeps the layout; one sample's output at a time is the only extra memory
        for i in range(x.shape[0]):
            out[i : i + 1] = self._one(x[i : i + 1])
        return out

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, self.weight, self.bias, None, None, True, 0.0, self.eps, False)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that avoids a oneDNN fault under CPU bf16 autocast.

    On CPUs with AVX512_BF16 but no AMX, oneDNN's bf16 backward-weights kernel for a stride-1 convolution
    whose input depth (the first spatial axis) lies between 1 and the kernel depth (2 for a 3x3x3 kernel)
    reads uninitialised memory: the weight gradient changes from run to run and can be inf or NaN. Such
    inputs (the deepest stage of a small patch) are tiny, so they run in float32 instead. Same parameters
    and state_dict keys as the parent.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_bf16_autocast(x) and self.stride[0] == 1 and 1 < x.shape[2] < self.kernel_size[0]:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def _cpu_bf16_autocast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class ConvDropoutNormReLU(nn.Module):
    """Conv3d (bias) -> InstanceNorm3d (affine) -> LeakyReLU, with 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, stride: Triple,
                 norm_eps: float = 1e-5, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, kernel_size, stride,
                              padding=[(k - 1) // 2 for k in kernel_size], bias=True)
        self.norm = InstanceNorm3d(out_channels, eps=norm_eps, affine=True)
        self.nonlin = nn.LeakyReLU(negative_slope, inplace=True)
        # Same modules again under a Sequential: nnU-Net's state_dict has both sets of keys.
        self.all_modules = nn.Sequential(self.conv, self.norm, self.nonlin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    """``n`` conv blocks; only the first one is strided."""

    def __init__(self, n: int, in_channels: int, out_channels: int, kernel_size: Triple,
                 first_stride: Triple, norm_eps: float, negative_slope: float) -> None:
        super().__init__()
        blocks = [ConvDropoutNormReLU(in_channels if i == 0 else out_channels, out_channels, kernel_size,
                                      first_stride if i == 0 else (1, 1, 1), norm_eps, negative_slope)
                  for i in range(n)]
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class PlainConvEncoder(nn.Module):
    """Encoder stages (strided first conv, no pooling); returns every stage's output as skips.

    Also holds the settings (widths, strides, kernels, norm/nonlin) that the decoder reads.
    """

    def __init__(self, in_channels: int, features_per_stage: Sequence[int], kernel_sizes: Sequence[Triple],
                 strides: Sequence[Triple], n_conv_per_stage: Sequence[int],
                 norm_eps: float = 1e-5, negative_slope: float = 0.01) -> None:
        super().__init__()
        stages = []
        for s, width in enumerate(features_per_stage):
            # nnU-Net wraps each stage in a Sequential (it may hold a pooling op) -> key "stages.s.0".
            stages.append(nn.Sequential(StackedConvBlocks(
                n_conv_per_stage[s], in_channels, width, kernel_sizes[s], strides[s], norm_eps, negative_slope)))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.output_channels = list(features_per_stage)
        self.kernel_sizes = list(kernel_sizes)
        self.strides = list(strides)
        self.norm_eps = norm_eps
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed conv up, concat skip, conv blocks, 1x1x1 head; settings come from the encoder."""

    def __init__(self, encoder: PlainConvEncoder, num_classes: int, n_conv_per_stage: Sequence[int],
                 deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.encoder = encoder  # registered on purpose: nnU-Net's keys include decoder.encoder.*
        self.num_classes = num_classes
        widths, n = encoder.output_channels, len(encoder.output_channels)
        stages, transpconvs, seg_layers = [], [], []
        for s in range(1, n):  # from the bottleneck up
            below, skip = widths[-s], widths[-(s + 1)]
            stride = encoder.strides[-s]
            transpconvs.append(nn.ConvTranspose3d(below, skip, stride, stride, bias=True))
            stages.append(StackedConvBlocks(n_conv_per_stage[s - 1], 2 * skip, skip, encoder.kernel_sizes[-(s + 1)],
                                            (1, 1, 1), encoder.norm_eps, encoder.negative_slope))
            # Heads exist for every stage so weights load whether or not deep supervision is on.
            seg_layers.append(nn.Conv3d(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Consumes ``skips`` (the encoder's list, emptied as it goes).

        For inference memory, every tensor is released as soon as it is used: a skip once concatenated, the
        concatenation after the stage's first block (hence the blocks are called one by one, not through the
        stage module). Autograd keeps what training needs either way.
        """
        x = skips.pop()
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = torch.cat((up(x), skips.pop()), dim=1)
            for block in stage.convs:
                x = block(x)
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        outputs.reverse()  # full resolution first
        return outputs if self.deep_supervision else outputs[0]


def init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """He (kaiming normal) init of conv / transposed-conv weights, zero biases (nnU-Net's InitWeights_He)."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PlainConvUNet(nn.Module):
    """nnU-Net's PlainConvUNet (3D, conv bias, InstanceNorm, LeakyReLU) with keyword arguments.

    forward returns ``[full, 1/2, 1/4, ...]`` logits with deep supervision, else the full-res logits.
    Input spatial sizes must be divisible by the product of the strides on each axis.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 2,
                 features_per_stage: Sequence[int] = (32, 64, 128, 256),
                 kernel_sizes: int | Sequence[int | Sequence[int]] = 3,
                 strides: int | Sequence[int | Sequence[int]] = (1, 2, 2, 2),
                 n_conv_per_stage: int | Sequence[int] = 2,
                 n_conv_per_stage_decoder: int | Sequence[int] = 2,
                 deep_supervision: bool = True, norm_eps: float = 1e-5, negative_slope: float = 0.01) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_classes", num_classes)
        if isinstance(features_per_stage, (int, str)) or not isinstance(features_per_stage, Sequence) \
                or len(features_per_stage) < 2:
            raise ValueError(f"features_per_stage must be a sequence of at least 2 ints, got {features_per_stage!r}")
        widths = [_positive_int(f"features_per_stage[{i}]", f) for i, f in enumerate(features_per_stage)]
        n = len(widths)
        kernels = [_as_triple(f"kernel_sizes[{i}]", k)
                   for i, k in enumerate(_per_stage("kernel_sizes", kernel_sizes, n))]
        for i, k in enumerate(kernels):
            if any(v % 2 == 0 for v in k):
                raise ValueError(f"kernel_sizes[{i}] must be odd (same padding), got {k}")
        stride_list = [_as_triple(f"strides[{i}]", s) for i, s in enumerate(_per_stage("strides", strides, n))]
        n_enc = [_positive_int(f"n_conv_per_stage[{i}]", c)
                 for i, c in enumerate(_per_stage("n_conv_per_stage", n_conv_per_stage, n))]
        n_dec = [_positive_int(f"n_conv_per_stage_decoder[{i}]", c)
                 for i, c in enumerate(_per_stage("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n - 1))]
        if not isinstance(deep_supervision, bool):
            raise ValueError(f"deep_supervision must be a bool, got {deep_supervision!r}")
        if not (isinstance(norm_eps, (int, float)) and norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        if not (isinstance(negative_slope, (int, float)) and negative_slope >= 0):
            raise ValueError(f"negative_slope must be a non-negative number, got {negative_slope!r}")

        self.init_args = {"in_channels": in_channels, "num_classes": num_classes, "features_per_stage": widths,
                          "kernel_sizes": [list(k) for k in kernels], "strides": [list(st) for st in stride_list],
                          "n_conv_per_stage": n_enc, "n_conv_per_stage_decoder": n_dec,
                          "deep_supervision": deep_supervision, "norm_eps": float(norm_eps),
                          "negative_slope": float(negative_slope)}
        self.encoder = PlainConvEncoder(in_channels, widths, kernels, stride_list, n_enc,
                                        float(norm_eps), float(negative_slope))
        self.decoder = UNetDecoder(self.encoder, num_classes, n_dec, deep_supervision)
        for m in self.modules():  # modules() visits shared submodules once
            init_he(m, float(negative_slope))

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.decoder.deep_supervision = bool(value)

    @property
    def num_classes(self) -> int:
        """Output channels (one per label, background included)."""
        return self.decoder.num_classes

    def output_scales(self) -> list[tuple[float, float, float]]:
        """Per-axis scale of each deep-supervision output relative to the input, full-res first.

        Always lists all ``n_stages - 1`` outputs, whether or not deep supervision is on.
        """
        scales, total = [], (1, 1, 1)
        for stride in self.encoder.strides[:-1]:
            total = tuple(t * s for t, s in zip(total, stride))
            scales.append(tuple(1.0 / t for t in total))
        return scales

    def size_divisor(self) -> Triple:
        """Per-axis product of the strides: input sizes must be multiples of this."""
        return tuple(math.prod(s[a] for s in self.encoder.strides) for a in range(3))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        div = self.size_divisor()
        if x.ndim != 5 or any(d % v for d, v in zip(x.shape[2:], div)):
            raise ValueError(f"expected input (B, C, X, Y, Z) with X, Y, Z divisible by {div}, got {tuple(x.shape)}")
        return self.decoder(self.encoder(x))
