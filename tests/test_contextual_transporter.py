"""The contextual transporter (``--transporter-context``, issue 13): f_T of level s also reads the step's
x_t. Its log-det is still the exact Jacobian in x_s, it inverts exactly given the same x_t, the
trajectory likelihood is the sum of its steps, the sampler's levels are the exact inverses of its draws,
a short real training lowers the held-out NLL and moves f_T, and its fp32 bundle (graphs with a context
input, the runtime's per-step inversion loop, the audit) draws and scores what torch does."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ntm_edge import schedule
from ntm_edge.config import NTMConfig, get_preset
from ntm_edge.data import load_dataset
from ntm_edge.errors import ConfigError
from ntm_edge.model import NTM, Trajectory
from ntm_edge.numerics import dequantize


def _model(context: bool = True, seed: int = 0) -> NTM:
    """`tiny` with a contextual transporter whose weights are perturbed off the identity."""
    torch.manual_seed(seed)
    cfg = get_preset("tiny").with_data(1, tuple(str(i) for i in range(10)))
    cfg = dataclasses.replace(cfg, transporter=dataclasses.replace(cfg.transporter, context=context))
    model = NTM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.transporter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def images():
    return load_dataset("digits", "test", image_size=8, channels=1).images[:6]


def _levels(model: NTM, images, steps: int = 4, seed: int = 3) -> Trajectory:
    g = torch.Generator().manual_seed(seed)
    return model.forward_trajectory(dequantize(torch.from_numpy(images), g), steps, generator=g)


def test_logdet_is_the_exact_jacobian_in_x_s(images):
    """log|det df_T/dx_s| from the flow equals autograd's Jacobian of x_s -> f_T(x_s; s, T, x_t) at a
    fixed x_t (float64), and f_T really reads x_t: another context gives another u_s."""
    model = copy.deepcopy(_model()).double()
    traj = _levels(model, images[:2])
    for b in range(2):
        for k in (0, 2):
            x_s, x_t, s = traj.x[b, k].double(), traj.x[b, k + 1].double(), traj.t[b, k].double()
            f = lambda v, x_t=x_t, s=s: model.transporter(v.view(1, 1, 8, 8), s.view(1), 4,  # noqa: E731
                                                          context=x_t[None])[0].flatten()
            J = torch.autograd.functional.jacobian(f, x_s.flatten())
            with torch.no_grad():
                _, logdet = model.transporter(x_s[None], s.view(1), 4, context=x_t[None])
                other = model.transporter(x_s[None], s.view(1), 4, context=torch.zeros_like(x_t)[None])[0]
                moved = float((other.flatten() - f(x_s.flatten())).abs().max())
            assert float(logdet) == pytest.approx(float(torch.linalg.slogdet(J)[1]), abs=1e-9)
            assert moved > 1e-3


@pytest.mark.parametrize("method", ["sequential", "jacobi"])
def test_inverse_given_the_same_context_is_exact(images, method):
    """inverse(forward(x_s; x_t); x_t) = x_s, batched over levels, both exact methods."""
    model = _model()
    traj = _levels(model, images)
    B, K = traj.t.shape
    x_s, x_t = traj.x[:, :-1].reshape(-1, 1, 8, 8), traj.x[:, 1:].reshape(-1, 1, 8, 8)
    s = traj.t[:, :-1].reshape(-1)
    with torch.no_grad():
        u, _ = model.transporter(x_s, s, 4, context=x_t)
        back = model.transporter.inverse(u, s, 4, method=method, tol=0.0, context=x_t)
        assert float((u - x_s).abs().max()) > 1e-2  # a round trip through something that moves
    assert torch.allclose(back, x_s, atol=1e-5)


def test_context_is_required_exactly_when_configured(images):
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="context"):
        _model().transporter(x, 0.5, 4)
    with pytest.raises(ValueError, match="context"):
        _model(context=False).transporter(x, 0.5, 4, context=x)


def test_a_fresh_contextual_model_is_the_identity_ablation(images):
    """At initialisation every block's output projection is zero, so the contextual f_T is the identity
    whatever it reads: with the same predictor weights, its trajectory NLL is the identity ablation's
    (f_T = id, the predictor on x_t), bit for bit."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").with_data(1, tuple(str(i) for i in range(10)))
    ctx = NTM(dataclasses.replace(cfg, transporter=dataclasses.replace(cfg.transporter, context=True))).eval()
    ablation = NTM(dataclasses.replace(cfg, transporter=dataclasses.replace(cfg.transporter, num_blocks=0))).eval()
    ablation.predictor.load_state_dict(ctx.predictor.state_dict())
    ablation.prompt_encoder.load_state_dict(ctx.prompt_encoder.state_dict())
    traj = _levels(ctx, images)
    prompts = [str(i) for i in range(len(images))]
    with torch.no_grad():
        assert torch.equal(ctx.trajectory_nll(traj, prompts, per_level=True),
                           ablation.trajectory_nll(traj, prompts, per_level=True))


