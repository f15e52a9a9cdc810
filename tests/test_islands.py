"""The fp32 islands (ntm_edge/islands.py) and the torch model honouring them under autocast.

1. Every module that the island list names (norms, time/level embeddings, last projections) is an
   fp32-island module in every preset and in the denoiser, and no other module is.
2. Under torch.autocast (CPU, bfloat16) the island modules compute in fp32: a GroupNorm/LayerNorm
   equals the fp32 norm of its input rounded once, projections and embeddings return fp32 (a plain
   layer returns bf16), and a whole tiny NTM's exact trajectory NLL stays close to its fp32 value.
3. ONNX node names map to their module path and island.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ntm_edge import islands
from ntm_edge.config import PRESETS
from ntm_edge.layers import FP32Conv2d, FP32GroupNorm, FP32Island, FP32LayerNorm, FP32Linear


def _model(preset: str):
    from ntm_edge import NTM

    cfg = PRESETS[preset].with_data(1, tuple("0123456789"))
    torch.manual_seed(0)
    return NTM(cfg)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_island_modules_are_fp32_modules(preset):
    named = list(_model(preset).named_modules())
    listed = {name for name, _ in named if islands.is_island_module(name)}
    fp32 = {name for name, m in named if isinstance(m, FP32Island)}
    assert listed == fp32
    assert any(name.endswith("norm1") for name in listed) and any(name.endswith(".out") for name in listed)
    assert any(name.endswith("condition") for name in listed)


def test_denoiser_island_modules():
    from ntm_edge.denoiser import Denoiser, DenoiserConfig

    den = Denoiser(DenoiserConfig(image_size=8, channels=1, num_prompt_tokens=11, t0=0.025, steps=4, width=32, depth=1))
    named = list(den.named_modules())
    assert {n for n, _ in named if islands.is_island_module(n)} == {n for n, m in named if isinstance(m, FP32Island)}


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_norms_compute_in_fp32_under_autocast(kind):
    g = torch.Generator().manual_seed(0)
    x = (3.0 + torch.randn((4, 16, 6, 6) if kind == "group" else (4, 9, 64), generator=g)).bfloat16()
    norm = FP32GroupNorm(4, 16) if kind == "group" else FP32LayerNorm(64)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(norm.weight.shape, generator=g))  # fp32 affine parameters
        norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=g))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
        if kind == "group":
            ref = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps)
        else:
            ref = F.layer_norm(x.float(), (64,), norm.weight, norm.bias, norm.eps)
    assert y.dtype == torch.bfloat16  # norms hand the input dtype on
    torch.testing.assert_close(y, ref.bfloat16(), rtol=0, atol=0)  # computed in fp32, rounded once at the end


def test_projections_return_fp32_under_autocast():
    lin, conv = FP32Linear(8, 4), FP32Conv2d(3, 2, 3, padding=1)
    x, img = torch.randn(5, 8), torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.Linear(8, 4)(x).dtype == torch.bfloat16  # what autocast does to a plain layer
        y_lin, y_conv = lin(x.bfloat16()), conv(img.bfloat16())
    assert y_lin.dtype == y_conv.dtype == torch.float32
    torch.testing.assert_close(y_lin, F.linear(x.bfloat16().float(), lin.weight, lin.bias))
    torch.testing.assert_close(y_conv, conv._conv_forward(img.bfloat16().float(), conv.weight, conv.bias))


def test_island_outputs_under_autocast_and_nll_close():
    model = _model("tiny").eval()
    with torch.no_grad():  # a trained-looking model: non-zero output projections
        for name, p in model.named_parameters():
            if name.endswith("out.weight"):
                p.copy_(torch.randn_like(p) * 0.02)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, o.dtype))
             for name, m in model.named_modules() if isinstance(m, FP32Island) and not name.endswith(("norm", "norm1", "norm2"))]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    traj = model.forward_trajectory(x0, 4, generator=g)
    ids = torch.arange(6)[:, None] % 10
    with torch.no_grad():
        ref = model.trajectory_nll(traj, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.trajectory_nll(traj, ids)
    for h in hooks:
        h.remove()
    assert seen and all(d == torch.float32 for d in seen.values()), seen
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # bf16 convs and attention (8 bits of mantissa) on 64 dims: the NLL moves by well under 1 nat/dim
    assert ((low - ref).abs() / 64).max().item() < 0.5


@pytest.mark.parametrize("name, op, path, island", [
    ("/predictor/backbone/down.0/norm1/InstanceNormalization", "InstanceNormalization", "predictor.backbone.down.0.norm1",
     "norms"),
    ("/predictor/backbone/down.0_1/norm1_1/Reshape", "Reshape", "predictor.backbone.down.0.norm1", "norms"),
    ("/predictor/backbone/condition/net/net.0/Gemm", "Gemm", "predictor.backbone.condition.net.net.0",
     "time and level embeddings"),
    ("/predictor/backbone/out/Conv", "Conv", "predictor.backbone.out", "last projections"),
    ("/predictor/Mul_3", "Mul", "predictor", "flow and sampler arithmetic"),
    ("/Mul_7", "Mul", "", "flow and sampler arithmetic"),
    ("/transporter/blocks.1/layers.0/attn/Softmax", "Softmax", "transporter.blocks.1.layers.0.attn", "softmax"),
    ("/predictor/backbone/down.0/conv1/Conv", "Conv", "predictor.backbone.down.0.conv1", None),
    ("/transporter/blocks.0/layers.0/attn/qkv/MatMul", "MatMul", "transporter.blocks.0.layers.0.attn.qkv", None),
    ("Cast_12", "Cast", None, None),
    ("graph_input_cast0", "Exp", None, "log-scales"),
])
def test_onnx_node_islands(name, op, path, island):
    assert islands.module_path(name) == path
    found = islands.island_of(op, name)
    assert (found.name if found else None) == island
