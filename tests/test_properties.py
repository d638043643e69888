"""The method's core rules as hypothesis properties, over the ranges the presets use.

Grouped as docs/method.md is: "Advantages"; "Clipped surrogate" and "KL to the reference"; "GRPO loss"
with "LA-GRPO"; the sampler's draw (`sampler._draw`, which draws the rollouts that "Log-probabilities"
scores); "Reward". Every expected value is computed here, apart from the code under test: a python loop
over floats in float64 (math.exp, min, max), a closed form, or a count.

Ranges (atlas_min/config.py): groups of 2..64 outputs (the presets use 4 and 8); rewards are the values
R = w_acc·R_acc + w_ft·R_ft + w_fmt·R_fmt − w_len·P_len − w_over·P_over takes under the micro, toy and
qwen2_5_vl_7b presets; clip_eps, kl_coef and anchor_coef around the presets' 0.2, 0.01 and 0.5; |A| ≤ 8
(a group of G has |A_i| ≤ (G−1)/√G < 8 for G ≤ 64); log-ratios inside ±LOG_RATIO_BOUND except where a
property is about leaving it. Shapes are small: every rule here is per token, per row or per group, so
a (8, 16) batch states it as a (128, 1024) one does, at a thousandth of the cost.

The hypothesis profiles (derandomized: every run checks the same examples) are in tests/conftest.py.
"""
import math
from functools import cache

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from atlas_min import grpo, rewards
from atlas_min.config import get_config
from atlas_min.model import log_partition_and_entropy
from atlas_min.sampler import _draw

PRESETS = ("micro", "toy", "qwen2_5_vl_7b")
CONFIGS = {name: get_config(name) for name in PRESETS}
BOUND = grpo.LOG_RATIO_BOUND  # 20
U_BF16, U_F32 = 2.0 ** -8, 2.0 ** -24  # unit roundoff: half the spacing of the numbers in [1, 2)
UNIT = {torch.float32: U_F32, torch.bfloat16: U_BF16}


def _tol(dtype, magnitude):
    """What ~8 roundings of a quantity of size `magnitude` can cost in `dtype`: a token's term goes through
    at most 5 (the difference of log-probs, exp, the product with A, clamp or min, the KL's sum), its row
    mean and the batch mean through 3 more (sum, division, the anchor's weight). Measured: at most 1.4 of
    the 8 over thousands of batches. The 1e-30 covers values at float32's underflow (A = 1e-40 is drawn too),
    which are off by their whole size."""
    return 8 * UNIT[dtype] * magnitude + 1e-30


# ============================================================================ Advantages
# A_i = (R_i − mean_j R_j) / (std_j R_j + ε), unbiased std, ε = 1e-6; 0 for a constant group and for G = 1.

EPS = 1e-6


@cache
def preset_rewards():
    """Every total reward the three presets can give, ascending (some 3,700 distinct floats).

    R_acc, R_fmt ∈ {0, 1}, R_ft ≤ R_acc; lengths 0 .. past the full length penalty; functional-token
    counts 0 .. past the full overuse penalty. The penalties come from rewards.py and the total is summed
    in compute_reward's order, so these are the floats training sees, not their real-number values.
    """
    values = set()
    for name in PRESETS:
        cfg = CONFIGS[name]
        most_tokens = cfg.len_threshold + cfg.len_buffer + 1  # the full length penalty from here on
        most_functional = cfg.over_threshold + math.ceil(cfg.over_max_penalty / cfg.over_slope) + 1  # likewise
        for accuracy, functional in ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0)):
            for fmt in (0.0, 1.0):
                for n_tokens in range(most_tokens + 1):
                    p_len = rewards.length_penalty(n_tokens, cfg)
                    for n_functional in range(most_functional + 1):
                        p_over = rewards.overuse_penalty(n_functional, cfg)
                        values.add(cfg.w_acc * accuracy + cfg.w_ft * functional + cfg.w_fmt * fmt
                                   - cfg.w_len * p_len - cfg.w_over * p_over)
    return sorted(values)


reward_values = st.sampled_from(preset_rewards())
reward_dtypes = st.sampled_from([torch.float32, torch.float64])  # train_rl.score passes float64


@st.composite
def mixed_group(draw, dtype=None):
    """(rewards (G,), G): one group of preset rewards that are not all equal in `dtype`."""
    G = draw(st.integers(2, 64))
    dtype = dtype or draw(reward_dtypes)
    R = torch.tensor(draw(st.lists(reward_values, min_size=G, max_size=G)), dtype=dtype)  # (G,)
    assume(R.max() != R.min())
    return R, G


def loop_advantages(R, eps=EPS):
    """docs/method.md's A_i for one group, in python floats (float64)."""
    G = len(R)
    mean = sum(R) / G
    std = math.sqrt(sum((r - mean) ** 2 for r in R) / (G - 1))
    return [(r - mean) / (std + eps) for r in R], std


