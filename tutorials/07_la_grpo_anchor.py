# %% [markdown]
# # 07 — LA-GRPO: gradient dilution and the functional-token anchor (docs/method.md, "LA-GRPO"; paper §2.3)
#
# In ATLAS an output has 203.7 generated tokens on average, of which 4.8 are functional tokens such
# as `<|Line|>` (§2.3): a *functional token share* (functional tokens / generated tokens) of
# 4.8 / 203.7 = 2.4% (the paper rounds it to 2.3%). GRPO gives every token of output i the same
# advantage A_i and averages over the output's tokens, so each token gets 1/|o_i| of the output's
# signal: the few functional tokens get 2.4% of it. LA-GRPO adds a second average, over the
# functional positions F_i only (the normalisation and lambda's value are our reading of the paper's
# text, docs/method.md, "LA-GRPO"):
#
#     L_anchor    = mean_{i in I_F} [ (1/|F_i|) sum_{t in F_i} l_{i,t} ]    (0 when I_F is empty)
#     L_LA-GRPO   = L_GRPO + lambda * L_anchor
#
# l_{i,t} is tutorial 06's clipped surrogate, I_F the outputs with at least one functional token.
# Implementations: `grpo_loss(..., anchor_coef=lambda)` and the diagnostic `functional_grad_share`,
# which measures the *functional gradient share*, sum_{t in F} |dL/dlog pi_t| / sum_t |dL/dlog pi_t|.

# %%
import torch

from atlas_min.grpo import functional_grad_share, group_advantages, grpo_loss

torch.set_printoptions(precision=4, sci_mode=False)
assert round(100 * 4.8 / 203.7, 1) == 2.4  # the paper's functional token share, as stated above

# %% [markdown]
# ## A batch shaped like the paper's
# Two prompts x G = 4 outputs, 178 to 200 tokens each, 4-6 functional tokens per output, and one
# output that used none (it is left out of the anchor's mean, I_F).

# %%
g = torch.Generator().manual_seed(0)
B, T = 8, 200
lengths = [200, 192, 185, 200, 178, 200, 196, 190]
n_functional = [5, 4, 4, 6, 4, 5, 4, 0]
mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
functional_mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
for i in range(B):
    functional_mask[i, torch.randperm(lengths[i], generator=g)[: n_functional[i]]] = True
rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
advantages = group_advantages(rewards, group_size=4)
old_logp = -2 * torch.rand(B, T, generator=g)
logp = old_logp + 0.02 * torch.randn(B, T, generator=g)  # early in the update: ratios close to 1
ref_logp = old_logp + 0.05 * torch.randn(B, T, generator=g)
f = functional_mask.sum().item() / mask.sum().item()
print(f"generated tokens: {mask.sum().item()}, functional: {functional_mask.sum().item()} "
      f"-> functional token share f = {f:.4f}")
print("advantages:", advantages)
in_IF = functional_mask.sum(1) > 0  # (B,): the outputs in I_F
assert min(lengths) == 178 and max(lengths) == 200 and sorted(set(n_functional)) == [0, 4, 5, 6]
assert functional_mask.sum(1).tolist() == n_functional and int(in_IF.sum()) == 7 and 0.02 < f < 0.025

# %% [markdown]
# ## The functional gradient share, for several lambda
# `functional_grad_share` differentiates the loss w.r.t. the per-token log-probs and returns the
# functional gradient share sum_{functional} |g| / sum_{all} |g|: how much of the policy-gradient
# "mass" lands on the functional tokens. With ratios ~1 (no clipping) and no KL, token t of output i gets
#     |g| = |A_i| / (B |o_i|)  +  lambda [t in F_i] |A_i| / (|I_F| |F_i|).
# Summed over all tokens that is sum_i |A_i| / B + lambda sum_{i in I_F} |A_i| / |I_F|; over the
# functional ones sum_i |A_i| f_i / B + the same anchor sum, with f_i = |F_i| / |o_i|. The share is
#     (f + lambda) / (1 + lambda)
# only under three assumptions: every |A_i| is equal, every output is in I_F (has a functional
# token), and every output has the same proportion f_i = f. Then the total is |A| (1 + lambda) and
# the functional part |A| (f + lambda). Below, f is the batch's functional token share.

# %%
print(f"{'lambda':>6} | {'functional gradient share':>25} | {'(f + lambda)/(1 + lambda)':>25} | {'anchor':>7} | {'loss':>8}")
shares, values = {}, {}  # values: lambda -> (L_anchor, the loss)
for lam in (0.0, 0.5, 1.0, 2.0):
    share = shares[lam] = functional_grad_share(logp, old_logp, ref_logp, advantages, mask, functional_mask,
                                                clip_eps=0.2, kl_coef=0.01, anchor_coef=lam)
    loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, functional_mask,
                            clip_eps=0.2, kl_coef=0.01, anchor_coef=lam)
    values[lam] = stats["anchor"], loss.item()
    print(f"{lam:6.1f} | {share:25.4f} | {(f + lam) / (1 + lam):25.4f} | {stats['anchor']:7.4f} | {loss.item():8.4f}")
    assert abs(share - (f + lam) / (1 + lam)) < 0.02  # close to the formula, not equal: see below

