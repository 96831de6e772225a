"""Cross-validate the unlearning eval over folds of the WMDP-bio documents.

Mode ``stats``, for each variant's SAE (trained without the WMDP-bio corpus) and each
fold k:

1. Firing rates: forget rates over the train-split forget tokens of every fold but
   k, retain rates over the train-split retain tokens of every fold. The exact
   counts come from one pass of the store through the SAE, counted per (corpus,
   fold) shard by shard as dask tasks (see `folds`).
2. The unmodified model scores fold k's WMDP-bio questions (assigned to folds as the
   harvest assigns their documents) and the MMLU subjects, which are the same in
   every fold, to form the known sets. Fold k's held-out forget and retain contexts
   give the baseline losses.
3. The unlearning eval's sweep runs with latents selected from the rates of step 1
   and yields fold k's points and unlearning score.
4. Every fold's result is written to ``<runs_dir>/<name>/folds/<variant>/fold_<k>.json``
   as soon as it is done, so a rerun skips it. The summary contains the mean and sample
   standard deviation over folds of every metric.

Folds are independent dask tasks: the threaded scheduler runs them in this process,
or a ``dask.distributed`` cluster runs them in its workers, which then need the same
file system. Each process loads the model once and reuses it for all its folds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import dask
import numpy as np
from pydantic import ValidationError

from evals.common import (
    default_output_path,
    epoch_millis,
    new_eval_id,
    write_eval_output,
    write_json_atomic,
)
from evals.core.config import CoreEvalConfig
from evals.core.main import EvalInputs, load_inputs, sae_config_dict
from evals.crossval.config import CrossvalConfig
from evals.crossval.folds import (
    FoldFiringCounts,
    corpus_domains,
    count_shard_firing,
    fold_rates_from_cache,
    fold_rates_from_counts,
    heldout_contexts_by_fold,
    other_folds,
    question_folds,
    sum_counts,
)
from evals.crossval.retrain import (
    RetrainError,
    check_fold_run,
    fold_run_name,
    fold_train_config,
    load_run_config,
    train_fold_sae,
)
from evals.crossval.schema import (
    EVAL_TYPE_ID_CROSSVAL,
    BestPointSummary,
    CrossvalEvalOutput,
    CrossvalMetrics,
    FiringRateSource,
    FoldResult,
    MetricSummary,
    PointSummary,
    VariantSummary,
)
from evals.unlearning.config import UnlearningEvalConfig
from evals.unlearning.loss import DOMAIN_NAMES, context_losses
from evals.unlearning.main import (
    MMLU_POOLED_SET,
    WMDP_SET,
    EvalState,
    KnownSet,
    collect_special_token_ids,
    find_known_set,
    honesty_warnings,
    load_mmlu_subject,
    load_wmdp_questions,
    pooled_summary,
    run_sweep,
    unlearning_metrics,
)
from evals.unlearning.schema import LossBaseline, QuestionSetSummary, UnlearningSweepPoint
from evals.unlearning.scoring import MultipleChoiceScorer
from evals.unlearning.selection import CACHE_DIRNAME, FiringRates
from pipeline.data import MCQuestion, resolve_local_path
from pipeline.models import LoadedModel, load_model
from stores.activations import ActivationStore, StoreMetadata
from trainer.config import TrainConfig, TrainConfigError
from trainer.train import RUN_CONFIG_FILE as TRAIN_RUN_CONFIG_FILE
from trainer.train import SAE_DIR

logger = logging.getLogger(__name__)

FOLDS_DIRNAME = "folds"
#: File of a training run's config (written by trainer.train), read to check its corpora.
RUN_CONFIG_FILE = TRAIN_RUN_CONFIG_FILE
#: Unlearning eval fields left out of the config hash: they change speed or paths, not results.
HASH_EXCLUDED_FIELDS = frozenset(
    {
        "sae_path",
        "store",
        "output",
        "plot",
        "device",
        "mcq_batch_size",
        "context_batch_size",
        "logit_chunk_size",
        "batch_size",
    }
)


class CrossvalError(ValueError):
    """Inputs the cross-validation cannot evaluate, or fold results from other settings."""


@dataclass(frozen=True)
class FoldJob:
    """Everything a worker needs to evaluate one variant on one fold.

    Attributes:
        variant: The variant label.
        run_name: The training run of the variant.
        fold: The evaluated fold.
        sae_path: Directory of the run's SAE.
        store_path: The activation store.
        unlearning: The unlearning eval config of this SAE.
        firing_rates: ``store`` or ``cache``.
        config_hash: Hash of every setting and input behind the result.
        result_path: Where the fold's `FoldResult` JSON goes.
        mode: ``stats`` or ``retrain``.
        train_config: Mode ``retrain``: the training run of this fold's SAE, which
            excludes the fold. None in mode ``stats``.
        overwrite: Mode ``retrain``: delete and train again a fold run that was started
            with another config.
    """

    variant: str
    run_name: str
    fold: int
    sae_path: str
    store_path: str
    unlearning: UnlearningEvalConfig
    firing_rates: str
    config_hash: str
    result_path: str
    mode: Literal["stats", "retrain"] = "stats"
    train_config: TrainConfig | None = None
    overwrite: bool = False


@dataclass
class CrossvalPlan:
    """The resolved runs, store, folds and jobs of one cross-validation.

    Attributes:
        cfg: The config.
        store: The activation store every variant was trained on.
        n_folds: Folds evaluated (0 .. n_folds-1).
        run_names: Run name of each variant.
        inputs: SAE and store of each variant (mode ``stats``; empty in mode
            ``retrain``, whose SAEs are trained by the fold tasks).
        jobs: One job per (variant, fold), in variant then fold order.
    """

    cfg: CrossvalConfig
    store: ActivationStore
    n_folds: int
    run_names: dict[str, str]
    inputs: dict[str, EvalInputs]
    jobs: list[FoldJob] = field(default_factory=list)


# Planning and checks


def check_folds(requested: int | None, metadata: StoreMetadata, store_path: str) -> int:
    """Return the number of folds to evaluate, checked against the store's ``n_folds``."""
    if metadata.n_folds < 2:
        raise CrossvalError(
            f"store {store_path} has n_folds {metadata.n_folds}; cross-validation needs at least 2 folds, "
            "so harvest it again with n_folds >= 2"
        )
    if requested is None:
        return metadata.n_folds
    if requested > metadata.n_folds:
        raise CrossvalError(
            f"folds {requested} is larger than the store's n_folds {metadata.n_folds} ({store_path}); "
            f"pass folds={metadata.n_folds} or fewer, or harvest the store with n_folds={requested}"
        )
    return requested


