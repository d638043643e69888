# %% [markdown]
# # 05 — The reward, and group-relative advantages
# (docs/method.md, "Stage 2: GRPO": **Reward** and **Advantages**; paper §2.2)
#
# GRPO has no value network. For each prompt it samples a *group* of G outputs, scores each with a
# rule-based reward R, and judges every output only against its siblings:
#
#     R   = w_acc·R_acc + w_ft·R_ft + w_fmt·R_fmt − w_len·P_len − w_over·P_over
#     A_i = (R_i − mean_j R_j) / (std_j R_j + eps)       std unbiased (Bessel), eps = 1e-6
#
# The advantage is one number per output; every token of that output shares it.
# Implementations: `atlas_min.rewards.compute_reward` and `atlas_min.grpo.group_advantages`.

# %%
import torch

from atlas_min.config import get_config
from atlas_min.grpo import group_advantages
from atlas_min.model import init_model
from atlas_min.rewards import compute_reward, length_penalty, overuse_penalty

torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## The reward, taught on a few completions
# One toy question, its gold answer "A", and completions a policy could write. The terms:
#   * R_acc ∈ {0, 1}: the final answer (the last `<answer>…</answer>`) equals the gold one;
#   * R_ft ∈ {0, 1}: ≥ 1 functional token **and** R_acc = 1;
#   * R_fmt ∈ {0, 1}: exactly one `<answer>…</answer>`, non-blank, at the very end;
#   * P_len: grows linearly from `len_threshold` generated tokens over `len_buffer` more, capped;
#   * P_over: grows by `over_slope` per functional token beyond `over_threshold`, capped.
# The micro weights (w_acc, w_ft, w_fmt, w_len, w_over) = (1, 0.5, 0.2, 0.2, 0.2): the values are
# ours, not the paper's (docs/method.md; each is a `Config` field with its reason). L is counted in
# tokens, the stop token included, as the trainer counts it (`decode_completion`).

# %%
cfg = get_config("micro")
_, tokenizer, _ = init_model(cfg)  # only for counting tokens as the trainer does
question = "Which line is longer, A (yellow, top) or B (cyan, bottom)?"
gold = "A"
completions = {
    "right, with its token": "Let me compare the lines. <|Line|> <answer>A</answer>",
    "right, no token": "I can see it directly. <answer>A</answer>",
    "wrong, with a token": "Let me compare the lines. <|Line|> <answer>B</answer>",
    "no <answer> tags": "Let me compare the lines. <|Line|> The answer is A.",
    "answer, then more text": "Let me compare the lines. <|Line|> <answer>A</answer> Done.",
    "too long": "Let me compare the lines. " * 10 + "<|Line|> <answer>A</answer>",
    "token spam, right": "<|Line|> " * 8 + "<answer>A</answer>",
    "token spam, wrong": "<|Line|> " * 8 + "<answer>B</answer>",
}
print(f"{'':24s} {'L':>3} {'n_F':>3} | {'R_acc':>5} {'R_ft':>4} {'R_fmt':>5} {'P_len':>5} {'P_over':>6} | {'R':>5}")
scores = {}
for name, text in completions.items():
    L = len(tokenizer.encode(text + "<|im_end|>", add_special_tokens=False))
    s = scores[name] = compute_reward(text, gold, cfg, question=question, num_tokens=L)
    print(f"{name:24s} {L:3d} {int(s['n_functional']):3d} | {s['accuracy']:5.1f} {s['functional']:4.1f} "
          f"{s['format']:5.1f} {s['length_penalty']:5.2f} {s['overuse_penalty']:6.2f} | {s['total']:5.2f}")

# %% [markdown]
# Reading the table:
#   * A right answer always beats a wrong one: the worst right answer loses at most w_len + w_over =
#     0.4 to the penalties, from 1.0, and a wrong one earns at most w_fmt = 0.2.
#   * Among right answers, the functional token earns 0.5 and the format 0.2.
#   * "no <answer> tags": no answer can be extracted, so R_acc = 0 although the text says "A".
#     "answer, then more text": the answer is extracted (R_acc = 1) but the format is broken.
#   * The penalties only rank; they never dominate: "token spam, right" still scores above "right,
#     no token" with these weights (P_over is capped at w_over·1 = 0.2 < w_ft = 0.5). Spam ranks below
#     one well-placed token, and that gap is what GRPO sees inside a group.
#
# ### Why R_ft counts only beside a right answer
# The paper makes the token reward conditional on correctness ("a strict conditional reward
# mechanism", §2.2). Without the gate, a token would pay on its own: in a group of wrong answers,
# the ones that sprinkle a token would get the higher reward and a positive advantage, and GRPO
# would teach the policy to write tokens whether or not they help. Below, a hard prompt where all
# four outputs are wrong, two of them with a token:

