"""Log-probabilities of chosen next tokens, with the LM head computed in vocabulary blocks.

A log-probability needs the logsumexp over the whole vocabulary at its position. With
Gemma's 262,144-token vocabulary, the unembedding of one position takes more
multiply-adds than the rest of Gemma 3 270M spends on one token (168M against an
estimated 100M), so the evals that score choices or held-out text compute it here:

- The logsumexp runs over vocabulary blocks with a running maximum and sum, so memory
  stays at ``positions x vocab_block`` and the unembedding matrix is read once per call
  rather than once per small chunk of positions.
- ``precision="float32"`` computes every logit in float32.
- ``precision="mixed"`` (the default) computes the logits for the logsumexp in
  bfloat16, which runs about three times faster on CPUs with AVX-512 BF16 and on GPUs,
  then replaces the ``exact_top_k`` largest logits of each position by their float32
  values. Those carry most of the probability mass, and the errors of the rest are
  small and of both signs, so they mostly cancel in the sum. The target token's logit
  is always computed in float32. docs/benchmarks.md gives the measured difference from
  ``float32`` on the embedded model.

Gemma's final logit soft-capping is applied when the model config sets it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

LogitPrecision = Literal["float32", "mixed"]
LOGIT_PRECISIONS = ("float32", "mixed")


class LMHeadError(ValueError):
    """An LM head or setting that the block computation cannot handle."""


class LMHead:
    """A causal LM's unembedding, for logsumexps and target logits at selected positions.

    Args:
        model: A Hugging Face causal LM; its ``get_output_embeddings()`` must be a linear layer.
        precision: ``mixed`` or ``float32`` (see the module docstring).
        vocab_block: Vocabulary rows per block of the logsumexp.
        exact_top_k: In ``mixed`` precision, the largest logits per position that are
            recomputed in float32.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        precision: LogitPrecision = "mixed",
        *,
        vocab_block: int = 16_384,
        exact_top_k: int = 32,
    ) -> None:
        if precision not in LOGIT_PRECISIONS:
            raise LMHeadError(f"invalid logit precision {precision!r}: choose 'mixed' or 'float32'")
        if vocab_block < 1 or exact_top_k < 1:
            raise LMHeadError(
                f"invalid vocab_block {vocab_block} or exact_top_k {exact_top_k}: both must be positive"
            )
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise LMHeadError(
                f"{type(model).__name__}.get_output_embeddings() is {type(head).__name__}, "
                "not a linear layer with a [vocabulary, d_model] weight"
            )
        self.weight_VD = weight.detach()
        bias = getattr(head, "bias", None)
        self.bias_V = bias.detach() if isinstance(bias, torch.Tensor) else None
        softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.softcap: float | None = float(softcap) if softcap else None
        self.precision = precision
        self.vocab_block = vocab_block
        self.exact_top_k = min(exact_top_k, self.weight_VD.shape[0])

        # One bfloat16 copy of the unembedding for the mixed logsumexp, unless the model
        # already runs in bfloat16 (then it is the weight itself).
        self._block_weight_VD = (
            self.weight_VD.to(torch.bfloat16) if precision == "mixed" else self.weight_VD
        )

    @property
    def vocab_size(self) -> int:
        return int(self.weight_VD.shape[0])

    def _finish(self, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Add the bias and apply the soft-capping, in float32."""
        logits = logits.float()
        if bias is not None:
            logits = logits + bias.float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits_at(self, hidden_ND: torch.Tensor, token_ids_N: torch.Tensor) -> torch.Tensor:
        """Return the float32 logit of ``token_ids_N[n]`` at hidden state ``hidden_ND[n]``."""
        return self._exact_logits(hidden_ND, token_ids_N[:, None])[:, 0]

    def _exact_logits(self, hidden_ND: torch.Tensor, token_ids_NK: torch.Tensor) -> torch.Tensor:
        """Return the float32 logits of ``token_ids_NK[n]`` at hidden state ``hidden_ND[n]``."""
        rows_NKD = self.weight_VD[token_ids_NK].float()
        logits_NK = torch.einsum("nd,nkd->nk", hidden_ND.float(), rows_NKD)
        bias_NK = None if self.bias_V is None else self.bias_V[token_ids_NK]
        return self._finish(logits_NK, bias_NK)

    def logsumexp(self, hidden_ND: torch.Tensor, *, chunk_size: int = 512) -> torch.Tensor:
        """Return the logsumexp of the logits over the whole vocabulary, per position (float64).

        Each pass over the vocabulary takes ``chunk_size`` positions, which bounds memory
        at about three ``chunk_size x vocab_block`` float32 arrays.
        """
        if hidden_ND.shape[0] <= chunk_size:
            return self._logsumexp_pass(hidden_ND)
        return torch.cat(
            [
                self._logsumexp_pass(hidden_ND[start : start + chunk_size])
                for start in range(0, hidden_ND.shape[0], chunk_size)
            ]
        )

    def _logsumexp_pass(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        """Return the logsumexp per position from one pass over the vocabulary blocks."""
        n = hidden_ND.shape[0]
        device = hidden_ND.device
        if n == 0:
            return torch.zeros(0, dtype=torch.float64, device=device)
        mixed = self.precision == "mixed"
        block_hidden_ND = hidden_ND.to(self._block_weight_VD.dtype)
        if not mixed:
            block_hidden_ND = block_hidden_ND.float()

        lse_N = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
        top_values_NK = torch.empty(n, 0, dtype=torch.float32, device=device)
        top_ids_NK = torch.empty(n, 0, dtype=torch.long, device=device)
        for start in range(0, self.vocab_size, self.vocab_block):
            weight_BD = self._block_weight_VD[start : start + self.vocab_block]
            if not mixed:
                weight_BD = weight_BD.float()
            bias_B = None if self.bias_V is None else self.bias_V[start : start + self.vocab_block]
            logits_NB = self._finish(block_hidden_ND @ weight_BD.T, bias_B)

            # Each block's float32 logsumexp joins the running one in float64.
            lse_N = torch.logaddexp(lse_N, torch.logsumexp(logits_NB, dim=1).double())

            if mixed:
                k = min(self.exact_top_k, logits_NB.shape[1])
                block_values_NK, block_ids_NK = logits_NB.topk(k, dim=1)
                values_NK = torch.cat([top_values_NK, block_values_NK], dim=1)
                ids_NK = torch.cat([top_ids_NK, block_ids_NK + start], dim=1)
                keep = min(self.exact_top_k, values_NK.shape[1])
                top_values_NK, order_NK = values_NK.topk(keep, dim=1)
                top_ids_NK = ids_NK.gather(1, order_NK)

        if not mixed:
            return lse_N

        # Swap the bfloat16 terms of the largest logits for their float32 values, as
        # float64 fractions of the total. The result keeps the total's float32
        # accuracy even when those terms make up almost all of it.
        exact_NK = self._exact_logits(hidden_ND, top_ids_NK).double()
        approx_share_N = torch.exp(top_values_NK.double() - lse_N[:, None]).sum(dim=1)
        exact_share_N = torch.exp(exact_NK - lse_N[:, None]).sum(dim=1)
        return lse_N + torch.log1p(exact_share_N - approx_share_N)

    def target_log_probs(
        self, hidden_ND: torch.Tensor, targets_N: torch.Tensor, *, chunk_size: int = 512
    ) -> torch.Tensor:
        """Return ``log p(targets_N[n])`` at each hidden state (float64)."""
        lse_N = self.logsumexp(hidden_ND, chunk_size=chunk_size)
        return self.logits_at(hidden_ND, targets_N).double() - lse_N