def check_training_corpora(
    cfg: CrossvalConfig, run_dir: Path, wmdp_corpus: str, metadata: StoreMetadata
) -> None:
    """Raise when the run's training config shows it was trained on the WMDP-bio corpus."""
    config_path = run_dir / RUN_CONFIG_FILE
    if not config_path.is_file():
        logger.warning(
            "%s has no %s, so it cannot be checked that its SAE was trained without corpus %s",
            run_dir,
            RUN_CONFIG_FILE,
            wmdp_corpus,
        )
        return
    train_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    corpora = train_cfg.get("train_corpora") or [corpus["name"] for corpus in metadata.corpora]
    domains = train_cfg.get("domains") or list(DOMAIN_NAMES)
    wmdp_domain = metadata.corpora[metadata.corpus_index(wmdp_corpus)].get("domain")
    if wmdp_corpus not in corpora or wmdp_domain not in domains:
        return

    message = (
        f"run {run_dir} was trained on corpus {wmdp_corpus} (train_corpora {train_cfg.get('train_corpora')}), "
        "so its SAE has seen every fold's questions"
    )
    if cfg.allow_trained_on_questions:
        if cfg.mode == "retrain":
            logger.warning(
                "%s; each fold's SAE still trains without that fold's tokens, but on the other folds' questions",
                message,
            )
        else:
            logger.warning("%s; only the latent selection is cross-validated", message)
        return
    others = [corpus["name"] for corpus in metadata.corpora if corpus["name"] != wmdp_corpus]
    raise CrossvalError(
        f"{message}. Train it with train_corpora={','.join(others)} run_name={run_dir.name}, "
        "or pass allow_trained_on_questions=true to cross-validate only the selection"
    )


def file_digest(path: Path) -> str:
    """Return the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_digests(sae_path: str | None, unlearning: UnlearningEvalConfig) -> dict[str, str]:
    """Return the digests of the SAE's files (unless ``sae_path`` is None) and of the local question files."""
    digests = {}
    if sae_path is not None:
        for path in sorted(Path(sae_path).iterdir()):
            if path.is_file() and path.suffix in (".safetensors", ".json"):
                digests[f"sae/{path.name}"] = file_digest(path)
    for name, source in (("wmdp", unlearning.wmdp_source), ("mmlu", unlearning.mmlu_source)):
        local = resolve_local_path(source)
        if local.is_file():
            digests[name] = file_digest(local)
    return digests


def variant_config_hash(
    cfg: CrossvalConfig,
    run_name: str,
    unlearning: UnlearningEvalConfig,
    metadata: StoreMetadata,
    train_config: TrainConfig | None = None,
) -> str:
    """Hash the settings and input files that determine a variant's fold results.

    Mode ``stats`` hashes the SAE's files. Mode ``retrain`` passes the fold's
    ``train_config`` instead, because its SAE does not exist before the fold task
    trains it. Training is a pure function of that config's hash (seeded data order
    and initialization), up to the device and software it runs on.
    """
    payload: dict[str, Any] = {
        "mode": cfg.mode,
        "firing_rates": cfg.firing_rates,
        "run_name": run_name,
        "unlearning": {
            key: value
            for key, value in unlearning.to_dict().items()
            if key not in HASH_EXCLUDED_FIELDS
        },
        "store_config_hash": metadata.config_hash,
        "store_n_folds": metadata.n_folds,
        "store_fold_seed": metadata.fold_seed,
        "inputs": input_digests(unlearning.sae_path if train_config is None else None, unlearning),
    }
    if train_config is not None:
        payload["train_config_hash"] = train_config.config_hash()
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fold_result_path(cfg: CrossvalConfig, variant: str, fold: int) -> Path:
    """Return ``<runs_dir>/<name>/folds/<variant>/fold_<k>.json``."""
    return cfg.crossval_dir / FOLDS_DIRNAME / variant / f"fold_{fold}.json"


def check_same_store(stores: dict[str, tuple[str, ActivationStore]]) -> None:
    """Raise when the variants' stores (path and store per variant) differ in config hash."""
    first, (first_path, store) = next(iter(stores.items()))
    for variant, (path, other) in stores.items():
        if other.metadata.config_hash != store.metadata.config_hash:
            raise CrossvalError(
                f"variant {variant} was trained on store {path} (config hash "
                f"{other.metadata.config_hash}), but variant {first} on {first_path} (config hash "
                f"{store.metadata.config_hash}); cross-validate variants trained on the same store"
            )


