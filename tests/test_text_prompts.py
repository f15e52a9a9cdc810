"""Free-form text prompts (the frozen MiniLM): caption training, the paraphrase test, the checkpoint,
the exported encoder graph against torch, the runtime (same images as `ntm-edge sample`, the
on-disk prompt cache, no torch and no transformers), and the one-line errors of bad prompts. The text
model's denoiser and its fp16 / int8 export: tests/test_text_denoiser.py.

The paraphrase margin: `tiny` trained 450 pairwise steps of the 4-step grid on digits captions
(``conftest.trained_text_tiny``), guidance 2, one image per caption (every class x name x phrasing, 240
each), scored by the evaluation classifier: measured 0.92 on the training templates and 0.89 on the
held-out paraphrases (chance 0.10); the test asks for > 0.5 on the paraphrases, and > 0.8 x the template
figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_runtime import FORBID_IMPORTS
from typer.testing import CliRunner

from ntm_edge.captions import HELDOUT_PARAPHRASES, TEMPLATES, all_captions, caption_table
from ntm_edge.cli import app
from ntm_edge.errors import PromptError

runner = CliRunner()


@pytest.fixture(scope="module")
def text_model(trained_text_tiny):
    from ntm_edge import NTM

    return NTM.from_pretrained(trained_text_tiny)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NTM_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_checkpoint_says_minilm_and_holds_no_encoder(trained_text_tiny, text_model):
    cfg = json.loads((trained_text_tiny / "config.json").read_text())
    assert cfg["prompt"]["kind"] == "minilm" and cfg["prompt"]["dim"] == 384 and cfg["prompt"]["max_tokens"] == 16
    assert not [k for k in text_model.state_dict() if k.startswith("prompt_encoder")]
    assert (trained_text_tiny / "model.safetensors").stat().st_size < 5 * 2**20  # the MiniLM alone is ~90 MB


def test_caption_table_rows_belong_to_their_class(text_model):
    names = text_model.config.prompt.class_names
    captions = all_captions(names)
    table = caption_table(text_model.vocab, captions)
    assert table.ids.shape == (sum(map(len, captions)), 16) and (table.count == 2 * len(TEMPLATES)).all()
    for k in (0, 7):
        rows = table.ids[table.start[k] : table.start[k] + table.count[k]]
        assert (rows == text_model.vocab.tokenize(captions[k])[0]).all()
    assert (table.mask == (table.ids != 0)).all()


def test_training_draws_varied_captions_and_the_null_prompt(text_model):
    from ntm_edge.train import prompt_sampler

    labels = torch.full((64,), 7)
    draw = prompt_sampler(text_model, labels, text_model.config.prompt.class_names, 0.25, torch.Generator().manual_seed(0))
    ids, mask = draw(torch.arange(64))
    null_ids, _ = text_model.vocab.null(1)
    dropped = (ids == torch.from_numpy(null_ids)).all(1)
    assert 5 <= int(dropped.sum()) <= 30  # '' at about a quarter of the examples
    sevens = {tuple(r.tolist()) for r in ids[~dropped]}
    assert len(sevens) >= 10  # many phrasings of the one class in one batch
    allowed = {tuple(r) for r in text_model.vocab.tokenize(all_captions(["7"])[0])[0].tolist()}
    assert sevens <= allowed and (mask == (ids != 0)).all()


def test_caption_trained_model_follows_heldout_paraphrases(text_model, cache_dir):
    from ntm_edge.metrics import load_or_train_classifier
    from ntm_edge.text_eval import paraphrase_report

    assert not set(HELDOUT_PARAPHRASES) & set(TEMPLATES)
    clf = load_or_train_classifier("digits", 8, 1, cache_dir=cache_dir, log=lambda *_: None)
    r = paraphrase_report(text_model, clf, guidance=2.0)
    held, templ = r["heldout_paraphrases"]["accuracy"], r["templates"]["accuracy"]
    assert r["heldout_paraphrases"]["num_samples"] == 240 and r["heldout_paraphrases"]["chance"] == 0.1
    assert held > 0.5 and held > 0.8 * templ, r


def test_eval_reports_template_and_paraphrase_accuracy_of_a_text_model(trained_text_tiny, text_model, cache_dir):
    """`ntm-edge eval` of a caption-trained model carries the template/paraphrase report of its own
    sampler settings, --num-samples captions of each set (of 240): the same numbers as ``paraphrase_report``
    called with them."""
    from ntm_edge.evaluate import evaluate_checkpoint
    from ntm_edge.metrics import load_or_train_classifier
    from ntm_edge.text_eval import paraphrase_report

    report = evaluate_checkpoint(trained_text_tiny, steps=(4,), num_samples=30, guidance=1.0, seed=3,
                                 log=lambda *_: None)
    got = report["rows"][0]["captions"]
    clf = load_or_train_classifier("digits", 8, 1, cache_dir=cache_dir, log=lambda *_: None)
    assert got == paraphrase_report(text_model, clf, guidance=1.0, seed=3, limit=30, steps=4, final="inverse")
    assert got["templates"]["num_samples"] == 30 and got["heldout_paraphrases"]["num_samples"] == 30


@pytest.mark.parametrize("limit", [None, 240, 500, 1, 7, 30, 239])
def test_a_caption_subset_is_class_balanced_and_spreads_over_the_phrasings(limit):
    """eval's caption report at --num-samples below the 240 captions of a set: every prefix of the order cycles
    through the 10 classes, and takes each class's phrasings in a shuffled order, not the first templates;
    at or above 240 every caption, in the order the full report has always used (its records stay comparable)."""
    from ntm_edge.text_eval import caption_subset

    names = [str(k) for k in range(10)]
    per_class = all_captions(names, TEMPLATES)
    everything = [c for captions in per_class for c in captions]
    captions, labels = caption_subset(per_class, limit)
    if limit is None or limit >= len(everything):
        assert captions == everything and labels.tolist() == [k for k in range(10) for _ in per_class[k]]
        return
    assert len(captions) == len(set(captions)) == limit
    assert all(c in per_class[k] for c, k in zip(captions, labels, strict=True))
    counts = np.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    if limit >= 30:  # three phrasings per class: not the first three of the 24
        assert {per_class[0].index(c) for c, k in zip(captions, labels, strict=True) if k == 0} != {0, 1, 2}


def test_onnx_encoder_agrees_with_torch(text_bundle, text_model):
    from ntm_edge.runtime import open_runtime
    from ntm_edge.runtime.sampler import encode

    rt = open_runtime(text_bundle, provider="cpu", threads=1)
    prompts = ["a handwritten seven", "the number 3", "", "someone wrote a 5 here", "zero", "an old scan of a nine",
               "hand-drawn figure 2", "a quick pen stroke forming 8", "éàü unicode digit 4", "x"]
    ids, mask = rt.bundle.vocab.tokenize(prompts)
    got = encode(rt, ids)  # (B, P, E)
    with torch.no_grad():
        ref = text_model.prompt_encoder.embed(torch.from_numpy(ids)).numpy()
    a, b = got[mask], ref[mask]  # real tokens only (N, E)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999 and np.abs(got - ref).max() < 1e-3, (cos.min(), np.abs(got - ref).max())
    assert (got[~mask] == 0).all()
    manifest = json.loads((text_bundle / "manifest.json").read_text())
    assert manifest["prompts"]["encoder_sha256"] == text_model.prompt_encoder.encoder_sha256
    assert "tokenizer.json" in manifest["files"] and manifest["parity"]["graphs"]["prompt_encoder"]["real"]["max_abs"] < 1e-3


@pytest.mark.parametrize("unrolled", [False, True], ids=["per-step", "unrolled"])
def test_runtime_draws_the_same_images_as_sample(text_bundle, text_model, cache_dir, unrolled):
    from ntm_edge.exits import sample_images
    from ntm_edge.runtime import open_runtime
    from ntm_edge.runtime.sampler import generate

    prompts = ["a handwritten seven", "someone wrote a 3 here", "", "the numeral 0 in ink", "1", "a messy 6"]
    rt = open_runtime(text_bundle, provider="cpu", threads=1)
    got = generate(rt, prompts, steps=4, seed=5, guidance=2.0, final="inverse", unrolled=unrolled)
    want = sample_images(text_model, prompts, steps=4, seed=5, guidance=2.0, final="inverse")
    assert np.abs(got.images.astype(int) - want).max() <= 1


def test_prompt_cache_hit_path(text_bundle, cache_dir):
    from ntm_edge.runtime import open_runtime
    from ntm_edge.runtime.sampler import generate

    rt = open_runtime(text_bundle, provider="cpu", threads=1)
    cold = generate(rt, ["a sketch of the digit 2"] * 3, seed=1, final="inverse")
    assert "text encoder" in cold.timer.seconds and "text encoder (cache hit)" not in cold.timer.seconds
    entries = sorted((cache_dir / "prompts").glob("*.npy"))
    assert len(entries) == 2  # the prompt and the null prompt
    warm = generate(rt, ["a sketch of the digit 2"] * 3, seed=1, final="inverse")
    assert "text encoder (cache hit)" in warm.timer.seconds and "text encoder" not in warm.timer.seconds
    assert (warm.images == cold.images).all()
    entries[0].write_bytes(b"not an array")  # a corrupt entry is a miss, recomputed and rewritten
    again = generate(rt, ["a sketch of the digit 2"] * 3, seed=1, final="inverse")
    assert "text encoder" in again.timer.seconds and (again.images == cold.images).all()
    assert np.load(entries[0]).shape == (16, 384)


def test_text_bundle_refuses_a_changed_tokenizer(text_bundle, tmp_path):
    from ntm_edge.runtime import BundleError, open_runtime

    copy = tmp_path / "b"
    shutil.copytree(text_bundle, copy)
    tok = copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"[SEP]"', '"[SEQ]"', 1))
    with pytest.raises(BundleError, match="tokenizer.json does not match its sha256"):
        open_runtime(copy, provider="cpu")


@pytest.mark.parametrize("prompt, needle", [
    ("seven " * 20, "tokens long; this model reads at most 16"),
    ("a\x07seven", "holds control characters"),
    ("a \udcff seven", "not valid UTF-8"),
], ids=["too-long", "control", "non-utf8"])
def test_bad_prompts_are_one_line(trained_text_tiny, tmp_path, prompt, needle):
    r = runner.invoke(app, ["sample", "--checkpoint", str(trained_text_tiny), "--prompt", prompt, "--num", "1",
                            "--out", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x.png").exists()


def test_free_text_is_refused_by_a_label_model():
    from ntm_edge.config import get_preset
    from ntm_edge.prompts import make_vocab

    vocab = make_vocab(get_preset("tiny").with_data(1, tuple("0123456789")).prompt)
    vocab.check("seven")
    with pytest.raises(PromptError, match="unknown prompt 'a handwritten seven'"):
        vocab.check("a handwritten seven")


NO_TORCH_TEXT = FORBID_IMPORTS + r"""
from ntm_edge.cli import app
bundle, out, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
for prompt in ("a handwritten four", ""):  # each measured run follows a warm-up run: its prompts hit the cache
    try:
        app(["run", "--bundle", bundle, "--prompt", prompt, "--num", "2", "--threads", "1", "--guidance", "1",
             "--out", out + ".png", "--save-array", out + ".npy", *extra])
    except SystemExit as e:
        assert e.code in (0, None), e.code
