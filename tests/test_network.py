"""PlainConvUNet: parameter count, nnU-Net compatibility, shapes, init, argument checks."""
import math

import pytest
import torch
from torch import nn

from lightning_flare.network import PlainConvUNet, count_parameters

ANISO = dict(features_per_stage=(8, 16, 32), strides=[(1, 1, 1), (2, 2, 1), (2, 2, 2)],
             kernel_sizes=[(3, 3, 1), 3, 3])


def reference(features_per_stage=(32, 64, 128, 256), kernel_sizes=3, strides=(1, 2, 2, 2), num_classes=2):
    """dynamic-network-architectures' PlainConvUNet as nnU-Net builds it for FLARE24."""
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    net = unet.PlainConvUNet(
        input_channels=1, n_stages=len(features_per_stage), features_per_stage=list(features_per_stage),
        conv_op=nn.Conv3d, kernel_sizes=kernel_sizes, strides=list(strides), n_conv_per_stage=2,
        num_classes=num_classes, n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=True)
    net.apply(net.initialize)
    return net


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b = a(x.clone()), b(x.clone())
    assert len(out_a) == len(out_b)
    for oa, ob in zip(out_a, out_b):
        assert oa.shape == ob.shape
        torch.testing.assert_close(oa, ob, atol=1e-5, rtol=1e-5)


def test_parameter_count():
    net = PlainConvUNet()
    assert count_parameters(net) == 5_602_950
    # state_dict holds duplicates (all_modules.*, decoder.encoder.*); count_parameters must not
    assert sum(v.numel() for v in net.state_dict().values()) > 5_602_950


def test_state_dict_matches_reference_both_ways():
    torch.manual_seed(0)
    ours = PlainConvUNet()
    ref = reference()
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    x = torch.randn(1, 1, 32, 32, 32)

    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same_outputs(ours, ref, x)

    torch.manual_seed(1)
    ours2, ref2 = PlainConvUNet(), reference()
    ref2.load_state_dict(ours2.state_dict(), strict=True)
    assert_same_outputs(ours2, ref2, x)


def test_anisotropic_matches_reference():
    torch.manual_seed(0)
    ours = PlainConvUNet(**ANISO)
    ref = reference(**ANISO)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.encoder.stages[0][0].convs[0].conv.kernel_size == (3, 3, 1)
    assert ours.decoder.transpconvs[-1].stride == (2, 2, 1)
    x = torch.randn(1, 1, 16, 8, 6)
    assert_same_outputs(ours, ref, x)
    outs = ours(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 8, 6), (8, 4, 6)]
    assert ours.output_scales() == [(1.0, 1.0, 1.0), (0.5, 0.5, 1.0)]


def test_output_shapes_and_toggle():
    torch.manual_seed(0)
    net = PlainConvUNet().eval()
    x = torch.randn(1, 1, 32, 48, 16)  # non-cubic
    with torch.no_grad():
        outs = net(x)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == [(1, 2, 32, 48, 16), (1, 2, 16, 24, 8), (1, 2, 8, 12, 4)]
    assert net.output_scales() == [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)]
    for o, s in zip(outs, net.output_scales()):
        assert tuple(o.shape[2:]) == tuple(round(d * f) for d, f in zip(x.shape[2:], s))

    net.deep_supervision = False
    assert net.decoder.deep_supervision is False and net.deep_supervision is False
    with torch.no_grad():
        full = net(x)
    assert isinstance(full, torch.Tensor) and full.shape == (1, 2, 32, 48, 16)
    torch.testing.assert_close(full, outs[0])

    net.deep_supervision = True
    with torch.no_grad():
        assert len(net(x)) == 3
    assert isinstance(PlainConvUNet(deep_supervision=False, features_per_stage=(4, 8), strides=(1, 2))(
        torch.randn(1, 1, 4, 4, 4)), torch.Tensor)


