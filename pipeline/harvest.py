"""Stage one: harvest one layer's residual stream into a sharded activation store.

Each corpus is streamed, tokenized and packed into contexts of ``context_size`` tokens.
Contexts are packed per (corpus, split) stream, so a context never mixes corpora or
splits. A context starts with BOS when the tokenizer has one. Documents inside it are
separated by EOS when the tokenizer has one. A document that does not fit is cut and
continues in the next context, after a new BOS. The last context of a stream is
padded on the right and its padding is masked out of the attention.

The shard plan is a pure function of the config, so a killed harvest is resumed by
planning again (tokenizing is cheap) and computing only the shards that are not yet
complete. Every shard is one dask task that runs the model up to the harvested block
and writes the shard through the store, which makes the write atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import HarvestConfig
from pipeline.data import CorpusSpec, is_local_source, iter_corpus_texts, resolve_source
from pipeline.models import (
    LoadedModel,
    ModelConfig,
    capture_residual,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_layer,
    resolve_model_path,
    special_token_ids,
)
from stores.activations import (
    DOMAINS,
    SPLITS,
    ActivationStore,
    StoreError,
    StoreMetadata,
    acts_to_float32,
    create_store,
)

logger = logging.getLogger(__name__)

# Codes stored in the `split` arrays.
TRAIN_SPLIT = SPLITS.index("train")
HELDOUT_SPLIT = SPLITS.index("heldout")

# Doc id of positions that hold no document token (BOS, EOS separators, padding).
NO_DOC = -1

# Shards in flight per worker: enough to keep workers busy while the next shards are
# planned, without building the task graph of a huge corpus up front.
SHARDS_IN_FLIGHT_PER_WORKER = 2


class HarvestError(ValueError):
    """A harvest that cannot produce a valid store (bad input data or settings)."""


# Document assignment


def _hash_unit(*parts: object) -> int:
    """Return a 64-bit integer from SHA-256 of the parts; stable across processes and runs."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def document_fold(fold_seed: int, corpus: str, doc_index: int, n_folds: int) -> int:
    """Return the cross-validation fold of a document (a seeded hash of its id)."""
    return _hash_unit("fold", fold_seed, corpus, doc_index) % n_folds


def document_split(fold_seed: int, corpus: str, doc_index: int, heldout_fraction: float) -> int:
    """Return `HELDOUT_SPLIT` for a ``heldout_fraction`` share of documents, else `TRAIN_SPLIT`.

    The hash is salted differently from `document_fold`, so the held-out documents
    spread over all folds.
    """
    unit = _hash_unit("heldout", fold_seed, corpus, doc_index) / 2.0**64
    return HELDOUT_SPLIT if unit < heldout_fraction else TRAIN_SPLIT


# Packing


@dataclass
class PlannedShard:
    """The contexts of one shard, before the model runs.

    Attributes:
        index: Shard index in the store.
        contexts_CT: Token ids, specials and padding included.
        valid_CT: True for positions before the padding (the attention mask).
        doc_CT: Document index within its corpus, or ``NO_DOC`` for BOS, EOS and padding.
        fold_CT: Fold of the position's document (0 where there is none).
        context_corpus_C: Corpus index of each context.
        context_split_C: Split code of each context.
    """

    index: int
    contexts_CT: np.ndarray
    valid_CT: np.ndarray
    doc_CT: np.ndarray
    fold_CT: np.ndarray
    context_corpus_C: np.ndarray
    context_split_C: np.ndarray


@dataclass
class _PackedContext:
    tokens: list[int]
    docs: list[int]
    folds: list[int]
    corpus: int
    split: int


