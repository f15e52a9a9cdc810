"""Frozen model configs and the preset registry (no torch here: the CLI validates presets cheaply).

A checkpoint carries its ``NTMConfig`` as ``config.json``; everything needed to rebuild the model
is in it. Presets fix the architecture and the image size; the dataset fills in the channels and
the prompt vocabulary (``with_data``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import ConfigError

CONFIG_VERSION = 1


@dataclass(frozen=True)
class TransporterConfig:
    """f_T: a stack of TarFlow blocks over patch tokens (DESIGN.md 2)."""

    patch_size: int = 2
    num_blocks: int = 2  # alternating scan direction: identity, flip, identity, ...; 0: f_T = identity
    layers_per_block: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 2
    alpha_clamp: float = 3.0  # soft clamp of the log-scale: alpha = c tanh(alpha_raw / c)


@dataclass(frozen=True)
class PredictorConfig:
    """f_P: the deep network that returns the Gaussian over u_s (DESIGN.md 2)."""

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


@dataclass(frozen=True)
class PromptConfig:
    """The prompt encoder: ``label`` maps a class name to one learned token."""

    kind: str = "label"
    class_names: tuple[str, ...] = ()
    dim: int = 64


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
        t, p = self.transporter, self.predictor
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
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
        # t_min must stay below t_1 = 1/16, the first level of the finest trained grid (T = 16)
        if not 0.0 <= self.t_min_low <= self.t_min_max < 1.0 / 16:
            raise ConfigError(f"need 0 <= t_min_low <= t_min_max < 1/16, got {self.t_min_low}, {self.t_min_max}")
        if not 0.0 < self.t_min_sample < 1.0 / self.steps:
            raise ConfigError(f"t_min_sample must lie in (0, 1/steps), got {self.t_min_sample}")
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
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config does not describe an NTM model ({e})") from None


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
    # CPU: MNIST 28x28. U-Net predictor (DESIGN.md 2: it learns pixels several times faster than a
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

# the training mode each preset was sized for
PRESET_MODES = {"tiny": "end2end", "small": "pairwise", "base": "pairwise"}


def get_preset(name: str) -> NTMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
