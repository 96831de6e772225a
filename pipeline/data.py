"""Stream text corpora and multiple-choice question sets from local files or the hub.

A source is a local ``.jsonl`` / ``.parquet`` file or a Hugging Face dataset name
(streamed with ``datasets``). Records are yielded lazily, so a corpus is never held in
memory. Every record carries a stable ``doc_id``: ``<file stem>:<line number>`` (1-based)
for JSONL, ``<file stem>:<row>`` (0-based) for Parquet and ``<dataset name>:<index>``
(0-based) for hub datasets.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

DATA_DIR_ENV_VAR = "KNOWSEP_DATA_DIR"
DEFAULT_DATA_PREFIX = "../shared/data"
LOCAL_SUFFIXES = (".jsonl", ".parquet")
CHOICE_LETTERS = "ABCD"
N_CHOICES = 4


class DataError(ValueError):
    """A corpus that is missing, malformed or empty."""


@dataclass(frozen=True)
class TextDoc:
    """One document of a text corpus."""

    doc_id: str
    text: str


@dataclass(frozen=True)
class MCQuestion:
    """One four-choice question; ``answer`` is the index (0-3) of the correct choice."""

    doc_id: str
    question: str
    choices: list[str]
    answer: int
    subject: str


@dataclass
class CorpusSpec:
    """A corpus to harvest, read from a local file when present, else from the hub.

    Attributes:
        name: Short unique name, stored in the activation store (e.g. ``wikitext``).
        kind: ``text`` (documents) or ``mcq`` (questions, harvested as question plus
            lettered choices).
        domain: ``forget`` (knowledge to separate out) or ``retain`` (general knowledge).
        local: Path of a local ``.jsonl`` / ``.parquet`` file, relative to the current
            directory. A leading ``../shared/data`` is replaced by ``$KNOWSEP_DATA_DIR``
            when that variable is set.
        hub: Hugging Face dataset name used when the local file is missing, or None.
        hub_config: Dataset config name on the hub (e.g. ``wikitext-2-raw-v1``), or None.
        hub_split: Dataset split read from the hub (and from Parquet directories).
        text_field: Record field holding the text of a ``text`` corpus.
        max_docs: Maximum number of documents (or questions) read; None reads all.
        max_tokens: Maximum number of document tokens harvested; None harvests all.
        required: When False, a corpus with neither a local file nor a hub name is
            skipped with a warning instead of raising an error.
    """

    name: str
    kind: Literal["text", "mcq"] = "text"
    domain: Literal["forget", "retain"] = "retain"
    local: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str = "test"
    text_field: str = "text"
    max_docs: int | None = None
    max_tokens: int | None = None
    required: bool = True


def default_corpora() -> list[CorpusSpec]:
    """Return the default corpora: WMDP-bio and OpenStax Microbiology (forget), WikiText-2 (retain)."""
    return [
        CorpusSpec(
            name="wmdp-bio",
            kind="mcq",
            domain="forget",
            local=f"{DEFAULT_DATA_PREFIX}/wmdp-bio/wmdp_bio.jsonl",
            hub="cais/wmdp",
            hub_config="wmdp-bio",
            hub_split="test",
        ),
        CorpusSpec(
            name="openstax-microbiology",
            kind="text",
            domain="forget",
            local=f"{DEFAULT_DATA_PREFIX}/openstax-microbiology/openstax_microbiology.jsonl",
            required=False,
        ),
        CorpusSpec(
            name="wikitext-2",
            kind="text",
            domain="retain",
            local=f"{DEFAULT_DATA_PREFIX}/wikitext-2-raw/wikitext2_raw_test.jsonl",
            hub="Salesforce/wikitext",
            hub_config="wikitext-2-raw-v1",
            hub_split="test",
        ),
    ]


def resolve_local_path(local: str) -> Path:
    """Apply ``$KNOWSEP_DATA_DIR`` to a path that starts with ``../shared/data``."""
    data_dir = os.environ.get(DATA_DIR_ENV_VAR)
    if data_dir and (local == DEFAULT_DATA_PREFIX or local.startswith(DEFAULT_DATA_PREFIX + "/")):
        return Path(data_dir) / local[len(DEFAULT_DATA_PREFIX) :].lstrip("/")
    return Path(local)


def resolve_source(spec: CorpusSpec) -> str | None:
    """Return the corpus's local path when it exists, else its hub name.

    Returns None (with a warning) for an optional corpus that has neither.
    """
    local = resolve_local_path(spec.local) if spec.local else None
    if local is not None and local.exists():
        logger.info("Corpus %s: reading local file %s", spec.name, local)
        return str(local)
    if spec.hub:
        logger.info("Corpus %s: %s not found, streaming hub dataset %s", spec.name, local, spec.hub)
        return spec.hub

    message = (
        f"corpus {spec.name!r}: local file {local} not found and no hub dataset is set. "
        f"Set {DATA_DIR_ENV_VAR} to the data directory, fix `local`, or set `hub`"
    )
    if spec.required:
        raise DataError(message)
    logger.warning("%s; skipping this optional corpus", message)
    return None


def is_local_source(source: str) -> bool:
    """Return whether ``source`` names a local file rather than a hub dataset."""
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists()


def _iter_raw_records(
    source: str,
    *,
    split: str,
    hub_config: str | None,
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield ``(doc_id, location, record)`` for every record; ``location`` is used in errors."""
    if not is_local_source(source):
        yield from _iter_hub(source, split=split, hub_config=hub_config)
        return

    path = Path(source)
    if not path.is_file():
        raise DataError(
            f"corpus file not found: {path}. Check the path, or set {DATA_DIR_ENV_VAR} to the data directory"
        )
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(
            f"unsupported corpus file {path}: use a .jsonl or .parquet file, or a hub dataset name"
        )


