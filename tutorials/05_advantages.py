# %% [markdown]
# # 05 — Group-relative advantages (DESIGN.md, "Stage 2, GRPO")
#
# GRPO has no value network. For each prompt it samples a *group* of G outputs, scores each with
# the reward, and judges every output only against its siblings:
#
#     A_i = (R_i - mean_j R_j) / (std_j R_j + eps)       std unbiased (Bessel), eps = 1e-6
#
# The advantage is one number per output; every token of that output shares it.
# Implementation: `atlas_min.grpo.group_advantages`.

# %%
import sys
from pathlib import Path

try:
    import atlas_min  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from atlas_min.grpo import group_advantages

torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## Three prompts, four sampled outputs each
# Rewards come in contiguous groups: outputs 0-3 answer prompt 0, outputs 4-7 prompt 1, and so on.
# Composite rewards (accuracy + functional-token bonus + format - penalties) are not just 0/1.

# %%
G = 4
rewards = torch.tensor([1.0, 0.0, 0.0, 0.0,    # prompt 0: one correct answer out of four
                        2.1, 1.1, 2.1, 0.1,    # prompt 1: mixed composite rewards
                        0.0, 1.0, 1.0, 1.0])   # prompt 2: three correct out of four
A = group_advantages(rewards, group_size=G)
print("rewards   :", rewards.view(-1, G))
print("advantages:", A.view(-1, G))
print("per-group mean:", A.view(-1, G).mean(1), "  per-group unbiased std:", A.view(-1, G).std(1))

# %% [markdown]
# Read prompt 0: the single correct answer gets +1.5, the three wrong ones -0.5 each. In prompt 2
# the roles flip: the lone wrong answer is pushed down hard (-1.5) and the correct ones mildly up.
# A rare success is a strong signal; a rare failure is too. Each group has mean 0 and std 1.

# %% [markdown]
# ## A constant group carries no signal
# If all four outputs got the same reward (all right, or all wrong), none is better than another:
# the advantages are exactly 0 and the group contributes no policy gradient. This is why a
# too-easy or too-hard prompt is "wasted" in GRPO. (Without eps, 0/0 would be NaN here.)

# %%
constant = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
print("all right / all wrong:", group_advantages(constant, group_size=G).view(-1, G))

# %% [markdown]
# ## Why per group, not across the batch
# Prompts differ in difficulty and in reward scale. Normalising over the whole batch would make
# every output of an easy prompt look "good" and every output of a hard prompt look "bad", even
# when they are the best or the worst of their own group. Per-group normalisation compares an
# output only with answers to the *same* question.

# %%
easy_then_hard = torch.tensor([0.9, 1.0, 1.0, 1.0,    # easy prompt: one slightly worse answer
                               0.0, 0.0, 0.1, 0.0])   # hard prompt: one slightly better answer
batch_wide = (easy_then_hard - easy_then_hard.mean()) / easy_then_hard.std()
print("batch-wide normalisation:", batch_wide.view(-1, G))
print("per-group (GRPO)        :", group_advantages(easy_then_hard, group_size=G).view(-1, G))

# %% [markdown]
# Batch-wide, the *worst* easy answer (0.9) gets a large positive advantage and the *best* hard
# answer (0.1) a negative one. Per group, the signs are right: the 0.9 is pushed down and the 0.1 up.

# %% [markdown]
# ## Why the unbiased std
# With small groups (G = 4 or 5 in practice) the population std (divide by G) underestimates the
# spread; Bessel's correction divides by G - 1. It rescales every advantage by sqrt((G-1)/G), i.e.
# it changes the effective step size by a constant for a given G. We follow DESIGN.md (and verl).

# %%
biased_std = rewards.view(-1, G).std(1, unbiased=False, keepdim=True)
biased = (rewards.view(-1, G) - rewards.view(-1, G).mean(1, keepdim=True)) / (biased_std + 1e-6)
print("population-std advantages:", biased[0])
print("unbiased-std advantages  :", A.view(-1, G)[0])
print("ratio:", (A.view(-1, G)[0] / biased[0]), " = sqrt(3/4) =", (3 / 4) ** 0.5)

# %% [markdown]
# ## A group of one
# With G = 1 the unbiased std is 0/0 and there is nothing to compare against, so
# `group_advantages` returns 0 for every output (documented behaviour, no NaN).

# %%
print("G = 1:", group_advantages(torch.tensor([0.0, 1.0, 3.0]), group_size=1))
