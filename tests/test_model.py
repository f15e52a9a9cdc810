"""Independent checks of the NTM model: transporter, predictor, likelihood, guidance, sampler, layers.

Every expectation is computed here in a different way than the library does it:

1. Invertibility: with perturbed weights (a fresh transporter is the identity, its output
   projections are zero), inverse(forward(x)) == x and forward(inverse(u)) == u for every TarFlow
   block (both scan directions) and the whole transporter, patch sizes 1 and 2, 1 and 3 channels,
   a scalar level and per-example mixed levels. The map is checked to be far from the identity,
   except at t = 1, where it must be exactly the identity with log-det 0.
2. Log-det against log|det| of the brute-force Jacobian (``torch.autograd.functional.jacobian``),
   per block and for the whole transporter; the per-block Jacobian is also checked to be
   triangular in scan order (the self-exclusive, autoregressive structure).
3. The trajectory NLL against a step-by-step recomputation with ``torch.distributions.Normal``.
4. With f_T = identity and a fresh predictor, the trajectory NLL against the closed-form Gaussian
   NLL of the posterior chain (docs/design.md Prop. 2), written in numpy.
5. Classifier-free guidance: w = 0 is the conditional model alone; w > 0 runs both halves through
   ``numerics.guided_gaussian`` (whose formula tests/test_numerics.py checks by quadrature).
6. The sampler: dtype, shape, seeding, and the one-line ``PromptError`` for an unknown prompt.
7. Both predictor backbones: output shapes, and a fresh model is the Gaussian posterior step.
8. Layers: patchify order and round trip (numpy and torch); the fixed-size KV-cache decoding step
   equals the causal pass.

Tolerances: float32 round trips < 1e-4 (absolute); float64 Jacobians 1e-6; float32 likelihoods
rtol 1e-5 (plus a small absolute floor for sums of terms of both signs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import Normal

from ntm_edge import schedule
from ntm_edge.config import NTMConfig, PredictorConfig, PromptConfig, TransporterConfig
from ntm_edge.errors import PromptError
from ntm_edge.exits import sample_images
from ntm_edge.layers import ConditionMLP, TransformerLayer
from ntm_edge.model import NTM
from ntm_edge.numerics import guided_gaussian, patchify, unpatchify

CLASSES = ("0", "1", "2")
STEPS = 4

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tiny_config(image_size=4, channels=1, patch_size=2, backbone="unet", param="v", **overrides) -> NTMConfig:
    """A model small enough that every test runs in well under a second."""
    return NTMConfig(
        image_size=image_size,
        channels=channels,
        transporter=TransporterConfig(
            patch_size=patch_size, num_blocks=2, layers_per_block=1, width=16, heads=2
        ),
        predictor=PredictorConfig(
            backbone=backbone,
            param=param,
            channels=(8, 16),
            patch_size=2,
            width=16,
            depth=1,
            heads=2,
            mlp_ratio=2,
        ),
        prompt=PromptConfig(class_names=CLASSES, dim=8),
        **overrides,
    )


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add N(0, scale^2) noise to every parameter (breaks the zero-initialised outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def perturbed_model(seed: int = 0, **config) -> NTM:
    """An NTM whose transporter and predictor are both far from their initialisation.

    Every parameter gets N(0, 0.1^2) noise (the transporter moves pixels by O(1-10), log-dets are
    O(1-20)); the predictor's output layer is then reset to N(0, 0.02^2) so that d stays small and
    the NLLs stay O(1e3) nats rather than O(1e6), which keeps relative tolerances meaningful.
    """
    torch.manual_seed(seed)
    model = NTM(tiny_config(**config))
    perturb(model, 0.1, seed)
    out: Any = model.predictor.backbone.out
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()
    perturb(out, 0.02, seed + 1)
    return model.eval()


def posterior_abc(s, t):
    """Prop. 2 in the textbook form (float64 numpy): A, B, C of q(x_s | x_t, x0)."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    A = s**2 * (1 - t) / (t**2 * (1 - s))
    B = (t - s) * (t + s - 2 * t * s) / (t**2 * (1 - s))
    C = np.sqrt(s**2 * (t - s) * (t + s - 2 * t * s) / (t**2 * (1 - s) ** 2))
    return A, B, C