class _ContextPacker:
    """Packs the documents of one (corpus, split) stream into contexts of fixed length."""

    def __init__(
        self, corpus: int, split: int, context_size: int, bos_id: int | None, eos_id: int | None
    ):
        self.corpus = corpus
        self.split = split
        self.context_size = context_size
        self.prefix = [bos_id] if bos_id is not None else []
        self.eos_id = eos_id
        self._start_context()

    def _start_context(self) -> None:
        self.tokens: list[int] = list(self.prefix)
        self.docs: list[int] = [NO_DOC] * len(self.prefix)
        self.folds: list[int] = [0] * len(self.prefix)
        self.has_document = False

    def _emit(self) -> _PackedContext:
        context = _PackedContext(self.tokens, self.docs, self.folds, self.corpus, self.split)
        self._start_context()
        return context

    def add(self, doc_index: int, fold: int, token_ids: list[int]) -> list[_PackedContext]:
        """Append one document and return the contexts it completed."""
        completed: list[_PackedContext] = []
        if not token_ids:
            return completed

        if self.has_document and self.eos_id is not None:
            self.tokens.append(self.eos_id)
            self.docs.append(NO_DOC)
            self.folds.append(0)
            if len(self.tokens) == self.context_size:
                completed.append(self._emit())

        start = 0
        while start < len(token_ids):
            space = self.context_size - len(self.tokens)
            piece = token_ids[start : start + space]
            self.tokens.extend(piece)
            self.docs.extend([doc_index] * len(piece))
            self.folds.extend([fold] * len(piece))
            self.has_document = True
            start += len(piece)
            if len(self.tokens) == self.context_size:
                completed.append(self._emit())
        return completed

    def flush(self) -> _PackedContext | None:
        """Return the last, partly filled context, or None when it contains no document token."""
        if not self.has_document:
            return None
        return self._emit()


@dataclass(frozen=True)
class HarvestCorpus:
    """A corpus of the harvest with its resolved source and its index in the store."""

    index: int
    spec: CorpusSpec
    source: str


def resolve_corpora(cfg: HarvestConfig) -> list[HarvestCorpus]:
    """Resolve every corpus's source; optional corpora without one are left out."""
    corpora: list[HarvestCorpus] = []
    for spec in cfg.corpora:
        source = resolve_source(spec)
        if source is not None:
            corpora.append(HarvestCorpus(index=len(corpora), spec=spec, source=source))
    if not corpora:
        raise HarvestError(
            "no corpus to harvest: every configured corpus is optional and none was found"
        )
    return corpora


def check_local_corpora(corpora: list[HarvestCorpus]) -> None:
    """Read every record of the local corpus files, so that a malformed record fails before any shard.

    Raises DataError (with the file and line) or HarvestError for a corpus whose texts
    are all blank. Hub corpora are streamed and checked only when harvested.
    """
    for corpus in corpora:
        if not is_local_source(corpus.source):
            continue
        n_docs = 0
        has_text = False
        for doc in iter_corpus_texts(corpus.spec, corpus.source):
            n_docs += 1
            has_text = has_text or bool(doc.text.strip())
        if not has_text:
            raise HarvestError(
                f"corpus {corpus.spec.name} ({corpus.source}) has {n_docs} document(s) but no text: every "
                "text is empty or blank. Fix the file or its text_field, or remove the corpus from the config"
            )


def _iter_packed_contexts(
    cfg: HarvestConfig,
    corpora: list[HarvestCorpus],
    tokenizer: Any,
) -> Iterator[_PackedContext]:
    """Yield packed contexts of every corpus, streaming documents one by one."""
    for corpus in corpora:
        spec = corpus.spec
        packers = {
            split: _ContextPacker(
                corpus.index,
                split,
                cfg.context_size,
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
            )
            for split in (TRAIN_SPLIT, HELDOUT_SPLIT)
        }
        n_tokens = 0
        n_docs = 0
        for doc_index, doc in enumerate(iter_corpus_texts(spec, corpus.source)):
            token_ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            if spec.max_tokens is not None:
                token_ids = token_ids[: spec.max_tokens - n_tokens]
            n_tokens += len(token_ids)
            n_docs += 1

            fold = document_fold(cfg.fold_seed, spec.name, doc_index, cfg.n_folds)
            split = document_split(cfg.fold_seed, spec.name, doc_index, cfg.heldout_fraction)
            yield from packers[split].add(doc_index, fold, token_ids)

            if spec.max_tokens is not None and n_tokens >= spec.max_tokens:
                break

        if n_tokens == 0:
            # NOTE: a hub corpus is only read when its turn comes, so the shards of the
            # corpora before it stay on disk, and a rerun after the fix resumes them.
            raise HarvestError(
                f"corpus {spec.name} ({corpus.source}) has {n_docs} document(s) but no tokens: every text is "
                "empty or blank. Fix the file or its text_field, or remove the corpus from the config"
            )
        for split in (TRAIN_SPLIT, HELDOUT_SPLIT):
            last = packers[split].flush()
            if last is not None:
                yield last
        logger.info("Corpus %s: %d documents, %d document tokens", spec.name, n_docs, n_tokens)


