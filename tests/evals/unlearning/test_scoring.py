"""Multiple-choice scoring against direct full-forward computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import BaseModelOutputWithPast

from evals.common import wilson_interval
from evals.unlearning.intervention import clamp_latents
from evals.unlearning.scoring import (
    PERMUTATIONS,
    MultipleChoiceScorer,
    ScoringError,
    cloze_prompt,
    letter_prompt,
)
from pipeline.data import MCQuestion
from tests.evals.unlearning.conftest import (
    BOS_ID,
    EOS_ID,
    FORGET_DIMS,
    FORGET_WORDS,
    LAYER,
    PAD_ID,
    RETAIN_WORDS,
    UNK_ID,
    VOCAB,
    build_model,
    build_tokenizer,
    choice_log_likelihood,
    identity_sae,
    make_questions,
    tiny_config_fields,
)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def family_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return build_model(request.param)


def mixed_length_questions() -> list[MCQuestion]:
    """Questions whose choices differ in length, so that batches need padding."""
    generator = np.random.default_rng(0)
    questions = []
    for index in range(5):
        words = FORGET_WORDS if index % 2 else RETAIN_WORDS
        question = " ".join(generator.choice(words, size=1 + index))
        choices = [" ".join(generator.choice(words, size=1 + (index + k) % 4)) for k in range(4)]
        questions.append(
            MCQuestion(
                doc_id=f"q:{index}",
                question=question,
                choices=choices,
                answer=index % 4,
                subject="test",
            )
        )
    return questions


@pytest.mark.parametrize("prompt_cache", [True, False])
def test_cloze_matches_full_forward(family_model: torch.nn.Module, prompt_cache: bool) -> None:
    tokenizer = build_tokenizer()
    questions = mixed_length_questions()
    scorer = MultipleChoiceScorer(
        family_model, tokenizer, "cloze", batch_size=8, prompt_cache=prompt_cache
    )
    scores = scorer.score(scorer.prepare(questions))

    for index, question in enumerate(questions):
        prompt_ids = [BOS_ID, *encode(tokenizer, cloze_prompt(question))]
        expected = [
            choice_log_likelihood(family_model, prompt_ids, encode(tokenizer, f" {choice}"))
            for choice in question.choices
        ]
        np.testing.assert_allclose(scores.scores_Q4[index], expected, atol=1e-4)
        order = np.argsort(expected)
        assert scores.correct_Q[index] == (
            order[-1] == question.answer and expected[order[-1]] > expected[order[-2]]
        )


def test_cloze_independent_of_batching() -> None:
    model = build_model("llama")
    tokenizer = build_tokenizer()
    questions = mixed_length_questions()
    one_by_one = MultipleChoiceScorer(model, tokenizer, "cloze", batch_size=1)
    batched = MultipleChoiceScorer(model, tokenizer, "cloze", batch_size=64, logit_chunk_size=3)

    separate = one_by_one.score(one_by_one.prepare(questions)).scores_Q4
    together = batched.score(batched.prepare(questions)).scores_Q4

    np.testing.assert_allclose(separate, together, atol=1e-5)


@torch.no_grad()
def direct_letter_log_probs(model, tokenizer, question: MCQuestion, order) -> np.ndarray:
    input_ids = torch.tensor([[BOS_ID, *encode(tokenizer, letter_prompt(question, order))]])
    log_probs = torch.log_softmax(model(input_ids=input_ids).logits[0, -1].double(), dim=-1)
    letter_ids = [encode(tokenizer, f" {letter}")[0] for letter in "ABCD"]
    return log_probs[letter_ids].numpy()


def test_letter_matches_direct_logits(family_model: torch.nn.Module) -> None:
    tokenizer = build_tokenizer()
    questions = mixed_length_questions()[:3]
    scorer = MultipleChoiceScorer(family_model, tokenizer, "letter")
    scores = scorer.score(scorer.prepare(questions))

    for index, question in enumerate(questions):
        expected = direct_letter_log_probs(family_model, tokenizer, question, (0, 1, 2, 3))
        np.testing.assert_allclose(scores.scores_Q4[index], expected, atol=1e-4)


def test_letter_permutation_filter() -> None:
    model = build_model("llama")
    tokenizer = build_tokenizer()
    questions = mixed_length_questions()[:2]
    scorer = MultipleChoiceScorer(model, tokenizer, "letter", batch_size=48)
    scores = scorer.score(scorer.prepare(questions, all_permutations=True))

    for index, question in enumerate(questions):
        margins = []
        for order in PERMUTATIONS:
            by_letter = direct_letter_log_probs(model, tokenizer, question, order)
            answer_letter = order.index(question.answer)
            margins.append(by_letter[answer_letter] - np.delete(by_letter, answer_letter).max())
        assert scores.correct_Q[index] == all(margin > 0 for margin in margins)
        assert scores.margin_Q[index] == pytest.approx(min(margins), abs=1e-4)


def test_lm_head_reads_each_shared_prefix_once() -> None:
    model = build_model("llama")
    tokenizer = build_tokenizer()
    questions = make_questions(model, FORGET_WORDS, 3, seed=1, subject="test")
    scorer = MultipleChoiceScorer(model, tokenizer, "cloze")
    prepared = scorer.prepare(questions)
    logsumexp_rows: list[int] = []
    target_rows: list[int] = []
    logsumexp, logits_at = scorer.head.logsumexp, scorer.head.logits_at

    def counting_logsumexp(hidden, **kwargs):
        logsumexp_rows.append(len(hidden))
        return logsumexp(hidden, **kwargs)

    def counting_logits_at(hidden, ids):
        target_rows.append(len(hidden))
        return logits_at(hidden, ids)

    scorer.head.logsumexp = counting_logsumexp  # type: ignore[method-assign]
    scorer.head.logits_at = counting_logits_at  # type: ignore[method-assign]

    scorer.score(prepared)

    # Every choice token is a target: 3 questions x 4 choices x 3 choice tokens. The
    # logsumexp runs once per distinct prefix of a question, which includes the prompt
    # shared by its four choices.
    distinct_prefixes = sum(
        len(
            {
                sequence[: position + 1]
                for sequence, start in zip(item.sequences, item.score_starts, strict=True)
                for position in range(start, len(sequence) - 1)
            }
        )
        for item in prepared
    )
    assert sum(target_rows) == 3 * 4 * 3
    assert sum(logsumexp_rows) == distinct_prefixes
    assert distinct_prefixes <= 3 * (1 + 4 * 2)


def long_prompt_questions(choice_words: int | None = None) -> list[MCQuestion]:
    """Questions whose prompts are longer than the tiny Gemma 3's sliding window of 8 tokens."""
    generator = np.random.default_rng(5)
    questions = []
    for index in range(6):
        words = FORGET_WORDS if index % 2 else RETAIN_WORDS
        question = " ".join(generator.choice(words, size=9 + 3 * index))
        sizes = [choice_words or 1 + (index + k) % 4 for k in range(4)]
        choices = [" ".join(generator.choice(words, size=size)) for size in sizes]
        questions.append(
            MCQuestion(
                doc_id=f"long:{index}", question=question, choices=choices, answer=0, subject="t"
            )
        )
    return questions