def test_trajectory_nll_is_the_sum_of_its_steps(images):
    """The batched trajectory NLL (every level's f_T given the next level, the predictor on x_t) equals
    the pairwise training path's step NLLs summed with the N(0, I) top, level by level."""
    model = _model()
    traj = _levels(model, images)
    ids, mask = model.tokenize([str(i) for i in range(len(images))])
    with torch.no_grad():
        levels = model.trajectory_terms(traj, ids, mask, per_level=True)[0]  # (B, K)
        B, K = traj.t.shape
        T = torch.full((B,), 4.0)
        for k in range(K - 1):
            x_s, x_t = traj.x[:, k], traj.x[:, k + 1]
            u_s, logdet = model.transporter(x_s, traj.t[:, k], T, context=x_t)
            nll, _, _ = model.step_terms(u_s, logdet, x_t, traj.t[:, k], traj.t[:, k + 1], T, ids, mask)
            assert torch.allclose(levels[:, k], nll, rtol=1e-5, atol=1e-3)
        top = schedule.step_nll(traj.x[:, -1], torch.zeros(B), torch.zeros_like(traj.x[:, -1]),
                                torch.zeros_like(traj.x[:, -1]))
        assert torch.allclose(levels[:, -1], top)


def test_sampler_levels_are_exact_inverses_of_the_draws():
    """The sampler works in x-space: re-mapping each sampled level x_s through f_T(.; s, T, x_t) gives back
    mu_P(x_t) + sigma_P(x_t) z with the very noise drawn (``draw_noise``'s order)."""
    model = _model()
    ids, mask = model.tokenize(["3", "7"])
    x, ts = model.sample_levels(ids, mask, 4, np.random.default_rng(5), 0.0, model.config.t_min_sample,
                                inverse_method="sequential")
    noise = model.noise(np.random.default_rng(5), 2, 4)
    assert torch.equal(x[:, -1], noise[0])
    with torch.no_grad():
        for j, k in enumerate(range(4, 0, -1)):
            mu, log_sigma = model.predict(x[:, k], ts[k], ts[k - 1], 4, ids, mask)
            u, _ = model.transporter(x[:, k - 1], float(ts[k - 1]), 4, context=x[:, k])
            assert torch.allclose(u, mu + log_sigma.exp() * noise[j + 1], atol=1e-4)


def test_sample_images_exits(images):
    from ntm_edge.exits import sample_images

    model = _model()
    for final in ("inverse", "inverse+score"):
        out = sample_images(model, ["1", "2", "3"], steps=4, seed=0, final=final)
        assert out.shape == (3, 8, 8, 1) and out.dtype == np.uint8
    with pytest.raises(ConfigError, match="no denoiser exit"):
        sample_images(model, ["1"], final="denoiser")


def test_config_round_trip_and_older_configs():
    """``context`` reaches config.json and back; a config written before the field loads as plain."""
    cfg = _model().config
    d = cfg.to_dict()
    assert d["transporter"]["context"] is True and NTMConfig.from_dict(d).transporter.context is True
    del d["transporter"]["context"]
    assert NTMConfig.from_dict(d).transporter.context is False
    with pytest.raises(ConfigError, match="context needs a transporter"):
        dataclasses.replace(cfg, transporter=dataclasses.replace(cfg.transporter, num_blocks=0)).validate()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """(checkpoint dir, its TrainArgs): `train --transporter-context` for 60 steps (pairwise, 4-step grid, NLL
    only), about 10 s on one core."""
    from ntm_edge.train import TrainArgs, train

    out = tmp_path_factory.mktemp("ctx") / "ctx"
    args = TrainArgs(dataset="digits", preset="tiny", steps=60, mode="pairwise", pairwise_steps=(4,), batch_size=64,
                     lr=2e-3, warmup=10, out=str(out), eval_images=0, seed=0, x0_mse_weight=0.0,
                     transporter_context=True, checkpoint_every=250)
    train(args, progress=False, log=lambda *_: None)
    return out, args


