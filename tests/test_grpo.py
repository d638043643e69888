"""Specification of atlas_min.grpo: GRPO and LA-GRPO as written in docs/method.md ("Stage 2: GRPO", "LA-GRPO").

Every expected value here is computed independently of the code under test: by hand, or by a slow
transcription of the formulas with python loops, math.exp and min (values) and hand-derived
derivatives (gradients).
"""
import math

import pytest
import torch

from atlas_min.grpo import clipped_surrogate, functional_grad_share, group_advantages, grpo_loss, kl_k3


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons against python-float arithmetic; restored so other test files are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------- advantages

def test_advantages_of_a_group_have_mean_0_and_unbiased_std_1():
    rewards = torch.randn(4 * 5, generator=torch.Generator().manual_seed(0))
    A = group_advantages(rewards, group_size=5).view(4, 5)
    assert torch.allclose(A.mean(dim=1), torch.zeros(4), atol=1e-12)
    assert torch.allclose(A.std(dim=1, unbiased=True), torch.ones(4), atol=1e-5)


def test_advantages_hand_computed_for_one_correct_answer_out_of_four():
    # mean 0.25; unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    A = group_advantages(torch.tensor([1, 0, 0, 0]), group_size=4)  # integer rewards are fine
    assert A.tolist() == pytest.approx([0.75 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6),
                                        -0.25 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6)], abs=1e-12)


def test_a_constant_group_has_zero_advantages():
    A = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3]), group_size=3)
    assert A.tolist() == [0.0] * 9


@pytest.mark.parametrize("reward", [1.7, 0.2, 1.2, 0.9, 1.5])  # sums of the presets' reward weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_group_of_eight_has_exactly_zero_advantages_in_float32_too(reward, dtype):
    # In float32 the mean of eight 1.7s is off by one rounding step and the std is ~1e-7, not 0: the
    # formula alone gives +0.1057 to every output. The rule "a constant group gets 0" holds anyway.
    A = group_advantages(torch.full((16,), reward, dtype=dtype), group_size=8)
    assert A.dtype == dtype and A.tolist() == [0.0] * 16


def test_a_mixed_group_beside_a_constant_one_keeps_its_float64_advantages():
    rewards = torch.tensor([1.7] * 8 + [1.7] * 7 + [0.2], dtype=torch.float32)
    A = group_advantages(rewards, group_size=8)
    r = [float(x) for x in rewards[8:]]  # the float32 values, in python floats
    mean = sum(r) / 8
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 7)
    assert A[:8].tolist() == [0.0] * 8
    assert A[8:].tolist() == pytest.approx([(x - mean) / (std + 1e-6) for x in r], abs=1e-6)


def test_advantages_are_normalised_per_group_not_across_the_batch():
    # two groups with very different reward scales get the same advantages: +-1/sqrt(2) each
    A = group_advantages(torch.tensor([0.0, 1.0, 10.0, 30.0]), group_size=2, eps=0.0)
    s = 1 / math.sqrt(2)
    assert A.tolist() == pytest.approx([-s, s, -s, s], abs=1e-12)


def test_a_group_of_one_has_zero_advantage_because_its_unbiased_std_is_undefined():
    assert group_advantages(torch.tensor([0.0, 1.0, 5.0]), group_size=1).tolist() == [0.0, 0.0, 0.0]


def test_rewards_that_do_not_split_into_whole_groups_are_rejected():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), group_size=4)


# ----------------------------------------------------------------------------- surrogate and KL

def test_ratio_1_makes_the_surrogate_minus_the_advantage_per_token():
    logp = -torch.rand(3, 4)
    A = torch.tensor([2.0, -0.5, 0.0])
    ell = clipped_surrogate(logp, logp.clone(), A, clip_eps=0.2)
    assert torch.equal(ell, -A[:, None].expand(3, 4))


def test_surrogate_hand_computed_for_each_sign_and_side():
    r = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    A = torch.tensor([[2.0, -1.0, -1.0, 2.0]])
    ell = torch.stack([clipped_surrogate(r[:, j:j + 1].log(), torch.zeros(1, 1), A[:, j], 0.2)[0, 0]
                       for j in range(4)])
    # -min(3, 2.4), -min(-0.5, -0.8), -min(-1.5, -1.2), -min(1, 1.6)
    assert ell.tolist() == pytest.approx([-2.4, 0.8, 1.5, -1.0], abs=1e-12)


