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
import math

import torch

from atlas_min.config import ConfigError, get_config
from atlas_min.grpo import group_advantages
from atlas_min.model import init_model
from atlas_min.rewards import compute_reward, length_penalty, overuse_penalty
from atlas_min.sampler import decode_completion

torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## The reward, taught on a few completions
# One toy question, its gold answer "A", and completions a policy could write. The terms:
#   * R_acc ∈ {0, 1}: the final answer (the last `<answer>…</answer>`) equals the gold one;
#   * R_ft ∈ {0, 1}: n_F ≥ 1 functional token **and** R_acc = 1;
#   * R_fmt ∈ {0, 1}: exactly one `<answer>…</answer>`, non-blank, at the very end;
#   * P_len: grows linearly from `len_threshold` generated tokens over `len_buffer` more, capped;
#   * P_over: grows by `over_slope` per functional token beyond `over_threshold`, capped.
# The micro weights (w_acc, w_ft, w_fmt, w_len, w_over) = (1, 0.5, 0.2, 0.2, 0.2): the values are
# ours, not the paper's (docs/method.md; each is a `Config` field with its reason).
#
# The two counts come from the completion's *token ids*, as the trainer has them: L is the number of
# generated tokens, the stop token included, and n_F the number of functional-token ids among them.
# `sampler.decode_completion(tokenizer, ids, mask)` returns (text, L, the functional tokens found by
# id), and `compute_reward(text, …, num_tokens=L, functional=…)` takes n_F from that list. The same
# n_F feeds P_over and the *right-token rate* (the share of outputs whose first functional token is
# the one the example names, logged when the data names one; docs/method.md, "Data"). Below, each
# completion is tokenised with its `<|im_end|>`, then scored exactly as `train_rl.py`'s `score` does.

# %%
cfg = get_config("micro")
assert (cfg.w_acc, cfg.w_ft, cfg.w_fmt, cfg.w_len, cfg.w_over) == (1, 0.5, 0.2, 0.2, 0.2)
_, tokenizer, _ = init_model(cfg)  # the micro tokenizer, functional tokens included
question = "Which line is longer, A (yellow, top) or B (cyan, bottom)?"
gold = "A"
STOP = "<|im_end|>"


def score_ids(ids):
    """A completion's token ids (its stop token included) -> text, L, functional -> every reward term."""
    ids = torch.tensor(ids)
    text, L, functional = decode_completion(tokenizer, ids, torch.ones_like(ids, dtype=torch.bool))
    return text, compute_reward(text, gold, cfg, question=question, num_tokens=L, functional=functional), L


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


def show(name, s, L):
    print(f"{name:24s} {L:3d} {int(s['n_functional']):3d} | {s['accuracy']:5.1f} {s['functional']:4.1f} "
          f"{s['format']:5.1f} {s['length_penalty']:5.2f} {s['overuse_penalty']:6.2f} | {s['total']:5.2f}")


for name, text in completions.items():
    decoded, scores[name], L = score_ids(tokenizer.encode(text + STOP, add_special_tokens=False))
    assert decoded == text  # the ids decode back to the text, without the stop token
    show(name, scores[name], L)

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

# %%
S = {name: s["total"] for name, s in scores.items()}
worst_right = cfg.w_acc - cfg.w_len * cfg.len_max_penalty - cfg.w_over * cfg.over_max_penalty
assert math.isclose(cfg.w_len + cfg.w_over, 0.4) and math.isclose(worst_right, 0.6) and worst_right > cfg.w_fmt == 0.2
assert min(S[n] for n in S if scores[n]["accuracy"]) > max(S[n] for n in S if not scores[n]["accuracy"])
assert math.isclose(S["right, with its token"] - S["right, no token"], cfg.w_ft) and cfg.w_ft == 0.5
assert math.isclose(S["right, with its token"] - S["answer, then more text"], cfg.w_fmt)
assert scores["no <answer> tags"]["accuracy"] == 0 and "A." in completions["no <answer> tags"]
assert scores["answer, then more text"]["accuracy"] == 1 and scores["answer, then more text"]["format"] == 0
assert scores["token spam, right"]["overuse_penalty"] * cfg.w_over == 0.2 < cfg.w_ft
assert S["right, no token"] < S["token spam, right"] < S["right, with its token"]
assert (S["right, with its token"], S["right, no token"], S["wrong, with a token"]) == (1.7, 1.2, 0.2)

