"""Configuration of stage one, the activation harvest."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data import CorpusSpec, default_corpora
from pipeline.models import ModelConfig


class HarvestConfigError(ValueError):
    """An invalid harvest setting."""


@dataclass
class HarvestConfig:
    """Harvest of one layer's residual stream over forget and retain corpora.

    Attributes:
        model: Model, layer, dtype and device (see ``ModelConfig``).
        store: Directory of the activation store to write.
        corpora: Corpora to harvest, in order; each is streamed, never fully loaded.
        context_size: Tokens per packed context, BOS included.
        batch_size: Contexts per forward pass.
        shard_contexts: Contexts per store shard, the unit of work and of resumption.
        n_folds: Number of cross-validation folds; each document goes to one fold by a
            seeded hash of its id.
        fold_seed: Seed of the fold hash and of the held-out split hash.
        heldout_fraction: Fraction of documents (not tokens) put in the held-out split,
            chosen by a seeded hash distinct from the fold hash.
        overwrite: Delete any existing store at ``store`` and harvest from scratch. When
            False, an unfinished store with the same settings is resumed and one with
            different settings raises an error.
        scheduler_address: Address of a running ``dask.distributed`` scheduler (e.g.
            ``tcp://10.0.0.5:8786``); None runs the shards in this process.
        num_workers: Threads of the local threaded scheduler. Forward passes of one
            process never overlap, so 2 lets one shard's write overlap the next shard's
            forward pass, which helps on a GPU. Keep 1 on a CPU, where one forward pass
            already uses every core.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    store: str = "runs/demo/store"
    corpora: list[CorpusSpec] = field(default_factory=default_corpora)
    context_size: int = 128
    batch_size: int = 16
    shard_contexts: int = 256
    n_folds: int = 5
    fold_seed: int = 0
    heldout_fraction: float = 0.1
    overwrite: bool = False
    scheduler_address: str | None = None
    num_workers: int = 1

    def validate(self) -> None:
        """Raise `HarvestConfigError` naming the first invalid field."""
        positive = {
            "context_size": self.context_size,
            "batch_size": self.batch_size,
            "shard_contexts": self.shard_contexts,
            "n_folds": self.n_folds,
            "num_workers": self.num_workers,
        }
        for name, value in positive.items():
            if value < 1:
                raise HarvestConfigError(f"invalid {name} {value}: it must be at least 1")
        if self.context_size < 2:
            raise HarvestConfigError(
                f"invalid context_size {self.context_size}: a context needs BOS plus at least one token"
            )
        if self.n_folds > 255:
            raise HarvestConfigError(
                f"invalid n_folds {self.n_folds}: folds are stored as uint8, so use at most 255"
            )
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise HarvestConfigError(
                f"invalid heldout_fraction {self.heldout_fraction}: use a value in [0, 1)"
            )
        if not self.corpora:
            raise HarvestConfigError("corpora is empty: list at least one corpus to harvest")

        names = [spec.name for spec in self.corpora]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise HarvestConfigError(
                f"duplicate corpus names {duplicates}: every corpus needs a unique name"
            )
        if len(names) > 255:
            raise HarvestConfigError(
                f"{len(names)} corpora given: corpus indices are stored as uint8, so use at most 255"
            )
        for spec in self.corpora:
            for name in ("max_docs", "max_tokens"):
                value = getattr(spec, name)
                if value is not None and value < 1:
                    raise HarvestConfigError(
                        f"corpus {spec.name!r}: invalid {name} {value}; use a positive number or None"
                    )