def test_a_constant_group_gets_exactly_zero_advantage_for_every_preset_reward_and_group_size():
    """All of it, not a sample: every preset reward, G = 2..64, float32 and float64 rewards. Without the
    rule the float32 mean of eight 1.7s is one rounding step off 1.7 and every output gets +0.106."""
    values = torch.tensor(preset_rewards(), dtype=torch.float64)  # (K,)
    for dtype in (torch.float32, torch.float64):
        for G in range(2, 65):
            R = values.to(dtype).repeat_interleave(G)  # (K·G,): K constant groups
            A = grpo.group_advantages(R, G, EPS)
            nonzero = A != 0
            assert not nonzero.any(), (f"G={G} {dtype}: constant group of {R[nonzero][0].item()!r} "
                                       f"gets A={A[nonzero][0].item()!r}")


@given(st.data(), st.integers(2, 64), reward_dtypes)
def test_constant_groups_get_exactly_zero_advantage_beside_mixed_groups(data, G, dtype):
    constant = data.draw(st.lists(st.booleans(), min_size=1, max_size=6), label="constant")  # per group
    groups = [[data.draw(reward_values)] * G if c else data.draw(st.lists(reward_values, min_size=G, max_size=G))
              for c in constant]
    A = grpo.group_advantages(torch.tensor(sum(groups, []), dtype=dtype), G, EPS).view(-1, G)  # (P, G)
    for p, c in enumerate(constant):
        if c:
            assert A[p].tolist() == [0.0] * G


@given(mixed_group())
def test_the_advantages_of_a_mixed_group_sum_to_zero(group):
    R, G = group
    A = grpo.group_advantages(R, G, EPS)
    # float64 arithmetic: R − mean is off by ~4e-16 (|R| ≤ 1.7), divided by std + ε ≥ 1e-6: ≤ 4e-10 per
    # output; float32 output: each A_i rounded by ≤ 2^-24·|A_i|, and |A_i| ≤ (G−1)/√G.
    tol = 1e-9 + (U_F32 * (G - 1) / math.sqrt(G) if R.dtype == torch.float32 else 0.0)
    assert abs(sum(A.double().tolist()) / G) <= tol


@given(mixed_group())
def test_the_advantages_of_a_mixed_group_equal_the_float64_formula(group):
    R, G = group
    A = grpo.group_advantages(R, G, EPS)
    want, _ = loop_advantages(R.double().tolist())  # from the same (possibly float32-rounded) rewards
    assert max(abs(a - w) for a, w in zip(A.double().tolist(), want)) <= 1e-6


@given(mixed_group(torch.float64), st.floats(-10, 10))
def test_adding_a_constant_to_a_groups_rewards_leaves_its_advantages(group, b):
    R, G = group
    A, A_shifted = grpo.group_advantages(R, G, EPS), grpo.group_advantages(R + b, G, EPS)
    # R + b rounds each reward by ≤ 2^-53·(|R| + |b|) ≈ 1.3e-15; A divides by std + ε ≥ 1e-6 and carries a
    # factor ≤ 1 + |A| ≤ 9: 1.3e-15·9/1e-6 ≈ 1.2e-8, and a margin of 10 on top.
    assert torch.allclose(A_shifted, A, rtol=0, atol=1e-7)


@given(mixed_group(torch.float64), st.floats(0.1, 10))
def test_scaling_a_groups_rewards_by_c_changes_its_advantages_only_through_eps(group, c):
    R, G = group
    A, A_scaled = grpo.group_advantages(R, G, EPS).tolist(), grpo.group_advantages(c * R, G, EPS).tolist()
    _, s = loop_advantages(R.tolist())
    # Exactly, A(cR) = c·d/(c·s + ε) and A(R) = d/(s + ε), so A(cR) − A(R) = A(R)·ε·(1 − 1/c)/(s + ε/c):
    # ε's whole effect, negligible when s ≫ ε, all of A when s ≪ ε. Plus 1e-7 for rounding (as above).
    for a, a_scaled in zip(A, A_scaled):
        assert abs(a_scaled - a) <= abs(a) * EPS * abs(1 - 1 / c) / (s + EPS / c) + 1e-7


@given(st.lists(st.floats(-10, 10), min_size=1, max_size=64), reward_dtypes)
def test_a_group_of_one_gets_zero_advantage(values, dtype):
    A = grpo.group_advantages(torch.tensor(values, dtype=dtype), 1, EPS)
    assert A.tolist() == [0.0] * len(values)


# ============================================================================ Clipped surrogate, KL to the reference
# D = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 ≥ 0, = 0 where the two agree.

log_probs = st.floats(-BOUND, 0.0, width=32)
logp_dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])


def every_difference(dtype):
    """(n,) the values log π_ref − log π_θ takes in `dtype` within ±LOG_RATIO_BOUND (beyond, the clamp holds
    it at the bound). bfloat16: all of them, from its 65,536 bit patterns. float32: in the band |δ| < 2^-10,
    where exp's rounding step can outweigh δ²/2, every 1021st bit pattern (1.9 million values spread over
    every exponent), and a sweep of 10^6 values across ±20."""
    if dtype == torch.bfloat16:
        bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
        x = bits.view(torch.bfloat16)
    else:
        small = torch.arange(0, 0x3A800000, 1021, dtype=torch.int32).view(torch.float32)  # [0, 2^-10)
        x = torch.cat([small, -small, torch.linspace(-BOUND, BOUND, 1_000_001)])
    return x[x.float().abs() <= BOUND]