def test_indivisible_input_rejected():
    net = PlainConvUNet(features_per_stage=(4, 8, 16), strides=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 8, 8, 6))


def test_he_init():
    torch.manual_seed(0)
    net = PlainConvUNet()
    gain = math.sqrt(2.0 / (1 + 0.01 ** 2))
    checked = 0
    for m in net.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            assert torch.all(m.bias == 0)
            w = m.weight
            if w.numel() >= 10_000:  # enough samples for a tight std estimate
                fan_in = w.shape[1] * math.prod(w.shape[2:])  # torch's fan_in for both conv types
                assert w.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.05)
                assert abs(w.mean().item()) < 0.05 * gain / math.sqrt(fan_in)
                checked += 1
        elif isinstance(m, nn.InstanceNorm3d):
            assert m.affine and m.eps == 1e-5
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert checked >= 15


@pytest.mark.parametrize("kwargs, bad", [
    (dict(features_per_stage=(32,)), "features_per_stage"),
    (dict(features_per_stage=(32, 0)), "features_per_stage"),
    (dict(kernel_sizes=(3, 3)), "kernel_sizes"),
    (dict(kernel_sizes=2), "kernel_sizes"),
    (dict(kernel_sizes=[(3, 3), 3, 3, 3]), "kernel_sizes"),
    (dict(strides=(1, 2, 2)), "strides"),
    (dict(strides=[1, 2, 0, 2]), "strides"),
    (dict(n_conv_per_stage=0), "n_conv_per_stage"),
    (dict(n_conv_per_stage_decoder=(2, 2, 2, 2)), "n_conv_per_stage_decoder"),
    (dict(in_channels=0), "in_channels"),
    (dict(num_classes=0), "num_classes"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(negative_slope=-1.0), "negative_slope"),
    (dict(deep_supervision="yes"), "deep_supervision"),
])
def test_invalid_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        PlainConvUNet(**kwargs)


CL = torch.channels_last_3d


@pytest.mark.parametrize("batch", [1, 3])
def test_instance_norm_keeps_channels_last_and_matches_hand_computed(batch):
    from lightning_flare.network import InstanceNorm3d

    torch.manual_seed(0)
    norm = InstanceNorm3d(4, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.25]))
    x = torch.randn(batch, 4, 5, 4, 3) * 3 + 2
    xl = x.contiguous(memory_format=CL).requires_grad_()
    out = norm(xl)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    var = x.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # gradients (training) equal torch's instance norm on the contiguous tensor
    xc = x.clone().requires_grad_()
    grad = torch.randn_like(x)
    out.backward(grad)
    nn.functional.instance_norm(xc, weight=norm.weight, bias=norm.bias, eps=1e-5).backward(grad)
    torch.testing.assert_close(xl.grad, xc.grad, rtol=1e-4, atol=1e-5)
    assert norm(x).is_contiguous()


