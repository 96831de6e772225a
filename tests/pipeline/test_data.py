"""Corpus loading: local JSONL and Parquet, source resolution and input errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import (
    CorpusSpec,
    DataError,
    MCQuestion,
    TextDoc,
    default_corpora,
    iter_corpus_texts,
    load_mcq,
    load_text_corpus,
    mcq_as_text,
    resolve_local_path,
    resolve_source,
)
from tests.pipeline.conftest import write_jsonl


def mcq_record(
    question: str = "Which?", answer: int = 1, subject: str = "bio", n_choices: int = 4
) -> dict:
    return {
        "question": question,
        "choices": [f"c{i}" for i in range(n_choices)],
        "answer": answer,
        "subject": subject,
    }


def test_text_corpus_doc_ids(tmp_path: Path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "third line", "title": "t"}\n', encoding="utf-8")
    docs = list(load_text_corpus(str(path)))
    assert docs == [TextDoc("notes:1", "first"), TextDoc("notes:3", "third line")]


def test_text_corpus_is_lazy(tmp_path: Path):
    # A malformed line after max_docs is never read.
    path = tmp_path / "lazy.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n', encoding="utf-8")
    assert [doc.text for doc in load_text_corpus(str(path), max_docs=2)] == ["a", "b"]
    stream = load_text_corpus(str(path))
    assert next(stream).text == "a"


def test_text_corpus_other_field(tmp_path: Path):
    path = write_jsonl(tmp_path / "body.jsonl", [{"body": "x"}])
    assert [doc.text for doc in load_text_corpus(str(path), text_field="body")] == ["x"]


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match=r"corpus file not found: .*absent\.jsonl"):
        list(load_text_corpus(str(missing)))


def test_malformed_line_number(tmp_path: Path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl, line 3"):
        list(load_text_corpus(str(path)))


def test_non_object_line(tmp_path: Path):
    path = tmp_path / "list.jsonl"
    path.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl, line 1: expected a JSON object, got list"):
        list(load_text_corpus(str(path)))


def test_missing_text_field(tmp_path: Path):
    path = write_jsonl(tmp_path / "fields.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(
        DataError, match=r"fields\.jsonl, line 2 has no field 'text'; its fields are \['body'\]"
    ):
        list(load_text_corpus(str(path)))


def test_empty_corpus(tmp_path: Path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"corpus .*empty\.jsonl yielded no documents"):
        list(load_text_corpus(str(path)))


def test_empty_after_subject_filter(tmp_path: Path):
    path = write_jsonl(tmp_path / "q.jsonl", [mcq_record(subject="bio")])
    with pytest.raises(DataError, match=r"yielded no questions of subjects \['law'\]"):
        list(load_mcq(str(path), subjects=["law"]))


def test_mcq_records(tmp_path: Path):
    path = write_jsonl(
        tmp_path / "quiz.jsonl",
        [
            mcq_record("Q1", 0, "bio"),
            mcq_record("Q2", 3, "law"),
            {"question": "Q3", "choices": ["a", "b", "c", "d"], "answer": 2},
        ],
    )
    questions = list(load_mcq(str(path)))
    assert questions[0] == MCQuestion("quiz:1", "Q1", ["c0", "c1", "c2", "c3"], 0, "bio")
    assert questions[2].subject == "quiz"
    assert [q.question for q in load_mcq(str(path), subjects=["law"])] == ["Q2"]
    assert [q.question for q in load_mcq(str(path), max_questions=1)] == ["Q1"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            mcq_record(n_choices=3),
            r"bad\.jsonl, line 2 has 3 choices; expected a list of exactly 4",
        ),
        (mcq_record(n_choices=5), r"bad\.jsonl, line 2 has 5 choices"),
        (mcq_record(answer=4), r"bad\.jsonl, line 2 has answer 4; expected an integer 0\.\.3"),
        (mcq_record(answer=-1), r"has answer -1"),
        ({**mcq_record(), "answer": "B"}, r"has answer 'B'"),
        ({"question": "Q", "answer": 0}, r"line 2 has no field 'choices'"),
        ({**mcq_record(), "question": None}, r"line 2 has question None of type NoneType"),
        (
            {**mcq_record(), "choices": ["a", 2, "c", "d"]},
            r"line 2 has choice 1 2 of type int; expected a string",
        ),
    ],
)
def test_bad_mcq(tmp_path: Path, record: dict, message: str):
    path = write_jsonl(tmp_path / "bad.jsonl", [mcq_record(), record])
    with pytest.raises(DataError, match=message):
        list(load_mcq(str(path)))


def test_mcq_as_text():
    question = MCQuestion("q:1", "What is it?", ["alpha", "beta", "gamma", "delta"], 2, "bio")
    assert mcq_as_text(question) == "What is it?\nA. alpha\nB. beta\nC. gamma\nD. delta"


def test_parquet_corpus(tmp_path: Path):
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "n": [1, 2]}), path)
    assert list(load_text_corpus(str(path))) == [
        TextDoc("table:0", "one"),
        TextDoc("table:1", "two"),
    ]
    quiz = tmp_path / "quiz.parquet"
    pq.write_table(
        pa.table({"question": ["Q"], "choices": [["a", "b", "c", "d"]], "answer": [3]}), quiz
    )
    assert list(load_mcq(str(quiz))) == [MCQuestion("quiz:0", "Q", ["a", "b", "c", "d"], 3, "quiz")]


def test_corpus_texts_from_mcq(tmp_path: Path):
    path = write_jsonl(tmp_path / "q.jsonl", [mcq_record("Q1"), mcq_record("Q2")])
    spec = CorpusSpec(name="quiz", kind="mcq", domain="forget", local=str(path), max_docs=1)
    docs = list(iter_corpus_texts(spec, str(path)))
    assert docs == [TextDoc("q:1", "Q1\nA. c0\nB. c1\nC. c2\nD. c3")]


def test_resolve_source_prefers_local(tmp_path: Path, caplog):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}])
    spec = CorpusSpec(name="c", local=str(path), hub="org/c")
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        assert resolve_source(spec) == str(path)
    assert "reading local file" in caplog.text
    missing = CorpusSpec(name="c", local=str(tmp_path / "nope.jsonl"), hub="org/c")
    assert resolve_source(missing) == "org/c"


def test_resolve_source_missing(tmp_path: Path, caplog):
    required = CorpusSpec(name="needed", local=str(tmp_path / "nope.jsonl"))
    with pytest.raises(
        DataError,
        match=r"corpus 'needed': local file .*nope\.jsonl not found and no hub dataset is set",
    ):
        resolve_source(required)
    optional = CorpusSpec(name="extra", local=str(tmp_path / "nope.jsonl"), required=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert resolve_source(optional) is None
    assert "skipping this optional corpus" in caplog.text


def test_data_dir_env_var(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KNOWSEP_DATA_DIR", str(tmp_path))
    assert (
        resolve_local_path("../shared/data/wmdp-bio/wmdp_bio.jsonl")
        == tmp_path / "wmdp-bio/wmdp_bio.jsonl"
    )
    assert resolve_local_path("other/file.jsonl") == Path("other/file.jsonl")
    monkeypatch.delenv("KNOWSEP_DATA_DIR")
    assert resolve_local_path("../shared/data/x.jsonl") == Path("../shared/data/x.jsonl")


def test_default_corpora():
    specs = {spec.name: spec for spec in default_corpora()}
    assert sorted(specs) == ["openstax-microbiology", "wikitext-2", "wmdp-bio"]
    assert (specs["wmdp-bio"].kind, specs["wmdp-bio"].domain, specs["wmdp-bio"].hub_config) == (
        "mcq",
        "forget",
        "wmdp-bio",
    )
    assert specs["openstax-microbiology"].required is False
    assert specs["wikitext-2"].domain == "retain"
    assert specs["wikitext-2"].hub == "Salesforce/wikitext"