@logp_dtypes
def test_k3_is_never_negative(dtype):
    """Not sampled: D depends on the two log-probs only through their rounded difference, and that takes
    few enough values to try (nearly) all. A deliberate failure also stays out of hypothesis, whose report
    of one would write a patch file into the working tree on every run."""
    delta = every_difference(dtype)  # (n,)
    D = grpo.kl_k3(torch.zeros_like(delta), delta)  # log π_θ = 0, log π_ref = δ: the difference is δ exactly
    assert (D >= 0).all(), f"D = {D[D < 0][0].item()} at δ = {delta[D < 0][0].item()}"


@logp_dtypes
@given(st.lists(log_probs, min_size=1, max_size=256))
def test_k3_is_exactly_zero_where_the_log_probs_agree(dtype, logp):
    logp = torch.tensor(logp, dtype=dtype)  # (n,)
    assert grpo.kl_k3(logp, logp.clone()).tolist() == [0.0] * len(logp)


# ============================================================================ GRPO loss, LA-GRPO
# L = mean_i (1/|o_i|) Σ_t (ℓ_{i,t} + β·D_{i,t}) + λ·mean_{i ∈ I_F} (1/|F_i|) Σ_{t ∈ F_i} ℓ_{i,t}

coefs = st.fixed_dictionaries({
    "clip_eps": st.floats(0.05, 0.5),
    "kl_coef": st.just(0.0) | st.floats(1e-4, 0.1),
    "anchor_coef": st.just(0.0) | st.floats(0.01, 2.0),
})
# per token, log π_θ − log π_old (and log π_ref − log π_θ): 0 (the first update after sampling), near 0, or
# anywhere inside the clamp; a batch uses some of these kinds
ratio_kinds = st.sets(st.sampled_from(["equal", "near", "far"]), min_size=1)


@st.composite
def batches(draw, dtype=torch.float32, max_b=8, max_t=16):
    """(logp, old_logp, ref_logp (B, T) in `dtype`; advantages (B,) float32; mask, functional_mask (B, T) bool).

    Hypothesis draws the structure: the shape, which kinds of log-ratio occur, the advantages (0 for a
    constant group), each row's length (right-padded as the sampler's completions are; 0 is an empty row)
    and the share of functional positions (possibly none in a row, or all). A seeded generator fills in
    the B·T values: drawing each through hypothesis costs ten times the test itself.
    ref_logp is None when the draw says so.
    """
    B, T = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    logp = -BOUND * torch.rand(B, T, generator=g)  # (B, T), in (−20, 0]

    def log_ratios(kinds):  # (B, T), inside ±(BOUND − 1) so that rounding to `dtype` stays inside the clamp
        near = (0.3 * torch.randn(B, T, generator=g)).clamp(-BOUND + 1, BOUND - 1)
        far = (BOUND - 1) * (2 * torch.rand(B, T, generator=g) - 1)
        kinds = sorted(kinds)
        pick = torch.randint(0, len(kinds), (B, T), generator=g)
        by_kind = {"equal": torch.zeros(B, T), "near": near, "far": far}
        return torch.stack([by_kind[k] for k in kinds])[pick, torch.arange(B)[:, None], torch.arange(T)]

    old = logp - log_ratios(draw(ratio_kinds))  # (B, T)
    ref = logp + log_ratios(draw(ratio_kinds))
    A = torch.tensor(draw(st.lists(st.just(0.0) | st.floats(-8, 8, width=32), min_size=B, max_size=B)))  # (B,)
    lengths = torch.tensor(draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))  # (B,)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    fmask = (torch.rand(B, T, generator=g) < draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))) & mask  # (B, T)
    # rounded to `dtype` after the differences are made: the references start from these rounded values
    return logp.to(dtype), old.to(dtype), None if draw(st.booleans()) else ref.to(dtype), A, mask, fmask


def floats(x):
    """A tensor as nested lists of python floats (float64), for the loops."""
    return None if x is None else x.double().tolist()


def loop_loss(logp, old, ref, A, mask, fmask, clip_eps, kl_coef, anchor_coef):
    """L_LA-GRPO of docs/method.md, token by token in python floats."""
    B, T = len(logp), len(logp[0])
    o = [[t for t in range(T) if mask[i][t]] for i in range(B)]  # o_i
    F = [[t for t in o[i] if fmask[i][t]] for i in range(B)]  # F_i

    def ell(i, t):
        r = math.exp(logp[i][t] - old[i][t])
        return -min(r * A[i], min(max(r, 1 - clip_eps), 1 + clip_eps) * A[i])

    def D(i, t):
        d = ref[i][t] - logp[i][t]
        return math.exp(d) - d - 1

    rows, I_F = [i for i in range(B) if o[i]], [i for i in range(B) if F[i]]
    L_grpo = sum(sum(ell(i, t) + (kl_coef * D(i, t) if ref is not None else 0.0) for t in o[i]) / len(o[i])
                 for i in rows) / len(rows) if rows else 0.0
    L_anchor = sum(sum(ell(i, t) for t in F[i]) / len(F[i]) for i in I_F) / len(I_F) if I_F else 0.0
    return L_grpo + anchor_coef * L_anchor