# %% [markdown]
# ### n_F counts token ids, not characters
# The same reply as "right, with its token", but with `<|Line|>` spelled out of eight ordinary
# one-character tokens. It decodes to the *same text*; it holds no functional-token id, so n_F = 0,
# R_ft = 0 and R = 1.2, not 1.7. The anchor's functional mask (tutorial 07) would not mark it
# either, so RL cannot earn R_ft with a token the anchor never sees. Only a hand-written string,
# whose ids nobody knows, is counted from its text (`compute_reward` without `functional=`), as in
# the last line.

# %%
head, tail = "Let me compare the lines. ", " <answer>A</answer>"
chars = tokenizer.convert_tokens_to_ids(list("<|Line|>"))  # "<", "|", "L", "i", "n", "e", "|", ">"
spelled = (tokenizer.encode(head, add_special_tokens=False) + chars
           + tokenizer.encode(tail + STOP, add_special_tokens=False))
assert len(chars) == 8 and tokenizer.unk_token_id not in chars and tokenizer.convert_tokens_to_ids("<|Line|>") not in chars
text, spelled_score, L = score_ids(spelled)
show("spelled out, right", spelled_score, L)
from_text = compute_reward(text, gold, cfg, question=question, num_tokens=L)  # no ids: counted in the text
show("same text, no ids given", from_text, L)
assert text == completions["right, with its token"]
assert (spelled_score["n_functional"], spelled_score["functional"], spelled_score["total"]) == (0, 0, 1.2)
assert (from_text["n_functional"], from_text["total"]) == (1, 1.7)

# %% [markdown]
# ### Why R_ft counts only beside a right answer
# The paper makes the token reward conditional on correctness ("a strict conditional reward
# mechanism", §2.2). Without the gate, a token would pay on its own: in a group of wrong answers,
# the ones that sprinkle a token would get the higher reward and a positive advantage, and GRPO
# would teach the policy to write tokens whether or not they help. Below, a hard prompt where all
# four outputs are wrong, three of them with tokens (one of those spams eight):

# %%
plain = "I can see it directly. <answer>B</answer>"
_, scores["wrong, plain"], _ = score_ids(tokenizer.encode(plain + STOP, add_special_tokens=False))
group = ["wrong, with a token", "token spam, wrong", "wrong, with a token", "wrong, plain"]
gated = torch.tensor([scores[n]["total"] for n in group])
ungated = gated + cfg.w_ft * torch.tensor([float(scores[n]["n_functional"] >= 1 and scores[n]["accuracy"] == 0)
                                           for n in group])
print("outputs          :", group)
print("R, with the gate :", gated, "-> A =", group_advantages(gated, group_size=4))
print("R, without gate  :", ungated, "-> A =", group_advantages(ungated, group_size=4))
assert torch.allclose(gated, torch.tensor([0.2, 0.0, 0.2, 0.2])) and scores["token spam, wrong"]["overuse_penalty"] > 0
assert [scores[n]["n_functional"] for n in group] == [1, 8, 1, 0] and not any(scores[n]["accuracy"] for n in group)
assert group_advantages(ungated, group_size=4).argmax() == 0  # the single token in a wrong answer wins

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
    for L in lengths:
        assert math.isclose(length_penalty(L, c), c.len_max_penalty * min(max((L - c.len_threshold) / c.len_buffer, 0), 1))