def check_questions(unlearning: UnlearningEvalConfig, store: ActivationStore, n_folds: int) -> None:
    """Read the WMDP-bio questions by fold and raise on an evaluated fold without any."""
    # Every variant shares the question settings. Reading the questions at planning
    # time fails fast, before any SAE or model pass, on an empty fold.
    warn_on_source_mismatch(unlearning, store.metadata)
    check_fold_questions(load_fold_questions(unlearning, store), n_folds, unlearning.wmdp_source)


def plan_crossval(cfg: CrossvalConfig) -> CrossvalPlan:
    """Resolve every variant's run and SAE, check the store and folds, and list the fold jobs."""
    if cfg.mode == "retrain":
        return plan_retrain(cfg)

    inputs: dict[str, EvalInputs] = {}
    unlearning: dict[str, UnlearningEvalConfig] = {}
    for variant in cfg.variants:
        sae_path = cfg.sae_path(variant)
        if not sae_path.is_dir():
            raise CrossvalError(
                f"variant {variant}: no SAE at {sae_path}. Train it first (knowsep train variant={variant} "
                f"run_name={cfg.run_name(variant)} with train_corpora excluding the WMDP-bio corpus), or set "
                "run_names / run_suffix to an existing run"
            )
        unlearning[variant] = cfg.unlearning_config(sae_path)
        inputs[variant] = load_inputs(
            CoreEvalConfig(
                sae_path=str(sae_path), store=cfg.store, device=unlearning[variant].device
            )
        )
        # Tasks that run in this process reuse the loaded SAE instead of loading it again.
        key = (str(sae_path), inputs[variant].store_path, unlearning[variant].device)
        with _CACHE_LOCK:
            _INPUTS_CACHE.setdefault(key, inputs[variant])

    first = cfg.variants[0]
    store = inputs[first].store
    check_same_store(
        {variant: (inputs[variant].store_path, inputs[variant].store) for variant in cfg.variants}
    )
    metadata = store.metadata
    store_path = inputs[first].store_path
    n_folds = check_folds(cfg.folds, metadata, store_path)

    plan = CrossvalPlan(
        cfg=cfg,
        store=store,
        n_folds=n_folds,
        run_names={variant: cfg.run_name(variant) for variant in cfg.variants},
        inputs=inputs,
    )
    check_questions(unlearning[first], store, n_folds)
    for variant in cfg.variants:
        variant_cfg = unlearning[variant]
        check_training_corpora(cfg, cfg.sae_path(variant).parent, variant_cfg.wmdp_corpus, metadata)
        config_hash = variant_config_hash(cfg, plan.run_names[variant], variant_cfg, metadata)
        for fold in range(n_folds):
            plan.jobs.append(
                FoldJob(
                    variant=variant,
                    run_name=plan.run_names[variant],
                    fold=fold,
                    sae_path=str(cfg.sae_path(variant)),
                    store_path=store_path,
                    unlearning=variant_cfg,
                    firing_rates=cfg.firing_rates,
                    config_hash=config_hash,
                    result_path=str(fold_result_path(cfg, variant, fold)),
                )
            )
    return plan


def plan_retrain(cfg: CrossvalConfig) -> CrossvalPlan:
    """Resolve every variant's run config, check the store and folds, and list one training and evaluation per fold.

    A fold's SAE is the variant's run config trained as ``<run>-fold<k>`` with
    ``exclude_folds=[k]``. Only the run's ``config.json`` is read, so the run's own SAE
    need not exist.
    """
    base_configs: dict[str, TrainConfig] = {}
    stores: dict[str, tuple[str, ActivationStore]] = {}
    for variant in cfg.variants:
        run_dir = Path(cfg.runs_dir) / cfg.run_name(variant)
        try:
            base_configs[variant] = load_run_config(run_dir)
        except RetrainError as error:
            raise CrossvalError(f"variant {variant}: {error}") from error
        store_path = cfg.store or base_configs[variant].store
        if not Path(store_path).is_dir():
            raise CrossvalError(
                f"variant {variant}: no activation store at {store_path} (from {run_dir / RUN_CONFIG_FILE}); "
                "pass store=PATH to train the fold SAEs on another copy of it"
            )
        stores[variant] = (store_path, ActivationStore.open(store_path))

    first = cfg.variants[0]
    store_path, store = stores[first]
    check_same_store(stores)
    metadata = store.metadata
    n_folds = check_folds(cfg.folds, metadata, store_path)
    plan = CrossvalPlan(
        cfg=cfg,
        store=store,
        n_folds=n_folds,
        run_names={variant: cfg.run_name(variant) for variant in cfg.variants},
        inputs={},
    )

    # The question settings do not depend on the SAE, so any fold's SAE path will do.
    shared_cfg = cfg.unlearning_config(
        Path(cfg.runs_dir) / fold_run_name(plan.run_names[first], 0) / SAE_DIR
    )
    check_questions(shared_cfg, store, n_folds)
    for variant in cfg.variants:
        run_name = plan.run_names[variant]
        check_training_corpora(cfg, Path(cfg.runs_dir) / run_name, shared_cfg.wmdp_corpus, metadata)
        for fold in range(n_folds):
            try:
                train_config = fold_train_config(
                    base_configs[variant],
                    run_name=run_name,
                    fold=fold,
                    runs_dir=cfg.runs_dir,
                    store=stores[variant][0],
                )
                check_fold_run(train_config, cfg.overwrite)
            except (RetrainError, TrainConfigError) as error:
                raise CrossvalError(f"variant {variant}, fold {fold}: {error}") from error
            sae_path = train_config.run_dir / SAE_DIR
            unlearning = cfg.unlearning_config(sae_path)
            plan.jobs.append(
                FoldJob(
                    variant=variant,
                    run_name=train_config.run_name,
                    fold=fold,
                    sae_path=str(sae_path),
                    store_path=stores[variant][0],
                    unlearning=unlearning,
                    firing_rates=cfg.firing_rates,
                    config_hash=variant_config_hash(
                        cfg, train_config.run_name, unlearning, metadata, train_config
                    ),
                    result_path=str(fold_result_path(cfg, variant, fold)),
                    mode="retrain",
                    train_config=train_config,
                    overwrite=cfg.overwrite,
                )
            )
    return plan