def loop_gradient(logp, old, ref, A, mask, fmask, clip_eps, kl_coef, anchor_coef):
    """∂L/∂log π_θ(i, t), derived by hand: dℓ/dlogp = −r·A where the unclipped branch is the min, else 0;
    dD/dlogp = 1 − exp(log π_ref − log π_θ); token t of row i weighs 1/(|o_i|·#rows) in L_GRPO and
    λ/(|F_i|·|I_F|) in L_anchor."""
    B, T = len(logp), len(logp[0])
    o = [[t for t in range(T) if mask[i][t]] for i in range(B)]
    F = [[t for t in o[i] if fmask[i][t]] for i in range(B)]
    rows, I_F = [i for i in range(B) if o[i]], [i for i in range(B) if F[i]]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in o[i]:
            r = math.exp(logp[i][t] - old[i][t])
            dell = -r * A[i] if r * A[i] <= min(max(r, 1 - clip_eps), 1 + clip_eps) * A[i] else 0.0
            dD = 1 - math.exp(ref[i][t] - logp[i][t]) if ref is not None else 0.0
            grad[i][t] += (dell + kl_coef * dD) / (len(o[i]) * len(rows))
            if t in F[i]:
                grad[i][t] += anchor_coef * dell / (len(F[i]) * len(I_F))
    return grad


def term_sizes(logp, old, ref, A, mask, clip_eps, kl_coef):
    """(B, T) float64: per token, |ℓ| and β·|D| with their rounding's growth (an exp(x) computed from a
    rounded x is off by |x| roundings), 0 off the mask: what the loss's rounding error scales with."""
    lr = (logp.double() - old.double())  # (B, T)
    size = (1 + lr.abs()) * torch.maximum(lr.exp(), torch.tensor(1 + clip_eps)) * A.double().abs()[:, None]
    if ref is not None:
        d = ref.double() - logp.double()
        size = size + kl_coef * ((1 + d.abs()) * d.exp() + d.abs() + 1)
    return torch.where(mask, size, 0.0)


def whole_batch_counts(mask, fmask):
    """(num_outputs, num_anchor_outputs): rows with a generated token, rows with a functional one."""
    rows = mask.tolist()
    frows = (fmask & mask).tolist()
    return sum(any(r) for r in rows), sum(any(r) for r in frows)


def _loss(x, old, ref, A, mask, fmask, c, **counts):
    kl_coef = c["kl_coef"] if ref is not None else 0.0
    return grpo.grpo_loss(x, old, ref, A, mask, fmask, clip_eps=c["clip_eps"], kl_coef=kl_coef,
                          anchor_coef=c["anchor_coef"], **counts)[0]


@logp_dtypes
@given(st.data(), coefs)
def test_grpo_loss_equals_a_per_token_loop(dtype, data, c):
    logp, old, ref, A, mask, fmask = data.draw(batches(dtype))
    loss = _loss(logp, old, ref, A, mask, fmask, c)
    kl_coef = c["kl_coef"] if ref is not None else 0.0
    want = loop_loss(floats(logp), floats(old), floats(ref), A.tolist(), mask.tolist(), fmask.tolist(),
                     c["clip_eps"], kl_coef, c["anchor_coef"])
    size = float(term_sizes(logp, old, ref, A, mask, c["clip_eps"], kl_coef).max())
    assert abs(loss.item() - want) <= _tol(dtype, (1 + c["anchor_coef"]) * size)


@given(st.data(), coefs)
def test_grpo_loss_gradient_equals_the_hand_derived_gradient(data, c):
    logp, old, ref, A, mask, fmask = data.draw(batches(torch.float32))
    r = (logp.double() - old.double()).exp()  # (B, T)
    # the surrogate has a kink where r crosses 1 ± ε (A ≠ 0): no gradient is defined there, keep away from it
    assume(not (mask & (((r - 1).abs() - c["clip_eps"]).abs() < 1e-4)).any())
    x = logp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss(x, old, ref, A, mask, fmask, c), x)
    kl_coef = c["kl_coef"] if ref is not None else 0.0
    want = torch.tensor(loop_gradient(floats(logp), floats(old), floats(ref), A.tolist(), mask.tolist(),
                                      fmask.tolist(), c["clip_eps"], kl_coef, c["anchor_coef"]), dtype=torch.float64)
    size = term_sizes(logp, old, ref, A, mask, c["clip_eps"], kl_coef)  # (B, T): the same growth as the terms'
    n_rows, n_anchor = whole_batch_counts(mask, fmask)
    # a token weighs ≤ 1/#rows in L_GRPO and ≤ λ/|I_F| in L_anchor
    bound = _tol(torch.float32, size * (1 / max(n_rows, 1) + c["anchor_coef"] / max(n_anchor, 1)))
    assert ((g.double() - want).abs() <= bound).all()


beyond_the_clamp = st.sampled_from([-math.inf, -1000.0, 1000.0])  # log π_old or log π_ref minus log π_θ