def padding_token_id(tokenizer: Any) -> int:
    """Return the id that fills the padded tail of a stream's last context."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    # NOTE: a tokenizer without pad, EOS and BOS tokens pads with id 0, which may be a
    # real token in `contexts`. The per-token arrays are still right, because padding
    # positions carry no document.
    return 0


def iter_planned_shards(
    cfg: HarvestConfig,
    corpora: list[HarvestCorpus],
    tokenizer: Any,
) -> Iterator[PlannedShard]:
    """Yield the deterministic shard plan: `shard_contexts` packed contexts per shard."""
    pad_id = padding_token_id(tokenizer)
    batch: list[_PackedContext] = []
    index = 0
    for context in _iter_packed_contexts(cfg, corpora, tokenizer):
        batch.append(context)
        if len(batch) == cfg.shard_contexts:
            yield _build_shard(index, batch, cfg.context_size, pad_id)
            index += 1
            batch = []
    if batch:
        yield _build_shard(index, batch, cfg.context_size, pad_id)


def _build_shard(
    index: int, contexts: list[_PackedContext], context_size: int, pad_id: int
) -> PlannedShard:
    n_contexts = len(contexts)
    contexts_CT = np.full((n_contexts, context_size), pad_id, dtype=np.int32)
    valid_CT = np.zeros((n_contexts, context_size), dtype=bool)
    doc_CT = np.full((n_contexts, context_size), NO_DOC, dtype=np.int64)
    fold_CT = np.zeros((n_contexts, context_size), dtype=np.uint8)
    for row, context in enumerate(contexts):
        length = len(context.tokens)
        contexts_CT[row, :length] = context.tokens
        valid_CT[row, :length] = True
        doc_CT[row, :length] = context.docs
        fold_CT[row, :length] = context.folds
    return PlannedShard(
        index=index,
        contexts_CT=contexts_CT,
        valid_CT=valid_CT,
        doc_CT=doc_CT,
        fold_CT=fold_CT,
        context_corpus_C=np.array([c.corpus for c in contexts], dtype=np.uint8),
        context_split_C=np.array([c.split for c in contexts], dtype=np.uint8),
    )


# Computing one shard (runs on a dask worker)


_MODEL_CACHE: dict[tuple[str, str, str, str | None], LoadedModel] = {}
_MODEL_CACHE_LOCK = threading.Lock()

# One forward pass at a time per model and process: worker threads then overlap one
# shard's write (CPU) with the next shard's forward pass instead of competing for the device.
_FORWARD_LOCKS: dict[tuple[str, str, str, str | None], threading.Lock] = {}


def _model_key(model: ModelConfig) -> tuple[str, str, str, str | None]:
    return (model.name, model.dtype, model.device, model.cache_dir)


def get_worker_model(model: ModelConfig) -> LoadedModel:
    """Return this process's copy of the model, loading it on first use."""
    key = _model_key(model)
    with _MODEL_CACHE_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load_model(
                model.name, dtype=model.dtype, device=model.device, cache_dir=model.cache_dir
            )
            _FORWARD_LOCKS[key] = threading.Lock()
        return _MODEL_CACHE[key]


