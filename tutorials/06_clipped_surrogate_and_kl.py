# %% [markdown]
# # 06 — The clipped surrogate, the k3 KL, and the GRPO loss (docs/method.md, "Stage 2: GRPO"; paper §2.2)
#
# Per token t of output i, with the probability ratio r = exp(log pi_theta - log pi_old):
#
#     l_{i,t} = -min(r * A_i, clip(r, 1-eps, 1+eps) * A_i)                       (a loss to minimise)
#     D_{i,t} = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1    (k3 KL estimator)
#     L_GRPO  = mean_i [ (1/|o_i|) sum_t (l_{i,t} + beta * D_{i,t}) ]              ("seq-mean-token-mean")
#
# pi_theta is the policy being trained, pi_old the same model with the weights it had when the
# step's samples were drawn (tutorial 03), pi_ref the frozen SFT model, A_i output i's advantage
# (tutorial 05), beta = `kl_coef`. "k3" names the third of the one-sample KL estimators in J. Schulman's
# note "Approximating KL Divergence": it needs only the log-probs of the sampled tokens under the two
# models, and it is never negative (the k3 section below; docs/method.md, "KL to the reference").
# Implementations: `clipped_surrogate`, `kl_k3`, `grpo_loss` in `atlas_min.grpo`.

# %%
import math

import torch

from atlas_min.grpo import LOG_RATIO_BOUND, clipped_surrogate, grpo_loss, kl_k3

torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## The ratio
# log pi_old(token) of every sampled token is computed once per RL step, before any update:
# `train_rl.py` runs the same full forward that later gives log pi_theta (`sequence_logprobs`), without
# grad. (The sampler's own log-probs, from its cached decode, agree with it only to rounding, within
# the tests' 1e-4, and are not used; tutorial 03.) So before the step's first update pi_theta == pi_old bit for bit, r = 1 exactly
# and l = -A per token (docs/method.md, "Log-probabilities"). Once an update has been applied (the
# next mini-batch of the step, or the next `ppo_epochs` pass), pi_theta has moved: r > 1 means the
# token became more likely, r < 1 less likely.

# %%
logp_old = torch.tensor([[-1.2, -0.3, -2.0]])
A_demo = torch.tensor([0.7])
print("r = 1 (pi_theta == pi_old): l =", clipped_surrogate(logp_old, logp_old, A_demo, 0.2), "= -A")
assert torch.equal(clipped_surrogate(logp_old, logp_old, A_demo, 0.2), -A_demo.expand(1, 3))
logp = torch.tensor([[-1.0, -0.3, -2.5]])
print("after an update, r = exp(logp - old_logp):", torch.exp(logp - logp_old))

# %% [markdown]
# Before `exp`, the log-ratio is clamped to ±20 (`grpo.LOG_RATIO_BOUND`), in the surrogate and in k3:
# without the bound a single log-prob of −∞ (or junk at a padding position) would make r = ∞ and the
# loss NaN. e^20 ≈ 4.9e8 is still finite in float32 and bfloat16, and a token whose probability moved
# by more than that factor is far outside any trust region anyway (docs/method.md, "Numerical guards").

# %%
bad = torch.tensor([[float("-inf"), 0.0]])  # a log pi_theta of -inf, and an ordinary one
print("l with log pi_theta = -inf:", clipped_surrogate(bad, torch.zeros(1, 2), torch.tensor([-1.0]), 0.2),
      "| k3:", kl_k3(bad, torch.zeros(1, 2)), f"| e^{LOG_RATIO_BOUND:g} = {math.exp(LOG_RATIO_BOUND):.2e}")
assert LOG_RATIO_BOUND == 20 and round(math.exp(20) / 1e8, 1) == 4.9
assert all(torch.tensor(LOG_RATIO_BOUND, dtype=d).exp().isfinite() for d in (torch.float32, torch.bfloat16))
assert clipped_surrogate(bad, torch.zeros(1, 2), torch.tensor([-1.0]), 0.2).isfinite().all()
assert kl_k3(bad, torch.zeros(1, 2)).isfinite().all()

# %% [markdown]
# ## The clipped surrogate over a sweep of ratios (eps = 0.2)
# For A > 0 we want to raise r, but the gain is capped once r > 1 + eps: the min picks the
# clipped branch, which is constant in r, so that token sends no gradient. For A < 0 the cap is
# at r < 1 - eps. On the other side (A > 0 with r small, A < 0 with r large) the unclipped branch
# stays selected, so a move in the wrong direction is always corrected: the objective is pessimistic.

