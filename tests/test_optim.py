"""The learning-rate schedule: linear warm-up to the peak, then cosine decay to 0 (atlas_min.optim.lr_at)."""
import math

import pytest

from atlas_min.optim import lr_at


def test_step_0_of_a_warm_up_takes_one_warm_up_share_of_the_peak():
    assert lr_at(0, total=100, warmup=10, peak=1.0) == pytest.approx(0.1)


def test_the_last_warm_up_step_reaches_the_peak():
    assert lr_at(9, total=100, warmup=10, peak=2e-3) == pytest.approx(2e-3)


def test_the_first_step_after_warm_up_starts_the_cosine_at_the_peak():
    assert lr_at(10, total=100, warmup=10, peak=1.0) == pytest.approx(1.0)


def test_halfway_through_the_decay_the_rate_is_half_the_peak():
    # progress (55 - 10) / 90 = 1/2: 0.5 * (1 + cos(pi/2)) = 0.5
    assert lr_at(55, total=100, warmup=10, peak=1.0) == pytest.approx(0.5)


def test_the_decay_ends_at_zero_on_the_last_step_and_stays_there():
    assert lr_at(100, total=100, warmup=10, peak=1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(150, total=100, warmup=10, peak=1.0) == pytest.approx(0.0, abs=1e-12)


def test_without_warm_up_step_0_is_the_peak():
    assert lr_at(0, total=4, warmup=0, peak=3.0) == pytest.approx(3.0)
    assert lr_at(1, total=4, warmup=0, peak=3.0) == pytest.approx(3.0 * 0.5 * (1 + math.cos(math.pi / 4)))


def _model_and_optimizer():
    import torch
    from atlas_min.config import get_config
    from atlas_min.optim import adamw
    model = torch.nn.Linear(3, 2)
    return model, adamw(model, get_config("micro"), "rl")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_norm_skips_the_update_and_clears_the_gradients(bad):
    import torch
    from atlas_min.optim import clipped_step
    model, optimizer = _model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = bad
    norm = clipped_step(model, optimizer, max_norm=1.0)
    assert not math.isfinite(norm)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no weight moved, none is NaN
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state == {} or all(s["step"] == 0 for s in optimizer.state.values())  # no AdamW moment took it


def test_a_finite_gradient_is_clipped_and_applied_and_its_norm_returned():
    import torch
    from atlas_min.optim import clipped_step
    model, optimizer = _model_and_optimizer()
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    # d(sum of outputs)/dW = ones (2, 3), d/db = ones (2,): norm sqrt(8)
    norm = clipped_step(model, optimizer, max_norm=1.0)
    assert norm == pytest.approx(math.sqrt(8))
    assert not torch.equal(model.weight, before) and model.weight.grad is None