def test_a_short_real_run_learns_and_moves_the_transporter(short_run, tmp_path):
    """The short run: the held-out NLL drops well below the untrained model's, f_T moves off the identity,
    the flag is saved, and what cannot use such a model (a denoiser, a resume without the flag's value)
    refuses in one line."""
    from ntm_edge.evaluate import heldout_likelihood, transporter_activity
    from ntm_edge.train import train

    out, args = short_run
    model = NTM.from_pretrained(out)
    assert model.contextual and model.config.transporter.context is True
    test = load_dataset("digits", "test", image_size=8, channels=1)
    fresh = NTM(model.config)
    trained_bpd = heldout_likelihood(model, test.images[:100], test.labels[:100], steps=4)["bits_per_dim"]
    fresh_bpd = heldout_likelihood(fresh, test.images[:100], test.labels[:100], steps=4)["bits_per_dim"]
    assert trained_bpd < fresh_bpd / 4, (trained_bpd, fresh_bpd)  # measured: 7.5 against 123 at 80 steps
    levels = transporter_activity(model, test.images, steps=4, num_images=50)
    assert all(r["displacement"] > 0.01 for r in levels[:-1]), levels
    assert levels[-1]["displacement"] == 0.0
    from ntm_edge.denoiser import train_denoiser

    with pytest.raises(ConfigError, match="no denoiser"):
        train_denoiser(out, steps=1)
    plain = tmp_path / "plain"
    train(dataclasses.replace(args, out=str(plain), steps=1, transporter_context=None), progress=False,
          log=lambda *_: None)
    with pytest.raises(ConfigError, match="trained without --transporter-context"):
        train(dataclasses.replace(args, out=str(plain), steps=2), progress=False, log=lambda *_: None, resume=True)


@pytest.fixture(scope="module")
def ctx_bundle(short_run, tmp_path_factory):
    """(model, fp32 runtime) of the short run's bundle, exported with `export --fp16 --int8` (batch 4, small
    calibration and quality-gate sets; --force: the gate's verdict on a 60-step model is not the point). The
    export itself checks every fp32 graph's parity with torch (random and real inputs) and raises past its
    tolerance."""
    from typer.testing import CliRunner

    from ntm_edge.cli import app
    from ntm_edge.runtime.session import open_runtime

    path = tmp_path_factory.mktemp("ctx_bundle") / "bundle"
    r = CliRunner().invoke(app, ["export", "--checkpoint", str(short_run[0]), "--out", str(path), "--batch", "4",
                                 "--fp16", "--int8", "--calib-images", "32", "--calib-samples", "8",
                                 "--quality-samples", "40", "--force"])
    assert r.exit_code == 0, r.output
    rt = open_runtime(path, provider="cpu", precision="fp32")
    assert set(rt.bundle.manifest["parity"]["graphs"]) == set(rt.bundle.graphs)
    return NTM.from_pretrained(short_run[0]).eval(), rt


def test_export_has_context_inputs_and_no_unrolled_loop(short_run, ctx_bundle):
    """Every transporter graph takes the step's x_t as ``context``; there is no unrolled sampler graph
    (the sampler inverts after every draw), and asking the runtime for it is one clear error, as is
    `bench` (which times the u-space sampler's stages) on the checkpoint or the bundle."""
    from ntm_edge.bench import check_sources
    from ntm_edge.runtime import specs
    from ntm_edge.runtime.sampler import generate

    _, rt = ctx_bundle
    graphs = rt.bundle.graphs
    assert specs.SAMPLER_LOOP not in graphs
    transporter = [n for n in graphs if n.startswith("transporter_")]
    assert len(transporter) == 1 + 2 * rt.bundle.transporter["num_blocks"]
    assert all(graphs[n].input_names[-1] == "context" for n in transporter)
    assert "context" not in graphs[specs.PREDICTOR_STEP].input_names
    with pytest.raises(ConfigError, match="no unrolled sampler graph"):
        generate(rt, ["3"], unrolled=True)
    for checkpoint, bundle in ((short_run[0], None), (None, rt.bundle.root)):
        with pytest.raises(ConfigError, match="contextual transporter"):
            check_sources(checkpoint, bundle, "tiny")