# %%
eps = 0.2
ratios = torch.tensor([0.5, 0.7, 0.79, 0.9, 1.0, 1.1, 1.21, 1.3, 1.5])
logp_sweep = ratios.log().unsqueeze(0).requires_grad_(True)  # (1, 9) with old_logp = 0
print(f"{'r':>5} | {'l (A=+1)':>9} {'grad':>6} {'clipped':>8} | {'l (A=-1)':>9} {'grad':>6} {'clipped':>8}")
rows = {}
for a in (1.0, -1.0):
    ell = clipped_surrogate(logp_sweep, torch.zeros(1, len(ratios)), torch.tensor([a]), eps)
    (g,) = torch.autograd.grad(ell.sum(), logp_sweep)
    rows[a] = (ell[0].tolist(), g[0].tolist())
for j, r in enumerate(ratios.tolist()):
    cells = []
    for a in (1.0, -1.0):
        l, g = rows[a][0][j], rows[a][1][j]
        clipped = g == 0.0  # the min selected the constant, clipped branch
        cells.append(f"{l:9.3f} {g:6.2f} {'yes' if clipped else '':>8}")
    print(f"{r:5.2f} | {cells[0]} | {cells[1]}")

# %% [markdown]
# "grad" is dl/dlog pi_theta = -r * A on the unclipped branch, 0 on the clipped one. Clipping is
# active exactly when r > 1 + eps with A > 0, or r < 1 - eps with A < 0 (`stats["clip_frac"]`).

# %%
for a in (1.0, -1.0):
    ell_a, grad_a = torch.tensor(rows[a][0]), torch.tensor(rows[a][1])
    active = (ratios > 1 + eps) if a > 0 else (ratios < 1 - eps)
    assert torch.equal(grad_a == 0, active)
    assert torch.allclose(grad_a[~active], -ratios[~active] * a) and torch.allclose(ell_a[~active], -ratios[~active] * a)
    assert torch.allclose(ell_a[active], torch.full((int(active.sum()),), -(1 + eps * (1 if a > 0 else -1)) * a))

# %% [markdown]
# ## The k3 KL estimator vs the true KL
# We only have log-probs of the *sampled* tokens, not full distributions. Three one-sample
# estimators of KL(pi_theta || pi_ref) with x ~ pi_theta and d = log pi_ref(x) - log pi_theta(x):
# k1 = -d (unbiased, can be negative), k3 = exp(d) - d - 1 (unbiased, always >= 0, low variance).
# Exactly: E_{x~pi}[exp(d)] = sum_x pi_ref(x) = 1, so E[k3] = 1 + KL - 1 = KL.

# %%
g = torch.Generator().manual_seed(0)
logits = torch.randn(50, generator=g)
pi = torch.log_softmax(logits.double(), 0)
for shift in (0.1, 0.5, 1.5):
    ref = torch.log_softmax(logits.double() + shift * torch.randn(50, generator=g).double(), 0)
    true_kl = (pi.exp() * (pi - ref)).sum()
    exact_k3 = (pi.exp() * kl_k3(pi, ref)).sum()  # expectation of k3 under pi, no sampling noise
    x = torch.multinomial(pi.exp(), 2000, replacement=True, generator=g)  # 2,000 sampled tokens
    k1, k3 = (pi[x] - ref[x]), kl_k3(pi[x], ref[x])
    print(f"shift {shift}: true KL {true_kl:.4f} | E[k3] {exact_k3:.4f} | sampled k3 mean {k3.mean():.4f} "
          f"(std {k3.std():.3f}, min {k3.min():.4f}) | sampled k1 mean {k1.mean():.4f} (std {k1.std():.3f})")
    assert torch.isclose(exact_k3, true_kl, rtol=0, atol=1e-12) and k3.min() >= 0 and k1.min() < 0
    assert k3.std() < k1.std() and (shift > 0.1 or k3.std() < k1.std() / 10)

# %% [markdown]
# k3 is never negative per token (so a per-token penalty can only pull pi_theta toward pi_ref; k1 is
# negative on some tokens) and its spread is smaller than k1's, more than 10 times smaller when the
# policies are close (shift 0.1) — the usual regime.

# %% [markdown]
# ## The full loss on a toy batch
# Two prompts x two outputs (G = 2), up to 6 generated tokens each, right-padded: outputs of 6, 4, 5
# and 1 tokens, 16 in all. Functional tokens (e.g. `<|Line|>`) are marked in `functional_mask`: 2 of
# the 16.