# %% [markdown]
# With lambda = 0 (plain GRPO) the functional gradient share is ~2%, about the functional token
# share: this is the dilution. lambda = 1 already gives the functional tokens about half of the
# gradient, lambda = 2 about two thirds, whatever the output length. The measured values differ a
# little (here by < 0.02) from the formula because the assumptions above do not quite hold: outputs
# differ in length, in functional-token count and in |A_i| (0.5, 0.866 or 1.5 here), the eighth
# output has no functional token at all (I_F has 7 of the 8), and r is not exactly 1 (and there is a
# small KL term). The anchor does not change *which* direction each functional token is pushed (it
# reuses the same A_i and the same clipped l), only how hard.
#
# lambda compares *gradients*, not loss values. Summed over tokens at r ~ 1, GRPO's |g| is
# sum_i |A_i| / B and the anchor's sum_{i in I_F} |A_i| / |I_F|: both a mean |A_i|, one scale. The
# values are not: at r ~ 1, L_GRPO ~ -mean_i A_i, and a group's advantages sum to 0, so L_GRPO is
# near 0 (the lambda = 0 row's loss, 0.0002), while L_anchor averages only the outputs of I_F, and
# leaving output 7 (A = +0.5) out gives -(-0.5) / 7 ~ 0.07 (the anchor column, 0.0724).

# %%
assert abs(shares[0.0] - f) < 0.005 and 0.015 < shares[0.0] < 0.025
assert abs(values[0.0][1]) < 0.001 and abs(values[0.0][0] - 0.5 / 7) < 0.005  # the two values above
assert abs(shares[1.0] - 1 / 2) < 0.05 and abs(shares[2.0] - 2 / 3) < 0.05
assert sorted({round(a, 3) for a in advantages.abs().tolist()}) == [0.5, 0.866, 1.5] and not in_IF[7]

# %% [markdown]
# ## Per-token gradients: a text token vs a functional token (output 0, lambda = 0 and 1)

# %%
i = 0
t_f = functional_mask[i].nonzero()[0].item()
t_text = (~functional_mask[i] & mask[i]).nonzero()[0].item()
grads = {}
for lam in (0.0, 1.0):
    x = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, old_logp, None, advantages, mask, functional_mask,
                        clip_eps=0.2, kl_coef=0.0, anchor_coef=lam)
    (grads[lam],) = torch.autograd.grad(loss, x)
    print(f"lambda {lam}: dL/dlogp at text token {t_text}: {grads[lam][i, t_text]:+.6f}, "
          f"at functional token {t_f}: {grads[lam][i, t_f]:+.6f}")
expected_text, expected_anchor = -advantages[0] / (B * lengths[0]), -advantages[0] / (7 * n_functional[0])
print(f"expected (r ~ 1): text -A_0/(B|o_0|) = {expected_text:+.6f}; "
      f"anchor adds -A_0/(|I_F||F_0|) = {expected_anchor:+.6f}")
assert torch.isclose(grads[0.0][i, t_text], expected_text, rtol=0.05) and torch.isclose(grads[0.0][i, t_f], expected_text, rtol=0.05)
assert torch.isclose(grads[1.0][i, t_f] - grads[0.0][i, t_f], expected_anchor, rtol=0.05)

# %% [markdown]
# (A negative gradient of the loss w.r.t. log pi means a gradient-descent step *raises* that
# token's probability: output 0 was correct, A_0 > 0.) At lambda = 1 the anchor alone pushes the
# functional token (B |o_0|) / (|I_F| |F_0|) = 1600 / 35 ≈ 46 times as hard as a text token of its
# output is pushed; with GRPO's own push on top, ≈ 47 times.

# %%
anchor_ratio = ((grads[1.0][i, t_f] - grads[0.0][i, t_f]) / grads[1.0][i, t_text]).item()
total_ratio = (grads[1.0][i, t_f] / grads[1.0][i, t_text]).item()
print(f"measured: anchor alone {anchor_ratio:.1f}x, in all {total_ratio:.1f}x a text token (1600 / 35 = {1600 / 35:.1f})")
assert (B * lengths[0], 7 * n_functional[0], round(1600 / 35)) == (1600, 35, 46) and advantages[0] > 0
assert abs(anchor_ratio / (1600 / 35) - 1) < 0.05 and abs(total_ratio / (1 + 1600 / 35) - 1) < 0.05

# %% [markdown]
# ## The anchor touches functional positions only
# The anchor's own gradient, grad(lambda = 1) - grad(lambda = 0), is zero at every text and padding
# position: LA-GRPO leaves the GRPO update of all other tokens unchanged.

# %%
anchor_grad = grads[1.0] - grads[0.0]
nonzero = anchor_grad != 0
print("positions where the anchor's gradient is non-zero:", nonzero.sum().item(),
      "| functional positions:", functional_mask.sum().item(),
      "| same set:", torch.equal(nonzero, functional_mask))
print("largest |anchor gradient| off functional positions:", anchor_grad[~functional_mask].abs().max().item())
assert torch.equal(nonzero, functional_mask) and anchor_grad[~functional_mask].abs().max() == 0

# %% [markdown]
# ## Where this is used
# → `train_rl.py`, step 4 (`update`): `grpo_loss(…, anchor_coef=cfg.anchor_coef)` with `fmask` from
# `tokens.functional_mask` on the sampled completions' ids, and the functional gradient share logged
# per step as `functional_grad_share` (beside the functional token share, `functional_token_share`, and
# the anchor's value, `anchor`). `anchor_coef=0` on the command line gives plain GRPO. Tutorial 08
# computes both shares on a model's own samples and takes the step.
