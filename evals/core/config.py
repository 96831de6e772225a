"""Config of the core eval."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CoreEvalConfig:
    """Core eval: reconstruction, sparsity and next-token loss with the SAE spliced in.

    Attributes:
        sae_path: Directory of a saved SAE (``sae_config.json`` and ``sae.safetensors``),
            e.g. ``runs/<run>/sae``.
        store: Activation store the SAE was trained on. None reads it from the SAE's
            metadata (key ``store``).
        n_eval_tokens: Held-out tokens (split 1 of the store) sampled for the
            reconstruction and sparsity metrics; all of them when the store has fewer.
        n_eval_contexts: Held-out contexts (``context_split`` 1) run through the model for
            the CE loss and KL metrics; all of them when the store has fewer.
        batch_size: Tokens per SAE forward pass for the reconstruction metrics.
        context_batch_size: Contexts per model forward pass for CE loss and KL.
        logit_chunk_size: Positions per chunk when logits and their log-softmax are
            computed, which bounds memory at about three ``chunk x vocabulary`` float32 arrays.
        model: Model name or directory for CE loss and KL. None uses the store's model.
        dtype: Dtype the model runs in: ``bfloat16``, ``float32`` or ``float16``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        output: Path of the result JSON. None writes ``<run>/evals/core.json``, where
            ``<run>`` is the parent directory of ``sae_path``.
        random_seed: Seed of the sampling of held-out tokens and contexts.
        feature_details: Write per-latent statistics (firing frequency, encoder norm and
            bias, cosine similarities) to ``eval_result_details``.
    """

    sae_path: str
    store: str | None = None
    n_eval_tokens: int = 50_000
    n_eval_contexts: int = 32
    batch_size: int = 4096
    context_batch_size: int = 4
    logit_chunk_size: int = 64
    model: str | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    output: str | None = None
    random_seed: int = 42
    feature_details: bool = True

    def __post_init__(self) -> None:
        for name in ("n_eval_tokens", "batch_size", "context_batch_size", "logit_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name} {value!r}: it must be a positive integer")
        if (
            isinstance(self.n_eval_contexts, bool)
            or not isinstance(self.n_eval_contexts, int)
            or self.n_eval_contexts < 0
        ):
            raise ValueError(
                f"invalid n_eval_contexts {self.n_eval_contexts!r}: it must be an integer >= 0 "
                "(0 skips the CE loss and KL metrics)"
            )
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"invalid dtype {self.dtype!r}: choose bfloat16, float32 or float16")
