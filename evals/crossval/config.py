"""Config of the cross-validated unlearning eval."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evals.unlearning.config import PRESETS, UnlearningEvalConfig

#: Unlearning eval fields that the cross-validation sets itself, so its ``unlearning`` table may not.
RESERVED_UNLEARNING_FIELDS = (
    "sae_path",
    "store",
    "output",
    "plot",
    "firing_rates",
    "cache_path",
    "random_seed",
    "wmdp_questions",
)

DEFAULT_VARIANTS = ("standard", "fixed", "adaptive")


class CrossvalConfigError(ValueError):
    """An invalid cross-validation config value."""


@dataclass
class CrossvalConfig:
    """Cross-validated unlearning eval: for each fold of the WMDP-bio documents, select latents on the other folds and evaluate on it.

    Attributes:
        mode: ``stats`` evaluates one SAE per variant, trained without the WMDP-bio
            questions, and selects fold k's latents from the other folds' firing rates.
            ``retrain`` trains one SAE per (variant, fold), so it costs one full training
            per fold of every variant. Fold k's SAE uses the variant's run config
            (``<runs_dir>/<run>/config.json``; the run's own SAE is not needed) as run
            ``<run>-fold<k>`` with ``exclude_folds=[k]``, so none of fold k's tokens
            reaches it. Its selection and evaluation then follow ``stats``. A finished fold
            run with the same config hash is reused, and an interrupted one resumes from
            its latest checkpoint.
        folds: Folds to evaluate: 0 .. folds-1 of the store's folds. None evaluates
            every fold of the store. It may be smaller than the store's ``n_folds`` for a
            quicker partial run, and the selection for fold k still uses every other
            fold of the store.
        variants: Variants to cross-validate; each is a label of one trained run.
        runs_dir: Directory of the training runs, and parent of ``name``.
        run_suffix: A variant's run is ``<runs_dir>/<variant><run_suffix>`` unless
            ``run_names`` names it. The default ``-noq`` marks runs trained without the
            WMDP-bio corpus (``train_corpora`` lists every other corpus). Use an empty
            suffix for runs named after their variant.
        run_names: Run name per variant, overriding ``run_suffix`` (e.g.
            ``{standard = "std-noq"}``).
        name: Folder under ``runs_dir`` for this cross-validation: per-fold results go
            to ``<runs_dir>/<name>/folds/<variant>/fold_<k>.json`` and the summary to
            ``<runs_dir>/<name>/evals/crossval.json``.
        store: Activation store. None reads it from the SAEs' metadata (key ``store``),
            or in mode ``retrain`` from the run configs; every variant must use the
            same store.
        preset: Unlearning eval preset that sets the sweep (``cpu`` or ``saebench``).
        unlearning: Overrides of unlearning eval fields on top of ``preset``, e.g.
            ``{max_questions = 64, multipliers = [2, 10, 50]}``. The sweep, question files,
            scoring, dtype and device come from here. ``max_questions`` caps the
            WMDP-bio questions of each fold and the questions of each MMLU subject. The
            fields in ``RESERVED_UNLEARNING_FIELDS`` are set by the cross-validation.
        firing_rates: Firing rates behind the selection of fold k. ``store`` counts them
            exactly by streaming the store's train-split tokens through each SAE once
            (per corpus and fold, so one pass serves every fold). ``cache`` reads the
            fold buckets of the correlation cache that training wrote beside the SAE,
            an exponential moving average over training batches. Masked variants write
            it, and only when their cache keeps folds. The cache holds only tokens the
            SAE was trained on, so its forget rates exclude the WMDP-bio questions.
        allow_trained_on_questions: Accept SAEs whose training config shows they were
            trained on the WMDP-bio corpus. Then only the latent selection is
            cross-validated, because the SAE itself has seen every fold's questions.
        scheduler_address: Address of a running ``dask.distributed`` scheduler (e.g.
            ``tcp://10.0.0.5:8786``), whose workers share this file system. None runs
            the tasks in this process with the threaded scheduler.
        num_workers: Threads of the local scheduler. Fold evaluations in one process
            run one at a time, because they share one model whose forward hooks are
            not thread-safe, so more threads overlap only the firing counts.
        output: Path of the summary JSON. None writes
            ``<runs_dir>/<name>/evals/crossval.json``.
        seed: Seed of the held-out context sample of each fold and of the control
            latents. It replaces the unlearning eval's ``random_seed``.
        overwrite: Recompute every fold. When False, a fold whose result file exists
            with the same config hash is skipped, and one with another hash raises an
            error. In mode ``retrain`` it also deletes and trains again a fold run
            started with another training config. A finished fold run with the same
            config hash is still reused, because training is seeded.
    """

    mode: Literal["stats", "retrain"] = "stats"
    folds: int | None = None
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    runs_dir: str = "runs"
    run_suffix: str = "-noq"
    run_names: dict[str, str] = field(default_factory=dict)
    name: str = "crossval"
    store: str | None = None
    preset: str = "cpu"
    unlearning: dict[str, Any] = field(default_factory=dict)
    firing_rates: Literal["store", "cache"] = "store"
    allow_trained_on_questions: bool = False
    scheduler_address: str | None = None
    num_workers: int = 1
    output: str | None = None
    seed: int = 42
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("stats", "retrain"):
            raise CrossvalConfigError(f"invalid mode {self.mode!r}: choose stats or retrain")
        if self.firing_rates not in ("store", "cache"):
            raise CrossvalConfigError(
                f"invalid firing_rates {self.firing_rates!r}: choose store or cache"
            )
        if self.folds is not None and (isinstance(self.folds, bool) or self.folds < 1):
            raise CrossvalConfigError(
                f"invalid folds {self.folds!r}: it must be an integer >= 1, or None for every fold of the store"
            )
        if isinstance(self.num_workers, bool) or self.num_workers < 1:
            raise CrossvalConfigError(
                f"invalid num_workers {self.num_workers!r}: it must be an integer >= 1"
            )
        if isinstance(self.seed, bool) or self.seed < 0:
            raise CrossvalConfigError(f"invalid seed {self.seed!r}: it must be an integer >= 0")
        self._check_runs()
        self._check_unlearning()

    def _check_runs(self) -> None:
        if not self.variants:
            raise CrossvalConfigError("variants is empty: name at least one variant, e.g. standard")
        duplicates = sorted(
            {variant for variant in self.variants if self.variants.count(variant) > 1}
        )
        if duplicates:
            raise CrossvalConfigError(f"variants lists {duplicates} more than once; name each once")
        unknown = sorted(set(self.run_names) - set(self.variants))
        if unknown:
            raise CrossvalConfigError(
                f"run_names names variants {unknown} that are not in variants {self.variants}; "
                "add them to variants or drop them from run_names"
            )
        for variant in self.variants:
            if not variant or Path(variant).name != variant:
                raise CrossvalConfigError(
                    f"invalid variant {variant!r}: use a plain name without '/', because it names a folder"
                )
            run_name = self.run_name(variant)
            if Path(run_name).name != run_name or run_name in (".", ".."):
                raise CrossvalConfigError(
                    f"invalid run name {run_name!r} for variant {variant!r}: use a plain directory name without '/'"
                )
        if not self.name or Path(self.name).name != self.name:
            raise CrossvalConfigError(
                f"invalid name {self.name!r}: use a plain directory name without '/'"
            )

    def _check_unlearning(self) -> None:
        if self.preset not in PRESETS:
            raise CrossvalConfigError(
                f"unknown preset {self.preset!r}; choose one of {', '.join(sorted(PRESETS))}"
            )
        reserved = sorted(set(self.unlearning) & set(RESERVED_UNLEARNING_FIELDS))
        if reserved:
            raise CrossvalConfigError(
                f"the unlearning table sets {reserved}, which the cross-validation sets itself; "
                "remove them (use the crossval fields store and seed instead)"
            )
        # Building one config validates every override before any model or store is read.
        self.unlearning_config("<sae_path>")

    def run_name(self, variant: str) -> str:
        """Return the run directory name of ``variant``."""
        return self.run_names.get(variant, f"{variant}{self.run_suffix}")

    def sae_path(self, variant: str) -> Path:
        """Return ``<runs_dir>/<run name>/sae`` of ``variant``."""
        return Path(self.runs_dir) / self.run_name(variant) / "sae"

    @property
    def crossval_dir(self) -> Path:
        """Directory of this cross-validation's fold results and summary."""
        return Path(self.runs_dir) / self.name

    def unlearning_config(self, sae_path: str | Path) -> UnlearningEvalConfig:
        """Return the unlearning eval config of one SAE: the preset, the overrides, then the crossval fields."""
        # Imported here because knowsep.config converts override strings (from the
        # command line) to the field types, and it is not needed anywhere else.
        from knowsep.config import build

        values = {
            **PRESETS[self.preset],
            **self.unlearning,
            "sae_path": str(sae_path),
            "store": self.store,
            "random_seed": self.seed,
            "plot": False,
        }
        try:
            return build(UnlearningEvalConfig, values, prefix="unlearning.")
        except ValueError as error:
            # Both a conversion error and the unlearning config's own check land here.
            raise CrossvalConfigError(f"invalid unlearning table: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serializable dict."""
        return dataclasses.asdict(self)
