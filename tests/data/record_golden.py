"""Record the golden outputs of tests/test_golden.py (run once, on the code BEFORE the issue-10 refactor).

    OMP_NUM_THREADS=1 .venv/bin/python tests/data/record_golden.py          # writes tests/data/golden/

1. Trains a small NTM (the `tiny` preset with a (16, 32) U-Net predictor, 300 steps on digits) and
   builds a small denoiser with random output weights; stores both weights in tests/data/golden/
   (float32 safetensors + config JSON), so that the golden test does not depend on training.
2. Loads them back exactly as the test does and records, for fixed seeds, what the code of that
   commit produced: torch sampler images (uint8) and their float values before quantisation for every
   exit and inverse method, with and without guidance; u levels; the FM and Gaussian baselines
   (seeded random weights); trajectory NLLs; held-out bits/dim; training losses; GS-Jacobi inverses;
   and the torch-free runtime's images, u levels, NLLs and audit bits/dim on an exported bundle.

Do not re-run it to make a failing golden test pass: the arrays are the pre-refactor behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ntm_edge import config as config_module
from ntm_edge.config import NTMConfig, get_preset

OUT = Path(__file__).parent / "golden"
PROMPTS = [str(i) for i in range(10)] + [""]
SEED = 3
GUIDANCES = (0.0, 1.5)


def golden_config() -> NTMConfig:
    tiny = get_preset("tiny")
    return dataclasses.replace(tiny, predictor=dataclasses.replace(tiny.predictor, channels=(16, 32)))


def train_weights(tmp: Path) -> None:
    from safetensors.torch import save_file

    from ntm_edge.denoiser import Denoiser, DenoiserConfig
    from ntm_edge.train import TrainArgs, train

    config_module.PRESETS["tiny"] = golden_config()  # train() builds the model from the preset
    ckpt = tmp / "trained"
    train(TrainArgs(dataset="digits", preset="tiny", steps=300, batch_size=64, lr=2e-3, out=str(ckpt),
                    eval_images=0, seed=0), progress=False, log=lambda *_: None)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "model.json").write_text((ckpt / "config.json").read_text())
    (OUT / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    cfg = NTMConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    dcfg = DenoiserConfig(image_size=cfg.image_size, channels=cfg.channels, num_prompt_tokens=len(cfg.prompt.class_names) + 1,
                          t0=cfg.t_min_sample, steps=cfg.steps, prompt_dim=cfg.prompt.dim, width=32, depth=1, heads=2)
    torch.manual_seed(0)
    den = Denoiser(dcfg)
    with torch.no_grad():
        den.net.out.weight.copy_(torch.randn(den.net.out.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    (OUT / "denoiser.json").write_text(json.dumps(dataclasses.asdict(dcfg), indent=2))
    save_file({k: v.contiguous() for k, v in den.state_dict().items()}, str(OUT / "denoiser.safetensors"))


def load_golden():
    from safetensors.torch import load_file

    from ntm_edge import NTM
    from ntm_edge.denoiser import Denoiser, DenoiserConfig

    model = NTM(NTMConfig.from_dict(json.loads((OUT / "model.json").read_text())))
    model.load_state_dict(load_file(str(OUT / "model.safetensors")))
    den = Denoiser(DenoiserConfig(**json.loads((OUT / "denoiser.json").read_text())))
    den.load_state_dict(load_file(str(OUT / "denoiser.safetensors")))
    return model.eval(), den.eval()


def baseline(objective: str):
    """A seeded random model of the baseline objective with every parameter moved off its init."""
    from ntm_edge import NTM

    torch.manual_seed(11)
    model = NTM(golden_config().with_data(1, tuple("0123456789")).for_objective(objective))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def record_torch(model, den, rec: dict) -> None:
    from ntm_edge.data import load_dataset
    from ntm_edge.evaluate import heldout_likelihood
    from ntm_edge.exits import invert_levels, sample_images, score_denoise
    from ntm_edge.losses import end2end_loss, pairwise_loss
    from ntm_edge.model import dequantize, to_uint8

    ids, mask = model.tokenize(PROMPTS)
    t_min = model.config.t_min_sample
    for w in GUIDANCES:
        tag = f"w{w:g}"
        u, ts = model.sample_levels(ids, mask, 4, np.random.default_rng(SEED), w, t_min)
        rec[f"torch/u_levels/{tag}"] = u.numpy()
        rec["torch/ts"] = ts
        t0 = float(ts[0])
        for final, method in [("inverse", "sequential"), ("inverse", "jacobi"), ("inverse+score", "sequential"),
                              ("inverse+score", "jacobi"), ("denoiser", "sequential")]:
            images = sample_images(model, PROMPTS, seed=SEED, guidance=w, final=final, denoiser=den, inverse_method=method)
            with torch.no_grad():
                if final == "inverse":
                    x = model.transporter.inverse(u[:, 0], t0, 4, method=method) / (1.0 - t0)
                elif final == "denoiser":
                    u_d, _ = model.sample_levels(ids, mask, 4, np.random.default_rng(SEED), w, den.config.t0)
                    x = den(u_d[:, 0], ids, mask)
            if final == "inverse+score":
                with torch.no_grad():
                    traj = invert_levels(model, u, ts, method)
                x = score_denoise(model, traj, ids, mask, 99.0)
            assert np.array_equal(to_uint8(x), images), (final, method, w)
            name = final if final == "denoiser" else f"{final}/{method}"
            rec[f"torch/images/{name}/{tag}"] = images
            rec[f"torch/x0/{name}/{tag}"] = x.detach().numpy()
        assert np.array_equal(model.sample(PROMPTS, seed=SEED, guidance=w), rec[f"torch/images/inverse/sequential/{tag}"])
        for objective in ("fm", "gaussian"):
            base = baseline(objective)
            rec[f"torch/images/{objective}/{tag}"] = sample_images(base, PROMPTS, seed=SEED, guidance=w)
            b_ids, b_mask = base.tokenize(PROMPTS)
            with torch.no_grad():
                if objective == "fm":
                    x = base.sample_euler(b_ids, b_mask, 4, np.random.default_rng(SEED), w)
                else:
                    x, t0b = base.sample_u(b_ids, b_mask, 4, np.random.default_rng(SEED), w, t_min)
                    x = base.transporter.inverse(x, t0b, 4) / (1.0 - t0b)
            assert np.array_equal(to_uint8(x), rec[f"torch/images/{objective}/{tag}"])
            rec[f"torch/x0/{objective}/{tag}"] = x.numpy()
    # GS-Jacobi on the sampled u (guidance 0): x and passes per block and segment
    u, t0 = model.sample_u(ids, mask, 4, np.random.default_rng(SEED), 0.0, t_min)
    for segments in (1, 2, 4):
        with torch.no_grad():
            x, report = model.transporter.inverse_with_report(u, t0, 4, method="jacobi", segments=segments)
        rec[f"torch/gs_jacobi/x/G{segments}"] = x.numpy()
        rec[f"torch/gs_jacobi/iterations/G{segments}"] = np.array(report.iterations)
    # likelihood: forward trajectories of held-out digits
    test = load_dataset("digits", "test", image_size=8)
    g = torch.Generator().manual_seed(0)
    x0 = dequantize(torch.from_numpy(test.images[:12]), g)
    traj = model.forward_trajectory(x0, 4, generator=g)
    lab_ids = torch.from_numpy(model.vocab.ids_for_labels(test.labels[:12]))
    with torch.no_grad():
        nll = model.trajectory_nll(traj, lab_ids)
    rec["torch/dequantized"] = x0.numpy()
    rec["torch/trajectory/x"] = traj.x.numpy()
    rec["torch/trajectory/t"] = traj.t.numpy()
    rec["torch/trajectory_nll"] = nll.numpy()
    h = heldout_likelihood(model, test.images[:64], test.labels[:64])
    rec["torch/heldout/bits_per_dim"] = np.array(h["bits_per_dim"])
    rec["torch/heldout/trajectory_nats_per_dim"] = np.array(h["trajectory_nats_per_dim"])
    # training losses (end-to-end and pairwise) on one batch
    x0 = dequantize(torch.from_numpy(test.images[:32]), torch.Generator().manual_seed(4))
    b_ids = torch.from_numpy(model.vocab.ids_for_labels(test.labels[:32]))
    b_mask = torch.ones_like(b_ids, dtype=torch.bool)
    with torch.no_grad():
        for name, fn in (("end2end", end2end_loss), ("pairwise", pairwise_loss)):
            losses = fn(model, x0, b_ids, b_mask, torch.Generator().manual_seed(5))
            rec[f"torch/loss/{name}"] = np.array([losses.main.item(), losses.x0_mse.item()])


def record_runtime(model, den, rec: dict, tmp: Path) -> None:
    from ntm_edge.checkpoint import save_model
    from ntm_edge.data import load_dataset
    from ntm_edge.denoiser import save_denoiser
    from ntm_edge.export import export_bundle
    from ntm_edge.runtime import open_runtime
    from ntm_edge.runtime.audit import dequantize, generated_nll, image_bound, trajectory_nll
    from ntm_edge.runtime.sampler import generate

    ckpt = tmp / "ckpt"
    save_model(model, ckpt, step=0, info={"dataset": "digits"})
    save_denoiser(den, ckpt, {"note": "golden"})
    export_bundle(ckpt, tmp / "bundle", batch=4, log=lambda *_: None)
    rt = open_runtime(tmp / "bundle", provider="cpu", threads=1)
    for final, method, w, unrolled in [("inverse", "jacobi", 0.0, False), ("inverse", "sequential", 0.0, False),
                                       ("inverse", "jacobi", 1.5, False), ("inverse", "sequential", 1.5, False),
                                       ("inverse", "jacobi", 1.5, True), ("denoiser", "jacobi", 0.0, False),
                                       ("denoiser", "jacobi", 1.5, True)]:
        r = generate(rt, PROMPTS, seed=SEED, guidance=w, final=final, inverse_method=method, unrolled=unrolled)
        name = f"runtime/{final}/{method if final == 'inverse' else '-'}/w{w:g}/{'unrolled' if unrolled else 'steps'}"
        rec[f"{name}/images"] = r.images
        rec[f"{name}/x0"] = r.x0
        rec[f"{name}/u_levels"] = r.u_levels
        if final == "inverse":
            rec[f"{name}/passes"] = np.array(r.passes)
    test = load_dataset("digits", "test", image_size=8)
    ids = model.vocab.ids_for_labels(test.labels[:12])
    mask = np.ones((12, 1), dtype=bool)
    rec["runtime/trajectory_nll"] = trajectory_nll(rt, rec["torch/trajectory/x"], rec["torch/trajectory/t"], ids, mask)
    u = rec["torch/u_levels/w0"]
    p_ids, p_mask = model.vocab.tokenize(PROMPTS)
    for method in ("jacobi", "sequential"):
        rec[f"runtime/generated_nll/{method}"] = generated_nll(rt, u, rec["torch/ts"], p_ids, p_mask, method)
    rec["runtime/dequantized"] = dequantize(test.images[:6], np.random.default_rng(2))
    bound = image_bound(rt, test.images[:16], [str(v) for v in test.labels[:16]], trajectories=2, seed=1)
    rec["runtime/audit/bits_per_dim"] = bound["bits_per_dim"]
    rec["runtime/audit/trajectory_nats_per_dim"] = bound["trajectory_nats_per_dim"]


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if "--keep-weights" not in sys.argv:
            train_weights(Path(tmp))
        model, den = load_golden()
        rec: dict = {}
        record_torch(model, den, rec)
        record_runtime(model, den, rec, Path(tmp))
    np.savez_compressed(OUT / "outputs.npz", **rec)
    size = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{len(rec)} arrays; tests/data/golden holds {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