def read_fold_result(path: str | Path) -> FoldResult:
    """Read one fold's result file."""
    try:
        return FoldResult.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValidationError) as error:
        raise CrossvalError(
            f"cannot read the fold result {path}: {error}; delete the file to recompute that fold"
        ) from error


def pending_jobs(plan: CrossvalPlan) -> list[FoldJob]:
    """Return the jobs without a finished result, raising on a result from other settings."""
    pending = []
    for job in plan.jobs:
        path = Path(job.result_path)
        if plan.cfg.overwrite or not path.exists():
            pending.append(job)
            continue
        stored_hash = read_fold_result(path).config_hash
        if stored_hash != job.config_hash:
            raise CrossvalError(
                f"{path} was computed with config hash {stored_hash}, but the current settings and inputs hash to "
                f"{job.config_hash}; pass overwrite=true to recompute every fold, or use another name"
            )
        logger.info(
            "variant %s, fold %d: finished earlier, skipped (%s)", job.variant, job.fold, path
        )
    return pending


# Per-process caches shared by the tasks of one worker


@dataclass
class FoldSetup:
    """The unmodified model and what it measured, shared by every variant and fold of one process.

    The known sets and baseline losses depend on the model and the data only, not on
    the SAE, so they are computed once per fold and reused by every variant.
    """

    loaded: LoadedModel
    scorer: MultipleChoiceScorer
    special_token_ids: list[int]
    wmdp_by_fold: dict[int, list[MCQuestion]]
    mmlu_known: dict[str, KnownSet]
    pooled: QuestionSetSummary
    contexts: dict[int, dict[str, np.ndarray]]
    wmdp_known: dict[int, KnownSet] = field(default_factory=dict)
    baseline_losses: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


# The model's forward hooks (the clamp) are not thread-safe, so every use of a shared
# model holds _MODEL_LOCK; _CACHE_LOCK guards only the lookups.
_MODEL_LOCK = threading.Lock()
_CACHE_LOCK = threading.Lock()
_INPUTS_CACHE: dict[tuple[str, str, str], EvalInputs] = {}
_SETUP_CACHE: dict[str, FoldSetup] = {}


def clear_process_caches() -> None:
    """Drop the SAEs, models and known sets this process keeps between tasks."""
    with _CACHE_LOCK:
        _INPUTS_CACHE.clear()
        _SETUP_CACHE.clear()


def variant_inputs(sae_path: str, store_path: str, device: str) -> EvalInputs:
    """Return this process's copy of an SAE and its store, loading it on first use."""
    key = (sae_path, store_path, device)
    with _CACHE_LOCK:
        if key not in _INPUTS_CACHE:
            _INPUTS_CACHE[key] = load_inputs(
                CoreEvalConfig(sae_path=sae_path, store=store_path, device=device)
            )
        return _INPUTS_CACHE[key]


def setup_key(job: FoldJob) -> str:
    """Return the key of the setup a job can share: the same model, store, questions and contexts."""
    sweep_fields = {
        "sae_path",
        "retain_thresholds",
        "n_features_list",
        "multipliers",
        "controls",
        "control_pool_size",
        "mmlu_threshold",
        "batch_size",
    }
    values = {k: v for k, v in job.unlearning.to_dict().items() if k not in sweep_fields}
    return json.dumps({"store": job.store_path, **values}, sort_keys=True, default=str)


def load_fold_questions(
    unlearning: UnlearningEvalConfig, store: ActivationStore
) -> dict[int, list[MCQuestion]]:
    """Read every WMDP-bio question and group them by the store's folds, keeping at most ``max_questions`` per fold."""
    metadata = store.metadata
    every_question = dataclasses.replace(unlearning, wmdp_questions="all", max_questions=None)
    questions = load_wmdp_questions(every_question, store)
    folds_Q = question_folds(
        len(questions), metadata.fold_seed, unlearning.wmdp_corpus, metadata.n_folds
    )

    by_fold = {}
    for fold in range(metadata.n_folds):
        selected = [
            question for question, q_fold in zip(questions, folds_Q, strict=True) if q_fold == fold
        ]
        by_fold[fold] = (
            selected[: unlearning.max_questions] if unlearning.max_questions else selected
        )
    return by_fold


