"""What the precision passes do, as data (torch-free, onnx-free: the CLI validates options with it).

``PrecisionOptions``: the options of `ntm-edge export --fp16 --int8`. ``GRAPH_POLICY``: which precision
each graph of a bundle actually runs in when the bundle is used at a given precision, and why; the
manifest copies it into every graph's ``variants`` entry ("runs"), so a bundle says what it runs.

The transporter stays out of INT8 (measured, README "Precisions"): it is inverted by fixed-point
iteration whose stopping test needs changes far below int8's resolution, and the audit reads its
log-determinant directly; its share of the pipeline's compute is small. In an INT8 bundle it runs in
fp32. The prompt encoder stays fp32 everywhere: a label model's is a table lookup (nothing to compute);
a text model's is the frozen MiniLM, one file built by runtime/text_graph.py and pinned by its sha256
(the same for every text model), run once per distinct prompt and cached, so there is little to gain.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from ..errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8")
CALIB_METHODS = ("minmax", "entropy", "percentile")
MAX_ACCURACY_DROP = 0.02  # the quality gate refuses a precision whose prompt accuracy drops by more

# graph name pattern -> {bundle precision: (the precision the graph runs in, why)}; first match wins
GRAPH_POLICY: tuple[tuple[str, dict[str, tuple[str, str]]], ...] = (
    ("prompt_encoder", {"fp16": ("fp32", "a table lookup, or the frozen MiniLM: one fp32 file, cached per prompt"),
                        "int8": ("fp32", "a table lookup, or the frozen MiniLM: one fp32 file, cached per prompt")}),
    ("transporter_*", {"fp16": ("fp16", "fp16 with fp32 islands keeps the inversion within fp16 rounding"),
                       "int8": ("fp32", "inverted and scored: int8 noise stops Jacobi from converging and "
                                        "moves the log-determinant (README, Precisions)")}),
    ("*", {"fp16": ("fp16", "fp16 with fp32 islands"), "int8": ("int8", "int8 Q/DQ convolutions and projections")}),
)


def runs_in(graph: str, precision: str) -> tuple[str, str]:
    """(precision the graph runs in, why) when the bundle runs at ``precision``."""
    if precision == "fp32":
        return "fp32", "the exported graph"
    for pattern, table in GRAPH_POLICY:
        if fnmatch.fnmatchcase(graph, pattern):
            return table[precision]
    raise AssertionError("the last GRAPH_POLICY pattern matches every graph")


@dataclass(frozen=True)
class PrecisionOptions:
    """Options of the precision passes at export."""

    fp16: bool = False
    int8: bool = False
    calib_method: str = "minmax"  # minmax | entropy | percentile
    calib_images: int = 256  # training images whose forward trajectories calibrate (every level, prompt and null)
    calib_samples: int = 64  # trajectories drawn by the sampler itself (its own range at each step)
    calib_guidance: float = 1.0  # guidance weight of half of the sampler's calibration trajectories
    calib_seed: int = 0
    quality_samples: int = 500  # samples per precision for prompt accuracy and Frechet distance
    audit_images: int = 100  # held-out images whose bits/dim shift the gate reports
    force: bool = False  # keep a precision that fails the quality gate

    @property
    def precisions(self) -> list[str]:
        """The precisions to build besides fp32."""
        return [p for p, on in (("fp16", self.fp16), ("int8", self.int8)) if on]

    def calibration_settings(self) -> dict:
        """What the INT8 ranges depend on besides the model (the calibration cache key)."""
        return {k: v for k, v in asdict(self).items() if k.startswith("calib_")}

    def validate(self) -> PrecisionOptions:
        if self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"unknown --calib-method {self.calib_method!r}; choose one of: {', '.join(CALIB_METHODS)}")
        if self.calib_images < 1 or self.calib_samples < 1:
            raise ConfigError("--calib-images and --calib-samples must be at least 1")
        if not self.calib_guidance >= 0:
            raise ConfigError("--calib-guidance must be >= 0")
        if self.quality_samples < 2 or self.audit_images < 1:
            raise ConfigError("--quality-samples must be at least 2 (a Frechet distance needs a covariance) "
                              "and --audit-images at least 1")
        return self