def test_clipping_is_active_exactly_outside_the_range_on_the_side_the_advantages_sign_selects():
    eps = 0.2
    ratios = [0.5, 0.7, 0.79, 0.81, 1.0, 1.19, 1.21, 1.5]
    for a, n_clipped in ((1.0, 2), (-1.0, 3)):  # A > 0: 1.21, 1.5;  A < 0: 0.5, 0.7, 0.79
        logp = torch.tensor([ratios]).log().requires_grad_(True)
        ell = clipped_surrogate(logp, torch.zeros(1, len(ratios)), torch.tensor([a]), eps)
        (g,) = torch.autograd.grad(ell.sum(), logp)
        for j, r in enumerate(ratios):
            active = (a > 0 and r > 1 + eps) or (a < 0 and r < 1 - eps)
            expected = -min(max(r, 1 - eps), 1 + eps) * a if active else -r * a
            assert ell[0, j].item() == pytest.approx(expected, abs=1e-12)
            assert (g[0, j].item() == 0.0) == active  # a clipped token sends no gradient
        _, stats = grpo_loss(logp.detach(), torch.zeros(1, len(ratios)), None, torch.tensor([a]),
                             torch.ones(1, len(ratios), dtype=torch.bool),
                             torch.zeros(1, len(ratios), dtype=torch.bool),
                             clip_eps=eps, kl_coef=0.0, anchor_coef=0.0)
        assert stats["clip_frac"] == pytest.approx(n_clipped / len(ratios))