def warn_on_source_mismatch(unlearning: UnlearningEvalConfig, metadata: StoreMetadata) -> None:
    """Warn when the store's WMDP-bio corpus was read from a file of another name than the questions."""
    corpus = metadata.corpora[metadata.corpus_index(unlearning.wmdp_corpus)]
    if Path(str(corpus.get("source", ""))).name != Path(unlearning.wmdp_source).name:
        logger.warning(
            "store corpus %s was read from %s but the questions come from %s; the fold assignment assumes both "
            "list the questions in the same order",
            unlearning.wmdp_corpus,
            corpus.get("source"),
            unlearning.wmdp_source,
        )


def check_fold_questions(by_fold: dict[int, list[MCQuestion]], n_folds: int, source: str) -> None:
    """Raise when one of the evaluated folds has no WMDP-bio question."""
    for fold in range(n_folds):
        if not by_fold[fold]:
            n_questions = sum(len(questions) for questions in by_fold.values())
            raise CrossvalError(
                f"fold {fold} has none of the {n_questions} WMDP-bio questions of {source}; "
                "use fewer folds or more questions"
            )


def build_setup(job: FoldJob, inputs: EvalInputs) -> FoldSetup:
    """Load the model, score the MMLU subjects and collect every fold's questions and held-out contexts."""
    unlearning = job.unlearning
    store = inputs.store
    wmdp_by_fold = load_fold_questions(unlearning, store)
    mmlu_questions = {
        subject: load_mmlu_subject(unlearning, subject)
        for subject in [*unlearning.mmlu_subjects, *unlearning.mmlu_reported_subjects]
    }

    model_name = unlearning.model or store.metadata.model
    loaded = load_model(model_name, dtype=unlearning.dtype, device=str(inputs.device))
    if loaded.d_model != store.metadata.d_model:
        raise CrossvalError(
            f"model {model_name} has d_model {loaded.d_model}, but store {inputs.store_path} has d_model "
            f"{store.metadata.d_model}; pass the model the store was harvested from"
        )
    scorer = MultipleChoiceScorer(
        cast(Any, loaded.model),
        loaded.tokenizer,
        unlearning.scoring,
        batch_size=unlearning.mcq_batch_size,
        logit_chunk_size=unlearning.logit_chunk_size,
        logit_precision=unlearning.logit_precision,
        prompt_cache=unlearning.prompt_cache,
    )
    mmlu_known = {
        subject: find_known_set(
            scorer, questions, unlearning.known_margin, unlearning.min_known_questions
        )
        for subject, questions in mmlu_questions.items()
    }
    pooled = pooled_summary(
        [mmlu_known[subject].summary for subject in unlearning.mmlu_subjects],
        unlearning.min_known_questions,
    )

    contexts: dict[int, dict[str, np.ndarray]] = {}
    if unlearning.n_loss_contexts > 0:
        contexts = heldout_contexts_by_fold(
            store, store.metadata.n_folds, unlearning.n_loss_contexts, unlearning.random_seed
        )
        if not any(
            len(contexts_CT)
            for by_domain in contexts.values()
            for contexts_CT in by_domain.values()
        ):
            raise CrossvalError(
                f"store {inputs.store_path} has no held-out contexts (context_split 1); harvest it with "
                "heldout_fraction > 0, or pass unlearning.n_loss_contexts=0 to skip the loss metrics"
            )
    return FoldSetup(
        loaded=loaded,
        scorer=scorer,
        special_token_ids=collect_special_token_ids(store, loaded),
        wmdp_by_fold=wmdp_by_fold,
        mmlu_known=mmlu_known,
        pooled=pooled,
        contexts=contexts,
    )


def fold_setup(job: FoldJob, inputs: EvalInputs) -> FoldSetup:
    """Return this process's setup for the job, building it on first use and adding the job's fold.

    Call with ``_MODEL_LOCK`` held.
    """
    key = setup_key(job)
    with _CACHE_LOCK:
        setup = _SETUP_CACHE.get(key)
    if setup is None:
        setup = build_setup(job, inputs)
        with _CACHE_LOCK:
            _SETUP_CACHE[key] = setup

    fold = job.fold
    unlearning = job.unlearning
    if fold not in setup.wmdp_known:
        setup.wmdp_known[fold] = find_known_set(
            setup.scorer,
            setup.wmdp_by_fold[fold],
            unlearning.known_margin,
            unlearning.min_known_questions,
        )
    if fold not in setup.baseline_losses and setup.contexts:
        setup.baseline_losses[fold] = {}
        for domain in DOMAIN_NAMES:
            contexts_CT = setup.contexts[fold][domain]
            if len(contexts_CT) == 0:
                logger.warning(
                    "fold %d has no held-out %s contexts, so its %s loss rise is not measured",
                    fold,
                    domain,
                    domain,
                )
            setup.baseline_losses[fold][domain] = context_losses(
                cast(Any, setup.loaded.model),
                contexts_CT,
                setup.special_token_ids,
                batch_size=unlearning.context_batch_size,
                logit_chunk_size=unlearning.logit_chunk_size,
                head=setup.scorer.head,
            )
    return setup


# One fold


def best_point(
    points: Sequence[UnlearningSweepPoint], metrics_best: tuple[Any, Any, Any]
) -> UnlearningSweepPoint | None:
    """Return the sweep point whose (retain threshold, n_features, multiplier) set the score, or None."""
    if metrics_best[0] is None:
        return None
    for point in points:
        if (point.retain_threshold, point.n_features, point.multiplier) == metrics_best:
            return point
    return None