for c in (cfg, big):
    print(f"{c.name:14s} N0 = {c.over_threshold}, slope = {c.over_slope}:",
          "  ".join(f"{n}:{overuse_penalty(n, c):.2f}" for n in range(0, 14)))
    for n in range(0, 14):
        assert math.isclose(overuse_penalty(n, c), min(c.over_max_penalty, c.over_slope * max(0, n - c.over_threshold)))
assert big.len_threshold > 203.7 > cfg.len_threshold and big.over_threshold > 4.8 > cfg.over_threshold

# %% [markdown]
# ## From rewards to advantages: three prompts, four sampled outputs each
# Rewards come in contiguous groups: outputs 0-3 answer prompt 0, outputs 4-7 prompt 1, and so on,
# with values from the table above (1.7 right with a token, 1.2 right without, 0.2 wrong; checked there).

# %%
G = 4
rewards = torch.tensor([1.7, 0.2, 0.2, 0.2,    # prompt 0: one right answer out of four
                        1.7, 1.2, 1.7, 0.2,    # prompt 1: mixed
                        0.2, 1.7, 1.7, 1.7])   # prompt 2: three right out of four
A = group_advantages(rewards, group_size=G)
print("rewards   :", rewards.view(-1, G))
print("advantages:", A.view(-1, G))
print("per-group mean:", A.view(-1, G).mean(1), "  per-group unbiased std:", A.view(-1, G).std(1))
assert cfg.adv_eps == 1e-6
assert torch.allclose(A.view(-1, G), torch.tensor([[1.5, -0.5, -0.5, -0.5],
                                                  [2 ** -0.5, 0.0, 2 ** -0.5, -(2 ** 0.5)],
                                                  [-1.5, 0.5, 0.5, 0.5]]), atol=1e-5)
assert torch.allclose(A.view(-1, G).mean(1), torch.zeros(3), atol=1e-6)
assert torch.allclose(A.view(-1, G).std(1), torch.ones(3), atol=1e-5)

# %% [markdown]
# Read prompt 0: the single right answer gets +1.5, the three wrong ones −0.5 each. In prompt 2
# the roles flip: the lone wrong answer is pushed down hard (−1.5) and the right ones mildly up.
# A rare success is a strong signal; a rare failure is too. Each group has mean 0 and std 1, so the
# reward's scale drops out: only the order and spacing within a group matter. In prompt 1 the right
# answer without a token (1.2) sits exactly at the group's mean: A = 0, while the two right answers
# with a token are pushed up and the wrong one down.

# %% [markdown]
# ## A constant group carries no signal
# If all outputs got the same reward (all right, or all wrong), none is better than another:
# the advantages are exactly 0 and the group contributes no policy gradient. This is why a
# too-easy or too-hard prompt is "wasted" in GRPO; `train_rl.py` logs the share of such groups per
# step as `constant_group_share`.
#
# "Exactly 0" is a rule the code applies, not something the formula delivers. In float32 the mean
# of eight rewards of 1.7 is one rounding step off 1.7 and their std comes out ≈ 1e-7 instead of 0,
# so (R − mean) / (std + eps) gives every output +0.1057 (and −0.0147 for eight rewards of 0.2): a
# hidden push up on everything the policy sampled for a solved prompt. `group_advantages` therefore
# computes in float64 and gives 0 to every group whose max equals its min (docs/method.md,
# "Advantages"). The same rule also covers the 0/0 a group with std exactly 0 would give without eps.

# %%
for value in (1.7, 0.2):
    group = torch.full((8,), value)  # float32: one constant group of G = 8
    formula = (group - group.mean()) / (group.std() + 1e-6)  # the formula alone, in float32, no rule
    print(f"eight rewards of {value}: float32 mean {group.mean().item():.9f}, std {group.std().item():.2e} "
          f"-> the formula gives {formula[0].item():+.4f} to each | group_advantages: {group_advantages(group, 8).tolist()}")
    assert (formula == formula[0]).all() and round(formula[0].item(), 4) == {1.7: 0.1057, 0.2: -0.0147}[value]
    assert group.mean() != group[0] and 0 < group.std() < 2e-7  # one rounding step off; std ~1e-7, not 0
    assert (group_advantages(group, group_size=8) == 0).all()