def test_log_ratios_beyond_the_bound_give_a_finite_loss_and_gradient():
    # old log-prob -inf (a token the sampler's distribution gave no mass), +-1000 nats, and junk at padding:
    # exp is taken of the clamped log-ratio, so r <= e^20 and nothing becomes inf or NaN
    logp = torch.tensor([[-1.0, -2.0, -0.5, 3.0]], requires_grad=True)
    old = torch.tensor([[float("-inf"), -1000.0, 1000.0, 0.0]])
    ref = torch.tensor([[-1e4, 1e4, -0.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    for A in (1.0, -1.0):
        loss, stats = grpo_loss(logp, old, ref, torch.tensor([A]), mask, mask, clip_eps=0.2, kl_coef=0.1,
                                anchor_coef=1.0)
        (g,) = torch.autograd.grad(loss, logp)
        assert math.isfinite(loss.item()) and torch.isfinite(g).all() and math.isfinite(stats["ratio_mean"])
    r = torch.exp(torch.clamp(torch.tensor(20.0), max=20.0)).item()
    assert clipped_surrogate(torch.zeros(1, 1), torch.tensor([[-1e9]]), torch.tensor([-1.0]), 0.2).item() == \
        pytest.approx(r)  # -min(r A, clip(r) A) with A = -1 and r = e^20


def test_k3_kl_is_non_negative_and_zero_iff_log_probs_are_equal():
    logp = -3 * torch.rand(50)
    ref = logp + torch.randn(50)
    ref[:10] = logp[:10]
    D = kl_k3(logp, ref)
    assert (D[:10] == 0).all() and (D[10:] > 0).all()
    assert kl_k3(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(math.e - 2)


def test_k3_kl_averaged_under_the_policy_equals_the_true_kl():
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(10, generator=g), 0)
    ref = torch.log_softmax(torch.randn(10, generator=g), 0)
    true_kl = sum(math.exp(p) * (p - q) for p, q in zip(logp.tolist(), ref.tolist()))
    assert (logp.exp() * kl_k3(logp, ref)).sum().item() == pytest.approx(true_kl, abs=1e-12)


# ----------------------------------------------------------------------------- the loop transcription

def loop_grpo(logp, old, ref, A, mask, fmask, eps, beta, lam):
    """docs/method.md's L_LA-GRPO with python loops, and its gradient w.r.t. logp derived by hand."""
    B, T = len(logp), len(logp[0])
    ell, dell, D, dD = {}, {}, {}, {}
    for i in range(B):
        for t in range(T):
            r = math.exp(logp[i][t] - old[i][t])
            unclipped, clipped = r * A[i], min(max(r, 1 - eps), 1 + eps) * A[i]
            ell[i, t] = -min(unclipped, clipped)
            dell[i, t] = -r * A[i] if unclipped <= clipped else 0.0
            if ref is not None:
                d = ref[i][t] - logp[i][t]
                D[i, t], dD[i, t] = math.exp(d) - d - 1, 1 - math.exp(d)
            else:
                D[i, t], dD[i, t] = 0.0, 0.0
    o = [[t for t in range(T) if mask[i][t]] for i in range(B)]
    F = [[t for t in o[i] if fmask[i][t]] for i in range(B)]
    rows = [i for i in range(B) if o[i]]
    I_F = [i for i in range(B) if F[i]]
    L_grpo = sum(sum(ell[i, t] + beta * D[i, t] for t in o[i]) / len(o[i]) for i in rows) / len(rows) if rows else 0.0
    L_anchor = sum(sum(ell[i, t] for t in F[i]) / len(F[i]) for i in I_F) / len(I_F) if I_F else 0.0
    grad = [[0.0] * T for _ in range(B)]
    for i in rows:
        for t in o[i]:
            grad[i][t] += (dell[i, t] + beta * dD[i, t]) / (len(o[i]) * len(rows))
    for i in I_F:
        for t in F[i]:
            grad[i][t] += lam * dell[i, t] / (len(F[i]) * len(I_F))
    return L_grpo + lam * L_anchor, L_anchor, grad


def random_batch(seed, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g)
    old = logp + 0.3 * torch.randn(B, T, generator=g)  # ratios spread over both sides of the clip range
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    A = torch.randn(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 0  # a row with an empty mask
    mask = torch.arange(T)[None, :] < lengths[:, None]
    fmask = (torch.rand(B, T, generator=g) < 0.3) & mask
    fmask[1] = False  # a row with tokens but no functional token
    fmask[2, 0] = True
    logp = torch.where(mask, logp, 7.0)  # padding holds junk; it must not matter
    return logp, old, ref, A, mask, fmask


def _loss_and_transcription(seed, kl_coef, anchor_coef):
    logp, old, ref, A, mask, fmask = random_batch(seed)
    ref_arg = ref if kl_coef > 0 else None
    x = logp.clone().requires_grad_(True)
    loss, stats = grpo_loss(x, old, ref_arg, A, mask, fmask, clip_eps=0.2, kl_coef=kl_coef, anchor_coef=anchor_coef)
    loss.backward()
    want = loop_grpo(logp.tolist(), old.tolist(), None if ref_arg is None else ref.tolist(),
                     A.tolist(), mask.tolist(), fmask.tolist(), 0.2, kl_coef, anchor_coef)
    return loss, stats, x.grad, want


COEFS = [(seed, kl_coef, anchor_coef) for seed in range(4) for kl_coef in (0.0, 0.04) for anchor_coef in (0.0, 0.7)]


@pytest.mark.parametrize("seed, kl_coef, anchor_coef", COEFS)
def test_grpo_loss_equals_a_loop_based_transcription_of_the_formula(seed, kl_coef, anchor_coef):
    loss, _, _, (want, _, _) = _loss_and_transcription(seed, kl_coef, anchor_coef)
    assert loss.item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed, kl_coef, anchor_coef", COEFS)
def test_grpo_loss_gradient_equals_the_hand_derived_gradient(seed, kl_coef, anchor_coef):
    _, _, grad, (_, _, want_grad) = _loss_and_transcription(seed, kl_coef, anchor_coef)
    assert not torch.isnan(grad).any()
    assert torch.allclose(grad, torch.tensor(want_grad), atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_the_logged_anchor_is_the_anchor_term_of_the_transcription(seed):
    _, stats, _, (_, want_anchor, _) = _loss_and_transcription(seed, 0.04, 0.7)
    assert stats["anchor"] == pytest.approx(want_anchor, abs=1e-12)


def _hand_batch():
    # row 0: A = +1, r = (1.5, 1, 1); row 1: A = -1, r = (0.5, 1), one padding position
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.5), 0.0, 0.0], [math.log(0.5), 0.0, 0.0]])
    ref = logp.clone()
    ref[0, 2] += 1.0  # D = e - 2 at that one token
    mask = torch.tensor([[True, True, True], [True, True, False]])
    fmask = torch.tensor([[False, True, False], [False, False, False]])
    return grpo_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask, fmask,
                     clip_eps=0.2, kl_coef=0.1, anchor_coef=0.5)


def test_loss_terms_hand_computed():
    loss, s = _hand_batch()
    # l row 0 = (-1.2, -1, -1), row 1 = (0.8, 1): pg = ((-3.2 / 3) + 0.9) / 2 = -1/12
    assert s["pg_loss"] == pytest.approx(-1 / 12)
    assert s["anchor"] == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(-1 / 12 + 0.1 * (math.e - 2) / 3 / 2 + 0.5 * -1.0)
    assert s["loss"] == pytest.approx(loss.item())


