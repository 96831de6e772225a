"""Config of the sparse probing eval."""

from __future__ import annotations

from dataclasses import dataclass, field

#: The k values that SAEBench's result layout has fields for (``sae_top_{k}_test_accuracy``).
SAEBENCH_K_VALUES = (1, 2, 5, 10, 20, 50, 100)


@dataclass
class ProbingDataset:
    """A labelled text set: one one-vs-rest probing task per class.

    Attributes:
        name: Name of the set in the results (SAEBench names AG News ``fancyzhx/ag_news``).
        local: Local ``.jsonl`` / ``.parquet`` file, read when it exists, or None. A leading
            ``../shared/data`` is replaced by ``$KNOWSEP_DATA_DIR`` when that variable is set.
        hub: Hugging Face dataset streamed when ``local`` is None or missing; None disables it.
        hub_config: Dataset config name on the hub, or None.
        hub_split: Split read from the hub.
        text_field: Record field holding the text.
        label_field: Record field holding the class label (compared as a string).
        classes: Labels to probe, as strings; None probes every label in the data.
        max_records: Records read from the source before sampling; None reads all.
    """

    name: str
    local: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str = "test"
    text_field: str = "text"
    label_field: str = "label"
    classes: list[str] | None = None
    max_records: int | None = None

    def __post_init__(self) -> None:
        if not self.local and not self.hub:
            raise ValueError(
                f"dataset {self.name!r} has neither a local file nor a hub name; set local or hub"
            )
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(
                f"invalid max_records {self.max_records} for dataset {self.name!r}: use >= 1 or None"
            )
        if self.classes is not None:
            self.classes = [str(label) for label in self.classes]
            if len(set(self.classes)) < 2:
                raise ValueError(
                    f"dataset {self.name!r}: classes {self.classes} must name at least two distinct labels"
                )


def ag_news_dataset() -> ProbingDataset:
    """Return AG News (4 topics), read from the local copy of its test split when present.

    NOTE: train and test pools are both drawn from that split (1,900 texts per class),
    while SAEBench draws train texts from AG News's train split. SAEBench's sizes (4000
    and 1000) need 2,500 texts per class, so they are downsized on this file.
    """
    return ProbingDataset(
        name="fancyzhx/ag_news",
        local="../shared/data/ag_news/ag_news_test.jsonl",
        hub="fancyzhx/ag_news",
        hub_split="test",
    )


@dataclass
class SparseProbingEvalConfig:
    """Sparse probing eval: how well k SAE latents, chosen per task, linearly predict a text's class.

    For each class of each dataset a balanced one-vs-rest task is built. Texts are
    truncated to ``context_length`` tokens and run through the model up to the SAE's
    layer. Residual activations and SAE latents are mean-pooled over real tokens (BOS,
    padding and other special tokens excluded). A logistic regression is fitted on all
    features and on the top k features by absolute difference of class means on the
    train set. SAEBench's defaults are probe_train_set_size 4000 and probe_test_set_size
    1000; the smaller defaults here make a CPU run take minutes.

    Attributes:
        sae_path: Directory of a saved knowsep SAE (``sae_config.json``) or an SAELens
            SAE (``cfg.json`` and ``sae_weights.safetensors``, detected automatically).
        datasets: Labelled text sets. The default is AG News (4 topics, ``ag_news_dataset``).
        probe_train_set_size: Texts in each task's train set, half of the class and half
            of the other classes. A dataset with too few texts per class is downsized with
            a warning, and the sizes used are recorded in the result.
        probe_test_set_size: Texts in each task's test set, split as the train set.
        context_length: Tokens per text, special tokens included; longer texts are
            truncated (their beginning is kept) and counted in the result.
        k_values: Numbers of features of the top-k probes. Each must be one of 1, 2, 5,
            10, 20, 50, 100, the values SAEBench's result layout has fields for.
        model: Model name or directory. None uses the SAE's metadata ``model``.
        dtype: Dtype the model runs in: ``bfloat16``, ``float32`` or ``float16``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        llm_batch_size: Texts per model forward pass.
        sae_batch_size: Texts per SAE encoding pass; bounds memory at about
            ``sae_batch_size x context_length x d_sae`` float32 values.
        probe_max_iter: Maximum iterations of each logistic regression fit (scikit-learn lbfgs).
        random_seed: Seed of the text sampling and of the negative examples.
        output: Path of the result JSON. None writes ``<run>/evals/sparse_probing.json``,
            where ``<run>`` is the parent directory of ``sae_path``.
    """

    sae_path: str
    datasets: list[ProbingDataset] = field(default_factory=lambda: [ag_news_dataset()])
    probe_train_set_size: int = 1000
    probe_test_set_size: int = 500
    context_length: int = 128
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    model: str | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    llm_batch_size: int = 16
    sae_batch_size: int = 16
    probe_max_iter: int = 1000
    random_seed: int = 42
    output: str | None = None

    def __post_init__(self) -> None:
        for name in ("context_length", "llm_batch_size", "sae_batch_size", "probe_max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name} {value!r}: it must be a positive integer")
        for name in ("probe_train_set_size", "probe_test_set_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(
                    f"invalid {name} {value!r}: it must be an integer >= 2 (one text of the class, one of the others)"
                )
        if not self.datasets:
            raise ValueError("datasets is empty: give at least one labelled text set")
        names = [dataset.name for dataset in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names {names} repeat; give each dataset a unique name")
        if not self.k_values:
            raise ValueError(
                f"k_values is empty: choose from {', '.join(map(str, SAEBENCH_K_VALUES))}"
            )
        unsupported = sorted(set(self.k_values) - set(SAEBENCH_K_VALUES))
        if unsupported:
            raise ValueError(
                f"invalid k_values {unsupported}: SAEBench's result layout has fields only for "
                f"k in {', '.join(map(str, SAEBENCH_K_VALUES))}"
            )
        self.k_values = sorted(set(self.k_values))
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"invalid dtype {self.dtype!r}: choose bfloat16, float32 or float16")