def _iter_jsonl(path: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"malformed JSON in {location}: {error.msg}") from error
            if not isinstance(record, dict):
                raise DataError(
                    f"malformed record in {location}: expected a JSON object, got {type(record).__name__}"
                )
            yield f"{path.stem}:{line_number}", location, record


def _iter_parquet(path: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path.stem}:{row}", f"{path}, row {row}", record
            row += 1


def _iter_hub(
    source: str, *, split: str, hub_config: str | None
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, hub_config, split=split, streaming=True)
    except Exception as error:
        # `datasets` raises many unrelated types (FileNotFoundError, ConnectionError,
        # DatasetNotFoundError, ValueError for a bad split), so all of them are reported alike.
        raise DataError(
            f"cannot stream hub dataset {source!r} (config {hub_config!r}, split {split!r}): {error}. "
            f"Use a local .jsonl file instead, or check the name, config and split"
        ) from error
    for index, record in enumerate(dataset):
        yield f"{source}:{index}", f"{source}, record {index}", record


def _raise_if_empty(count: int, source: str, record_kind: str) -> None:
    if count == 0:
        raise DataError(
            f"corpus {source} yielded no {record_kind}: it is empty, or the filters removed every record"
        )


def load_text_corpus(
    source: str,
    *,
    text_field: str = "text",
    split: str = "test",
    hub_config: str | None = None,
    max_docs: int | None = None,
) -> Iterator[TextDoc]:
    """Yield the documents of a text corpus lazily; raise `DataError` on bad input."""
    count = 0
    if max_docs is not None and max_docs <= 0:
        raise DataError(
            f"invalid max_docs {max_docs}: use a positive number, or None for all documents"
        )
    for doc_id, location, record in _iter_raw_records(source, split=split, hub_config=hub_config):
        if text_field not in record:
            raise DataError(
                f"record in {location} has no field {text_field!r}; its fields are {sorted(record)}. Set text_field to the right one"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"field {text_field!r} in {location} is {type(text).__name__}, expected a string"
            )
        yield TextDoc(doc_id=doc_id, text=text)
        count += 1
        if max_docs is not None and count >= max_docs:
            return
    _raise_if_empty(count, source, "documents")