# %%
plain = "I can see it directly. <answer>B</answer>"
L = len(tokenizer.encode(plain + "<|im_end|>", add_special_tokens=False))
scores["wrong, plain"] = compute_reward(plain, gold, cfg, question=question, num_tokens=L)
group = ["wrong, with a token", "token spam, wrong", "wrong, with a token", "wrong, plain"]
gated = torch.tensor([scores[n]["total"] for n in group])
ungated = gated + cfg.w_ft * torch.tensor([float(scores[n]["n_functional"] >= 1 and scores[n]["accuracy"] == 0)
                                           for n in group])
print("outputs          :", group)
print("R, with the gate :", gated, "-> A =", group_advantages(gated, group_size=4))
print("R, without gate  :", ungated, "-> A =", group_advantages(ungated, group_size=4))

# %% [markdown]
# With the gate, the token-bearing and the plain wrong answers score alike (here only the spam's
# P_over separates them, downwards). Without it, the single token in a wrong answer gets the largest
# advantage: reward for the token itself, farmed by sprinkling it.
#
# ### The length and overuse penalties
# P_len = p_max · clamp((L − L0)/buffer, 0, 1) and P_over = min(p_max, slope · max(0, n_F − N0)),
# for the micro preset and for the 7B one (its replies average 203.7 tokens and 4.8 functional
# tokens in the paper, §2.3, so its thresholds are far higher).

# %%
big = get_config("qwen2_5_vl_7b")
for c, lengths in ((cfg, (24, 48, 56, 64, 72, 80, 120)), (big, (512, 768, 832, 896, 960, 1024))):
    print(f"{c.name:14s} L0 = {c.len_threshold}, buffer = {c.len_buffer}:",
          "  ".join(f"P_len({L}) = {length_penalty(L, c):.2f}" for L in lengths))
for c in (cfg, big):
    print(f"{c.name:14s} N0 = {c.over_threshold}, slope = {c.over_slope}:",
          "  ".join(f"{n}:{overuse_penalty(n, c):.2f}" for n in range(0, 14)))

# %% [markdown]
# ## From rewards to advantages: three prompts, four sampled outputs each
# Rewards come in contiguous groups: outputs 0-3 answer prompt 0, outputs 4-7 prompt 1, and so on,
# with values from the table above (1.7 right with a token, 1.2 right without, 0.2 wrong).

# %%
G = 4
rewards = torch.tensor([1.7, 0.2, 0.2, 0.2,    # prompt 0: one right answer out of four
                        1.7, 1.2, 1.7, 0.2,    # prompt 1: mixed
                        0.2, 1.7, 1.7, 1.7])   # prompt 2: three right out of four
A = group_advantages(rewards, group_size=G)
print("rewards   :", rewards.view(-1, G))
print("advantages:", A.view(-1, G))
print("per-group mean:", A.view(-1, G).mean(1), "  per-group unbiased std:", A.view(-1, G).std(1))

# %% [markdown]
# Read prompt 0: the single right answer gets +1.5, the three wrong ones −0.5 each. In prompt 2
# the roles flip: the lone wrong answer is pushed down hard (−1.5) and the right ones mildly up.
# A rare success is a strong signal; a rare failure is too. Each group has mean 0 and std 1, so the
# reward's scale drops out: only the order and spacing within a group matter. In prompt 1 the right
# answer without a token (1.2) sits exactly at the group's mean: A = 0, while the two right answers
# with a token are pushed up and the wrong one down.

# %% [markdown]
# ## A constant group carries no signal
# If all four outputs got the same reward (all right, or all wrong), none is better than another:
# the advantages are exactly 0 and the group contributes no policy gradient. This is why a
# too-easy or too-hard prompt is "wasted" in GRPO. (Without eps, 0/0 would be NaN here.)

# %%
constant = torch.tensor([1.7, 1.7, 1.7, 1.7, 0.2, 0.2, 0.2, 0.2])
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
# Groups are small: G = 8 in the toy and qwen2_5_vl_7b presets (verl's Qwen2.5-VL GRPO recipe uses
# 5; here 4). The population std (divide by G) underestimates the spread; Bessel's correction divides
# by G − 1. It rescales every advantage by sqrt((G−1)/G), i.e. it changes the effective step size by
# a constant for a given G: sqrt(3/4) = 0.866 at G = 4, sqrt(7/8) = 0.935 at G = 8. We follow
# docs/method.md ("Advantages"), as verl does.

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

# %% [markdown]
# ## Where this is used
# → `train_rl.py`, step 2 (`score`): `compute_reward(text, answer, cfg, question=…, num_tokens=…)` for
# every sampled completion, then `group_advantages(rewards, cfg.group_size, cfg.adv_eps)`. The step's
# log carries each component's mean (`rollout_metrics`: reward, accuracy, format, functional_reward,
# length_penalty, overuse_penalty). Tutorial 08 scores a real group this way.