def test_instance_norm_channels_last_sample_path_and_exported_graphs():
    """The batch-norm path of one channels-last sample (CUDA's) is instance norm too, and traced graphs (ONNX,
    TorchScript export) hold torch's instance norm, not group norm."""
    from lightning_flare.network import InstanceNorm3d

    torch.manual_seed(2)
    norm = InstanceNorm3d(3, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, -0.5, 1.0]))
        norm.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    x = torch.randn(1, 3, 5, 4, 3) * 2 + 1
    expected = nn.functional.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=1e-5)
    out = norm._one(x.contiguous(memory_format=CL))
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    graph = str(torch.jit.trace(norm, x).inlined_graph)
    assert "instance_norm" in graph and "group_norm" not in graph


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_cpu_instance_norm_output_is_no_view_and_its_gradients_are_instance_norms(layout):
    """An in-place LeakyReLU after a view makes autograd copy the gradient (CopySlices); group norm's is no view."""
    from lightning_flare.network import InstanceNorm3d

    torch.manual_seed(1)
    norm = InstanceNorm3d(3, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = (torch.randn(2, 3, 6, 5, 4) * 2 - 1).contiguous(memory_format=layout).requires_grad_()
    out = norm(x)
    assert out._base is None
    grad = torch.randn(2, 3, 6, 5, 4)
    nn.functional.leaky_relu(out, 0.01, inplace=True).backward(grad)
    xr = x.detach().contiguous().requires_grad_()
    w, b = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
    nn.functional.leaky_relu(nn.functional.instance_norm(xr, weight=w, bias=b, eps=1e-5), 0.01).backward(grad)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.bias.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_channels_last_network_matches_contiguous_and_stays_channels_last():
    from lightning_flare.inference import channels_last_forward

    torch.manual_seed(0)
    net = PlainConvUNet(features_per_stage=(8, 16, 32), strides=(1, 2, 2), deep_supervision=False).eval()
    seen = []
    for name, m in net.named_modules():
        if isinstance(m, nn.InstanceNorm3d) and not name.startswith("decoder.encoder"):
            m.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=CL) and not o.is_contiguous()))
    x = torch.randn(2, 1, 16, 12, 8)
    with torch.no_grad():
        reference = net(x)
        seen.clear()
        out = channels_last_forward(net)(x)
    # every norm after the first block runs channels-last (the 1-channel input's first conv cannot tell layouts)
    assert sum(seen) >= len(seen) - 2 and len(seen) == 10
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert all(p.is_contiguous() for p in net.parameters())  # the module's own weights are left as they were


def test_decoder_consumes_the_skip_list():
    net = PlainConvUNet(features_per_stage=(4, 8, 16), strides=(1, 2, 2), deep_supervision=True).eval()
    skips = net.encoder(torch.randn(1, 1, 8, 8, 8))
    assert len(skips) == 3
    outputs = net.decoder(skips)
    assert skips == [] and [tuple(o.shape[2:]) for o in outputs] == [(8, 8, 8), (4, 4, 4)]


# oneDNN's code paths, newest first: AMX, AVX512_BF16 without AMX (where its bf16 backward-weights kernel
# misreads inputs of depth 2), AVX-512 without bf16, AVX2. A cap above what this CPU has changes nothing.
ONEDNN_ISA_CAPS = ["ALL", "AVX512_CORE_BF16", "AVX512_CORE", "AVX2"]

_BF16_GRADIENTS = """
import torch
from lightning_flare.network import PlainConvUNet
torch.manual_seed(0)
net = PlainConvUNet(features_per_stage=[16, 32, 32, 32], deep_supervision=False)
x = torch.randn(2, 1, 16, 16, 16)  # the deepest stage sees 2 x 2 x 2
probe = torch.randn(2, 2, 16, 16, 16)  # a linear objective: its weight gradient is well conditioned
grads = []
for _ in range(3):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    (out.float() * probe).mean().backward()
    grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
assert torch.isfinite(grads[0]).all(), "non-finite weight gradient"
for g in grads[1:]:
    assert torch.equal(g, grads[0]), f"weight gradients differ between identical passes by {(g - grads[0]).abs().max()}"
net.zero_grad(set_to_none=True)
(net(x) * probe).mean().backward()
reference = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
error = float((grads[0] - reference).norm() / reference.norm())  # ~0.2 in bf16 here; the fault gives 1e30+
assert error < 0.5, f"bf16 weight gradient {error:.3g} (relative) away from float32"
"""


@pytest.mark.parametrize("isa", ONEDNN_ISA_CAPS)
def test_bf16_weight_gradients_are_deterministic_on_every_onednn_path(isa):
    """Identical bf16 passes give identical, finite weight gradients close to float32's, whichever kernels
    oneDNN picks on this CPU (each cap in a fresh process: oneDNN reads it once)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", _BF16_GRADIENTS], env=env, capture_output=True, text=True,
                            timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