def brute_logdet(f, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of f at one example x (any shape), J the full Jacobian of the flattened map."""
    J = jacobian(lambda xi: f(xi).reshape(-1), x)
    n = x.numel()
    return torch.linalg.slogdet(J.reshape(n, n))[1]


def run_or_error(fn):
    """(fn(), None), or (None, the RuntimeError's message): a failing assert then reads cleanly."""
    try:
        return fn(), None
    except RuntimeError as e:
        return None, str(e)


def block_inputs(model: NTM, B: int, seed: int, dtype=torch.float32):
    """Random tokens (B, N, D), a random condition vector (B, W) and an open gate (B, 1, 1)."""
    tr = model.transporter
    g = torch.Generator().manual_seed(seed)
    p = tr.cfg.patch_size
    N, D = (tr.image_size // p) ** 2, tr.channels * p * p
    x = torch.randn(B, N, D, generator=g).to(dtype)
    c = torch.randn(B, tr.cfg.width, generator=g).to(dtype)
    return x, c, torch.ones(B, 1, 1, dtype=dtype)


def images(B: int, model: NTM, seed: int, dtype=torch.float32) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=g).to(dtype)


FLOW_SHAPES = [  # (patch_size, channels, image_size)
    pytest.param(1, 1, 4, id="patch1"),
    pytest.param(2, 1, 4, id="patch2"),
    pytest.param(2, 3, 4, id="patch2-rgb"),
    pytest.param(1, 3, 4, id="patch1-rgb"),
]

# ---------------------------------------------------------------------------------------------
# 1. invertibility
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch, channels, size", FLOW_SHAPES)
def test_every_block_round_trips_and_is_not_the_identity(patch, channels, size):
    model = perturbed_model(patch_size=patch, channels=channels, image_size=size)
    flips = [block.flip for block in model.transporter.blocks]
    assert flips == [False, True], "blocks must alternate scan direction (identity, flip)"
    x, c, gate = block_inputs(model, 3, seed=1)
    with torch.no_grad():
        for block in model.transporter.blocks:
            u, logdet = block(x, c, gate)
            assert u.shape == x.shape and logdet.shape == (3,)
            assert (u - x).abs().max() > 1e-2, f"flip={block.flip}: perturbed block is still the identity"
            assert logdet.abs().min() > 1e-3, f"flip={block.flip}: perturbed block is volume preserving"
            err = (block.inverse(u, c, gate) - x).abs().max().item()
            assert err < 1e-4, f"flip={block.flip}: inverse(forward(x)) off by {err:.2e}"
            err = (block(block.inverse(x, c, gate), c, gate)[0] - x).abs().max().item()
            assert err < 1e-4, f"flip={block.flip}: forward(inverse(u)) off by {err:.2e}"


@pytest.mark.parametrize("patch, channels, size", FLOW_SHAPES)
@pytest.mark.parametrize("t", [0.3, torch.tensor([0.0, 0.05, 0.5, 0.9])], ids=["scalar-t", "mixed-t"])
def test_transporter_round_trips(patch, channels, size, t):
    model = perturbed_model(patch_size=patch, channels=channels, image_size=size)
    x = images(4, model, seed=2)
    with torch.no_grad():
        u, logdet = model.transporter(x, t, STEPS)
        assert u.shape == x.shape and logdet.shape == (4,)
        assert ((u - x).flatten(1).abs().amax(1) > 1e-2).all(), "perturbed transporter is still the identity"
        err = (model.transporter.inverse(u, t, STEPS) - x).abs().max().item()
        assert err < 1e-4, f"inverse(forward(x)) off by {err:.2e}"
        err = (model.transporter(model.transporter.inverse(x, t, STEPS), t, STEPS)[0] - x).abs().max().item()
        assert err < 1e-4, f"forward(inverse(u)) off by {err:.2e}"


@pytest.mark.parametrize("patch, channels, size", FLOW_SHAPES)
def test_transporter_is_exactly_the_identity_at_t1(patch, channels, size):
    model = perturbed_model(patch_size=patch, channels=channels, image_size=size)
    x = images(3, model, seed=3)
    with torch.no_grad():
        u, logdet = model.transporter(x, 1.0, STEPS)
        assert torch.equal(u, x) and torch.equal(logdet, torch.zeros(3))
        assert torch.equal(model.transporter.inverse(x, 1.0, STEPS), x)
        # per example: only the t = 1 example passes through untouched
        u, logdet = model.transporter(x, torch.tensor([0.5, 1.0, 0.2]), STEPS)
        assert torch.equal(u[1], x[1]) and logdet[1].item() == 0.0
        assert not torch.allclose(u[0], x[0]) and not torch.allclose(u[2], x[2])


# ---------------------------------------------------------------------------------------------
# 2. log-determinants against the brute-force Jacobian
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [1, 2])
def test_block_logdet_matches_jacobian_float64(patch):
    model = perturbed_model(patch_size=patch).double()
    x, c, gate = block_inputs(model, 2, seed=4, dtype=torch.float64)
    B, N, D = x.shape
    for block in model.transporter.blocks:
        _, logdet = block(x, c, gate)
        for i in range(B):
            f = lambda xi: block(xi[None], c[i : i + 1], gate[i : i + 1])[0]  # noqa: B023, E731
            expected = brute_logdet(f, x[i])
            assert abs(logdet[i].item() - expected.item()) < 1e-6, (
                f"flip={block.flip} example {i}: "
                f"logdet {logdet[i].item():.10f} vs log|det J| {expected.item():.10f}"
            )
            # self-exclusive: in scan order token n depends only on tokens <= n, and on itself elementwise
            J = jacobian(lambda xi: f(xi)[0], x[i]).reshape(N, D, N, D)  # noqa: B023
            if block.flip:
                J = J.flip(0).flip(2)
            for n in range(N):
                assert not J[n, :, n + 1 :].any(), f"token {n} sees a later token"
                own = J[n, :, n]
                assert torch.equal(own, torch.diag(torch.diagonal(own))), f"token {n} mixes its own dims"


@pytest.mark.parametrize("patch", [1, 2])
def test_transporter_logdet_matches_jacobian_float32(patch):
    """The whole map (patchify, both blocks, unpatchify) in the dtype the library runs in."""
    model = perturbed_model(patch_size=patch)
    x = images(2, model, seed=5)
    t = torch.tensor([0.2, 0.7])
    _, logdet = model.transporter(x, t, STEPS)
    assert logdet.abs().min() > 0.1
    for i in range(2):
        expected = brute_logdet(lambda xi: model.transporter(xi[None], t[i : i + 1], STEPS)[0], x[i])  # noqa: B023
        assert abs(logdet[i].item() - expected.item()) < 1e-4, (logdet[i].item(), expected.item())


def test_condition_mlp_follows_module_dtype():
    """ConditionMLP (used by the transporter and both predictor backbones) must run in float64.

    Known bug: ``fourier_features`` (ntm_edge/layers.py:33-35) always returns float32, and
    ``ConditionMLP.forward`` (layers.py:50) feeds that straight into ``self.net``, so any model
    converted with ``.double()`` (or ``.half()``) fails with "mat1 and mat2 must have the same dtype".
    """
    mlp = ConditionMLP(2, 16).double()
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    out, error = run_or_error(lambda: mlp(t, t))
    assert error is None, (
        "BUG ntm_edge/layers.py:50: ConditionMLP.forward passes float32 Fourier features (layers.py:33-34 "
        f"hard-code float32) to a float64 Linear: {error}. Proposed fix: "
        "`return self.net(feats.to(self.net[0].weight.dtype))` (the features stay computed in fp32). "
        "This blocks model.double(), hence the float64 Jacobian check of the whole transporter."
    )
    assert out.dtype == torch.float64


@pytest.mark.parametrize("patch", [1, 2])
def test_transporter_logdet_matches_jacobian_float64(patch):
    model = perturbed_model(patch_size=patch).double()
    x = images(2, model, seed=5, dtype=torch.float64)
    t = torch.tensor([0.2, 0.7])
    out, error = run_or_error(lambda: model.transporter(x, t, STEPS))
    assert error is None, (
        f"the transporter cannot run in float64 (see test_condition_mlp_follows_module_dtype): {error}"
    )
    logdet = out[1]
    for i in range(2):
        expected = brute_logdet(lambda xi: model.transporter(xi[None], t[i : i + 1], STEPS)[0], x[i])  # noqa: B023
        assert abs(logdet[i].item() - expected.item()) < 1e-6, (logdet[i].item(), expected.item())


# ---------------------------------------------------------------------------------------------
# 3-4. the trajectory likelihood
# ---------------------------------------------------------------------------------------------


def independent_levels(model: NTM, traj, ids: torch.Tensor) -> torch.Tensor:
    """(B, T + 1): for each level k < T, -log N(u_k; mu_P, sigma_P^2) - logdet_k of the step k+1 -> k, and
    -log N(x_T; 0, I) at k = T; recomputed step by step, level by level."""
    B, K = traj.t.shape
    T = K - 1
    levels = [model.transporter(traj.x[:, k], traj.t[:, k], T) for k in range(K)]  # (u_k, logdet_k)
    emb, mask = model.prompt_encoder(ids), torch.ones_like(ids, dtype=torch.bool)
    T_vec = torch.full((B,), float(T))
    terms = [-Normal(0.0, 1.0).log_prob(traj.x[:, -1]).flatten(1).sum(1)]
    for k in range(T, 0, -1):
        (u_t, _), (u_s, logdet_s) = levels[k], levels[k - 1]
        mu, log_sigma, _ = model.predictor(u_t, traj.t[:, k], traj.t[:, k - 1], T_vec, emb, mask)
        log_p = Normal(mu, log_sigma.exp()).log_prob(u_s).flatten(1).sum(1)
        terms.insert(0, -log_p - logdet_s)
    return torch.stack(terms, dim=1)


def independent_nll(model: NTM, traj, ids: torch.Tensor) -> torch.Tensor:
    """Sum over steps k = T..1 of -log N(u_s; mu_P, sigma_P^2) - logdet_s, plus -log N(x_T; 0, I)."""
    return independent_levels(model, traj, ids).sum(1)


@pytest.mark.parametrize("backbone", ["unet", "transformer"])
def test_trajectory_nll_matches_stepwise_recomputation(backbone):
    model = perturbed_model(backbone=backbone)
    x0 = images(3, model, seed=6).clamp(-1, 1)
    traj = model.forward_trajectory(x0, steps=STEPS, generator=torch.Generator().manual_seed(7))
    assert traj.x.shape == (3, STEPS + 1, 1, 4, 4) and (traj.t[:, -1] == 1.0).all()
    with torch.no_grad():
        results = {}
        for name, prompts, ids in [("cond", ["0", "2", "1"], [1, 3, 2]), ("uncond", ["", "", ""], [0, 0, 0])]:
            got = model.trajectory_nll(traj, prompts)
            expected = independent_nll(model, traj, torch.tensor(ids)[:, None])
            assert got.shape == (3,)
            torch.testing.assert_close(
                got, expected, rtol=1e-5, atol=1e-3, msg=f"{name}: {got} vs {expected}"
            )
            results[name] = got
            levels = model.trajectory_nll(traj, prompts, per_level=True)  # the same, one term per level
            torch.testing.assert_close(levels, independent_levels(model, traj, torch.tensor(ids)[:, None]),
                                       rtol=1e-5, atol=1e-3)
            assert torch.equal(schedule.sum_levels(levels), got)  # the total is their sum, bit for bit
    assert (results["cond"] - results["uncond"]).abs().min() > 1e-3, "the prompt does not reach the NLL"


def test_nll_with_identity_transporter_is_the_gaussian_chain():
    """f_T = identity and a fresh "v" predictor (x0-hat = u_t, d = 0): each step is
    N(x_s; (A + B) x_t, C^2 I), so the trajectory NLL has a closed form."""
    model = perturbed_model()
    with torch.no_grad():
        for block in model.transporter.blocks:  # every block the identity
            block.out.weight.zero_()
            block.out.bias.zero_()
        model.predictor.backbone.out.weight.zero_()  # raw output v = 0 and d = 0
        model.predictor.backbone.out.bias.zero_()
        x0 = images(3, model, seed=8).clamp(-1, 1)
        traj = model.forward_trajectory(x0, steps=STEPS, generator=torch.Generator().manual_seed(9))
        got = model.trajectory_nll(traj, ["1", "", "2"]).numpy()

    x, ts = traj.x.double().numpy(), traj.t.double().numpy()  # (B, K, C, H, W), (B, K)
    expected = np.zeros(3)
    for b in range(3):
        expected[b] = np.sum(0.5 * x[b, -1] ** 2 + 0.5 * math.log(2 * math.pi))  # prior N(0, I) of x_T
        for k in range(1, STEPS + 1):
            A, B, C = posterior_abc(ts[b, k - 1], ts[b, k])
            z = (x[b, k - 1] - (A + B) * x[b, k]) / C
            expected[b] += np.sum(0.5 * z**2 + math.log(C) + 0.5 * math.log(2 * math.pi))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# 5. classifier-free guidance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["unet", "transformer"])
def test_predict_guidance(backbone):
    model = perturbed_model(backbone=backbone)
    u = images(2, model, seed=11)
    ids, null = torch.tensor([[1], [3]]), torch.zeros(2, 1, dtype=torch.long)
    mask = torch.ones(2, 1, dtype=torch.bool)
    t, s = 0.5, 0.25
    full = lambda v: torch.full((2,), float(v))  # noqa: E731
    with torch.no_grad():
        mu_c, ls_c, _ = model.predictor(u, full(t), full(s), full(STEPS), model.prompt_encoder(ids), mask)
        mu_u, ls_u, _ = model.predictor(u, full(t), full(s), full(STEPS), model.prompt_encoder(null), mask)
        mu0, ls0 = model.predict(u, t, s, STEPS, ids, mask, guidance=0.0)
        assert torch.equal(mu0, mu_c) and torch.equal(ls0, ls_c), "guidance 0 must be the conditional model"
        assert (mu_c - mu_u).abs().max() > 1e-4, "conditional and unconditional predictions coincide"
        w = 2.0
        mu_w, ls_w = model.predict(u, t, s, STEPS, ids, mask, guidance=w)
    mu_e, ls_e = guided_gaussian(*(v.double().numpy() for v in (mu_c, ls_c, mu_u, ls_u)), w)  # float64
    np.testing.assert_allclose(mu_w.numpy(), mu_e, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ls_w.numpy(), ls_e, atol=1e-5)
    assert (mu_w - mu0).abs().max() > 1e-4, "guidance > 0 did not change the prediction"


# ---------------------------------------------------------------------------------------------
# 6. sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_shape_dtype_and_seeding(channels):
    model = perturbed_model(image_size=8, channels=channels)
    a = sample_images(model, ["1", "2"], steps=STEPS, seed=0)
    assert a.dtype == np.uint8 and a.shape == (2, 8, 8, channels)
    assert np.array_equal(a, sample_images(model, ["1", "2"], steps=STEPS, seed=0)), "same seed, different images"
    assert not np.array_equal(a, sample_images(model, ["1", "2"], steps=STEPS, seed=1)), (
        "different seeds, same images"
    )
    guided = sample_images(model, ["1", ""], steps=STEPS, seed=0, guidance=1.5)
    assert guided.dtype == np.uint8 and guided.shape == (2, 8, 8, channels)


def test_unknown_prompt_raises_one_line_prompt_error():
    model = perturbed_model()
    with pytest.raises(PromptError) as info:
        sample_images(model, ["1", "giraffe"], steps=STEPS, seed=0)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert "giraffe" in message
    for name in CLASSES:
        assert repr(name) in message, f"known class {name!r} missing from: {message}"


# ---------------------------------------------------------------------------------------------
# 7. predictor backbones
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["unet", "transformer"])
@pytest.mark.parametrize("channels", [1, 3])
def test_fresh_predictor_is_the_gaussian_posterior_step(backbone, channels):
    torch.manual_seed(12)
    model = NTM(tiny_config(image_size=8, channels=channels, backbone=backbone)).eval()
    u = images(3, model, seed=13)
    t, s = torch.tensor([1.0, 0.5, 0.75]), torch.tensor([0.75, 0.25, 0.025])
    ids = torch.tensor([[0], [1], [3]])
    with torch.no_grad():
        mu, log_sigma, x0_hat = model.predictor(
            u, t, s, torch.full((3,), 4.0), model.prompt_encoder(ids), torch.ones_like(ids, dtype=torch.bool)
        )
    for out in (mu, log_sigma, x0_hat):
        assert out.shape == (3, channels, 8, 8)
    assert torch.equal(x0_hat, u), "param 'v' with v = 0 must give x0-hat = u_t"
    A, B, C = posterior_abc(s.numpy(), t.numpy())
    view = (3, 1, 1, 1)
    np.testing.assert_allclose(mu.numpy(), (A + B).reshape(view) * u.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        log_sigma.numpy(), np.broadcast_to(np.log(C).reshape(view), u.shape), atol=1e-5
    )