def test_clip_fraction_counts_the_tokens_whose_clipped_branch_is_taken():
    _, s = _hand_batch()
    # row 0 token 0: A > 0 and r = 1.5 > 1.2; row 1 token 0: A < 0 and r = 0.5 < 0.8: 2 of 5 tokens
    assert s["clip_frac"] == pytest.approx(2 / 5)


def test_token_mean_stats_hand_computed():
    _, s = _hand_batch()
    assert s["ratio_mean"] == pytest.approx((1.5 + 1 + 1 + 0.5 + 1) / 5)
    assert s["kl"] == pytest.approx((math.e - 2) / 5)
    assert s["functional_token_share"] == pytest.approx(1 / 5)


# ----------------------------------------------------------------------------- LA-GRPO anchor

def test_anchor_loss_is_zero_when_no_functional_token_was_sampled():
    logp, old, _, A, mask, fmask = random_batch(5)
    no_f = torch.zeros_like(fmask)
    x0, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    l0, _ = grpo_loss(x0, old, None, A, mask, no_f, clip_eps=0.2, kl_coef=0.0, anchor_coef=0.0)
    l2, s2 = grpo_loss(x2, old, None, A, mask, no_f, clip_eps=0.2, kl_coef=0.0, anchor_coef=2.0)
    assert s2["anchor"] == 0.0 and s2["functional_token_share"] == 0.0
    assert l2.item() == l0.item()
    l0.backward(), l2.backward()
    assert torch.equal(x0.grad, x2.grad)


def test_the_anchors_gradient_is_nonzero_only_at_functional_positions():
    logp, _, _, A, mask, fmask = random_batch(6)
    grads = []
    for lam in (0.0, 1.0):
        x = logp.clone().requires_grad_(True)
        loss, _ = grpo_loss(x, logp, None, A, mask, fmask, clip_eps=0.2, kl_coef=0.0, anchor_coef=lam)
        (g,) = torch.autograd.grad(loss, x)
        grads.append(g)
    anchor_grad = grads[1] - grads[0]
    assert fmask.any()
    assert torch.equal(anchor_grad != 0, fmask)


def test_functional_positions_outside_the_mask_are_ignored():
    logp, old, ref, A, mask, fmask = random_batch(7)
    l1, s1 = grpo_loss(logp, old, ref, A, mask, fmask, clip_eps=0.2, kl_coef=0.1, anchor_coef=1.0)
    l2, s2 = grpo_loss(logp, old, ref, A, mask, fmask | ~mask, clip_eps=0.2, kl_coef=0.1, anchor_coef=1.0)
    assert l1.item() == l2.item() and s1 == s2


def test_a_batch_of_empty_rows_gives_a_zero_loss_that_still_backpropagates():
    x = torch.randn(2, 3, requires_grad=True)
    none = torch.zeros(2, 3, dtype=torch.bool)
    loss, s = grpo_loss(x, x.detach(), x.detach(), torch.ones(2), none, none, clip_eps=0.2, kl_coef=0.1, anchor_coef=1.0)
    assert loss.item() == 0.0 and all(v == 0.0 for k, v in s.items() if k != "ratio_mean")
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


def test_the_kl_term_needs_reference_log_probs():
    logp, old, ref, A, mask, fmask = random_batch(8)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, None, A, mask, fmask, clip_eps=0.2, kl_coef=0.1, anchor_coef=0.0)
    l_none, s_none = grpo_loss(logp, old, None, A, mask, fmask, clip_eps=0.2, kl_coef=0.0, anchor_coef=0.0)
    l_ref, _ = grpo_loss(logp, old, ref, A, mask, fmask, clip_eps=0.2, kl_coef=0.0, anchor_coef=0.0)
    assert l_none.item() == l_ref.item() and s_none["kl"] == 0.0


# ----------------------------------------------------------------------------- gradient dilution

def loop_functional_grad_share(A, lengths, functional, lam):
    """On-policy (r = 1), no KL: token t of output i gets g = -A_i (1/(B |o_i|) + lam [t in F_i] / (|I_F| |F_i|))."""
    B, I_F = len(A), [i for i in range(len(A)) if functional[i]]
    f_mass = total = 0.0
    for i in range(B):
        for t in range(lengths[i]):
            is_f = t in functional[i]
            g = abs(A[i] * (1 / (B * lengths[i]) + (lam / (len(I_F) * len(functional[i])) if is_f else 0.0)))
            total += g
            f_mass += g if is_f else 0.0
    return f_mass / total