def evaluate_fold(job: FoldJob, rates: FiringRates) -> FoldResult:
    """Run the unlearning sweep of one variant on one fold with latents selected from ``rates``."""
    unlearning = job.unlearning
    inputs = variant_inputs(job.sae_path, job.store_path, unlearning.device)
    with _MODEL_LOCK:
        setup = fold_setup(job, inputs)
        wmdp_known = setup.wmdp_known[job.fold]
        known = {WMDP_SET: wmdp_known, **setup.mmlu_known}
        contexts = setup.contexts.get(job.fold, {}) if setup.contexts else {}
        state = EvalState(
            cfg=unlearning,
            inputs=inputs,
            loaded=setup.loaded,
            model=cast(Any, setup.loaded.model),
            scorer=setup.scorer,
            special_token_ids=setup.special_token_ids,
            known=known,
            contexts=contexts,
            baseline_losses=setup.baseline_losses.get(job.fold, {}),
        )
        logger.info(
            "variant %s, fold %d: %d WMDP-bio questions (%d known), firing rates from %d forget and %d retain tokens",
            job.variant,
            job.fold,
            wmdp_known.summary.n_questions,
            wmdp_known.summary.n_known,
            int(rates.n_forget_tokens),
            int(rates.n_retain_tokens),
        )
        points = run_sweep(state, rates)

    metrics = unlearning_metrics(points, known, setup.pooled)
    summaries = {WMDP_SET: wmdp_known.summary, MMLU_POOLED_SET: setup.pooled}
    loss = None
    if contexts:
        baselines = setup.baseline_losses[job.fold]
        loss = LossBaseline(
            forget_loss=_nan_mean(baselines["forget"]),
            retain_loss=_nan_mean(baselines["retain"]),
            n_forget_contexts=int((~np.isnan(baselines["forget"])).sum()),
            n_retain_contexts=int((~np.isnan(baselines["retain"])).sum()),
        )
    store_folds = inputs.store.metadata.n_folds
    return FoldResult(
        variant=job.variant,
        run_name=job.run_name,
        fold=job.fold,
        mode=job.mode,
        sae_path=job.sae_path,
        config_hash=job.config_hash,
        wmdp_bio=wmdp_known.summary,
        mmlu=setup.pooled,
        firing_rates=FiringRateSource(
            source=rates.source,
            path=rates.path,
            folds=other_folds(job.fold, store_folds),
            n_forget_tokens=rates.n_forget_tokens,
            n_retain_tokens=rates.n_retain_tokens,
        ),
        loss=loss,
        metrics=metrics,
        best_point=best_point(
            points,
            (metrics.best_retain_threshold, metrics.best_n_features, metrics.best_multiplier),
        ),
        points=points,
        warnings=honesty_warnings(unlearning, summaries),
    )


def _nan_mean(values: np.ndarray) -> float | None:
    scored = values[~np.isnan(values)]
    return float(scored.mean()) if len(scored) else None


def fold_rates(job: FoldJob, counts: FoldFiringCounts | None) -> FiringRates:
    """Return the firing rates behind the selection of the job's fold."""
    inputs = variant_inputs(job.sae_path, job.store_path, job.unlearning.device)
    metadata = inputs.store.metadata
    if job.firing_rates == "cache":
        return fold_rates_from_cache(
            Path(job.sae_path) / CACHE_DIRNAME, inputs.sae, metadata, job.fold
        )
    if counts is None:
        raise CrossvalError(
            f"variant {job.variant}, fold {job.fold}: firing_rates='store' needs the firing counts"
        )
    return fold_rates_from_counts(counts, corpus_domains(metadata), job.fold)


def run_fold_task(job: FoldJob, counts: FoldFiringCounts | None) -> str:
    """Evaluate one fold and write its result atomically; return the result path."""
    result = evaluate_fold(job, fold_rates(job, counts))
    write_json_atomic(job.result_path, result.model_dump_json(indent=2))
    score = result.metrics.unlearning_score
    logger.info(
        "variant %s, fold %d: unlearning_score %s -> %s",
        job.variant,
        job.fold,
        "n/a" if score is None else f"{score:.4f}",
        job.result_path,
    )
    return job.result_path


def count_shard_task(
    sae_path: str, store_path: str, device: str, shard_index: int, batch_size: int
) -> FoldFiringCounts:
    """Count one shard's firing per corpus and fold (a dask task)."""
    inputs = variant_inputs(sae_path, store_path, device)
    return count_shard_firing(
        inputs.store,
        shard_index,
        inputs.sae,
        inputs.norm_scale,
        batch_size=batch_size,
        device=inputs.device,
    )


def train_fold_task(job: FoldJob) -> FoldJob:
    """Train the SAE of a retrain job's fold unless a finished one exists (a dask task); return the job."""
    if job.train_config is None:
        raise CrossvalError(
            f"variant {job.variant}, fold {job.fold}: a mode {job.mode!r} job has no training config to train"
        )
    sae_dir, trained = train_fold_sae(job.train_config, job.overwrite)
    if str(sae_dir) != job.sae_path:
        raise CrossvalError(
            f"variant {job.variant}, fold {job.fold}: the fold run wrote its SAE to {sae_dir}, "
            f"but the job evaluates {job.sae_path}"
        )
    if trained:
        # A copy loaded before this training (an earlier run in this process) is stale.
        with _CACHE_LOCK:
            for key in [key for key in _INPUTS_CACHE if key[0] == job.sae_path]:
                del _INPUTS_CACHE[key]
    return job


