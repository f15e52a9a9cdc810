"""The analytic FLOP counts (ntm_edge/flops.py) against a brute-force count: torch's FlopCounterMode on
the real modules, at batch 3, with attention on the math kernel (whose matrix products the counter
sees; the fused CPU kernel is invisible to it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ntm_edge import flops
from ntm_edge.config import get_preset
from ntm_edge.decoding import segment_bounds
from ntm_edge.denoiser import Denoiser, DenoiserConfig
from ntm_edge.model import NTM

B, T = 3, 4


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def _model(cfg) -> NTM:
    torch.manual_seed(0)
    model = NTM(cfg.with_data(1, tuple("0123456789"))).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh transporter is the identity: Jacobi would stop after one pass
        for p in model.transporter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


TINY = get_preset("tiny")
# a transformer predictor, shrunk to test size (the `base` preset's backbone)
TINY_TRANSFORMER = dataclasses.replace(
    get_preset("base"), image_size=8,
    transporter=dataclasses.replace(get_preset("base").transporter, width=32, heads=2, layers_per_block=1),
    predictor=dataclasses.replace(get_preset("base").predictor, width=32, depth=2, heads=2), prompt=TINY.prompt)


@pytest.fixture(scope="module", params=["unet", "transformer"])
def setup(request):
    model = _model(TINY if request.param == "unet" else TINY_TRANSFORMER)
    size = model.config.image_size
    u = torch.randn(B, 1, size, size, generator=torch.Generator().manual_seed(1))
    ids, mask = model.tokenize(["1", "2", "3"])
    return model, u, ids, mask


def test_predictor_and_loop(setup):
    model, u, ids, mask = setup
    cfg = model.config
    assert counted(lambda: model.predict(u, 0.5, 0.25, T, ids, mask)) == B * flops.predictor_step(cfg)
    assert counted(lambda: model.predict(u, 0.5, 0.25, T, ids, mask, 1.0)) == B * flops.predictor_step(cfg, guided=True)
    loop = counted(lambda: model.sample_levels(ids, mask, T, np.random.default_rng(0), 0.0, 0.025))
    assert loop == B * flops.sampler_loop(cfg, T) > 0


def test_transporter(setup):
    model, u, _, _ = setup
    cfg, tr = model.config, model.transporter
    assert counted(lambda: tr(u, 0.3, T)) == B * flops.transporter_forward(cfg) > 0
    assert counted(lambda: tr.inverse(u, 0.3, T)) == B * flops.inverse_sequential(cfg) > 0
    with torch.no_grad():
        report = tr.inverse_with_report(u, 0.3, T, "jacobi")[1]
    assert min(report.block_iterations) > 1  # the count below is not the trivial one-pass case
    jacobi = flops.inverse_jacobi(cfg, flops.jacobi_work(cfg, report.block_iterations))
    assert counted(lambda: tr.inverse(u, 0.3, T, "jacobi")) == B * jacobi
    with torch.no_grad():
        its = tr.inverse_with_report(u, 0.3, T, "jacobi", segments=2)[1].iterations
    bounds = segment_bounds(tr.num_tokens, 2)
    work = [[(end, n) for (_, end), n in zip(bounds, block, strict=True)] for block in its]
    assert counted(lambda: tr.inverse(u, 0.3, T, "jacobi", segments=2)) == B * flops.inverse_jacobi(cfg, work)


def test_audit_and_denoiser(setup):
    model, u, ids, mask = setup
    cfg = model.config
    traj = model.forward_trajectory(u.clamp(-1, 1), T, generator=torch.Generator().manual_seed(2))
    assert counted(lambda: model.trajectory_nll(traj, ids)) == B * flops.audit(cfg, T)
    den_cfg = DenoiserConfig(image_size=cfg.image_size, channels=1, num_prompt_tokens=model.vocab.num_tokens, t0=0.025,
                             steps=T, prompt_dim=cfg.prompt.dim, width=32, depth=2, heads=2)
    den = Denoiser(den_cfg).eval()
    assert counted(lambda: den(u, ids, mask)) == B * flops.denoiser(den_cfg) > 0


def test_identity_transporter_costs_nothing():
    cfg = get_preset("tiny").for_objective("gaussian")  # f_T = identity: no blocks
    assert flops.transporter_forward(cfg) == flops.inverse_sequential(cfg) == 0
    assert flops.audit(cfg, T) == T * flops.predictor_step(cfg)


def test_text_encoder():
    from ntm_edge.text_prompts import TextPromptEncoder

    text = TINY.with_data(1, tuple("0123456789")).with_text_encoder("minilm")
    enc = TextPromptEncoder(text.prompt.max_tokens)
    ids, _ = enc.tokenizer.tokenize(["a handwritten seven", "", "3"])  # padding is computed too: P = 16 each
    assert counted(lambda: enc.embed(torch.from_numpy(ids))) == B * flops.text_encoder(text) > 0
    assert flops.text_encoder(TINY) == 0  # a label table is a lookup