# %%
g = torch.Generator().manual_seed(1)
B, T = 4, 6
mask = torch.tensor([[1, 1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 1, 0],
                     [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
functional_mask = torch.zeros(B, T, dtype=torch.bool)
functional_mask[0, 1] = functional_mask[2, 3] = True
old_logp = -2 * torch.rand(B, T, generator=g)
logp = old_logp + 0.25 * torch.randn(B, T, generator=g)  # pi_theta after a couple of updates
ref_logp = old_logp + 0.1 * torch.randn(B, T, generator=g)
advantages = torch.tensor([0.7, -0.7, 0.7, -0.7])
print("ratio r (masked):\n", torch.where(mask, torch.exp(logp - old_logp), torch.nan))
loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, functional_mask,
                        clip_eps=0.2, kl_coef=0.04, anchor_coef=0.0)
print("L_GRPO =", round(loss.item(), 4))
shown = ("pg_loss", "kl", "clip_frac", "ratio_mean", "functional_token_share")  # `anchor`: tutorial 07
print({k: round(stats[k], 4) for k in shown})
r = torch.exp(logp - old_logp)
A_bt = advantages[:, None].expand(B, T)
assert mask.sum(1).tolist() == [6, 4, 5, 1] and int(mask.sum()) == 16 and int(functional_mask.sum()) == 2
assert math.isclose(stats["functional_token_share"], 2 / 16)
assert math.isclose(stats["clip_frac"], float((((A_bt > 0) & (r > 1.2)) | ((A_bt < 0) & (r < 0.8)))[mask].float().mean()))
assert math.isclose(stats["ratio_mean"], r[mask].mean().item(), rel_tol=1e-6) and stats["ratio_mean"] > 1
assert math.isclose(stats["kl"], kl_k3(logp, ref_logp)[mask].mean().item(), rel_tol=1e-6)

# %% [markdown]
# The stats: `pg_loss` is the l part of L_GRPO (its sequence-mean of token-means); `kl` is the
# *token*-mean of D over all 16 generated tokens; `clip_frac` the share of tokens whose gradient was
# cut by clipping; `ratio_mean` the token-mean of r, above 1 here as the policy has moved; and
# `functional_token_share` is functional tokens / generated tokens = 2 / 16.
# (`grpo_loss` also reports `anchor`, the LA-GRPO term of tutorial 07, even when its weight is 0.)
# `train_rl.py` logs `kl`, `clip_frac`, `pg_loss`, `ratio_mean` and `anchor` per step, means over its
# micro-batches; it logs `functional_token_share` over the whole rollout, not per micro-batch.
#
# `pg_loss + beta * kl` is *not* the loss: the loss averages D per output first (sequence-mean of
# token-means), `kl` over all tokens at once, and with outputs of 6, 4, 5 and 1 tokens the two
# means differ. The terms that do add up, by hand:

# %%
ell = clipped_surrogate(logp, old_logp, advantages, 0.2)  # (B, T)
D = kl_k3(logp, ref_logp)  # (B, T)


def seq_mean_token_mean(x):
    return sum(x[i][mask[i]].mean() for i in range(B)) / B


pg_part, kl_part = seq_mean_token_mean(ell), seq_mean_token_mean(0.04 * D)
print(f"seq-mean of l       : {pg_part.item():+.4f}   (= stats['pg_loss'] {stats['pg_loss']:+.4f})")
print(f"seq-mean of beta*D  : {kl_part.item():+.4f}   (beta * stats['kl'], a token-mean: {0.04 * stats['kl']:+.4f})")
print(f"sum                 : {(pg_part + kl_part).item():+.4f}   = L_GRPO {loss.item():+.4f}")
assert math.isclose(pg_part.item(), stats["pg_loss"], rel_tol=1e-5) and torch.isclose(pg_part + kl_part, loss)
assert not math.isclose(kl_part.item(), 0.04 * stats["kl"], rel_tol=1e-3)  # the two means differ

# %% [markdown]
# Why "seq-mean-token-mean": each output weighs the same, whatever its length. Output 3 has one
# token, so that token weighs as much as all six tokens of output 0 together. A plain token-mean
# over the batch would instead let long outputs dominate:

# %%
per_token = ell + 0.04 * D
print("seq-mean-token-mean:", round(seq_mean_token_mean(per_token).item(), 4),
      "  token-mean instead:", round(per_token[mask].mean().item(), 4))
weights = torch.where(mask, 1 / mask.sum(1, keepdim=True), 0.0) / B  # each token's weight in the loss
assert torch.isclose(weights[3, 0], weights[0][mask[0]].sum())  # output 3's one token = output 0's six

# %% [markdown]
# ## Where this is used
# → `train_rl.py`, step 4 (`update`): `grpo_loss(logp, old_logp, ref_logp, advantages, mask, fmask,
# clip_eps=…, kl_coef=…, anchor_coef=…)` on every micro-batch, each slice divided by its whole
# mini-batch's counts (`num_outputs`), so the slices add up to the mini-batch's loss; the step's log
# carries `kl`, `clip_frac`, `pg_loss`, `ratio_mean` and `anchor`. `old_logp` comes from step 3's
# no-grad forward. Tutorial 07 adds the anchor; tutorial 08 runs the loss on a model.