def clear_model_cache() -> None:
    """Drop the models loaded by `get_worker_model` in this process."""
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE.clear()
        _FORWARD_LOCKS.clear()


def acts_dtype_for(model_dtype: str) -> str:
    """Return the store dtype: bfloat16 models store bfloat16, others store float32 (exact)."""
    return "bfloat16" if model_dtype == "bfloat16" else "float32"


def token_mask(shard: PlannedShard, special_ids: list[int]) -> np.ndarray:
    """Return the positions written to the per-token arrays: document tokens that are not special."""
    return (shard.doc_CT != NO_DOC) & ~np.isin(
        shard.contexts_CT, np.asarray(special_ids, dtype=np.int32)
    )


def compute_shard_acts(
    loaded: LoadedModel,
    layer: int,
    shard: PlannedShard,
    keep_CT: np.ndarray,
    batch_size: int,
    acts_dtype: str,
) -> np.ndarray:
    """Run the model over a shard's contexts and return the kept positions' activations [N, D]."""
    device = loaded.device
    pieces: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(shard.contexts_CT), batch_size):
            stop = start + batch_size
            input_ids_BL = torch.from_numpy(shard.contexts_CT[start:stop]).to(
                device=device, dtype=torch.long
            )
            attention_mask_BL = torch.from_numpy(shard.valid_CT[start:stop]).to(
                device=device, dtype=torch.long
            )
            acts_BLD = capture_residual(loaded.model, layer, input_ids_BL, attention_mask_BL)

            # Boolean indexing walks rows in C order, the order of np.nonzero(keep_CT).
            keep_BL = torch.from_numpy(keep_CT[start:stop]).to(device)
            acts_ND = acts_BLD[keep_BL]
            if acts_dtype == "bfloat16":
                bits = acts_ND.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
                pieces.append(bits)
            else:
                pieces.append(acts_ND.to(torch.float32).cpu().numpy())

    if not pieces:
        return np.zeros(
            (0, loaded.d_model), dtype=np.uint16 if acts_dtype == "bfloat16" else np.float32
        )
    return np.concatenate(pieces, axis=0)


def shard_arrays(
    shard: PlannedShard,
    acts_ND: np.ndarray,
    keep_CT: np.ndarray,
    domain_codes: list[int],
) -> dict[str, np.ndarray]:
    """Assemble the store arrays of one shard from its plan and its activations."""
    rows, positions = np.nonzero(keep_CT)
    corpus_N = shard.context_corpus_C[rows]
    return {
        "acts": acts_ND,
        "token_ids": shard.contexts_CT[rows, positions].astype(np.int32),
        "doc_ids": shard.doc_CT[rows, positions].astype(np.int64),
        "positions": positions.astype(np.int32),
        "context_index": rows.astype(np.int32),
        "domain": np.asarray(domain_codes, dtype=np.uint8)[corpus_N],
        "corpus": corpus_N.astype(np.uint8),
        "fold": shard.fold_CT[rows, positions].astype(np.uint8),
        "split": shard.context_split_C[rows].astype(np.uint8),
        "contexts": shard.contexts_CT.astype(np.int32),
        "context_corpus": shard.context_corpus_C.astype(np.uint8),
        "context_split": shard.context_split_C.astype(np.uint8),
    }


def harvest_shard(
    model: ModelConfig,
    layer: int,
    store_path: str,
    shard: PlannedShard,
    batch_size: int,
    domain_codes: list[int],
) -> int:
    """Compute and write one shard; return its number of token rows. One dask task."""
    # NOTE: with one worker, writes and forward passes take turns instead of
    # overlapping. On a 2-core CPU the harvest still reaches about 0.9 of the bare
    # forward pass (docs/benchmarks.md).
    loaded = get_worker_model(model)
    store = ActivationStore.open(store_path, require_complete=False)
    keep_CT = token_mask(shard, loaded.special_token_ids)
    with _FORWARD_LOCKS[_model_key(model)]:
        acts_ND = compute_shard_acts(
            loaded, layer, shard, keep_CT, batch_size, store.metadata.acts_dtype
        )
    arrays = shard_arrays(shard, acts_ND, keep_CT, domain_codes)
    store.write_shard(shard.index, arrays, statistics=shard_statistics(arrays, store.metadata))
    return int(keep_CT.sum())