def count_job_shard_task(job: FoldJob, shard_index: int) -> FoldFiringCounts:
    """Count one shard's firing per corpus and fold with the job's SAE (a dask task)."""
    return count_shard_task(
        job.sae_path, job.store_path, job.unlearning.device, shard_index, job.unlearning.batch_size
    )


def count_firing(job: FoldJob) -> FoldFiringCounts:
    """Count the firing of the job's SAE on every shard of the store, in this thread."""
    parts = [
        count_shard_task(
            job.sae_path,
            job.store_path,
            job.unlearning.device,
            info.index,
            job.unlearning.batch_size,
        )
        for info in variant_inputs(job.sae_path, job.store_path, job.unlearning.device).store.shards
    ]
    return sum_counts(parts)


# Scheduling


def build_retrain_tasks(plan: CrossvalPlan, jobs: Sequence[FoldJob]) -> list[Any]:
    """Return one delayed fold task per job, each after its own training and shard counts."""
    tasks = []
    shard_indices = [info.index for info in plan.store.shards]
    for job in jobs:
        trained = dask.delayed(train_fold_task)(job)
        counts = None
        if plan.cfg.firing_rates == "store":
            parts = [dask.delayed(count_job_shard_task)(trained, index) for index in shard_indices]
            counts = dask.delayed(sum_counts)(parts)
        tasks.append(dask.delayed(run_fold_task)(trained, counts))
    return tasks


def build_tasks(plan: CrossvalPlan, jobs: Sequence[FoldJob]) -> list[Any]:
    """Return one delayed fold task per job; in mode ``stats`` each variant's shard counts are shared by its folds."""
    if plan.cfg.mode == "retrain":
        return build_retrain_tasks(plan, jobs)
    tasks = []
    shard_indices = [info.index for info in plan.store.shards]
    for variant in plan.cfg.variants:
        variant_jobs = [job for job in jobs if job.variant == variant]
        if not variant_jobs:
            continue
        first = variant_jobs[0]
        counts = None
        if plan.cfg.firing_rates == "store":
            parts = [
                dask.delayed(count_shard_task)(
                    first.sae_path,
                    first.store_path,
                    first.unlearning.device,
                    index,
                    first.unlearning.batch_size,
                )
                for index in shard_indices
            ]
            counts = dask.delayed(sum_counts)(parts)
        for job in variant_jobs:
            tasks.append(dask.delayed(run_fold_task)(job, counts))
    return tasks


def compute_tasks(cfg: CrossvalConfig, tasks: list[Any]) -> list[str]:
    """Compute the fold tasks on the local threaded scheduler or on a dask.distributed cluster."""
    if not tasks:
        return []
    if cfg.scheduler_address is None:
        return list(dask.compute(*tasks, scheduler="threads", num_workers=cfg.num_workers))

    from distributed import Client

    with Client(cfg.scheduler_address) as client:
        logger.info(
            "Connected to dask scheduler %s with %d worker(s)",
            cfg.scheduler_address,
            len(client.scheduler_info()["workers"]),
        )
        futures = client.compute(tasks)
        return list(client.gather(futures))


# Summary


def summarize(values: Sequence[float | None]) -> MetricSummary:
    """Return the mean and sample standard deviation (ddof=1) over the values that are not None."""
    present = np.array([value for value in values if value is not None], dtype=np.float64)
    return MetricSummary(
        mean=float(present.mean()) if len(present) else None,
        std=float(present.std(ddof=1)) if len(present) >= 2 else None,
        n_folds=len(present),
        values=list(values),
    )


def _loss_rise(point: UnlearningSweepPoint | None, domain: str) -> float | None:
    if point is None or point.loss_rise is None or domain not in point.loss_rise:
        return None
    return point.loss_rise[domain].mean_rise


def summarize_variant(run_name: str, rows: Sequence[FoldResult]) -> VariantSummary:
    """Summarize one variant's fold results (in fold order) as mean and standard deviation over folds."""
    best = [row.best_point for row in rows]
    best_summary = BestPointSummary(
        wmdp_bio_accuracy=summarize([point.wmdp_bio.accuracy if point else None for point in best]),
        mmlu_accuracy=summarize([point.mmlu.accuracy if point else None for point in best]),
        forget_loss_rise=summarize([_loss_rise(point, "forget") for point in best]),
        retain_loss_rise=summarize([_loss_rise(point, "retain") for point in best]),
    )

    # Points are matched across folds by their hyperparameters, because every fold runs the same sweep.
    keys = [
        (point.retain_threshold, point.n_features, point.multiplier) for point in rows[0].points
    ]
    by_key = [
        {
            (point.retain_threshold, point.n_features, point.multiplier): point
            for point in row.points
        }
        for row in rows
    ]
    sweep = []
    for key in keys:
        points = [points_of_fold.get(key) for points_of_fold in by_key]
        sweep.append(
            PointSummary(
                retain_threshold=key[0],
                n_features=key[1],
                multiplier=key[2],
                wmdp_bio_accuracy=summarize(
                    [point.wmdp_bio.accuracy if point else None for point in points]
                ),
                mmlu_accuracy=summarize(
                    [point.mmlu.accuracy if point else None for point in points]
                ),
                forget_loss_rise=summarize([_loss_rise(point, "forget") for point in points]),
                retain_loss_rise=summarize([_loss_rise(point, "retain") for point in points]),
                n_folds_counted=sum(
                    1 for point in points if point is not None and point.counts_in_score
                ),
            )
        )
    return VariantSummary(
        run_name=run_name,
        n_folds=len(rows),
        n_reliable_folds=sum(1 for row in rows if row.metrics.reliable),
        unlearning_score=summarize([row.metrics.unlearning_score for row in rows]),
        n_wmdp_questions=summarize([float(row.wmdp_bio.n_questions) for row in rows]),
        n_wmdp_known=summarize([float(row.wmdp_bio.n_known) for row in rows]),
        best_point=best_summary,
        sweep_points=sweep,
    )


