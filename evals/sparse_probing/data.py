"""Labelled text sets for sparse probing: reading, per-class train/test pools, one-vs-rest tasks.

As in SAEBench, each class gets a pool of ``train_size // 2`` train texts and
``test_size // 2`` test texts. The task for class ``c`` uses the whole pool of ``c`` as
positives and as many negatives drawn from the pools of the other classes, spread
evenly over them. Train and test pools never share a text, so no test text is seen in
training, also not as a negative.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from evals.sparse_probing.config import ProbingDataset
from pipeline.data import CorpusSpec, DataError, _iter_raw_records, resolve_source

logger = logging.getLogger(__name__)

POSITIVE_LABEL = 1
NEGATIVE_LABEL = 0


class ProbingDataError(DataError):
    """A labelled text set that cannot form probing tasks."""


def load_labelled_texts(spec: ProbingDataset) -> dict[str, list[str]]:
    """Read a labelled text set into ``{label: texts}`` (labels as strings, in sorted order).

    Blank texts are skipped with a warning. Raises ``ProbingDataError`` on a record
    without the text or label field, a requested class absent from the data, or fewer
    than two classes.
    """
    corpus = CorpusSpec(
        name=spec.name,
        kind="text",
        local=spec.local,
        hub=spec.hub,
        hub_config=spec.hub_config,
        hub_split=spec.hub_split,
        text_field=spec.text_field,
    )
    source = resolve_source(corpus)
    if source is None:
        raise ProbingDataError(f"dataset {spec.name!r} has no readable source; set local or hub")

    texts_by_label: dict[str, list[str]] = {}
    n_blank = 0
    n_records = 0
    wanted = set(spec.classes) if spec.classes is not None else None
    for _, location, record in _iter_raw_records(
        source, split=spec.hub_split, hub_config=spec.hub_config
    ):
        for field_name in (spec.text_field, spec.label_field):
            if field_name not in record:
                raise ProbingDataError(
                    f"record in {location} has no field {field_name!r}; its fields are {sorted(record)}. "
                    "Set text_field and label_field of the dataset"
                )
        text = record[spec.text_field]
        label = record[spec.label_field]
        if not isinstance(text, str):
            raise ProbingDataError(
                f"field {spec.text_field!r} in {location} is {type(text).__name__}, expected a string"
            )
        if not isinstance(label, (str, int)):
            raise ProbingDataError(
                f"field {spec.label_field!r} in {location} is {type(label).__name__}, expected a string or integer label"
            )
        n_records += 1
        if spec.max_records is not None and n_records > spec.max_records:
            break
        label = str(label)
        if wanted is not None and label not in wanted:
            continue
        if not text.strip():
            n_blank += 1
            continue
        texts_by_label.setdefault(label, []).append(text)

    if n_blank:
        logger.warning("dataset %s: skipped %d blank texts", spec.name, n_blank)
    if wanted is not None:
        missing = sorted(wanted - set(texts_by_label))
        if missing:
            raise ProbingDataError(
                f"dataset {spec.name!r} ({source}) has no texts with label(s) {missing}; "
                f"its labels are {sorted(texts_by_label) or 'none'}"
            )
    if len(texts_by_label) < 2:
        raise ProbingDataError(
            f"dataset {spec.name!r} ({source}) has {len(texts_by_label)} class(es) "
            f"({sorted(texts_by_label)}), so no one-vs-rest task can be built; a probing set needs at least two "
            f"labels in field {spec.label_field!r}"
        )
    return {label: texts_by_label[label] for label in sorted(texts_by_label)}


@dataclass
class ClassPools:
    """Sampled texts and each class's disjoint train and test pools (indices into ``texts``)."""

    texts: list[str]
    train_pools: dict[str, np.ndarray]
    test_pools: dict[str, np.ndarray]
    train_per_class: int
    test_per_class: int
    downsized: bool

    @property
    def probe_train_set_size(self) -> int:
        """Texts in each task's train set: the class's pool and as many negatives."""
        return 2 * self.train_per_class

    @property
    def probe_test_set_size(self) -> int:
        """Texts in each task's test set."""
        return 2 * self.test_per_class


def sample_class_pools(
    texts_by_label: dict[str, list[str]],
    train_size: int,
    test_size: int,
    rng: np.random.Generator,
    dataset_name: str = "",
) -> ClassPools:
    """Sample each class's train and test pools, downsizing both when a class is too small.

    A class needs ``train_size // 2 + test_size // 2`` texts. When the smallest class has
    fewer, both pool sizes shrink in proportion to fit it (with at least one text each),
    and a warning names the sizes used.
    """
    train_per_class = train_size // 2
    test_per_class = test_size // 2
    needed = train_per_class + test_per_class
    smallest_label = min(texts_by_label, key=lambda label: len(texts_by_label[label]))
    available = len(texts_by_label[smallest_label])

    downsized = available < needed
    if downsized:
        if available < 2:
            raise ProbingDataError(
                f"dataset {dataset_name!r}: class {smallest_label!r} has {available} text(s), but each class needs "
                "at least 2 (one for training, one for testing)"
            )
        train_per_class = min(
            available - 1, max(1, math.floor(available * train_per_class / needed))
        )
        test_per_class = available - train_per_class
        logger.warning(
            "dataset %s: class %s has %d texts, fewer than the %d needed for probe_train_set_size %d and "
            "probe_test_set_size %d; using train sets of %d and test sets of %d texts",
            dataset_name,
            smallest_label,
            available,
            needed,
            train_size,
            test_size,
            2 * train_per_class,
            2 * test_per_class,
        )

    texts: list[str] = []
    train_pools: dict[str, np.ndarray] = {}
    test_pools: dict[str, np.ndarray] = {}
    for label, class_texts in texts_by_label.items():
        chosen = rng.choice(len(class_texts), size=train_per_class + test_per_class, replace=False)
        start = len(texts)
        texts.extend(class_texts[i] for i in chosen)
        train_pools[label] = np.arange(start, start + train_per_class)
        test_pools[label] = np.arange(
            start + train_per_class, start + train_per_class + test_per_class
        )
    return ClassPools(
        texts=texts,
        train_pools=train_pools,
        test_pools=test_pools,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        downsized=downsized,
    )


def one_vs_rest_task(
    pools: dict[str, np.ndarray], label: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(text indices, 0/1 labels)`` of a balanced, shuffled task for ``label``.

    Positives are the class's whole pool. Negatives number as many, drawn from the other
    classes' pools with at most ``ceil(n / (classes - 1))`` from each, then subsampled.
    """
    positives = pools[label]
    n_positive = len(positives)
    other_labels = [other for other in pools if other != label]
    per_class = math.ceil(n_positive / len(other_labels))
    candidates = np.concatenate(
        [rng.permutation(pools[other])[:per_class] for other in other_labels]
    )
    negatives = rng.permutation(candidates)[:n_positive]

    indices = np.concatenate([positives, negatives])
    targets = np.concatenate(
        [
            np.full(n_positive, POSITIVE_LABEL, dtype=np.int64),
            np.full(len(negatives), NEGATIVE_LABEL, dtype=np.int64),
        ]
    )
    order = rng.permutation(len(indices))
    return indices[order], targets[order]
