"""What a user gets with only `lr` set: K-FAC and FOP train at their defaults for any lr a user brings from SGD, the
safeguard catches a configuration that diverges without it, and the seeds' recommended configuration trains.

Every run is a constant-lr run of fop-train's training loop (fop_train.cli.run_one) on sklearn's digits, so the defaults
are what is tested: nothing but lr (and the configuration under test) is passed."""

from __future__ import annotations

import functools

import pytest
from fop_train.cli import RunConfig, run_one
from fop_train.data import load_digits


@functools.lru_cache(maxsize=1)
def digits():
    return load_digits()


def constant_lr_run(optimizer: str, model: str, batch: int, lr: float, epochs: int, target: float = 95.0,
                    overrides: dict | None = None) -> dict:
    config = RunConfig(model=model, epochs=epochs, target=target, lr_scaling="none", warmup_epochs=0,
                       schedule="constant")
    return run_one(digits(), optimizer, batch, 0, config, lr, overrides or {})


def best_accuracy(record: dict) -> float:
    return max((p["test_acc"] for p in record["history"]), default=0.0)


@pytest.mark.parametrize("optimizer", ["kfac", "fop"])
@pytest.mark.parametrize("lr", [0.01, 0.1, 1.0])
def test_defaults_train_the_digits_cnn_at_any_lr(optimizer, lr):
    """The robustness matrix's CNN cells at batch 256 (bench/RESULTS.md): 95% within 8 epochs, no divergence."""
    record = constant_lr_run(optimizer, "cnn", 256, lr, epochs=10)
    assert not record["diverged"], record["diverged_step"]
    assert record["reached_epoch"] is not None and record["reached_epoch"] <= 8, best_accuracy(record)


@pytest.mark.parametrize("optimizer", ["kfac", "fop"])
@pytest.mark.parametrize("lr", [0.01, 0.1, 1.0])
def test_defaults_train_tinyvit_at_any_lr(optimizer, lr):
    """TinyViT (LayerNorm, attention, embeddings that are not preconditioned): no divergence at any lr, and the
    training loss falls below half its starting value (ln 10) within 4 epochs at batch 128."""
    record = constant_lr_run(optimizer, "transformer", 128, lr, epochs=4, target=101.0)
    assert not record["diverged"], record["diverged_step"]
    assert record["history"][-1]["train_loss"] < 0.5 * 2.3026, record["history"]
    assert best_accuracy(record) > 60.0


@pytest.mark.parametrize("optimizer", ["kfac", "fop"])
def test_the_kl_clip_catches_what_diverges_without_it(optimizer):
    """The former defaults (no KL clip, eigen damping 1e-3) diverge within two epochs at lr 0.1; the defaults do not."""
    unsafe = constant_lr_run(optimizer, "cnn", 256, 0.1, epochs=2, target=101.0,
                             overrides={"kl_clip": None, "damping_mode": "eigen"})
    assert unsafe["diverged"] or unsafe["history"][-1]["train_loss"] > 10.0
    safe = constant_lr_run(optimizer, "cnn", 256, 0.1, epochs=2, target=101.0)
    assert not safe["diverged"] and safe["history"][-1]["train_loss"] < 0.6 * 2.3026  # well below ln 10


@pytest.mark.parametrize("optimizer", ["kfac", "fop"])
def test_the_seeds_recommended_configuration_trains(optimizer):
    """lr 0.05, damping 1e-4, factor and inverse intervals 150 (the FOP paper's typical values), batch 128."""
    record = constant_lr_run(optimizer, "cnn", 128, 0.05, epochs=10,
                             overrides={"damping": 1e-4, "factor_interval": 150, "inverse_interval": 150})
    assert not record["diverged"], record["diverged_step"]
    assert record["reached_epoch"] is not None, best_accuracy(record)