@pytest.mark.parametrize("backbone", ["unet", "transformer"])
def test_perturbed_predictor_shapes_and_x0_param(backbone):
    model = perturbed_model(image_size=8, backbone=backbone, param="x0")
    u = images(2, model, seed=14)
    ids = torch.tensor([[2], [0]])
    with torch.no_grad():
        mu, log_sigma, x0_hat = model.predictor(
            u,
            torch.tensor([0.5, 1.0]),
            torch.tensor([0.25, 0.75]),
            torch.full((2,), 4.0),
            model.prompt_encoder(ids),
            torch.ones_like(ids, dtype=torch.bool),
        )
    for out in (mu, log_sigma, x0_hat):
        assert out.shape == u.shape and torch.isfinite(out).all()
    A, B, _ = posterior_abc(np.array([0.25, 0.75]), np.array([0.5, 1.0]))
    view = (2, 1, 1, 1)
    expected = A.reshape(view) * u.double().numpy() + B.reshape(view) * x0_hat.double().numpy()
    np.testing.assert_allclose(mu.numpy(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 8. layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_array", [torch.from_numpy, np.asarray], ids=["torch", "numpy"])
@pytest.mark.parametrize("p, C, H, W", [(1, 1, 4, 4), (2, 1, 4, 8), (2, 3, 4, 4), (4, 3, 8, 4)])
def test_patchify_order_and_round_trip(p, C, H, W, as_array):
    x = np.random.default_rng(0).standard_normal((2, C, H, W))
    tokens = np.asarray(patchify(as_array(x), p))
    assert tokens.shape == (2, (H // p) * (W // p), C * p * p)
    n = 0
    for i in range(H // p):  # row-major patches, features ordered (c, dy, dx)
        for j in range(W // p):
            expected = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(2, -1)
            assert np.array_equal(tokens[:, n], expected), f"token {n} is not patch ({i}, {j})"
            n += 1
    assert np.array_equal(np.asarray(unpatchify(as_array(tokens), p, C, H, W)), x)


def test_kv_cache_decoding_matches_causal_pass():
    torch.manual_seed(15)
    width, heads, B, N = 16, 2, 2, 6
    layers = [TransformerLayer(width, heads, 2).eval() for _ in range(2)]
    h = torch.randn(B, N, width)
    with torch.no_grad():
        full = h
        for layer in layers:
            full = layer(full, causal=True)
        # causality of the full pass: changing the last token leaves the others alone
        h2 = h.clone()
        h2[:, -1] += 1.0
        full2 = h2
        for layer in layers:
            full2 = layer(full2, causal=True)
        torch.testing.assert_close(full2[:, :-1], full[:, :-1], rtol=0, atol=1e-6)

        slots = torch.arange(N)
        # fixed size, slot n holds token n; the unused slots hold garbage that the mask must hide
        garbage = 10 * torch.randn(B, heads, N, width // heads)
        caches = [(garbage, garbage) for _ in layers]
        outs = []
        for n in range(N):
            x = h[:, n : n + 1]
            one_hot, visible = (slots == n).view(1, 1, N, 1), (slots <= n).view(1, 1, 1, N)
            write = lambda cache, new: torch.where(one_hot, new, cache)  # noqa: B023, E731  (as exported)
            for i, layer in enumerate(layers):
                x, k, v = layer.decode(x, visible, *caches[i], write)
                assert k.shape == v.shape == (B, heads, N, width // heads)
                assert torch.equal(k[:, :, n + 1 :], garbage[:, :, n + 1 :]), "slots after n must stay untouched"
                caches[i] = (k, v)
            outs.append(x)
    stepped = torch.cat(outs, dim=1)
    assert (stepped - full).abs().max() < 1e-5, f"KV-cache path differs by {(stepped - full).abs().max():.2e}"