@logp_dtypes
@given(st.data(), coefs)
def test_log_ratios_beyond_the_clamp_give_a_finite_loss_and_gradient(dtype, data, c):
    logp, old, ref, A, mask, fmask = data.draw(batches(dtype))
    B, T = logp.shape
    far_old = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T)
    far_ref = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T)
    assume(far_old.any() or (ref is not None and far_ref.any()))
    old = torch.where(far_old, logp.float() + data.draw(beyond_the_clamp), old.float()).to(dtype)  # (B, T)
    if ref is not None:
        ref = torch.where(far_ref, logp.float() + data.draw(beyond_the_clamp), ref.float()).to(dtype)
    x = logp.clone().requires_grad_(True)
    loss = _loss(x, old, ref, A, mask, fmask, dict(c, kl_coef=max(c["kl_coef"], 0.01)))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


@st.composite
def cuts(draw, B):
    """Slices of range(B): the micro-batches (or ranks) one batch is cut into."""
    points = sorted(set(draw(st.lists(st.integers(1, max(B - 1, 1)), max_size=4)))) if B > 1 else []
    edges = [0] + points + [B]
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


@given(st.data(), coefs)
def test_micro_batches_with_the_whole_batchs_counts_add_up_to_the_whole_batch_loss(data, c):
    logp, old, ref, A, mask, fmask = data.draw(batches())
    slices = data.draw(cuts(logp.shape[0]))
    n_out, n_anchor = whole_batch_counts(mask, fmask)
    whole = _loss(logp, old, ref, A, mask, fmask, c).item()
    parts = [_loss(logp[s], old[s], ref if ref is None else ref[s], A[s], mask[s], fmask[s], c,
                   num_outputs=n_out, num_anchor_outputs=n_anchor).item() for s in slices]
    size = float(term_sizes(logp, old, ref, A, mask, c["clip_eps"], c["kl_coef"]).max())
    assert abs(sum(parts) - whole) <= _tol(torch.float32, (1 + c["anchor_coef"]) * size)


@given(st.data(), coefs)
def test_micro_batches_with_the_whole_batchs_counts_add_up_to_the_whole_batch_gradient(data, c):
    logp, old, ref, A, mask, fmask = data.draw(batches())
    slices = data.draw(cuts(logp.shape[0]))
    n_out, n_anchor = whole_batch_counts(mask, fmask)
    x_whole, x_parts = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    _loss(x_whole, old, ref, A, mask, fmask, c).backward()
    for s in slices:  # gradient accumulation: one backward per micro-batch into the same .grad
        _loss(x_parts[s], old[s], ref if ref is None else ref[s], A[s], mask[s], fmask[s], c,
              num_outputs=n_out, num_anchor_outputs=n_anchor).backward()
    size = term_sizes(logp, old, ref, A, mask, c["clip_eps"], c["kl_coef"])  # (B, T)
    bound = _tol(torch.float32, size * (1 / max(n_out, 1) + c["anchor_coef"] / max(n_anchor, 1)))  # as above
    assert ((x_parts.grad.double() - x_whole.grad.double()).abs() <= bound).all()


@given(st.data(), coefs)
def test_lambda_zero_is_plain_grpo_in_loss_and_gradient(data, c):
    logp, old, ref, A, mask, fmask = data.draw(batches())
    c = dict(c, anchor_coef=0.0)
    x, x_plain = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    loss, plain = _loss(x, old, ref, A, mask, fmask, c), _loss(x_plain, old, ref, A, mask, torch.zeros_like(fmask), c)
    loss.backward()
    plain.backward()
    assert loss.item() == plain.item() and torch.equal(x.grad, x_plain.grad)


@given(st.data(), coefs)
def test_the_anchor_sends_no_gradient_off_functional_positions(data, c):
    logp, old, ref, A, mask, fmask = data.draw(batches())
    lam = data.draw(st.floats(0.1, 2.0))
    grads = []
    for anchor_coef in (0.0, lam):
        x = logp.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(_loss(x, old, ref, A, mask, fmask, dict(c, anchor_coef=anchor_coef)), x)[0])
    assert torch.equal(grads[1][~fmask], grads[0][~fmask])


# ============================================================================ The sampler's draw
# token ~ softmax(logits) restricted to the top-p nucleus (the smallest prefix, by descending probability,
# with mass ≥ p) and renormalised; `_draw` takes it by inverse CDF from the step's exp(logits − max),
# with one uniform u ∈ [0, 1) per row.

BELOW_ONE = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()  # 1 − 2^-24, float32's largest u < 1
# exp(x) < 2^-150 (half float32's smallest subnormal) rounds to 0: a token this far below the row's largest
# logit has probability exactly 0 in float32. 0.5 more keeps clear of exp's last-bit rounding.
ZERO_PROBABILITY_GAP = math.log(2.0 ** -150) - 0.5  # ≈ −104.5


