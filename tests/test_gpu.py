"""The GPU path (ntm_edge/gpu.py). No machine of this project has CUDA yet, so the CUDA tests at the
end skip here; the rest checks on CPU what does not need CUDA: the sampler written for capture is
Algorithm 2 exactly, the capture wrapper runs eagerly on CPU, the Jacobi pass count grows to what a
batch needs, autocast (CPU, bfloat16) keeps the fp32 islands in fp32, and the CLI refuses
`--device cuda` without CUDA in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ntm_edge.cli import app
from ntm_edge.config import get_preset
from ntm_edge.denoiser import Denoiser, DenoiserConfig
from ntm_edge.errors import ConfigError
from ntm_edge.exits import sample_images
from ntm_edge.gpu import GraphSampler, StaticGraph, require_cuda, sample_images_gpu
from ntm_edge.layers import FP32Island
from ntm_edge.model import NTM

NO_CUDA = "needs CUDA: the GPU path is untested on this project's machines (none has a GPU)"
PROMPTS = [str(i % 10) for i in range(10)]  # 10 prompts: batches of 4 leave a padded last batch


@pytest.fixture(scope="module")
def models():
    """tiny NTM and denoiser with every weight perturbed (fresh ones are partly zero: identity transporter,
    zero outputs), so that every stage computes something."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").with_data(1, tuple("0123456789"))
    model = NTM(cfg).eval()
    den = Denoiser(DenoiserConfig(image_size=8, channels=1, num_prompt_tokens=11, t0=cfg.t_min_sample, steps=4,
                                  prompt_dim=cfg.prompt.dim, width=32, depth=2, heads=2)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*model.parameters(), *den.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.03)
    return model, den


def test_static_graph_on_cpu_runs_eagerly():
    x = torch.zeros(3)
    graph = StaticGraph(lambda v: (v * 2, v.sum()), (x,))
    assert graph.captured is False
    out = graph.outputs
    result = graph(torch.tensor([1.0, 2.0, 3.0]))
    assert result[0] is out[0]  # results land in the same tensors, as replays of a captured graph do
    assert result[0].tolist() == [2.0, 4.0, 6.0] and result[1].item() == 6.0


def test_graph_sampler_is_algorithm_2(models):
    """fp32 without autocast: the same images as the library's sampler, bit for bit (denoiser exit),
    over three batches of 4 with a padded last one."""
    model, den = models
    sampler = GraphSampler(model, 4, final="denoiser", denoiser=den, dtype=torch.float32)
    assert sampler.loop.captured is False  # CPU
    images = sampler.sample(PROMPTS, seed=3)
    reference = sample_images(model, PROMPTS, seed=3, final="denoiser", denoiser=den)
    assert images.shape == reference.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(images, reference)
    assert images.std() > 0


def test_captured_jacobi_grows_its_passes(models):
    """One pass per block is not enough: the first batch is inverted again with the adaptive stop, the
    passes grow to what it needed, and the images are those of Transporter.inverse(method="jacobi")."""
    model, _ = models
    sampler = GraphSampler(model, 4, final="inverse", dtype=torch.float32, passes=(1, 1))
    images = sampler.sample(PROMPTS, seed=3)
    assert sampler.fallbacks >= 1 and min(sampler.passes) > 1
    reference = sample_images(model, PROMPTS, seed=3, final="inverse", inverse_method="jacobi")
    assert np.abs(images.astype(int) - reference).max() <= 1  # Jacobi stops within tol: at most one level


def test_autocast_keeps_fp32_islands(models):
    """Under CPU autocast to bfloat16: matmuls and convolutions run in bf16 (autocast is on), norms, the
    predictor's mean and log-scale and the sampler state stay fp32; images stay close to fp32 ones."""
    model, den = models
    dtypes: dict[str, set] = {"norm": set(), "island": set(), "matmul": set(), "mu": set(), "log_sigma": set()}

    def record(kind):
        def hook(module, args, out):
            dtypes[kind].add(out.dtype)
        return hook

    images = {}
    for final in ("denoiser", "inverse"):
        sampler = GraphSampler(model, 4, final=final, denoiser=den, dtype=torch.bfloat16)
        for net in (sampler.model, sampler.denoiser):
            # the last projections and the condition MLPs are fp32 islands (ntm_edge.islands), with all they hold
            in_island = {id(sub) for m in net.modules() if isinstance(m, FP32Island) for sub in m.modules()}
            for m in net.modules():
                if isinstance(m, nn.LayerNorm | nn.GroupNorm):
                    m.register_forward_hook(record("norm"))
                elif isinstance(m, nn.Linear | nn.Conv2d):
                    m.register_forward_hook(record("island" if id(m) in in_island else "matmul"))

        def predictor_hook(module, args, out):
            dtypes["mu"].add(out[0].dtype)
            dtypes["log_sigma"].add(out[1].dtype)

        sampler.model.predictor.register_forward_hook(predictor_hook)
        images[final] = sampler.sample(PROMPTS, seed=3)
        assert sampler.loop.outputs[0].dtype == torch.float32  # u_t0
    assert dtypes == {"norm": {torch.float32}, "island": {torch.float32}, "matmul": {torch.bfloat16},
                      "mu": {torch.float32}, "log_sigma": {torch.float32}}
    fp32 = {"denoiser": sample_images(model, PROMPTS, seed=3, final="denoiser", denoiser=den),
            "inverse": sample_images(model, PROMPTS, seed=3, final="inverse", inverse_method="jacobi")}
    for final in fp32:
        diff = np.abs(images[final].astype(int) - fp32[final])
        assert diff.mean() < 2.0 and diff.max() <= 16, (final, diff.mean(), diff.max())


def test_uncaptured_exits_run_eagerly(models):
    model, _ = models
    images = sample_images_gpu(model, PROMPTS[:3], seed=1, final="inverse", inverse_method="sequential")
    np.testing.assert_array_equal(images, sample_images(model, PROMPTS[:3], seed=1, final="inverse"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_refused_in_one_line(trained_tiny, tmp_path):
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        require_cuda("cuda")
    with pytest.raises(ConfigError, match="unknown device 'mps'"):
        require_cuda("mps")
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(trained_tiny[0]), "--prompt", "1", "--device", "cuda",
                                      "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda:"), result.output
    assert not (tmp_path / "x.png").exists()


# -- on a CUDA machine ---------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("final", ["denoiser", "inverse"])
def test_cuda_graphs_match_eager(models, final):
    model, den = models
    cuda_model, cuda_den = model.to("cuda"), den.to("cuda")
    try:
        fp32 = GraphSampler(cuda_model, 4, final=final, denoiser=cuda_den, dtype=torch.float32)
        bf16 = GraphSampler(cuda_model, 4, final=final, denoiser=cuda_den, dtype=torch.bfloat16)
        assert fp32.loop.captured and bf16.exit.captured
        reference = sample_images(cuda_model, PROMPTS, seed=3, final=final, denoiser=cuda_den, inverse_method="jacobi")
        assert np.abs(fp32.sample(PROMPTS, seed=3).astype(int) - reference).max() <= 1
        diff = np.abs(bf16.sample(PROMPTS, seed=3).astype(int) - reference)
        assert diff.mean() < 2.0 and diff.max() <= 16
    finally:
        model.to("cpu"), den.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_sample_cli_on_cuda(trained_tiny, tmp_path):
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(trained_tiny[0]), "--prompt", "1", "--device", "cuda",
                                      "--inverse-method", "jacobi", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    assert "CUDA graphs on" in result.output and (tmp_path / "x.png").exists()