def test_functional_grad_share_is_the_token_share_without_the_anchor_and_grows_with_it():
    g = torch.Generator().manual_seed(0)
    B, T = 8, 200
    lengths = [200, 200, 180, 200, 150, 200, 200, 190]
    n_functional = [4, 4, 4, 4, 4, 4, 4, 0]  # 28 of 1,520 generated positions: 1.8%
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    fmask = torch.zeros(B, T, dtype=torch.bool)
    functional = []
    for i in range(B):
        pos = torch.randperm(lengths[i], generator=g)[: n_functional[i]].tolist()
        fmask[i, pos] = True
        functional.append(set(pos))
    A = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), group_size=4)
    logp = -3 * torch.rand(B, T, generator=g)
    shares = {}
    for lam in (0.0, 1.0):
        shares[lam] = functional_grad_share(logp, logp, None, A, mask, fmask, clip_eps=0.2, kl_coef=0.0, anchor_coef=lam)
        assert shares[lam] == pytest.approx(loop_functional_grad_share(A.tolist(), lengths, functional, lam), abs=1e-12)
    assert shares[0.0] < 0.03
    assert shares[1.0] > 0.4


def test_functional_grad_share_leaves_the_models_graph_untouched():
    w = torch.randn(2, 5, requires_grad=True)
    logp = torch.nn.functional.logsigmoid(w)
    mask = torch.ones(2, 5, dtype=torch.bool)
    fmask = torch.zeros(2, 5, dtype=torch.bool)
    fmask[0, 1] = True
    share = functional_grad_share(logp, logp.detach() + 0.01, None, torch.tensor([1.0, -1.0]), mask, fmask,
                                  clip_eps=0.2, kl_coef=0.0, anchor_coef=1.0)
    assert 0 < share < 1 and w.grad is None
    logp.sum().backward()  # the caller's graph is still intact
    assert w.grad is not None


def test_slices_with_whole_batch_counts_add_up_to_the_whole_batch_loss():
    """Micro-batches and ranks: each slice divides by the whole batch's counts, so the sum is exact."""
    g = torch.Generator().manual_seed(7)
    B, T = 6, 9
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old, ref = logp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64), logp - 0.05
    A = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[2] = False  # an empty row
    fmask = (torch.rand(B, T, generator=g) < 0.2) & mask
    kw = dict(clip_eps=0.2, kl_coef=0.05, anchor_coef=0.7)
    whole, _ = grpo_loss(logp, old, ref, A, mask, fmask, **kw)
    n_out, n_anchor = int((mask.sum(1) > 0).sum()), int((fmask.sum(1) > 0).sum())
    parts = [grpo_loss(logp[s], old[s], ref[s], A[s], mask[s], fmask[s], num_outputs=n_out,
                       num_anchor_outputs=n_anchor, **kw)[0] for s in (slice(0, 2), slice(2, 5), slice(5, 6))]
    torch.testing.assert_close(sum(parts), whole)


def test_at_the_papers_sparsity_lambda_half_gives_functional_tokens_22x_the_weight_and_035_of_the_gradient():
    # config.py's reason for anchor_coef=0.5: 4.8 functional of 203.7 tokens (as 48 of 2,037 per output),
    # r = 1, every output with the same |A|. By hand: a text token's |g| is |A| / (B |o|); a functional
    # one's adds λ |A| / (B |F|): ratio 1 + λ |o| / |F| = 1 + 0.5 * 2037 / 48; share (|F|/|o| + λ) / (1 + λ).
    B, T, n_f, lam = 4, 2037, 48, 0.5
    mask = torch.ones(B, T, dtype=torch.bool)
    fmask = torch.zeros(B, T, dtype=torch.bool)
    fmask[:, :: T // n_f][:, :n_f] = True
    assert int(fmask.sum()) == B * n_f
    A = torch.tensor([1.0, -1.0, 1.0, -1.0])
    logp = torch.full((B, T), -1.0, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), None, A, mask, fmask, clip_eps=0.2, kl_coef=0.0, anchor_coef=lam)
    (g,) = torch.autograd.grad(loss, logp)
    assert (g[fmask].abs() / g[~fmask].abs().mean()).mean().item() == pytest.approx(1 + lam * 2037 / 48)
    assert 1 + lam * 2037 / 48 == pytest.approx(22.2, abs=0.05)
    share = functional_grad_share(logp, logp.detach(), None, A, mask, fmask, clip_eps=0.2, kl_coef=0.0,
                                  anchor_coef=lam)
    assert share == pytest.approx((48 / 2037 + lam) / (1 + lam)) and share == pytest.approx(0.35, abs=0.005)
