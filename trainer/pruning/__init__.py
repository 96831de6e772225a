"""Connection pruning of masked SAEs during training.

- `options`: option dataclasses of the variants (`variant_options` in the run config).
- `schedule`: the cubic density schedule and the steps of pruning events.
- `selection`: choosing which live connections to prune or regrow, with the
  per-latent minimum of connections.
- `tracking`: the correlation cache refreshed during training, step timing and the
  forget-specific latent report that every variant writes beside its final SAE.
- `fixed`: gradual magnitude pruning on the cubic schedule (variant "fixed").
- `adaptive`: correlation-driven, separation-aware pruning with FVU feedback
  (variant "adaptive").

This module imports nothing, so `trainer.saes` can import `trainer.pruning.options`
without a cycle. The hooks are imported when a run builds them.
"""
