"""Thresholds shared by the analysis, the fixes and blending."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


#: Earlier names of thresholds and metadata keys -> their one name (read from older fix tables).
OLD_NAMES = {"hyper_multiplier": "hyper_mult", "dead_threshold": "dead_abs", "scope": "token_scope"}


@dataclass(frozen=True)
class Thresholds:
    """Classification thresholds. Defaults are the original research's constants.

    - ``outlier_ratio``: τ; a dim is an outlier when σ_tgt/σ_ref > τ or < 1/τ (two-sided).
      The original VL masking used 10.
    - ``dead_abs``: a dim is dead when σ < ``dead_abs`` ...
    - ``dead_rel``: ... or when σ < ``dead_rel`` × the model's median σ (scale-free rule).
    - ``hyper_mult``: hyperactive when σ > ``hyper_mult`` × the same model's median σ.
    - ``clamp_sigma``: the legacy ``clamp`` mode limits hyperactive dims to ±``clamp_sigma``·σ_ref.
    - ``eps_rel``: relative epsilon for ratios, as a fraction of the median σ of both models pooled.
    - ``min_tokens``: fewer tokens than this give a warning in reports (estimates are noise).
    """

    outlier_ratio: float = 3.0
    dead_abs: float = 0.01
    dead_rel: float = 1e-3
    hyper_mult: float = 5.0
    clamp_sigma: float = 3.0
    eps_rel: float = 1e-6
    min_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.outlier_ratio > 1.0:
            raise ValueError(f"outlier_ratio must be > 1, got {self.outlier_ratio}")
        for name in ("dead_abs", "dead_rel", "hyper_mult", "clamp_sigma", "eps_rel"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Thresholds":
        """Read :meth:`to_json` output; earlier names of a threshold (``OLD_NAMES``) are mapped."""
        data = json.loads(text)
        data = {OLD_NAMES.get(k, k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: The original research's quantitative verdict on a substitute encoder.
VERDICT_CRITERIA = {
    "cosine_min": 0.95,
    "std_correlation_min": 0.95,
    "mean_correlation_min": 0.9,
    "outlier_dims_max": 10,
}
