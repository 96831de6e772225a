"""Config of the comparison report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ReportConfigError(ValueError):
    """An invalid report config value."""


@dataclass
class ReportConfig:
    """Comparison report: one HTML page and a markdown twin comparing the variants of an experiment.

    Attributes:
        experiment_dir: Directory holding one run directory per variant, e.g.
            ``runs/demo`` with ``standard/``, ``fixed/`` and ``adaptive/`` inside. A run
            directory is any subdirectory with a ``train_log.jsonl``, an ``evals/``
            folder or an ``sae/`` folder.
        output_dir: Directory the report is written to (``report.html``, ``report.md``
            and the PNG figures). None writes ``<experiment_dir>/report``. An existing
            report there is replaced only once the new one is complete.
        variants: Run directories to compare, in table order. None takes every run
            directory found, with standard, fixed and adaptive first.
        reference: Variant whose separation the conclusion tests against each of
            ``baselines``.
        baselines: Variants the reference is compared with.
        alpha: Significance level of every test in the conclusion, for two-sided tests
            (0.05 gives 95% intervals).
        mask_grid: Rows and columns of the mask density image: the (d_sae, d_model)
            encoder mask is averaged over blocks of about ``d_sae / rows`` latents by
            ``d_model / cols`` input dimensions.
        title: Heading of the report. None uses "knowsep report: <experiment_dir name>".
        dpi: Resolution of the PNG figures.
    """

    experiment_dir: str = "runs/demo"
    output_dir: str | None = None
    variants: list[str] | None = None
    reference: str = "adaptive"
    baselines: list[str] = field(default_factory=lambda: ["fixed", "standard"])
    alpha: float = 0.05
    mask_grid: list[int] = field(default_factory=lambda: [64, 64])
    title: str | None = None
    dpi: int = 100

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise ReportConfigError(
                f"invalid alpha {self.alpha}: it must be in (0, 0.5), e.g. 0.05 for 95% intervals"
            )
        if len(self.mask_grid) != 2 or any(
            isinstance(size, bool) or not isinstance(size, int) or size < 1
            for size in self.mask_grid
        ):
            raise ReportConfigError(
                f"invalid mask_grid {self.mask_grid!r}: give two positive integers, e.g. [64, 64]"
            )
        if isinstance(self.dpi, bool) or not isinstance(self.dpi, int) or not 30 <= self.dpi <= 600:
            raise ReportConfigError(f"invalid dpi {self.dpi!r}: it must be an integer in [30, 600]")
        if self.reference in self.baselines:
            raise ReportConfigError(
                f"reference {self.reference!r} is also in baselines {self.baselines}: "
                "compare it with other variants"
            )
        if self.variants is not None and not self.variants:
            raise ReportConfigError(
                "variants is empty: list run directories, or leave it unset to take all of them"
            )

    @property
    def resolved_output_dir(self) -> Path:
        """Directory the report is written to."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(self.experiment_dir) / "report"

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serializable dict."""
        return dataclasses.asdict(self)