assert (group_advantages(torch.tensor([1.7] * 4 + [0.2] * 4), group_size=G) == 0).all()  # G = 4 too

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
per_group = group_advantages(easy_then_hard, group_size=G)
assert batch_wide[0] > 0.5 and batch_wide[6] < 0  # the worst easy answer up, the best hard answer down
assert per_group[0] < 0 and per_group[6] > 0  # per group: the 0.9 down, the 0.1 up

# %% [markdown]
# Batch-wide, the *worst* easy answer (0.9) gets a large positive advantage and the *best* hard
# answer (0.1) a negative one. Per group, the signs are right: the 0.9 is pushed down and the 0.1 up.

# %% [markdown]
# ## Why the unbiased std
# Groups are small: G = 8 in the toy and qwen2_5_vl_7b presets (verl's Qwen2.5-VL GRPO recipe uses
# 5; here 4, the micro preset's). The population std (divide by G) underestimates the spread; Bessel's correction divides
# by G − 1. It rescales every advantage by sqrt((G−1)/G), i.e. it changes the effective step size by
# a constant for a given G: sqrt(3/4) = 0.866 at G = 4, sqrt(7/8) = 0.935 at G = 8. We follow
# docs/method.md ("Advantages"), as verl does.

# %%
biased_std = rewards.view(-1, G).std(1, unbiased=False, keepdim=True)
biased = (rewards.view(-1, G) - rewards.view(-1, G).mean(1, keepdim=True)) / (biased_std + 1e-6)
print("population-std advantages:", biased[0])
print("unbiased-std advantages  :", A.view(-1, G)[0])
print("ratio:", (A.view(-1, G)[0] / biased[0]), " = sqrt(3/4) =", (3 / 4) ** 0.5)
assert get_config("toy").group_size == big.group_size == 8 and cfg.group_size == G == 4
assert round((3 / 4) ** 0.5, 3) == 0.866 and round((7 / 8) ** 0.5, 3) == 0.935
assert torch.allclose(A.view(-1, G)[0] / biased[0], torch.full((4,), (3 / 4) ** 0.5), atol=1e-5)

# %% [markdown]
# ## A group of one
# With G = 1 the unbiased std is 0/0 and there is nothing to compare against, so
# `group_advantages` returns 0 for every output (documented behaviour, no NaN). RL would then do
# nothing, so the config refuses `group_size` < 2.

# %%
print("G = 1:", group_advantages(torch.tensor([0.0, 1.0, 3.0]), group_size=1))
assert (group_advantages(torch.tensor([0.0, 1.0, 3.0]), group_size=1) == 0).all()
try:
    get_config("micro", ["group_size=1"])
    raise AssertionError("group_size=1 was accepted")
except ConfigError as e:
    print("get_config('micro', ['group_size=1']) ->", e)

# %% [markdown]
# ## Where this is used
# → `train_rl.py`, step 2 (`score`): `decode_completion(tokenizer, ids, mask)` then
# `compute_reward(text, answer, cfg, question=…, num_tokens=L, functional=…)` for every sampled
# completion, then `group_advantages(rewards, cfg.group_size, cfg.adv_eps)` on float64 rewards and
# `grpo.constant_groups`. The step's log carries each component's mean (`rollout_metrics`: reward,
# accuracy, format, functional_reward, length_penalty, overuse_penalty, functional_per_completion,
# right_token_rate when the data names its tokens) and `constant_group_share`. `eval.py` scores its
# greedy outputs with the same two calls. Tutorial 08 scores a real group this way.