@st.composite
def logit_rows(draw, max_v=700, rows=4):
    """(R, V) float32 logits as a policy's, after the sampler bans tokens with -inf: V up to 700 (the
    toy tokenizer's size) or Qwen's 152,064; spreads from flat to peaked enough that some probabilities
    underflow to 0; token 0 (where a `cum < u·total` rule lands for u = 0) as drawn, banned, or underflowed."""
    V = 152_064 if max_v > 64 and draw(st.integers(0, 9)) == 0 else draw(st.integers(2, max_v))  # Qwen's in 1 of 10
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0, 100.0]))
    logits = torch.randn(rows, V, generator=g) * scale  # (R, V)
    banned = torch.rand(rows, V, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    first = draw(st.sampled_from(["as drawn", "banned", "underflows"]))
    keep = torch.randint(1, V, (rows,), generator=g)  # one allowed token per row, so no row is all -inf
    banned[torch.arange(rows), keep] = False
    logits = logits.masked_fill(banned, -math.inf)
    if first == "banned":
        logits[:, 0] = -math.inf
    elif first == "underflows":
        logits[:, 0] = logits.max(dim=1).values - 200
    return logits


def probabilities(logits):
    """softmax in float64, one row (a list): the distribution the draw samples, apart from the code."""
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


def nucleus(p, top_p):
    """The smallest prefix, by descending probability, with mass ≥ top_p, as a set of token ids, and the
    margin by which the mass of its prefixes misses top_p (the nearest one)."""
    order = sorted(range(len(p)), key=lambda k: -p[k])
    kept, mass, margin = set(), 0.0, math.inf
    for k in order:
        kept.add(k)
        mass += p[k]
        margin = min(margin, abs(mass - top_p))
        if mass >= top_p:
            break
    return kept, margin


def chi2_sf(x, df):
    """P(χ²_df > x), exactly: the regularised upper incomplete gamma function Q(df/2, x/2) by its finite
    series (a half-integer order starts from erfc). `test_the_chi_square_tail_matches_a_printed_table`
    checks it against a table."""
    h = x / 2
    if df % 2 == 0:
        term = math.exp(-h)  # Q(1, h)
        total = term
        for j in range(1, df // 2):
            term *= h / j
            total += term
        return total
    total = math.erfc(math.sqrt(h))  # Q(1/2, h)
    term = math.exp(-h) * math.sqrt(h) / math.gamma(1.5)
    for j in range(1, (df + 1) // 2):
        total += term
        term *= h / (j + 0.5)
    return total


def chi2_p_value(counts, q, n):
    """P-value of Pearson's χ² for observed `counts` against probabilities `q` over n draws. Cells expected
    below 5 times are pooled (χ²'s approximation wants ≥ 5), and a pool still below 5 joins the likeliest
    cell: a grouping fixed by q alone, before the counts are seen. 1.0 when only one cell is left."""
    cells = [[k] for k in range(len(q)) if n * q[k] >= 5]
    small = [k for k in range(len(q)) if n * q[k] < 5]
    if small and n * sum(q[k] for k in small) >= 5:
        cells.append(small)
    elif small:
        max(cells, key=lambda cell: sum(q[k] for k in cell)).extend(small)
    if len(cells) < 2:
        return 1.0
    stat = 0.0
    for cell in cells:
        expected = n * sum(q[k] for k in cell)
        stat += (sum(counts[k] for k in cell) - expected) ** 2 / expected
    return chi2_sf(stat, len(cells) - 1)


def draw_logits(logits, top_p, u):
    """The sampler's path from logits (-inf where banned) to tokens: the step's exp(logits − max), then `_draw`."""
    weights = torch.empty(logits.shape)  # (n, V)
    log_partition_and_entropy(logits, weights)
    return _draw(weights, top_p, u)


N_DRAWS = 20_000
# A correct draw fails one example's test with chance 1e-6; over the ~120 examples of the two χ² properties, a
# run with a correct sampler fails with chance ~1e-4 (derandomized, such a failure would repeat on every run).
FALSE_ALARM = 1e-6


def draw_many(logits, top_p):
    """Token counts of N_DRAWS draws from one row of logits, with uniforms from a fixed seed. (V,) list"""
    u = torch.rand(N_DRAWS, generator=torch.Generator().manual_seed(0))  # (n,)
    picks = draw_logits(logits[None, :].expand(N_DRAWS, -1), top_p, u)  # (n,)
    return torch.bincount(picks, minlength=logits.shape[0]).tolist()


@given(logit_rows(), st.just(1.0) | st.floats(0.01, 1.0),
       st.lists(st.floats(0.0, 1.0, exclude_max=True, width=32), max_size=6))
def test_the_draw_never_takes_a_banned_or_zero_probability_token(logits, top_p, drawn_u):
    R, V = logits.shape
    u = torch.tensor([0.0, BELOW_ONE] + drawn_u)  # (K,): u = 0 and the largest float32 u always
    K = len(u)
    picks = draw_logits(logits.repeat_interleave(K, 0), top_p, u.repeat(R)).view(R, K)  # (R, K)
    for row, ks in zip(logits.tolist(), picks.tolist()):
        top = max(row)
        for k, uk in zip(ks, u.tolist()):
            assert 0 <= k < V and row[k] - top >= ZERO_PROBABILITY_GAP, \
                f"u={uk!r} took token {k} with logit {row[k]} (the row's largest: {top})"


@given(logit_rows(max_v=50, rows=1))
def test_draws_follow_the_softmax_by_a_chi_square_test(logits):
    counts = draw_many(logits[0], 1.0)
    assert chi2_p_value(counts, probabilities(logits[0].tolist()), N_DRAWS) > FALSE_ALARM


def _nucleus_or_skip(logits, top_p):
    p = probabilities(logits.tolist())
    kept, margin = nucleus(p, top_p)
    # float32 sums are off by ~1e-7: keep clear of the boundary where the nucleus is a matter of rounding,
    # and of ties at its edge, where which of two equal tokens is kept is the sort's choice
    edge = min(p[k] for k in kept)
    assume(margin > 1e-5 and not any(k not in kept and abs(p[k] - edge) <= 1e-6 * edge for k in range(len(p))))
    return p, kept


@given(logit_rows(max_v=50, rows=1), st.floats(0.05, 0.99))
def test_top_p_never_draws_a_token_outside_the_smallest_prefix_with_mass_p(logits, top_p):
    _, kept = _nucleus_or_skip(logits[0], top_p)
    counts = draw_many(logits[0], top_p)
    assert all(counts[k] == 0 for k in range(len(counts)) if k not in kept)


@given(logit_rows(max_v=50, rows=1), st.floats(0.05, 0.99))
def test_top_p_draws_the_nucleus_at_its_renormalised_probabilities(logits, top_p):
    p, kept = _nucleus_or_skip(logits[0], top_p)
    mass = sum(p[k] for k in kept)
    q = [p[k] / mass if k in kept else 0.0 for k in range(len(p))]
    assert chi2_p_value(draw_many(logits[0], top_p), q, N_DRAWS) > FALSE_ALARM


@pytest.mark.parametrize("df, x95", [(1, 3.841), (2, 5.991), (3, 7.815), (10, 18.307), (49, 66.339)])
def test_the_chi_square_tail_matches_a_printed_table(df, x95):
    """The 0.95 quantiles of χ² (any statistics table, to 3 decimals): the helper's tail there is 0.05."""
    assert chi2_sf(x95, df) == pytest.approx(0.05, abs=2e-4)


# ============================================================================ Reward
# compute_reward never raises on any string (model output is hostile input); equivalence is symmetric
# where its rule is.

# answers as models and benchmarks write them, for each rule of rewards.py's pipeline
ANSWERS = ["5", "-3", "\u22123", "+2", "0.5", ".5", "5.", "1,000", "1000", "1,5", "1/2", "\\frac{1}{2}", "\\frac12",
           "\\dfrac{\\sqrt{3}}{2}", "2\\sqrt{3}", "\\sqrt{12}", "\u221a12", "30^\\circ", "30^{\\circ}", "30\u00b0",
           "30 degrees", "50\\%", "50%", "5 cm", "5cm", "5\\,cm", "5 m", "5 m^2", "5 cm\u00b2", "A", "B", "b", "(B)",
           "B.", "B)", "B:", "B. red", "(A) red", "Option B", "red", "Red", "blue", "yes", "Yes.", "x = 3", "3",
           "\\text{B}", "\\textbf{red}", "\\boxed{5}", "**B**", "$5$", "\\$5", "1{,}000", "...", "9" * 70, "1e9",
           "x^2", "2x", "10**3", "\\angle ABC = 30^\\circ", ""]
# ways of writing one answer differently (the normalisation rules undo most of them)
REWRITES = [str.upper, str.lower, str.swapcase, "\\text{{{}}}".format, "${}$".format, "**{}**".format,
            "The answer is {}".format, "Answer: {}".format, "{}.".format, "x = {}".format, "({})".format,
            "{} cm".format, "{}\u00b0".format, "{}\\%".format, " {} ".format]
FRAGMENTS = ANSWERS + ["\\boxed{", "{", "}", "<answer>", "</answer>", "<|Zoom|>", "<|Line|>", "\\frac", "\\sqrt",
                       "(", ")", "=", "<=", "/", " ", "\n", "\\", "^", "$", "**"]


def rewrite(answer, rewrites):
    for f in rewrites:
        answer = f(answer)
    return answer


# free text: a soup of answer pieces and LaTeX-ish fragments (cut anywhere, so braces and commands are left
# open), or any unicode
texts = (st.builds(lambda parts, cut: "".join(parts)[:cut],
                   st.lists(st.sampled_from(FRAGMENTS), max_size=10), st.integers(0, 120))
         | st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=10).map("".join)
         | st.text(max_size=200))
written = st.builds(rewrite, st.sampled_from(ANSWERS), st.lists(st.sampled_from(REWRITES), max_size=2))
answers = written | st.builds(lambda a, cut: a[:cut], written, st.integers(0, 20)) | texts  # whole, cut off, or free
# replies: free text, or text around an answer in the tag or boxed format (so the answer reaches the comparison)
completions = texts | st.builds(lambda before, answer, form: before + form.format(answer), texts, answers,
                                st.sampled_from(["<answer>{}</answer>", "\\boxed{{{}}}", "$\\boxed{{{}}}$.",
                                                 "<|Zoom|> <answer>{}</answer>"]))
# pairs of answers that are often the same answer written two ways, so that equivalence is exercised
answer_pairs = (st.sampled_from(ANSWERS).flatmap(lambda a: st.tuples(
                    st.builds(rewrite, st.just(a), st.lists(st.sampled_from(REWRITES), max_size=3)),
                    st.builds(rewrite, st.just(a), st.lists(st.sampled_from(REWRITES), max_size=3))))
                | st.tuples(answers, answers))
# string functions cost ~1 ms an example and have many branches: five times the profile's examples
strings = settings(max_examples=5 * settings.default.max_examples)


@strings
@given(completions, answers, texts, st.sampled_from(PRESETS), st.none() | st.integers(0, 2048),
       st.none() | st.lists(st.sampled_from(["<|Zoom|>", "<|Line|>"]), max_size=12))
def test_compute_reward_never_raises_on_any_text(completion, answer, question, preset, num_tokens, functional):
    scores = rewards.compute_reward(completion, answer, CONFIGS[preset], question=question,
                                    num_tokens=num_tokens, functional=functional)
    assert math.isfinite(scores["total"])


@strings
@given(answers, answers, texts)
def test_answers_equivalent_never_raises_on_any_pair(a, b, question):
    assert rewards.answers_equivalent(a, b, question=question) in (True, False)


def _letter_with_text(answer):
    """`B. red`, `(B) red`: a letter followed by an option's text (after normalisation)."""
    text = rewards.normalise_answer(answer)
    letters = frozenset(rewards.LETTERS)
    return rewards.choice_letter(text, letters, with_text=True) != rewards.choice_letter(text, letters, with_text=False)


@strings
@given(answer_pairs)
def test_answers_equivalent_is_symmetric_without_a_question_between_answers_without_option_text(pair):
    # By design not symmetric when one side is a letter with text: without options, a *prediction*
    # `B. red` names choice B (it equals gold `B`), but a *gold* `B. red` is a name ("A. Lincoln"), which
    # a bare `B` does not match (answers_equivalent's docstring and comment).
    a, b = pair
    assume(not _letter_with_text(a) and not _letter_with_text(b))
    assert rewards.answers_equivalent(a, b) == rewards.answers_equivalent(b, a)


option_texts = st.sampled_from(["red", "blue", "5 cm", "1/2", "0.5", "A", "x = 3", "3", "\\frac{1}{2}", "30\u00b0"])
option_styles = st.sampled_from(["({L}) {t} ", "{L}. {t}\n", "{L}: {t}, ", "{L}) {t}\n"])  # BLINK, lines, WeMath, …
questions_with_options = st.builds(
    lambda options, style: "Which one? " + "".join(style.format(L=letter, t=t)
                                                   for letter, t in zip(rewards.LETTERS, options)),
    st.lists(option_texts, min_size=2, max_size=5), option_styles)


@strings
@given(answer_pairs, questions_with_options)
def test_answers_equivalent_is_symmetric_when_the_question_lists_options(pair, question):
    # with options, both sides are read the same way: a letter, a letter with its option's text, or the text
    a, b = pair
    assert rewards.answers_equivalent(a, b, question=question) == rewards.answers_equivalent(b, a, question=question)


# --- which prompts share an update: the same on any number of processes (data.rank_share) ----------------------

@given(world=st.sampled_from([1, 2, 4, 8, 16]), updates=st.integers(1, 8), per_rank=st.integers(1, 8))
def test_each_update_holds_the_same_prompts_on_any_number_of_processes(world, updates, per_rank):
    from atlas_min.data import rank_share
    # the presets' range: 1-16 processes, 1-8 mini-batches a step, 1-8 prompts of a mini-batch per rank
    per_update = world * per_rank  # rl_mini_batch / G prompts
    n = updates * per_update  # prompts_per_step
    shares = [rank_share(n, per_update, rank, world) for rank in range(world)]
    assert sorted(p for share in shares for p in share) == list(range(n))  # every prompt on exactly one rank
    for m in range(updates):  # train_rl's update m takes each rank's m-th slice of per_rank prompts
        held = {p for share in shares for p in share[m * per_rank:(m + 1) * per_rank]}
        assert held == set(range(m * per_update, (m + 1) * per_update))  # as on 1 process: prompts m·M .. (m+1)·M − 1


# --- an update's micro-batches: rows of similar length together (data.micro_batches) ------------------------------

@given(data=st.data(), G=st.sampled_from([4, 8]), prompts=st.integers(1, 8), updates=st.integers(1, 4))
def test_an_updates_micro_batches_hold_each_of_its_rows_once_and_the_longer_rows_first(data, G, prompts, updates):
    from atlas_min.data import micro_batches
    # the presets' range: 1-8 prompts of a mini-batch per rank, micro-batches of whole groups, rows of a 7B rollout
    # 2..1,024 reply tokens after prompts of up to 1,536
    size = G * data.draw(st.integers(1, prompts))
    per_update = G * prompts
    lengths = torch.tensor(data.draw(st.lists(st.integers(2, 2560), min_size=updates * per_update,
                                              max_size=updates * per_update)))
    batches = micro_batches(lengths, per_update, size)
    assert [update for update, _ in batches] == [slice(m * per_update, (m + 1) * per_update) for m in range(updates)]
    for update, micros in batches:
        rows = [int(r) for micro in micros for r in micro]
        assert sorted(rows) == list(range(update.start, update.stop))  # each row of the update, once
        assert all(len(micro) <= size for micro in micros) and len(micros) == -(-per_update // size)
        assert all(micro.tolist() == sorted(micro.tolist()) for micro in micros)  # a prompt's rows adjoin
        for longer, shorter in zip(micros, micros[1:]):
            assert lengths[longer].min() >= lengths[shorter].max()
        if per_update <= size:  # one micro-batch: the update's rows as they are
            assert micros[0].tolist() == list(range(update.start, update.stop))
