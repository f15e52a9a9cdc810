"""Frozen model configs and the preset registry (no torch here: the CLI validates presets cheaply).

A checkpoint carries its ``NTMConfig`` as ``config.json``; everything needed to rebuild the model
is in it. Presets fix the architecture and the image size; the dataset fills in the channels and
the prompt vocabulary (``with_data``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from .errors import ConfigError
from .schedule import shift_time

CONFIG_VERSION = 1


@dataclass(frozen=True)
class TransporterConfig:
    """f_T: a stack of TarFlow blocks over patch tokens (docs/design.md 2)."""

    patch_size: int = 2
    num_blocks: int = 2  # alternating scan direction: identity, flip, identity, ...; 0: f_T = identity
    layers_per_block: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 2
    alpha_clamp: float = 3.0  # soft clamp of the log-scale: alpha = c tanh(alpha_raw / c)
    # f_T of level s also reads the step's x_t, u_s = f_T(x_s; s, T, x_t), and the predictor reads x_t
    # itself; the likelihood stays exact, and the sampler inverts f_T at every step (issue 13)
    context: bool = False


@dataclass(frozen=True)
class PredictorConfig:
    """f_P: the deep network that returns the Gaussian over u_s (docs/design.md 2)."""

    backbone: str = "unet"  # "unet" (pixels on CPU) | "transformer" (the paper's)
    param: str = "v"  # the network predicts "v" (x0-hat = u_t - t v) or "x0" directly
    # condition on the whole step (t, s, 1/T), or on t alone as a flow-matching velocity net does
    # (such a net reads as an NTM predictor, which is what finetuning from FM relies on, paper 3.6)
    grid_conditioning: bool = True
    learn_scale: bool = True  # sigma_P = C exp(d); False pins d = 0 (the Gaussian posterior step)
    # U-Net
    channels: tuple[int, ...] = (32, 64)  # one entry per resolution
    blocks_per_level: int = 1
    # transformer
    patch_size: int = 2
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4


PROMPT_KINDS = ("label", "minilm")
MINILM_DIM = 384  # all-MiniLM-L6-v2's token states


@dataclass(frozen=True)
class MiniLMConfig:
    """The shape of the frozen all-MiniLM-L6-v2 (text_encoder.MiniLM; flops.text_encoder counts it)."""

    vocab_size: int = 30522
    width: int = MINILM_DIM
    layers: int = 6
    heads: int = 12
    mlp_width: int = 1536
    max_positions: int = 512
    eps: float = 1e-12


@dataclass(frozen=True)
class PromptConfig:
    """The prompt encoder: ``label`` maps a class name to one learned token (P = 1); ``minilm`` reads
    free-form text through the frozen all-MiniLM-L6-v2 (P = ``max_tokens`` word pieces, dim 384)."""

    kind: str = "label"
    class_names: tuple[str, ...] = ()
    dim: int = 64
    max_tokens: int = 16  # minilm only: [CLS] + word pieces + [SEP], padded to this length

    def validate(self) -> PromptConfig:
        if self.kind not in PROMPT_KINDS:
            raise ConfigError(f"unknown prompt encoder {self.kind!r}; choose one of: {', '.join(PROMPT_KINDS)}")
        if self.kind == "minilm" and self.dim != MINILM_DIM:
            raise ConfigError(f"prompt.dim of a minilm model is the encoder's width {MINILM_DIM}, got {self.dim!r}")
        _need_int("prompt.max_tokens", self.max_tokens, 3)
        names = self.class_names
        if not isinstance(names, tuple) or not all(isinstance(n, str) and n.strip() for n in names):
            raise ConfigError(f"prompt.class_names must be non-empty strings, got {names!r}")
        keys = [" ".join(n.lower().split()) for n in names]  # as prompts.normalize_prompt reads them
        if len(set(keys)) != len(keys):
            raise ConfigError(f"prompt.class_names has names that a prompt cannot tell apart: {names!r}")
        return self


OBJECTIVES = ("ntm", "gaussian", "fm")


@dataclass(frozen=True)
class NTMConfig:
    # "ntm": the full model. Baselines on the same backbone (paper section 4):
    # "gaussian": f_T = identity and sigma_P = C, trained by the same exact NLL;
    # "fm": flow matching (velocity MSE), no transporter, sampled with Euler.
    objective: str = "ntm"
    image_size: int = 8
    channels: int = 1
    steps: int = 4  # T used by end-to-end training and the default sampler
    shift: float = 0.0  # time-grid shift mu (schedule.shift_time)
    # training draws t_0 = t_min ~ U[t_min_low, t_min_max]. The paper's low end is 0; on 8-bit pixels
    # a level below the quantisation step (1/128) only adds heavy-tailed loss: the last step's C ~ s
    # tends to 0 while the predictor's x0 error does not, so a handful of examples dominate the batch.
    t_min_low: float = 0.01
    t_min_max: float = 0.05
    t_min_sample: float = 0.025  # t_0 used by sampling and evaluation
    prompt_dropout: float = 0.1  # classifier-free guidance training (C.5)
    x0_mse_weight: float = 0.0  # optional hybrid objective: + w * ||x0-hat - x0||^2 per dim
    transporter: TransporterConfig = field(default_factory=TransporterConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    @property
    def dims(self) -> int:
        """Dimensions of one image, C * H * W."""
        return self.channels * self.image_size * self.image_size

    def with_data(self, channels: int, class_names: tuple[str, ...]) -> NTMConfig:
        prompt = dataclasses.replace(self.prompt, class_names=tuple(class_names))
        return dataclasses.replace(self, channels=channels, prompt=prompt)

    def with_text_encoder(self, kind: str) -> NTMConfig:
        """This config with the prompt encoder ``kind`` ("label" keeps the preset's learned width)."""
        if kind not in PROMPT_KINDS:
            raise ConfigError(f"unknown text encoder {kind!r}; choose one of: labels, minilm")
        dim = MINILM_DIM if kind == "minilm" else self.prompt.dim
        return dataclasses.replace(self, prompt=dataclasses.replace(self.prompt, kind=kind, dim=dim))

    def for_objective(self, objective: str) -> NTMConfig:
        """This architecture as the full NTM or as one of its baselines."""
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        if objective == "ntm":
            return dataclasses.replace(self, objective=objective)
        pred = dataclasses.replace(self.predictor, learn_scale=False, grid_conditioning=objective != "fm")
        trans = dataclasses.replace(self.transporter, num_blocks=0)
        x0_mse_weight = 0.0 if objective == "fm" else self.x0_mse_weight  # FM's loss is already an MSE
        return dataclasses.replace(self, objective=objective, predictor=pred, transporter=trans, x0_mse_weight=x0_mse_weight)

    def validate(self) -> NTMConfig:
        """Every value a model can be built, trained and sampled with, or one ConfigError naming the
        field (config.json is user-visible: a value that loads must not crash deep inside later)."""
        t, p = self.transporter, self.predictor
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        for name in ("image_size", "channels", "steps"):
            _need_int(name, getattr(self, name), 1)
        for name, low in (("patch_size", 1), ("num_blocks", 0), ("layers_per_block", 1), ("width", 1),
                          ("heads", 1), ("mlp_ratio", 1)):
            _need_int(f"transporter.{name}", getattr(t, name), low)
        for name in ("blocks_per_level", "patch_size", "width", "depth", "heads", "mlp_ratio"):
            _need_int(f"predictor.{name}", getattr(p, name), 1)
        if not isinstance(p.channels, tuple) or not p.channels:
            raise ConfigError(f"predictor.channels must list at least one width, got {p.channels!r}")
        for c in p.channels:
            _need_int("predictor.channels", c, 1)
        _need_int("prompt.dim", self.prompt.dim, 1)
        for name in ("shift", "t_min_low", "t_min_max", "t_min_sample", "prompt_dropout", "x0_mse_weight"):
            _need_number(name, getattr(self, name))
        _need_number("transporter.alpha_clamp", t.alpha_clamp)
        for name in ("grid_conditioning", "learn_scale"):
            if not isinstance(getattr(p, name), bool):
                raise ConfigError(f"predictor.{name} must be true or false, got {getattr(p, name)!r}")
        if not isinstance(t.context, bool):
            raise ConfigError(f"transporter.context must be true or false, got {t.context!r}")
        if t.context and not t.num_blocks:
            raise ConfigError("transporter.context needs a transporter (num_blocks >= 1)")
        if t.width % t.heads or p.width % p.heads:
            raise ConfigError("the transporter's and the predictor's width must be divisible by their heads")
        if t.alpha_clamp <= 0:
            raise ConfigError(f"transporter.alpha_clamp must be positive, got {t.alpha_clamp}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ConfigError(f"prompt_dropout must lie in [0, 1], got {self.prompt_dropout}")
        if self.x0_mse_weight < 0:
            raise ConfigError(f"x0_mse_weight must be >= 0, got {self.x0_mse_weight}")
        if self.image_size % t.patch_size:
            raise ConfigError(f"image size {self.image_size} is not divisible by the transporter patch {t.patch_size}")
        if self.objective == "fm" and (p.grid_conditioning or p.param != "v" or t.num_blocks):
            raise ConfigError("a flow-matching model predicts v from (x_t, t) alone and has no transporter")
        if p.backbone not in ("unet", "transformer"):
            raise ConfigError(f"unknown predictor backbone {p.backbone!r}; use 'unet' or 'transformer'")
        if p.param not in ("v", "x0"):
            raise ConfigError(f"unknown predictor parametrisation {p.param!r}; use 'v' or 'x0'")
        if p.backbone == "transformer" and self.image_size % p.patch_size:
            raise ConfigError(f"image size {self.image_size} is not divisible by the predictor patch {p.patch_size}")
        if p.backbone == "unet" and self.image_size % (2 ** (len(p.channels) - 1)):
            raise ConfigError(f"image size {self.image_size} cannot be halved {len(p.channels) - 1} times")
        self.prompt.validate()
        # training draws t_min below t_1 of the finest grid it trains on (T = 16 pairwise, or `steps`);
        # sampling starts from t_min_sample below t_1 of the model's own grid
        finest = shift_time(1.0 / max(16, self.steps), self.shift)
        if not 0.0 <= self.t_min_low <= self.t_min_max < finest:
            raise ConfigError(f"need 0 <= t_min_low <= t_min_max < t_1 = {finest:.4f} (the finest trained grid), "
                              f"got {self.t_min_low}, {self.t_min_max}")
        t1 = shift_time(1.0 / self.steps, self.shift)
        if not 0.0 < self.t_min_sample < t1:
            raise ConfigError(f"t_min_sample must lie in (0, t_1 = {t1:.4f}) for {self.steps} steps, "
                              f"got {self.t_min_sample}")
        return self

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> NTMConfig:
        d = dict(d)
        version = d.pop("config_version", None)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config version {version} is not supported (this ntm-edge reads {CONFIG_VERSION})")
        try:
            sub = {
                "transporter": _build(TransporterConfig, d.pop("transporter")),
                "predictor": _build(PredictorConfig, d.pop("predictor")),
                "prompt": _build(PromptConfig, d.pop("prompt")),
            }
            return cls(**d, **sub).validate()
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"config does not describe an NTM model ({e})") from None


def _need_int(name: str, value, low: int) -> None:
    if type(value) is not int or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _need_number(name: str, value) -> None:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _build(cls, d: dict):
    """Rebuild a sub-config, turning JSON lists back into tuples."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

PRESETS: dict[str, NTMConfig] = {
    # tests: digits 8x8, trains in seconds on one core
    "tiny": NTMConfig(
        image_size=8,
        transporter=TransporterConfig(patch_size=2, num_blocks=2, layers_per_block=1, width=32, heads=2),
        predictor=PredictorConfig(backbone="unet", channels=(32, 64), blocks_per_level=1),
        prompt=PromptConfig(dim=32),
    ),
    # CPU: MNIST 28x28. U-Net predictor (docs/design.md 2: it learns pixels several times faster than a
    # transformer on 2 cores) and a light patch-4 transporter (49 tokens), trained pairwise.
    "small": NTMConfig(
        image_size=28,
        x0_mse_weight=1.0,
        transporter=TransporterConfig(patch_size=4, num_blocks=2, layers_per_block=2, width=64, heads=4),
        predictor=PredictorConfig(backbone="unet", channels=(32, 64, 128), blocks_per_level=1),
        prompt=PromptConfig(dim=64),
    ),
    # GPU: the paper's shape at MNIST/CIFAR scale, transformer predictor with prompt prefix tokens.
    "base": NTMConfig(
        image_size=32,
        shift=0.3,
        transporter=TransporterConfig(patch_size=2, num_blocks=2, layers_per_block=4, width=256, heads=8),
        predictor=PredictorConfig(backbone="transformer", patch_size=2, width=512, depth=12, heads=8),
        prompt=PromptConfig(dim=256),
    ),
}

# the prompt encoder each preset trains with unless told (``ntm-edge train --text-encoder``)
PRESET_TEXT_ENCODERS = {"tiny": "label", "small": "minilm", "base": "minilm"}

# the training mode each preset was sized for
PRESET_MODES = {"tiny": "end2end", "small": "pairwise", "base": "pairwise"}


def get_preset(name: str) -> NTMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