# Scheduling


def _run_local(
    cfg: HarvestConfig,
    tasks: Iterator[Any],
    on_done: Callable[[int], None],
) -> None:
    """Compute delayed shard tasks on the local threaded scheduler, a window at a time."""
    window_size = SHARDS_IN_FLIGHT_PER_WORKER * cfg.num_workers
    window: list[Any] = []
    for task in tasks:
        window.append(task)
        if len(window) == window_size:
            for n_tokens in dask.compute(*window, scheduler="threads", num_workers=cfg.num_workers):
                on_done(n_tokens)
            window = []
    if window:
        for n_tokens in dask.compute(*window, scheduler="threads", num_workers=cfg.num_workers):
            on_done(n_tokens)


def _run_distributed(
    cfg: HarvestConfig,
    tasks: Iterator[Any],
    on_done: Callable[[int], None],
) -> None:
    """Compute delayed shard tasks on a dask.distributed cluster, a bounded window in flight."""
    from distributed import Client, as_completed

    assert cfg.scheduler_address is not None
    with Client(cfg.scheduler_address) as client:
        n_workers = max(1, len(client.scheduler_info()["workers"]))
        max_in_flight = SHARDS_IN_FLIGHT_PER_WORKER * n_workers
        logger.info(
            "Connected to dask scheduler %s with %d worker(s)", cfg.scheduler_address, n_workers
        )

        pending = as_completed()
        in_flight = 0
        try:
            for task in tasks:
                pending.add(client.compute(task))
                in_flight += 1
                if in_flight >= max_in_flight:
                    on_done(next(pending).result())
                    in_flight -= 1
            for future in pending:
                on_done(future.result())
        except BaseException:
            # Stop the rest: a failed shard fails the harvest, and a rerun resumes it.
            for future in list(pending.futures):
                future.cancel()
            raise


# Orchestration