def hand_scores(model, tokenizer, questions: list[MCQuestion]) -> np.ndarray:
    return np.array(
        [
            [
                choice_log_likelihood(
                    model,
                    [BOS_ID, *encode(tokenizer, cloze_prompt(question))],
                    encode(tokenizer, f" {choice}"),
                )
                for choice in question.choices
            ]
            for question in questions
        ]
    )


def test_prompt_cache_under_clamp(family_model: torch.nn.Module) -> None:
    # The clamp changes the cached prompt states; both paths must see the same change.
    # Latents 0..3 of the identity SAE fire on forget tokens, so forget questions move.
    tokenizer = build_tokenizer()
    questions = long_prompt_questions()
    sae = identity_sae(norm_scale=1.0)
    cached = MultipleChoiceScorer(family_model, tokenizer, "cloze", batch_size=12)
    full = MultipleChoiceScorer(family_model, tokenizer, "cloze", batch_size=12, prompt_cache=False)
    prepared = cached.prepare(questions)
    unclamped_Q4 = cached.score(prepared).scores_Q4

    with clamp_latents(
        family_model,
        LAYER,
        sae,
        range(FORGET_DIMS),
        20.0,
        norm_scale=1.0,
        special_token_ids=[PAD_ID, BOS_ID, EOS_ID, UNK_ID],
    ):
        cached_Q4 = cached.score(prepared).scores_Q4
        full_Q4 = full.score(prepared).scores_Q4
        expected_Q4 = hand_scores(family_model, tokenizer, questions)

    np.testing.assert_allclose(cached_Q4, expected_Q4, atol=1e-4)
    np.testing.assert_allclose(full_Q4, expected_Q4, atol=1e-4)
    assert np.abs(cached_Q4 - unclamped_Q4)[1::2].max() > 0.1