assert "torch" not in sys.modules and "transformers" not in sys.modules
print("NO TORCH OK")
"""


def test_runtime_text_bundle_imports_neither_torch_nor_transformers(text_bundle, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NTM_EDGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", NO_TORCH_TEXT, str(text_bundle), str(tmp_path / "s")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "NO TORCH OK" in r.stdout, r.stdout + r.stderr
    assert "text encoder (cache hit)" in r.stdout
    assert np.load(tmp_path / "s.npy").shape == (2, 8, 8, 1)


def _captioned_npz(path, n_per_class: int = 30):
    """digits 0 and 1 (8x8) with captions of their own: two per image, none from the templates."""
    from ntm_edge.data import load_dataset

    d = load_dataset("digits")
    keep = np.concatenate([np.flatnonzero(d.labels == k)[:n_per_class] for k in (0, 1)])
    words = {0: ("a round loop", "an empty ring"), 1: ("a single upright stroke", "a thin vertical bar")}
    caps = np.array([words[int(label)] for label in d.labels[keep]])  # (N, 2) strings
    np.savez(path, images=d.images[keep], labels=d.labels[keep], captions=caps, class_names=np.array(["zero", "one"]))
    return caps


def test_npz_captions_are_loaded_split_and_drawn(tmp_path):
    from ntm_edge import NTM
    from ntm_edge.data import load_dataset
    from ntm_edge.train import TrainArgs, prompt_sampler, train

    caps = _captioned_npz(tmp_path / "c.npz")
    train_set, test_set = load_dataset(f"npz:{tmp_path / 'c.npz'}"), load_dataset(f"npz:{tmp_path / 'c.npz'}", "test")
    assert train_set.captions is not None and test_set.captions is not None
    assert len(train_set.captions) + len(test_set.captions) == len(caps)
    by_label = {0: ("a round loop", "an empty ring"), 1: ("a single upright stroke", "a thin vertical bar")}
    assert all(c == by_label[int(k)] for c, k in zip(train_set.captions, train_set.labels, strict=True))
    out = tmp_path / "run"
    train(TrainArgs(dataset=f"npz:{tmp_path / 'c.npz'}", preset="tiny", steps=3, batch_size=8, out=str(out),
                    text_encoder="minilm", eval_images=0), progress=False, log=lambda *_: None)
    model = NTM.from_pretrained(out)
    labels = torch.from_numpy(train_set.labels)
    draw = prompt_sampler(model, labels, train_set.class_names, 0.0, torch.Generator().manual_seed(0), train_set.captions)
    ids, _ = draw(torch.arange(len(labels)))
    allowed = {tuple(r) for r in model.vocab.tokenize([c for pair in by_label.values() for c in pair])[0].tolist()}
    drawn = {tuple(r) for r in ids.tolist()}
    assert drawn == allowed  # only the dataset's captions, all four of them over 54 draws


def test_folder_captions_and_their_errors(tmp_path):
    from PIL import Image

    from ntm_edge.data import load_dataset
    from ntm_edge.errors import DataError

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / cls / f"{i}.png")
    lines = [json.dumps({"file": f"{cls}/{i}.png", "captions": [f"{cls} number {i}"]}) for cls in "ab" for i in range(10)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    d = load_dataset(f"folder:{tmp_path}")
    assert d.captions is not None and len(d.captions) == len(d)
    assert all(c[0].startswith(d.class_names[k] + " number") for c, k in zip(d.captions, d.labels, strict=True))

    def both_splits():  # b/9.png lies in one of them
        return [load_dataset(f"folder:{tmp_path}", split) for split in ("train", "test")]

    (tmp_path / "captions.jsonl").write_text("\n".join(lines[:-1]))
    with pytest.raises(DataError, match="has no captions for b/9.png"):
        both_splits()
    (tmp_path / "captions.jsonl").write_text(lines[0] + "\n" + json.dumps({"file": "a/1.png", "caption": " "}))
    with pytest.raises(DataError, match="a caption is empty"):
        both_splits()