def test_run_cli_draws_and_audits(ctx_bundle, tmp_path):
    """`ntm-edge run --audit` on the bundle: a grid, the latency table with the per-step inversion, the NLL."""
    from typer.testing import CliRunner

    from ntm_edge.cli import app

    _, rt = ctx_bundle
    r = CliRunner().invoke(app, ["run", "--bundle", str(rt.bundle.root), "--prompt", "3", "--num", "2", "--audit",
                                 "--threads", "1", "--out", str(tmp_path / "threes.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "threes.png").stat().st_size > 0
    assert "inverse (jacobi) x 4" in r.output and "nll" in r.output.lower(), r.output


@pytest.mark.parametrize("method", ["jacobi", "sequential"])
def test_runtime_draws_the_torch_samplers_images(ctx_bundle, method):
    """The runtime's loop (predictor graph, then the inversion graphs given x_t, at every step) draws the
    torch sampler's images for the same seed, guided and not, with either inversion."""
    from ntm_edge.exits import sample_images
    from ntm_edge.runtime.sampler import generate

    model, rt = ctx_bundle
    prompts = [str(i % 10) for i in range(6)]
    for guidance in (0.0, 1.5):
        ref = sample_images(model, prompts, seed=2, guidance=guidance, inverse_method=method)
        got = generate(rt, prompts, seed=2, guidance=guidance, final="inverse", inverse_method=method)
        assert np.abs(got.images.astype(int) - ref).max() <= 1, (method, guidance)
        if method == "jacobi":
            assert np.isfinite(got.x0).all() and got.images.std() > 0


def test_audit_matches_torch(ctx_bundle, images):
    """The runtime's exact trajectory NLL of a contextual model (each level given the next, the top level
    the identity, the predictor reading x) equals torch's, on forward trajectories of real images and on
    the runtime's own samples."""
    from ntm_edge.runtime.audit import generated_nll, trajectory_nll
    from ntm_edge.runtime.sampler import generate

    model, rt = ctx_bundle
    traj = _levels(model, images)
    labels = [str(i) for i in range(len(images))]
    ids, mask = model.tokenize(labels)
    with torch.no_grad():
        ref = model.trajectory_nll(traj, labels).double().numpy()
    got = trajectory_nll(rt, traj.x.numpy(), traj.t.numpy(), ids.numpy(), mask.numpy())
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), (got, ref)
    run = generate(rt, labels, seed=5, audit=True)
    x = torch.from_numpy(run.u_levels)
    with torch.no_grad():
        ref = model.trajectory_nll(Trajectory(x, torch.from_numpy(run.ts).float().expand(len(labels), -1)), labels)
    assert np.abs(run.nll - ref.double().numpy()).max() <= 1e-5 * np.abs(ref.double().numpy()).max()
    assert np.abs(generated_nll(rt, run.u_levels, run.ts, ids.numpy(), mask.numpy()) - run.nll).max() == 0


def test_fp16_and_int8_bundle(ctx_bundle):
    """`export --fp16 --int8`: the predictor step is calibrated on what a contextual predictor reads (x
    levels, forward and sampled) and quantized; the transporter graphs (context input) go fp16 and stay
    fp32 in int8; each precision runs the per-step loop and lands near the fp32 images."""
    from ntm_edge.runtime import specs
    from ntm_edge.runtime.sampler import generate
    from ntm_edge.runtime.session import open_runtime

    prompts = [str(i % 10) for i in range(8)]
    ref = generate(ctx_bundle[1], prompts, seed=4, guidance=1.0).x0
    for precision in ("fp16", "int8"):
        rt = open_runtime(ctx_bundle[1].bundle.root, provider="cpu", precision=precision)
        runs = {name: rt.bundle.manifest["graphs"][name]["variants"][precision]["runs"] for name in rt.bundle.graphs}
        assert runs[specs.PREDICTOR_STEP] == precision
        assert runs[specs.TRANSPORTER_FORWARD] == ("fp16" if precision == "fp16" else "fp32")
        got = generate(rt, prompts, seed=4, guidance=1.0).x0
        err = float(np.abs(got - ref).max())  # measured: fp16 0.0016, int8 0.020 (x0 in [-1, 1])
        assert np.isfinite(got).all() and err < (0.01 if precision == "fp16" else 0.1), (precision, err)