def harvest_config_hash(cfg: HarvestConfig, layer: int, corpora: list[HarvestCorpus]) -> str:
    """Hash every setting that changes the stored content (not batch size or workers)."""
    content = {
        "model": cfg.model.name,
        "layer": layer,
        "dtype": cfg.model.dtype,
        "context_size": cfg.context_size,
        "shard_contexts": cfg.shard_contexts,
        "n_folds": cfg.n_folds,
        "fold_seed": cfg.fold_seed,
        "heldout_fraction": cfg.heldout_fraction,
        # The source kind matters, because a local file and its hub version can differ.
        # `local` is hashed as written, so relocating the data with KNOWSEP_DATA_DIR keeps the hash.
        "corpora": [
            {
                **dataclasses.asdict(corpus.spec),
                "source_kind": "local" if Path(corpus.source).exists() else "hub",
            }
            for corpus in corpora
        ],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _build_metadata(
    cfg: HarvestConfig,
    corpora: list[HarvestCorpus],
    tokenizer: Any,
    layer: int,
    d_model: int,
    n_layers: int,
) -> StoreMetadata:
    import transformers

    return StoreMetadata(
        model=cfg.model.name,
        layer=layer,
        d_model=d_model,
        acts_dtype=acts_dtype_for(cfg.model.dtype),
        context_size=cfg.context_size,
        n_folds=cfg.n_folds,
        fold_seed=cfg.fold_seed,
        heldout_fraction=cfg.heldout_fraction,
        corpora=[
            {"name": c.spec.name, "source": c.source, "domain": c.spec.domain, "kind": c.spec.kind}
            for c in corpora
        ],
        config_hash=harvest_config_hash(cfg, layer, corpora),
        bos_token_id=tokenizer.bos_token_id,
        special_token_ids=special_token_ids(tokenizer),
        extra={
            "n_layers": n_layers,
            "model_dtype": cfg.model.dtype,
            "eos_token_id": tokenizer.eos_token_id,
            "padding_token_id": padding_token_id(tokenizer),
            "shard_contexts": cfg.shard_contexts,
            "corpus_specs": [dataclasses.asdict(c.spec) for c in corpora],
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        },
    )


def _model_shape(cfg: HarvestConfig) -> tuple[int, int]:
    """Return (n_layers, d_model) from the model's config, without loading its weights."""
    from transformers import AutoConfig

    source = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
    text_config = AutoConfig.from_pretrained(source).get_text_config()
    return int(text_config.num_hidden_layers), int(text_config.hidden_size)


def shard_statistics(arrays: dict[str, np.ndarray], metadata: StoreMetadata) -> dict[str, Any]:
    """Summarize one shard for `finalize_store`: first non-finite row, train squared norms, counts."""
    acts_ND = acts_to_float32(arrays["acts"], metadata.acts_dtype)
    bad_rows = np.flatnonzero(~np.isfinite(acts_ND).all(axis=1))
    train_N = arrays["split"] == TRAIN_SPLIT
    domain_fold_counts = [
        np.bincount(arrays["fold"][arrays["domain"] == code], minlength=metadata.n_folds).tolist()
        for code in range(len(metadata.domains))
    ]
    return {
        "first_non_finite_row": int(bad_rows[0]) if len(bad_rows) else None,
        "n_non_finite_rows": int(len(bad_rows)),
        # float64 sums: a float32 sum over millions of squared norms near 1e4 loses digits.
        "train_sum_squares": float(np.square(acts_ND[train_N], dtype=np.float64).sum(dtype=np.float64)),
        "n_train": int(train_N.sum()),
        "domain_fold_counts": domain_fold_counts,
        "split_counts": np.bincount(arrays["split"], minlength=len(SPLITS)).tolist(),
        "corpus_counts": np.bincount(arrays["corpus"], minlength=len(metadata.corpora)).tolist(),
    }


def finalize_store(store: ActivationStore, n_planned: int) -> None:
    """Check every shard, compute ``norm_scale`` and token counts, and mark the store complete.

    Shards written by this harvest carry their statistics in their completion marker;
    a shard without them (an older harvest) is read again.
    """
    metadata = store.metadata
    infos = store.shards
    indices = [info.index for info in infos]
    if indices != list(range(n_planned)):
        missing = sorted(set(range(n_planned)) - set(indices))
        raise HarvestError(
            f"store {store.path} is missing shard(s) {missing[:10]} after the harvest; rerun it to resume"
        )

    corpus_names = [corpus["name"] for corpus in metadata.corpora]
    domain_counts = {
        domain: {str(fold): 0 for fold in range(metadata.n_folds)} for domain in metadata.domains
    }
    split_counts = dict.fromkeys(SPLITS, 0)
    corpus_counts = dict.fromkeys(corpus_names, 0)
    sum_squares = 0.0
    n_train = 0
    for info in infos:
        statistics = store.read_shard_statistics(info.index)
        if statistics is None:
            arrays = store.read_shard(info.index, ("acts", "domain", "fold", "split", "corpus"))
            statistics = shard_statistics(arrays, metadata)
        if statistics["first_non_finite_row"] is not None:
            raise StoreError(
                f"shard {info.index} of {store.path} has NaN or Inf activations in "
                f"{statistics['n_non_finite_rows']} row(s), first at row {statistics['first_non_finite_row']}; "
                "the model overflowed in its dtype: harvest again with model.dtype=float32"
            )
        sum_squares += statistics["train_sum_squares"]
        n_train += statistics["n_train"]
        for code, domain in enumerate(metadata.domains):
            for fold, count in enumerate(statistics["domain_fold_counts"][code]):
                domain_counts[domain][str(fold)] += int(count)
        for code, split in enumerate(SPLITS):
            split_counts[split] += int(statistics["split_counts"][code])
        for code, name in enumerate(corpus_names):
            corpus_counts[name] += int(statistics["corpus_counts"][code])

    if n_train == 0:
        raise HarvestError(
            f"store {store.path} has no train-split tokens, so norm_scale is undefined; harvest more documents or lower heldout_fraction"
        )
    mean_squared_norm = sum_squares / n_train
    norm_scale = math.sqrt(metadata.d_model / mean_squared_norm)
    store.finalize(
        norm_scale, {"domain": domain_counts, "split": split_counts, "corpus": corpus_counts}
    )


def run_harvest(cfg: HarvestConfig) -> ActivationStore:
    """Harvest the configured layer over every corpus into ``cfg.store``; resume an unfinished store."""
    cfg.validate()
    started = time.perf_counter()

    # An unusable device fails here, before the store is created.
    resolve_device(cfg.model.device)
    if cfg.scheduler_address is None:
        # Local shards run in this process, so the model they use also tokenizes:
        # Gemma's tokenizer takes about 3 s to load, and this loads it once.
        tokenizer = get_worker_model(cfg.model).tokenizer
    else:
        tokenizer = load_tokenizer(cfg.model.name, cache_dir=cfg.model.cache_dir)
    n_layers, d_model = _model_shape(cfg)
    layer = resolve_layer(cfg.model.layer, n_layers)
    corpora = resolve_corpora(cfg)
    domain_codes = [DOMAINS.index(corpus.spec.domain) for corpus in corpora]

    # Local files are read once before the store is created, so that a bad record in
    # the last corpus stops the run before the first shard rather than after hours.
    check_local_corpora(corpora)

    metadata = _build_metadata(cfg, corpora, tokenizer, layer, d_model, n_layers)
    store = create_store(cfg.store, metadata, overwrite=cfg.overwrite)
    if store.metadata.complete:
        logger.info(
            "Store %s is already complete (config hash %s); nothing to harvest",
            store.path,
            metadata.config_hash,
        )
        return store

    n_existing = len(store.shards)
    if n_existing:
        logger.info("Resuming harvest into %s: %d complete shard(s) found", store.path, n_existing)
    logger.info(
        "Harvesting %s layer %d (%s) over %s into %s",
        cfg.model.name,
        layer,
        cfg.model.dtype,
        ", ".join(c.spec.name for c in corpora),
        store.path,
    )

    counters = {"planned": 0, "skipped": 0, "computed": 0, "tokens": 0}
    progress = tqdm(desc="harvest", unit="tok", unit_scale=True, mininterval=1.0)

    def tasks() -> Iterator[Any]:
        for shard in iter_planned_shards(cfg, corpora, tokenizer):
            counters["planned"] += 1
            if store.is_complete(shard.index):
                counters["skipped"] += 1
                continue
            yield dask.delayed(harvest_shard, pure=False)(
                cfg.model, layer, str(store.path), shard, cfg.batch_size, domain_codes
            )

    def on_done(n_tokens: int) -> None:
        counters["computed"] += 1
        counters["tokens"] += n_tokens
        progress.update(n_tokens)

    try:
        if cfg.scheduler_address is None:
            _run_local(cfg, tasks(), on_done)
        else:
            _run_distributed(cfg, tasks(), on_done)
    finally:
        progress.close()

    if counters["skipped"]:
        logger.info("Skipped %d shard(s) completed by an earlier run", counters["skipped"])
    if counters["planned"] == 0:
        raise HarvestError(
            "the corpora produced no tokens: every document is empty after tokenization"
        )

    finalize_store(store, counters["planned"])
    elapsed = time.perf_counter() - started
    logger.info(
        "Harvest finished: %d shard(s) (%d computed now), %d tokens computed in %.1f s (%.0f tokens/s), norm_scale %.4g",
        counters["planned"],
        counters["computed"],
        counters["tokens"],
        elapsed,
        counters["tokens"] / max(elapsed, 1e-9),
        store.metadata.norm_scale,
    )
    return store
