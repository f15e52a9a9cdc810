"""Text prompts: the paraphrase test at a chosen size, and the encoder's latency per prompt.

    # prompt accuracy on the training templates and on the held-out paraphrases
    .venv/bin/python benchmarks/text_prompts.py paraphrases --checkpoint runs/tiny_text --guidance 2
    # latency per prompt: torch MiniLM vs the bundle's ONNX encoder, and the runtime's cache cold / warm
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_prompts.py latency --checkpoint runs/tiny_text --bundle b/tiny_text

``latency`` times each variant on the same prompts in one run (median of one call per prompt) and
prints the ratios against torch. The cache runs use a fresh temporary $NTM_EDGE_CACHE.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

app = typer.Typer(add_completion=False)


@app.command()
def paraphrases(checkpoint: Path = typer.Option(...), guidance: float = 2.0, seed: int = 0, repeats: int = 1):
    """Prompt accuracy under the evaluation classifier: templates vs held-out paraphrases."""
    from ntm_edge.checkpoint import trained_on
    from ntm_edge.metrics import load_or_train_classifier
    from ntm_edge.model import NTM
    from ntm_edge.text_eval import paraphrase_report

    model = NTM.from_pretrained(checkpoint)
    cfg = model.config
    clf = load_or_train_classifier(trained_on(checkpoint) or "digits", cfg.image_size, cfg.channels)
    print(json.dumps(paraphrase_report(model, clf, guidance, seed, repeats), indent=2))


def _median_ms(fn, prompts) -> float:
    times = []
    for p in prompts:
        start = time.perf_counter()
        fn(p)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@app.command()
def latency(checkpoint: Path = typer.Option(...), bundle: Path = typer.Option(...), threads: int = 1):
    """Milliseconds per prompt (batch 1): torch MiniLM, ONNX encoder graph, runtime cold and warm cache."""
    import torch

    from ntm_edge.captions import HELDOUT_PARAPHRASES, all_captions
    from ntm_edge.model import NTM
    from ntm_edge.runtime import open_runtime
    from ntm_edge.runtime.sampler import StageTimer, encode, encode_cached
    from ntm_edge.text_prompts import TextPromptEncoder

    torch.set_num_threads(threads)
    model = NTM.from_pretrained(checkpoint)
    enc = model.prompt_encoder
    if not isinstance(enc, TextPromptEncoder):
        raise SystemExit(f"error: {checkpoint} was trained with labels, not a text encoder")
    rt = open_runtime(bundle, provider="cpu", threads=threads)
    vocab = rt.bundle.vocab
    prompts = [c for per in all_captions(model.config.prompt.class_names, HELDOUT_PARAPHRASES) for c in per]
    ids = {p: vocab.tokenize([p])[0] for p in prompts}
    encode(rt, ids[prompts[0]])  # load the session
    with torch.no_grad():
        rows = {
            "torch (MiniLM, eager)": _median_ms(lambda p: enc.embed(torch.from_numpy(ids[p])), prompts),
            "onnxruntime (prompt_encoder graph)": _median_ms(lambda p: encode(rt, ids[p]), prompts),
        }
    with tempfile.TemporaryDirectory() as cache:
        os.environ["NTM_EDGE_CACHE"] = cache
        rows["runtime, cache cold (tokenise + graph + write)"] = _median_ms(
            lambda p: encode_cached(rt, vocab.tokenize([p])[0], StageTimer()), prompts)
        rows["runtime, cache warm (tokenise + read)"] = _median_ms(
            lambda p: encode_cached(rt, vocab.tokenize([p])[0], StageTimer()), prompts)
    base = rows["torch (MiniLM, eager)"]
    print(f"{len(prompts)} prompts, batch 1, {threads} thread(s), median ms per prompt:")
    for name, ms in rows.items():
        print(f"  {name:48s} {ms:8.3f} ms   {base / ms:6.1f}x torch")


if __name__ == "__main__":
    app()