def _parse_mcq(
    doc_id: str, location: str, record: dict[str, Any], default_subject: str
) -> MCQuestion:
    for name in ("question", "choices", "answer"):
        if name not in record:
            raise DataError(
                f"question in {location} has no field {name!r}; expected question, choices, answer"
            )

    question = record["question"]
    if not isinstance(question, str):
        raise DataError(
            f"question in {location} has question {question!r} of type {type(question).__name__}; "
            "expected a string"
        )

    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) != N_CHOICES:
        count = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise DataError(
            f"question in {location} has {count} choices; expected a list of exactly {N_CHOICES} strings"
        )
    for index, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise DataError(
                f"question in {location} has choice {index} {choice!r} of type "
                f"{type(choice).__name__}; expected a string"
            )

    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < N_CHOICES:
        raise DataError(
            f"question in {location} has answer {answer!r}; expected an integer 0..{N_CHOICES - 1}"
        )

    subject = record.get("subject") or default_subject
    return MCQuestion(
        doc_id=doc_id,
        question=question,
        choices=list(choices),
        answer=answer,
        subject=str(subject),
    )


def load_mcq(
    source: str,
    *,
    split: str = "test",
    hub_config: str | None = None,
    max_questions: int | None = None,
    subjects: Iterable[str] | None = None,
) -> Iterator[MCQuestion]:
    """Yield four-choice questions lazily, optionally only those of ``subjects``.

    A record without a ``subject`` gets the hub config name, else the file stem or
    dataset name.
    """
    if max_questions is not None and max_questions <= 0:
        raise DataError(
            f"invalid max_questions {max_questions}: use a positive number, or None for all questions"
        )
    subject_filter = set(subjects) if subjects is not None else None
    default_subject = hub_config or (Path(source).stem if is_local_source(source) else source)

    count = 0
    for doc_id, location, record in _iter_raw_records(source, split=split, hub_config=hub_config):
        question = _parse_mcq(doc_id, location, record, default_subject)
        if subject_filter is not None and question.subject not in subject_filter:
            continue
        yield question
        count += 1
        if max_questions is not None and count >= max_questions:
            return
    record_kind = "questions"
    if subject_filter is not None:
        record_kind = f"questions of subjects {sorted(subject_filter)}"
    _raise_if_empty(count, source, record_kind)


def mcq_as_text(question: MCQuestion) -> str:
    """Format a question and its lettered choices (``A. ...``) as one text."""
    lines = [question.question]
    for letter, choice in zip(CHOICE_LETTERS, question.choices, strict=True):
        lines.append(f"{letter}. {choice}")
    return "\n".join(lines)


def iter_corpus_texts(spec: CorpusSpec, source: str) -> Iterator[TextDoc]:
    """Yield a corpus's documents as text; questions become `mcq_as_text`."""
    if spec.kind == "mcq":
        for question in load_mcq(
            source, split=spec.hub_split, hub_config=spec.hub_config, max_questions=spec.max_docs
        ):
            yield TextDoc(doc_id=question.doc_id, text=mcq_as_text(question))
    elif spec.kind == "text":
        yield from load_text_corpus(
            source,
            text_field=spec.text_field,
            split=spec.hub_split,
            hub_config=spec.hub_config,
            max_docs=spec.max_docs,
        )
    else:
        raise DataError(f"corpus {spec.name!r} has invalid kind {spec.kind!r}: use text or mcq")


__all__ = [
    "CorpusSpec",
    "DataError",
    "MCQuestion",
    "TextDoc",
    "default_corpora",
    "is_local_source",
    "iter_corpus_texts",
    "load_mcq",
    "load_text_corpus",
    "mcq_as_text",
    "resolve_local_path",
    "resolve_source",
]
