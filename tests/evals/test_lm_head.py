"""The block LM head against a full-vocabulary float64 log-softmax."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from evals.lm_head import LMHead, LMHeadError


class HeadOnly(nn.Module):
    """The part of a causal LM that LMHead reads: an output embedding and a config."""

    def __init__(
        self,
        vocab: int,
        d_model: int,
        *,
        bias: bool = False,
        softcap: float | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.head = nn.Linear(d_model, vocab, bias=bias)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(vocab, d_model, generator=generator) * scale)
            if bias:
                self.head.bias.copy_(torch.randn(vocab, generator=generator))
        text_config = SimpleNamespace(final_logit_softcapping=softcap)
        self.config = SimpleNamespace(get_text_config=lambda: text_config)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def reference_log_probs(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        logits_NV = hidden_ND.double() @ self.head.weight.double().T
        if self.head.bias is not None:
            logits_NV = logits_NV + self.head.bias.double()
        softcap = self.config.get_text_config().final_logit_softcapping
        if softcap:
            logits_NV = torch.tanh(logits_NV / softcap) * softcap
        return torch.log_softmax(logits_NV, dim=-1)


def hidden(n: int, d_model: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_float32_matches_full_log_softmax(bias: bool, softcap: float | None) -> None:
    model = HeadOnly(1000, 16, bias=bias, softcap=softcap)
    hidden_ND = hidden(9, 16)
    targets_N = torch.arange(9) * 97
    # A block size that does not divide the vocabulary exercises the last, short block.
    head = LMHead(model, "float32", vocab_block=333)

    expected_N = model.reference_log_probs(hidden_ND).gather(1, targets_N[:, None])[:, 0]

    torch.testing.assert_close(
        head.target_log_probs(hidden_ND, targets_N, chunk_size=4), expected_N, atol=1e-5, rtol=0
    )


def test_mixed_exact_with_full_recompute() -> None:
    model = HeadOnly(200, 16, softcap=5.0)
    hidden_ND = hidden(5, 16)
    head = LMHead(model, "mixed", vocab_block=64, exact_top_k=200)

    expected_N = torch.logsumexp(_reference_logits(model, hidden_ND), dim=-1)

    torch.testing.assert_close(head.logsumexp(hidden_ND), expected_N, atol=1e-5, rtol=0)


def _reference_logits(model: HeadOnly, hidden_ND: torch.Tensor) -> torch.Tensor:
    logits_NV = hidden_ND.double() @ model.head.weight.double().T
    softcap = model.config.get_text_config().final_logit_softcapping
    return torch.tanh(logits_NV / softcap) * softcap if softcap else logits_NV


def mixed_and_plain_bf16_errors(scale: float) -> tuple[float, float]:
    """Largest logsumexp errors of the mixed head and of a plain bfloat16 logsumexp."""
    vocab, d_model = 50_000, 64
    model = HeadOnly(vocab, d_model, scale=scale)
    hidden_ND = hidden(32, d_model)
    expected_N = torch.logsumexp(_reference_logits(model, hidden_ND), dim=-1)

    with torch.no_grad():
        mixed_N = LMHead(model, "mixed", vocab_block=8192).logsumexp(hidden_ND)
        plain_N = torch.logsumexp(
            (hidden_ND.bfloat16() @ model.head.weight.bfloat16().T).double(), dim=-1
        )
    return (mixed_N - expected_N).abs().max().item(), (plain_N - expected_N).abs().max().item()


def test_mixed_error_small_on_flat_distributions() -> None:
    # Small logits: no token dominates, and the rounding errors of many tokens cancel.
    mixed_error, _ = mixed_and_plain_bf16_errors(scale=0.05)

    assert mixed_error < 1e-3


def test_mixed_recomputes_the_dominant_logits() -> None:
    # Large logits: a few tokens hold most of the mass, so their bfloat16 rounding
    # would carry straight into the logsumexp without the float32 recomputation.
    mixed_error, plain_error = mixed_and_plain_bf16_errors(scale=0.5)

    assert mixed_error < 5e-3
    assert mixed_error < plain_error / 5


def test_bfloat16_model_weights() -> None:
    model = HeadOnly(3000, 32).to(torch.bfloat16)
    hidden_ND = hidden(6, 32).bfloat16()
    targets_N = torch.tensor([0, 5, 17, 2999, 1234, 42])
    expected_N = model.reference_log_probs(hidden_ND).gather(1, targets_N[:, None])[:, 0]

    for precision in ("float32", "mixed"):
        result_N = LMHead(model, precision, vocab_block=1000).target_log_probs(hidden_ND, targets_N)
        assert result_N.dtype == torch.float64
        torch.testing.assert_close(result_N, expected_N, atol=5e-3, rtol=0)


def test_empty_input() -> None:
    head = LMHead(HeadOnly(100, 8), "mixed")

    assert head.target_log_probs(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_invalid_settings_rejected() -> None:
    model = HeadOnly(100, 8)
    with pytest.raises(LMHeadError, match="'half'"):
        LMHead(model, "half")  # type: ignore[arg-type]
    with pytest.raises(LMHeadError, match="vocab_block 0"):
        LMHead(model, vocab_block=0)

    no_head = HeadOnly(100, 8)
    no_head.get_output_embeddings = lambda: nn.Identity()  # type: ignore[method-assign]
    with pytest.raises(LMHeadError, match="Identity"):
        LMHead(no_head)
