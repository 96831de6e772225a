"""Tests of adaptive pruning: scores, the FVU feedback rule, training, regrowth and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stores.cache import CorrelationCache
from tests.trainer.conftest import tiny_train_config
from trainer.checkpoint import latest_checkpoint
from trainer.config import TrainConfig
from trainer.pruning.adaptive import AdaptivePruningHook, connection_scores, feedback_rule
from trainer.pruning.options import AdaptiveOptions, PruningConfigError
from trainer.pruning.selection import select_largest
from trainer.saes import Variant, load_sae, register_variant
from trainer.saes.masked import MaskedSAE, build_masked_sae_config
from trainer.train import train

CRASH_VARIANT = "adaptive-crash-test"
RISING_VARIANT = "adaptive-rising-fvu-test"


class SimulatedCrash(RuntimeError):
    """Stands in for a killed process."""


class CrashingAdaptiveHook(AdaptivePruningHook):
    crash_after_step: int | None = None

    def after_optimizer_step(self, step, sae, optimizer, batch, f_BF):
        super().after_optimizer_step(step, sae, optimizer, batch, f_BF)
        if CrashingAdaptiveHook.crash_after_step == step + 1:
            raise SimulatedCrash(f"simulated crash after step {step + 1}")


class RisingFvuHook(AdaptivePruningHook):
    """Reports an FVU rise of 10 (above any tolerance here) after every event and checks the regrown weights."""

    regrowths: list[dict] = []

    def complete_event(self, event, fvu_after, done, optimizer, batch):
        before_FD = self.sae.encoder_mask.to_dense()
        extra = super().complete_event(event, event["fvu_before"] + 10.0, done, optimizer, batch)
        regrown_DF = (self.sae.encoder_mask.to_dense() & ~before_FD).T
        state = optimizer.state[self.sae.W_enc_DF]
        RisingFvuHook.regrowths.append(
            {
                "regrown": int(regrown_DF.sum()),
                "weights_zero": bool(torch.all(self.sae.W_enc_DF[regrown_DF] == 0)),
                "moments_zero": bool(torch.all(state["exp_avg"][regrown_DF] == 0))
                and bool(torch.all(state["exp_avg_sq"][regrown_DF] == 0)),
                "k_before": event["k"],
                "pruned": event["pruned"],
                **extra,
            }
        )
        return extra


for name, hook_class in ((CRASH_VARIANT, CrashingAdaptiveHook), (RISING_VARIANT, RisingFvuHook)):
    register_variant(
        Variant(
            name=name,
            sae_class=MaskedSAE,
            options_class=AdaptiveOptions,
            build_sae_config=build_masked_sae_config,
            make_hook=hook_class,
        )
    )


@pytest.fixture(autouse=True)
def reset_hooks():
    CrashingAdaptiveHook.crash_after_step = None
    RisingFvuHook.regrowths = []
    yield
    CrashingAdaptiveHook.crash_after_step = None


OPTIONS = {
    "min_connections": 2,
    "prune_every": 4,
    "fvu_window": 2,
    "cache_every": 2,
    "tolerance": 1.0,
    "k_init": 64,
}


def make_config(store, tmp_path, **overrides) -> TrainConfig:
    return tiny_train_config(
        store,
        tmp_path,
        **{"variant": "adaptive", "variant_options": dict(OPTIONS), "seed": 9, **overrides},
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# Feedback rule.


def test_feedback_rise_halves_k_and_regrows():
    decision = feedback_rule(k=40.0, fvu_before=0.20, fvu_after=0.25, tolerance=0.01, k_max=100)
    assert decision.next_k == 20.0
    assert decision.regrow
    assert not decision.stop


def test_feedback_small_rise_grows_k():
    decision = feedback_rule(k=40.0, fvu_before=0.20, fvu_after=0.205, tolerance=0.01, k_max=100)
    assert decision.next_k == 60.0
    assert not decision.regrow


def test_feedback_growth_is_capped_at_k_max():
    assert (
        feedback_rule(k=80.0, fvu_before=0.3, fvu_after=0.1, tolerance=0.01, k_max=100).next_k
        == 100.0
    )


def test_feedback_stops_below_one():
    decision = feedback_rule(k=1.5, fvu_before=0.1, fvu_after=0.5, tolerance=0.01, k_max=100)
    assert decision.next_k == 0.75
    assert decision.stop


def test_feedback_without_fvu_counts_as_no_rise():
    decision = feedback_rule(k=4.0, fvu_before=None, fvu_after=0.5, tolerance=0.0, k_max=100)
    assert not decision.regrow
    assert decision.next_k == 6.0


def test_regrowth_picks_largest_gradients():
    gradient_FD = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.8]], dtype=torch.float64)
    pruned_FD = torch.tensor([[True, True, False], [True, False, True]])
    chosen_FD = select_largest(gradient_FD, pruned_FD, 2)
    assert chosen_FD.tolist() == [[False, True, False], [False, False, True]]


# Scores.


def build_scoring_cache() -> CorrelationCache:
    """Latent 0 fires on all 30 forget tokens and 10 of 30 retain tokens; latent 1 only on retain tokens.

    Forget tokens have x = (1, 3), retain tokens x = (3, 1): input 0 carries retain drive.
    """
    cache = CorrelationCache(2, 2, None, model="synthetic", layer=0)
    x_forget_BD = torch.tensor([[1.0, 3.0]]).repeat(30, 1)
    f_forget_BF = torch.tensor([[1.0, 0.0]]).repeat(30, 1)
    x_retain_BD = torch.tensor([[3.0, 1.0]]).repeat(30, 1)
    f_retain_BF = torch.zeros(30, 2)
    f_retain_BF[:10, 0] = 1.0
    f_retain_BF[:, 1] = 1.0
    cache.update(x_forget_BD, f_forget_BF, torch.zeros(30, dtype=torch.int64))
    cache.update(x_retain_BD, f_retain_BF, torch.ones(30, dtype=torch.int64))
    return cache


def test_scores_lower_retain_driven_connections():
    cache = build_scoring_cache()
    magnitude_FD = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    scores = connection_scores(
        magnitude_FD,
        cache.select(["forget"]),
        cache.select(["retain"]),
        tau=0.3,
        beta=1.0,
        epsilon=1e-12,
    )

    # r_F = 1, r_R = 1/3, so s_0 = (2/3) / (4/3) = 0.5; latent 1 has s_1 = -1.
    assert scores.specificity_F.tolist() == pytest.approx([0.5, -1.0])
    assert scores.forget_specific_F.tolist() == [True, False]

    # E[x_0^2 | f_0 > 0] = (30 * 1 + 10 * 9) / 40 = 3 and E[x_1^2 | f_0 > 0] = (30 * 9 + 10 * 1) / 40 = 7.
    assert scores.importance_FD[0].tolist() == pytest.approx([2 * math.sqrt(3), math.sqrt(7)])
    # q_00 = 3 / (3 + 1) and q_01 = 1 / (1 + 3).
    assert scores.scores_FD[0].tolist() == pytest.approx(
        [2 * math.sqrt(3) * 0.25, math.sqrt(7) * 0.75]
    )
    # Importance ranks input 0 higher, the separation pressure ranks it lower.
    assert scores.importance_FD[0, 0] > scores.importance_FD[0, 1]
    assert scores.scores_FD[0, 0] < scores.scores_FD[0, 1]
    # A latent that is not forget-specific keeps S = I.
    assert torch.equal(scores.scores_FD[1], scores.importance_FD[1])


def test_beta_zero_gives_importance():
    cache = build_scoring_cache()
    scores = connection_scores(
        torch.ones(2, 2),
        cache.select(["forget"]),
        cache.select(["retain"]),
        tau=0.3,
        beta=0.0,
        epsilon=1e-12,
    )
    assert torch.equal(scores.scores_FD, scores.importance_FD)


def test_adaptive_needs_the_cache():
    with pytest.raises(PruningConfigError, match="set track_separation = true"):
        AdaptiveOptions(track_separation=False)


# Training.


def test_adaptive_reaches_target_and_logs(sparse_store, tmp_path):
    run_dir = train(make_config(sparse_store, tmp_path))
    sae = load_sae(run_dir / "sae")
    assert sae.encoder_mask.count() == 128
    assert int(sae.encoder_mask.row_counts().min()) >= 2

    events = read_jsonl(run_dir / "pruning_log.jsonl")
    # 512 - 128 = 384 connections: k grows 64, 96, 144, then the last 80 reach the target.
    assert [event["step"] for event in events] == [7, 11, 15, 19]
    assert [event["k"] for event in events] == [64.0, 96.0, 144.0, 216.0]
    assert [event["pruned"] for event in events] == [64, 96, 144, 80]
    assert [event["next_k"] for event in events] == [96.0, 144.0, 216.0, 256.0]
    for event in events:
        assert set(event) >= {
            "step",
            "pruned",
            "regrown",
            "density",
            "fvu_before",
            "fvu_after",
            "next_k",
        }
        assert event["regrown"] == 0
        assert event["fvu_after_steps"] == 2
    assert events[-1]["density"] == 0.25

    log = read_jsonl(run_dir / "train_log.jsonl")
    assert log[-1]["encoder_density"] == 0.25
    assert log[-1]["pruning_k"] == 256.0
    assert (run_dir / "sae" / "separation.json").is_file()


def test_forced_fvu_rise_halves_k_and_regrows(sparse_store, tmp_path):
    options = {**OPTIONS, "regrow_fraction": 0.5}
    run_dir = train(
        make_config(sparse_store, tmp_path, variant=RISING_VARIANT, variant_options=options)
    )
    regrowths = RisingFvuHook.regrowths
    assert len(regrowths) >= 3
    for record in regrowths:
        assert record["next_k"] == record["k_before"] / 2
        assert record["fvu_rose"]
        assert record["regrown"] == record["pruned"] - record["pruned"] // 2
        assert record["weights_zero"]
        assert record["moments_zero"]

    events = read_jsonl(run_dir / "pruning_log.jsonl")
    assert events[0]["regrown"] == 32
    assert events[0]["density_after_feedback"] == pytest.approx(events[0]["density"] + 32 / 512)
    # The feedback never lets k grow, so the run ends above the target density.
    assert load_sae(run_dir / "sae").encoder_mask.count() > 128


def test_adaptive_resume_is_bit_identical(sparse_store, tmp_path):
    whole_dir = train(make_config(sparse_store, tmp_path, run_name="whole", variant=CRASH_VARIANT))

    # The checkpoint at step 15 contains the event of step 15 before its feedback at 17.
    CrashingAdaptiveHook.crash_after_step = 16
    cfg = make_config(sparse_store, tmp_path, run_name="split", variant=CRASH_VARIANT)
    with pytest.raises(SimulatedCrash):
        train(cfg)
    assert latest_checkpoint(cfg.run_dir).name == "step_00000015"
    state = json.loads((latest_checkpoint(cfg.run_dir) / "pruning_state.json").read_text())
    assert state["pending"]["step"] == 15
    CrashingAdaptiveHook.crash_after_step = None
    resumed_dir = train(cfg, resume=True)

    whole = load_sae(whole_dir / "sae")
    resumed = load_sae(resumed_dir / "sae")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed.encoder_mask == whole.encoder_mask
    assert read_jsonl(resumed_dir / "pruning_log.jsonl") == read_jsonl(
        whole_dir / "pruning_log.jsonl"
    )