def build_other_family(family: str) -> torch.nn.Module:
    """A random two-block model of another architecture, with a sliding window where it has one."""
    shared = tiny_config_fields()
    torch.manual_seed(0)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**shared, head_dim=8, sliding_window=8))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**shared, sliding_window=8))
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(VOCAB),
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=256,
                bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
            )
        )
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shared))
    return model.eval()


@pytest.mark.parametrize("family", ["gemma2", "mistral", "qwen2"])
def test_prompt_cache_other_families(family: str) -> None:
    model = build_other_family(family)
    tokenizer = build_tokenizer()
    questions = long_prompt_questions()
    scorer = MultipleChoiceScorer(
        model, tokenizer, "cloze", batch_size=12, logit_precision="float32"
    )

    scores_Q4 = scorer.score(scorer.prepare(questions)).scores_Q4

    np.testing.assert_allclose(scores_Q4, hand_scores(model, tokenizer, questions), atol=1e-5)


def test_one_token_choices_skip_choice_pass(family_model: torch.nn.Module) -> None:
    tokenizer = build_tokenizer()
    questions = long_prompt_questions(choice_words=1)
    scorer = MultipleChoiceScorer(family_model, tokenizer, "cloze", batch_size=64)
    calls: list[tuple[int, ...]] = []
    handle = scorer.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        scores_Q4 = scorer.score(scorer.prepare(questions)).scores_Q4
    finally:
        handle.remove()

    assert calls == [(len(questions), max(len(q.question.split()) for q in questions) + 3)]
    np.testing.assert_allclose(
        scores_Q4, hand_scores(family_model, tokenizer, questions), atol=1e-4
    )


class RecurrentLayerCache:
    """A cache like a hybrid model's: the class repeats, but one of its layers cannot."""

    layers = [object()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise AssertionError("the scorer must check the layers before repeating")


@pytest.mark.parametrize("cache", [None, RecurrentLayerCache()])
def test_unrepeatable_cache_falls_back(cache, caplog: pytest.LogCaptureFixture) -> None:
    model = build_model("llama")
    tokenizer = build_tokenizer()
    questions = long_prompt_questions()
    scorer = MultipleChoiceScorer(model, tokenizer, "cloze", logit_precision="float32")
    decoder = scorer.decoder

    def forward_with_cache(**kwargs):
        kwargs.pop("use_cache", None)
        hidden = decoder(**kwargs, use_cache=False).last_hidden_state
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)

    scorer.decoder = forward_with_cache  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="evals.unlearning.scoring"):
        scores_Q4 = scorer.score(scorer.prepare(questions)).scores_Q4

    assert not scorer.prompt_cache
    assert "full sequences" in caplog.text
    np.testing.assert_allclose(scores_Q4, hand_scores(model, tokenizer, questions), atol=1e-5)


def test_pad_outside_embedding_falls_back() -> None:
    model = build_model("llama")
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert tokenizer.pad_token_id == len(VOCAB)
    questions = mixed_length_questions()

    for prompt_cache in (True, False):
        scorer = MultipleChoiceScorer(
            model, tokenizer, "cloze", logit_precision="float32", prompt_cache=prompt_cache
        )
        scores_Q4 = scorer.score(scorer.prepare(questions)).scores_Q4

        assert scorer.pad_token_id == EOS_ID
        np.testing.assert_allclose(scores_Q4, hand_scores(model, tokenizer, questions), atol=1e-5)


def test_too_long_question_named() -> None:
    model = build_other_family("gpt2")
    tokenizer = build_tokenizer()
    question = MCQuestion(
        doc_id="long:0",
        question=" ".join(["f1"] * 300),
        choices=["f1", "f2", "f3", "f4"],
        answer=0,
        subject="t",
    )
    scorer = MultipleChoiceScorer(model, tokenizer, "cloze")

    with pytest.raises(
        ScoringError, match="long:0, has 304 tokens, while the model has 256 positions"
    ):
        scorer.score(scorer.prepare([question]))


def test_empty_choice_rejected() -> None:
    scorer = MultipleChoiceScorer(build_model("llama"), build_tokenizer(), "cloze")
    question = MCQuestion(
        doc_id="bad:7", question="f1", choices=["f1", "", "f2", "f3"], answer=0, subject="x"
    )

    with pytest.raises(ScoringError, match="bad:7"):
        scorer.prepare([question])


def test_invalid_mode_rejected() -> None:
    with pytest.raises(ScoringError, match="invalid scoring mode"):
        MultipleChoiceScorer(build_model("llama"), build_tokenizer(), "logits")  # type: ignore[arg-type]


def test_wilson_interval_values() -> None:
    assert wilson_interval(0, 0) == (None, None)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
