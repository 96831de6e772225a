"""When pruning happens and how dense the masks are at each step.

Steps are counted as completed optimizer steps `t` (the step a checkpoint is named
after), so an event at `t` runs right after the `t`-th optimizer step.
"""

from __future__ import annotations

from trainer.pruning.options import PruningConfigError

#: Default start and end of pruning as fractions of the run's steps.
DEFAULT_START_FRACTION = 0.1
DEFAULT_END_FRACTION = 0.7


def resolve_window(start_step: int | None, end_step: int | None, total_steps: int) -> tuple[int, int]:
    """Return the pruning window (t0, t1), filling unset ends with 10% and 70% of the run.

    Raises PruningConfigError unless 0 <= t0 < t1 <= total_steps.
    """
    t0 = start_step if start_step is not None else round(DEFAULT_START_FRACTION * total_steps)
    t1 = end_step if end_step is not None else round(DEFAULT_END_FRACTION * total_steps)
    if not 0 <= t0 < t1 <= total_steps:
        raise PruningConfigError(
            f"invalid pruning window start_step={t0}, end_step={t1} for a run of {total_steps} steps: "
            "use 0 <= start_step < end_step <= total steps (total_tokens // batch_size)"
        )
    return t0, t1


def cubic_density(step: int, target_density: float, start_step: int, end_step: int) -> float:
    """Return the scheduled density rho_t of the cubic schedule of Zhu & Gupta (2017).

    rho_t = rho_f + (1 - rho_f) (1 - (t - t0) / (t1 - t0))^3 for t0 <= t <= t1, 1
    before t0 and rho_f after t1. The density falls fastest right after t0, when the
    network has the most redundant connections.
    """
    if end_step <= start_step:
        raise PruningConfigError(f"invalid pruning window ({start_step}, {end_step}): end_step must exceed start_step")
    if step <= start_step:
        return 1.0
    if step >= end_step:
        return target_density
    remaining = 1.0 - (step - start_step) / (end_step - start_step)
    return target_density + (1.0 - target_density) * remaining**3


def is_pruning_step(step: int, start_step: int, end_step: int, prune_every: int) -> bool:
    """Return whether a pruning event runs after completed step `step`.

    Events run every `prune_every` steps after t0 up to t1, and always at t1 so that
    the schedule ends on its target.
    """
    if not start_step < step <= end_step:
        return False
    return (step - start_step) % prune_every == 0 or step == end_step


def pruning_steps(start_step: int, end_step: int, prune_every: int) -> list[int]:
    """Return every step with a pruning event, ascending."""
    return [step for step in range(start_step + 1, end_step + 1) if is_pruning_step(step, start_step, end_step, prune_every)]