def unstructured_notes(plan: CrossvalPlan, rows: Sequence[FoldResult]) -> dict[str, Any]:
    """Return the free-form part of the result: method notes and every fold's warnings."""
    method = (
        "For fold k, latents are selected with forget firing rates over every other fold of the store and "
        "retain firing rates over every fold, then measured on fold k's WMDP-bio questions and on held-out "
        "contexts that belong mostly to fold k. Means are unweighted over folds; std is the sample standard "
        "deviation (ddof=1)."
    )
    if plan.cfg.mode == "retrain":
        method = (
            "Each fold k has its own SAE, trained with the variant's run config on the store's train split "
            "with fold k's tokens excluded (exclude_folds=[k]); sae_path of each row names it. "
            + method
        )
    return {
        "method": method,
        "firing_rates": plan.cfg.firing_rates,
        "best_point_note": (
            "best_point metrics use the point that sets each fold's score, picked on that fold's own questions, "
            "so they are optimistic; sweep_points are free of that selection."
        ),
        "warnings": {
            f"{row.variant}/fold_{row.fold}": row.warnings for row in rows if row.warnings
        },
    }


def sae_configs(plan: CrossvalPlan) -> dict[str, Any]:
    """Return the evaluated SAEs' configs: one per variant in mode ``stats``, one per ``<variant>/fold_<k>`` in mode ``retrain``."""
    if plan.cfg.mode != "retrain":
        return {variant: sae_config_dict(inputs) for variant, inputs in plan.inputs.items()}
    configs = {}
    for job in plan.jobs:
        if not Path(job.sae_path).is_dir():
            logger.warning(
                "variant %s, fold %d: the fold's SAE %s is gone, so sae_cfg_dict leaves it out",
                job.variant,
                job.fold,
                job.sae_path,
            )
            continue
        inputs = variant_inputs(job.sae_path, job.store_path, job.unlearning.device)
        configs[f"{job.variant}/fold_{job.fold}"] = sae_config_dict(inputs)
    return configs


def run(cfg: CrossvalConfig) -> Path:
    """Cross-validate every variant over the folds and write the summary JSON; return its path."""
    plan = plan_crossval(cfg)
    pending = pending_jobs(plan)
    logger.info(
        "Cross-validating %d variant(s) over %d fold(s): %d fold evaluation(s) to run, %d finished earlier",
        len(cfg.variants),
        plan.n_folds,
        len(pending),
        len(plan.jobs) - len(pending),
    )
    compute_tasks(cfg, build_tasks(plan, pending))

    rows = [read_fold_result(job.result_path) for job in plan.jobs]
    for job, row in zip(plan.jobs, rows, strict=True):
        if row.config_hash != job.config_hash:
            raise CrossvalError(
                f"{job.result_path} has config hash {row.config_hash} after the run, expected {job.config_hash}; "
                "another process may be writing the same folds"
            )
    summaries = {
        variant: summarize_variant(
            plan.run_names[variant], [row for row in rows if row.variant == variant]
        )
        for variant in cfg.variants
    }

    first_job = plan.jobs[0]
    eval_config = {
        **cfg.to_dict(),
        "store": first_job.store_path,
        "folds": plan.n_folds,
        "n_store_folds": plan.store.metadata.n_folds,
        "run_names": plan.run_names,
        "fold_run_names": {
            variant: [job.run_name for job in plan.jobs if job.variant == variant]
            for variant in cfg.variants
        },
        "resolved_unlearning": {
            key: value for key, value in first_job.unlearning.to_dict().items() if key != "sae_path"
        },
    }
    output_path = (
        Path(cfg.output)
        if cfg.output
        else default_output_path(cfg.crossval_dir, EVAL_TYPE_ID_CROSSVAL)
    )
    output = CrossvalEvalOutput(
        eval_config=eval_config,
        eval_id=new_eval_id(),
        datetime_epoch_millis=epoch_millis(),
        eval_result_metrics=CrossvalMetrics(variants=summaries),
        eval_result_details=rows,
        eval_result_unstructured=unstructured_notes(plan, rows),
        sae_cfg_dict=sae_configs(plan),
    )
    write_eval_output(output, output_path)

    for variant, summary in summaries.items():
        score = summary.unlearning_score
        if score.mean is None:
            score_text = "n/a"
        elif score.std is None:
            # One fold with a score has no spread to show.
            score_text = f"{score.mean:.4f} (one fold)"
        else:
            score_text = f"{score.mean:.4f} ± {score.std:.4f}"
        logger.info(
            "variant %s: unlearning_score %s from %d of %d folds",
            variant,
            score_text,
            score.n_folds,
            summary.n_folds,
        )
    logger.info("crossval results -> %s", output_path)
    return output_path
