# %% [markdown]
# # 03 — The group sampler (docs/method.md, "Stage 2: GRPO" and "Log-probabilities"; paper §2.2)
#
# "For each prompt q, sample a group of G outputs o_1..o_G from π_old."
#
# π_old ("the old policy") is the model with the weights it has when the step begins, frozen for
# that step: it draws the samples, and the update then moves the weights (π_θ, the policy being
# trained) away from it (docs/method.md, "Stage 2: GRPO").
#
# GRPO needs, for every prompt q, G sampled outputs and the log-probability π_old(o_t | q, o_<t)
# of every sampled token. `atlas_min.sampler.sample` produces both in one pass:
#   * one prefill forward over the left-padded distinct prompts (each image encoded once) fills a
#     KV cache, which is then repeated G times: row r of the G·B rows answers prompt r // G;
#   * then one token per step for every row, at an explicit 3-D position (explained below):
#     temperature, top-p, a per-row random generator, a stop per row at `<|im_end|>` (or
#     `<|endoftext|>`), and the vision placeholders banned.
# `sequence_logprobs` recomputes the same log-probs with one full forward — that is the forward
# the GRPO update differentiates.

# %%
import inspect
import math
from pathlib import Path

import torch

from atlas_min.config import PRESETS, get_config
from atlas_min.data import collate_prompts, encode_example, load_examples
from atlas_min.model import forward, init_model, mrope_positions
from atlas_min.sampler import _draw, sample, sequence_logprobs
from atlas_min.tokens import VISION_TOKENS

torch.set_printoptions(precision=2, sci_mode=False, linewidth=120)

# %% [markdown]
# ## A batch of two prompts
# A "line" question and a "shape" question: different lengths, so the shorter is left-padded
# (tutorial 02). No replies: the sampler writes those.

# %%
cfg = get_config("micro")
model, tokenizer, image_processor = init_model(cfg)
model.eval()
examples = load_examples(cfg, "train")
chosen = [examples[1], examples[0]]
batch = collate_prompts([encode_example(ex, tokenizer, image_processor, cfg) for ex in chosen],
                        tokenizer.pad_token_id)
for ex, n in zip(chosen, batch["attention_mask"].sum(1).tolist()):
    print(f"{ex['task']:5s} {n} prompt tokens: {ex['question']!r}")
print("input_ids", tuple(batch["input_ids"].shape))
V = len(tokenizer)  # 440 tokens: the tiny BPE's 435 and the 5 functional tokens


def next_token_logits():
    """(B, V): the logits after each prompt's last token."""
    with torch.no_grad():
        return forward(model, batch, batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[0].logits[:, -1]


# %% [markdown]
# ## A model worth sampling from
# `init_model` gives the micro Qwen2.5-VL with the functional tokens, weights at the usual init
# (std 0.02). Such a model is a poor demo:
#   * its layers barely touch the residual stream, so the last hidden state is ≈ the normalised
#     embedding of the last input token, and with a tied head the largest logit is that same
#     token: greedy decoding echoes the prompt's last token ("Ċ", a newline) forever;
#   * its logits are all within ±0.7, so sampling at temperature 1 is ≈ uniform over the
#     vocabulary (every log-prob within 0.7 of log(1/440) = −6.09).

# %%
plain = next_token_logits()
echo = sample(model, batch, tokenizer, max_new_tokens=10, temperature=0)["completion_ids"]
print("init std of the embedding:", round(model.get_input_embeddings().weight[1:].std().item(), 4),
      "| logits in", [round(plain.min().item(), 3), round(plain.max().item(), 3)],
      "| log-probs in", [round(x.item(), 3) for x in plain.log_softmax(-1).aminmax()], f"| log(1/{V}) = {math.log(1 / V):.3f}")
print("greedy:", [tokenizer.convert_ids_to_tokens(row.tolist()) for row in echo])
assert model.config.text_config.initializer_range == 0.02 and V == 435 + 5 == 440
assert plain.abs().max() < 0.7 and (plain.log_softmax(-1) - math.log(1 / V)).abs().max() < 0.7
assert (echo == tokenizer.convert_tokens_to_ids("Ċ")).all() and (batch["input_ids"][:, -1] == echo[:, 0]).all()

# %% [markdown]
# Re-drawing the language model's matrices with std 0.3 makes the logits large and context-dependent
# (std ≈ 1.7): greedy decoding wanders, and sampled tokens have very different log-probs. This is
# for the demo only (the tests do the same); it is not how a model is initialised for training.

# %%
torch.manual_seed(0)
with torch.no_grad():
    for p in model.model.language_model.parameters():
        if p.dim() == 2:  # embeddings (tied to the head) and every projection; norms keep their 1s
            p.normal_(0, 0.3)
lively = next_token_logits()
print("logit std per prompt:", [round(x, 3) for x in lively.std(-1).tolist()])
assert ((lively.std(-1) - 1.7).abs() < 0.2).all()

# %% [markdown]
# ## Positions in three dimensions (mrope)
# Qwen2.5-VL's rotary position embedding is multimodal ("mrope"): every token has three position
# ids (t, h, w), time, height and width, and each head's rotary dimensions are split between the
# three (`mrope_section`; at 7B [16, 24, 24] of its 128 / 2 = 64 frequency pairs, checked below).
#   * Text tokens have t = h = w, running 1-D: 0, 1, 2, …
#   * The image tokens of one image all get the same t (the next position), and h, w = that
#     position + the row and column of their merged patch in the image's grid.
#   * After the image, text continues from the largest position used so far + 1.
# So an image of k tokens advances the positions by less than k: here 4 image tokens (a 2 x 2 grid)
# use rows and columns 0..1 and advance them by 2. From there on, a token's 3-D position is its 1-D
# index among the real tokens plus a fixed offset, `rope_deltas` (−2 here). Left padding gets
# position 0 and attention 0.
#
# `model.mrope_positions` (transformers' `get_rope_index`) computes all of this from the ids and the
# image grids; `atlas_min.model.forward` calls it on every full forward, never relying on state
# cached by an earlier call.

# %%
image_token = model.config.image_token_id
positions, rope_deltas = mrope_positions(model, batch["input_ids"], batch["attention_mask"],
                                         (batch["input_ids"] == image_token).long(), batch["image_grid_thw"])
print("positions", tuple(positions.shape), "(t/h/w, row, column) | rope_deltas", rope_deltas.flatten().tolist())
row = batch["input_ids"][0]
at = (row == image_token).nonzero().flatten()
span = slice(at[0].item() - 2, at[-1].item() + 4)
print("row 0 around its image:", tokenizer.convert_ids_to_tokens(row[span].tolist()))
print(positions[:, 0, span])
n_real = batch["attention_mask"].sum(1)
print("real tokens per row:", n_real.tolist(), "| last position per row:", positions[0, :, -1].tolist(),
      "| next position = real tokens + rope_delta:", (n_real + rope_deltas.flatten()).tolist())
big = get_config("qwen2_5_vl_7b")
sections = [int(x) for x in big.mrope_section.split(",")]
assert sections == [16, 24, 24] and sum(sections) == big.text_hidden // big.text_heads // 2 == 64
img = positions[:, 0, at]  # (3, 4): the image's t, h, w
assert batch["image_grid_thw"][0].tolist() == [1, 4, 4] and len(at) == 4  # 4 x 4 patches, merged 2 x 2: a 2 x 2 grid
assert (img[0] == img[0, 0]).all() and (img[1:] - img[0, 0]).unique().tolist() == [0, 1]  # rows, columns 0..1
assert positions[0, 0, at[-1] + 1] == img[0, 0] + 2  # the text after the image: + 2, not + 4
assert rope_deltas.flatten().tolist() == [-2, -2]
assert torch.equal(positions[:, :, -1], (n_real - 1 + rope_deltas.flatten()).expand(3, 2))  # 1-D index + rope_deltas
n_pad = int((batch["attention_mask"][1] == 0).sum())  # row 1 is left-padded
assert n_pad > 0 and (positions[:, 1, :n_pad] == 0).all()

# %% [markdown]
# This is why the decode loop passes explicit `position_ids`. The cached decode feeds one token at a
# time, so nothing in its input says where the image was; the sampler keeps `rope_deltas` from the
# prefill and gives each new token the position (its 1-D index among the row's real tokens) +
# `rope_deltas`, the same on all three axes, exactly what a full forward over prompt + completion
# assigns to it. With the wrong positions the cached decode would condition on different positions
# than the training forward, and the two log-probs of the same token would differ.

# %% [markdown]
# ## Let it stop sometimes
# Even the lively model gives `<|im_end|>` a probability under 1% (printed), so rows would rarely
# stop within 10 tokens and the completion mask would be almost all True. To see the stop logic we
# pretend the model has learned to stop: a forward hook on the head sets `<|im_end|>`'s logit so that it gets
# ≈ 10% of the probability at every step. The hook acts on every forward (sampler and
# `sequence_logprobs` alike), so it is part of "the model" for the rest of this section.

# %%
eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
print("p(<|im_end|>) after each prompt, without the hook:", [round(x, 4) for x in lively.softmax(-1)[:, eos].tolist()])
assert (lively.softmax(-1)[:, eos] < 0.01).all()


def stop_sometimes(module, inputs, logits):
    stop = logits.logsumexp(-1, keepdim=True) - 2.2  # exp(-2.2) ≈ 0.11 x the rest's mass: p ≈ 0.10
    return logits.index_copy(-1, torch.tensor([eos]), stop)


hook = model.lm_head.register_forward_hook(stop_sometimes)
p_stop = next_token_logits().softmax(-1)[:, eos]
print("p(<|im_end|>) with the hook:", [round(x, 4) for x in p_stop.tolist()], f"(exp(-2.2) = {math.exp(-2.2):.4f})")
assert round(math.exp(-2.2), 2) == 0.11 and ((p_stop - 0.10).abs() < 0.005).all()

# %% [markdown]
# ## How one token is drawn: the inverse CDF
# Row n gets its `max_new_tokens` uniforms u ∈ [0, 1) up front, from its own generator. At each step
# `_draw` takes the first token k whose running sum of probabilities cum_k exceeds u · total (the step
# passes exp(logits − max), the probabilities up to a factor per row, so total is not 1): a
# token then is taken with probability p_k / total, and one of probability 0 never is (its cum_k
# equals the one before it, so it is never the *first* to exceed; that is how the banned vision
# placeholders, whose probabilities the sampler sets to 0, are never drawn). The threshold is also kept
# strictly below total, so even u = 0 (or a u so close to 1 that u · total rounds to total) lands on
# a token of probability > 0. The rule before it, "count the tokens with cum_k < u · total", took
# token 0 at u = 0 whatever its probability. Four tokens, the first of probability 0:

# %%
probs4 = torch.tensor([0.0, 0.5, 0.3, 0.2])
cum4 = probs4.cumsum(0)
u = torch.tensor([0.0, 0.3, 0.6, 0.9])
picked = _draw(probs4.expand(4, 4), 1.0, u)  # the first token is impossible
old_rule = (cum4 < u[:, None] * cum4[-1]).sum(-1)
print("cum:", [round(c, 2) for c in cum4.tolist()], "| u:", [round(x, 2) for x in u.tolist()], "-> token", picked.tolist(),
      "| old rule at u = 0 -> token", old_rule[0].item())
assert picked.tolist() == [1, 1, 2, 3] and old_rule[0].item() == 0
many = _draw(probs4.expand(20_000, 4), 1.0, torch.rand(20_000, generator=torch.Generator().manual_seed(0)))
freq = torch.bincount(many, minlength=4) / 20_000
print("frequencies over 20,000 uniforms:", [round(f, 3) for f in freq.tolist()])
assert freq[0] == 0 and (freq - probs4).abs().max() < 0.02

# %% [markdown]
# ## G = 3 completions per prompt
# Rows come in contiguous groups, prompt-major: rows 0-2 answer prompt 0, rows 3-5 prompt 1 (the
# layout `group_advantages` expects, tutorial 05). `row_seeds` gives each row its own random
# generator, so a row's sample depends on its seed and its logits only, not on which other rows
# share the batch or the process (the same data on 1 or 8 GPUs). Besides the tokens and their
# log-probs, `sample` returns `entropy`, H = −Σ_v p_v log p_v of the distribution each token was
# drawn from (in nats, between 0 and log V), and `truncated`, the rows that reached `max_new_tokens`
# without a stop token; `train_rl.py` logs their means (`entropy`, `truncated_share`).

# %%
G = 3
out = sample(model, batch, tokenizer, group_size=G, max_new_tokens=10, temperature=1.0, row_seeds=range(6))
for key, value in out.items():
    print(f"{key:16s}", tuple(value.shape), value.dtype)
assert out["completion_ids"].shape[0] == 2 * G == 6

ids, mask = out["completion_ids"], out["completion_mask"]
for r in range(len(ids)):
    if r % G == 0:
        print(f"prompt {r // G} ({chosen[r // G]['task']}):")
    tokens = tokenizer.convert_ids_to_tokens(ids[r][mask[r]].tolist())  # generated tokens, <|im_end|> included
    print(f"  row {r}: {len(tokens):2d} tokens: {' '.join(tokens)}")

# %% [markdown]
# Printed as BPE pieces: decoded to text they would be mostly stray bytes. The words are nonsense
# (the model is untrained); what matters is the bookkeeping. A row that
# sampled `<|im_end|>` is done: its mask is True up to and including the stop token (the model
# must learn to stop, so the stop token is trained like any other), and after it the row holds
# padding with mask False. The loop ends when every row is done or after `max_new_tokens`.

# %%
print("completion_mask (1 = a generated token that counts):")
print(mask.int())
print("logprobs of the sampled tokens (nan where the mask is False):")
print(torch.where(mask, out["logprobs"], torch.nan))
print("entropy per generated token, nats (nan where masked):")
print(torch.where(mask, out["entropy"], torch.nan))
print("truncated:", out["truncated"].tolist())
n_gen = mask.sum(1)  # (6,)
last = ids.gather(1, (n_gen - 1)[:, None])[:, 0]  # each row's last counted token
stopped = last == eos
assert torch.equal(mask, torch.arange(ids.shape[1])[None] < n_gen[:, None])  # True up to the stop, then False
assert (ids[~mask] == tokenizer.pad_token_id).all()
assert torch.equal(out["truncated"], ~stopped) and (n_gen[~stopped] == 10).all()
assert (out["entropy"][mask] > 0).all() and (out["entropy"][mask] <= math.log(V)).all()

# %% [markdown]
# Each stopped row's last counted entry, −2.30 = log 0.10, is its `<|im_end|>`, at the probability the hook
# gave it. The other entries vary between about −1 (a likely token) and −8 (an unlikely one).

# %%
lp_last = out["logprobs"].gather(1, (n_gen - 1)[:, None])[:, 0]
others = out["logprobs"][mask & (ids != eos)]
print(f"at <|im_end|>: {lp_last[stopped].tolist()} (log 0.10 = {math.log(0.1):.2f}); "
      f"other tokens: from {others.min().item():.2f} to {others.max().item():.2f}")
assert round(math.log(0.1), 2) == -2.30 and ((lp_last[stopped] - math.log(0.1)).abs() < 0.01).all()
assert -1.5 < others.max() < -0.5 and -9 < others.min() < -6

# %% [markdown]
# ## The training forward sees the same numbers
# `sequence_logprobs` concatenates prompt and completion, runs one ordinary forward (no cache,
# all positions at once, images encoded once and reused for each prompt's `repeats` rows) and reads
# off log softmax(logits)[token] at each completion position.

# %%
with torch.no_grad():
    recomputed = sequence_logprobs(model, batch, out["prompt_ids"], out["prompt_mask"], ids, mask, repeats=G)
diff = (recomputed - out["logprobs"]).abs()[mask]
print("sequence_logprobs (nan where masked):")
print(torch.where(mask, recomputed, torch.nan))
print(f"max |sampler - full forward| over {int(mask.sum())} tokens: {diff.max().item():.3e}")
assert diff.max() < 1e-4

# %% [markdown]
# What the printed difference is: the same quantity computed twice, a cached one-token-at-a-time
# decode and one full forward, whose floating-point sums may run in a different order. It is a
# rounding difference, far below 1e-4 here, and need not be 0 (other kernels, thread counts, bf16
# autocast on a GPU round differently; tutorial 08 prints it for an SFT-trained model). The test
# `test_sampler_logprobs_equal_the_training_forward` holds it within 1e-4, as the assert above does
# (docs/method.md, "Log-probabilities"). A real disagreement (a wrong position scheme,
# the temperature applied in one path only, image features on the wrong rows) would be far larger.
#
# ### Which of the two is log π_old?
# GRPO's ratio is r = exp(log π_θ − log π_old). The sampler's log-probs are log π_old already: the
# log-probs of the drawn tokens under the weights that drew them. Yet `train_rl.py` does not use
# them. Before any update it runs `sequence_logprobs` without grad on the same weights and takes
# *that* as log π_old; during the update log π_θ comes from the same function on the same inputs.
# So before the first optimiser step the two are one computation, and r is exactly 1, bit for bit
# (not 1 ± the difference above; tutorial 08 checks it). The clipped surrogate then reduces to −A
# per token (tutorial 06), and clipping cannot fire on a policy that has not moved. The price is one
# extra no-grad forward per step.
#
# Both are log-probs under softmax(logits / T) over the *whole* vocabulary, computed before the
# sampler's top-p truncation and its ban on vision tokens: the distribution the update differentiates.
# With top-p < 1 the sampler draws only from the nucleus, the smallest set of tokens holding
# probability ≥ top_p, renormalised. A token in it is drawn with probability π/mass, not π, and one
# outside it never is. The samples then come from a different distribution than the π_old in the
# ratio, and the update is off-policy by that truncation: a kept token is drawn at log π − log mass
# (printed as log π + (−log mass)). For the first step of the model above (the stop hook included):

# %%
probs = next_token_logits().softmax(-1).sort(-1, descending=True).values  # (B, V)
for top_p in (0.9, 0.5):
    kept = (probs.cumsum(-1) - probs) < top_p  # the nucleus: the smallest prefix holding >= top_p
    mass = (probs * kept).sum(-1)
    print(f"top_p {top_p}: the nucleus keeps {kept.sum(-1).tolist()} of {probs.shape[-1]} tokens, mass "
          f"{[round(m, 3) for m in mass.tolist()]}: a kept token is drawn at log π + "
          f"{[round(-math.log(m), 3) for m in mass.tolist()]}")
    smallest = mass - probs.gather(1, kept.sum(-1, keepdim=True) - 1)[:, 0]  # the mass without its last token
    assert (mass >= top_p).all() and (smallest < top_p).all()

# %% [markdown]
# Every preset (`micro`, `toy`, `toy_decisive`, `qwen2_5_vl_7b`) samples with T = 1 and top_p = 1: the samples come
# from π_old itself, up to the ban on vision placeholders, a truncation of the same kind but of the
# tiny mass a trained model gives them.

# %%
assert sorted(PRESETS) == sorted(["micro", "toy", "toy_decisive", "qwen2_5_vl_7b"])
assert all((c.temperature, c.top_p) == (1.0, 1.0) for c in PRESETS.values())

# %%
hook.remove()  # back to the plain (lively) model

# %% [markdown]
# ## Greedy decoding matches `model.generate` token for token
# Temperature 0 means argmax. Our loop passes explicit 3-D (mrope) positions at every cached step
# (above); if those were wrong, the continuation would drift from what Hugging Face's `generate`
# produces. `generate` needs `mm_token_type_ids` (1 at the image tokens)
# for the same positions, and `suppress_tokens` for the same ban on vision placeholders.

# %%
ours = sample(model, batch, tokenizer, max_new_tokens=10, temperature=0)["completion_ids"]
theirs = model.generate(
    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
    image_grid_thw=batch["image_grid_thw"],
    mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).long(),
    do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    suppress_tokens=tokenizer.convert_tokens_to_ids(VISION_TOKENS))[:, batch["input_ids"].shape[1]:]
for r in range(len(ours)):
    print(f"prompt {r} sampler : {tokenizer.convert_ids_to_tokens(ours[r].tolist())}")
    print(f"prompt {r} generate: {tokenizer.convert_ids_to_tokens(theirs[r].tolist())}")
C = theirs.shape[1]
print("identical:", torch.equal(ours[:, :C], theirs))
assert torch.equal(ours[:, :C], theirs) and all(len(set(row.tolist())) > 1 for row in ours)  # it wanders

# %% [markdown]
# Why hand-write a sampler at all, when `generate` exists? It returns exactly what GRPO needs
# (per-token log-probs under the sampling temperature, a mask that includes the stop token),
# seeds each row independently, encodes each image once for the G copies of its prompt, stops
# either in step with the other processes or on its own, as the weights' layout needs (below), and
# is short enough to read.
#
# On stopping: under FSDP (fully sharded data parallel: each process, or rank, holds a slice of every
# weight and gathers the rest from the others for each forward) every forward is a collective that
# all ranks must join, so a rank whose rows are done must keep stepping until every rank's rows are
# done, or the others wait forever. That is `lockstep=True`, the default. `train_rl.py` and `eval.py` instead
# sample inside `dist.gathered` (each weight gathered once for the whole rollout): no decode step is
# then a collective, so they pass `lockstep=False` and each rank stops as soon as its own rows are done.

# %%
assert inspect.signature(sample).parameters["lockstep"].default is True
root = Path(inspect.getfile(sequence_logprobs)).parents[1]  # the repository
for script in (root / "train_rl.py", root / "atlas_min" / "evaluate.py"):
    assert "with gathered(model)" in script.read_text() and "lockstep=False" in script.read_text(), script

# %% [markdown]
# ## Where this is used
# → `train_rl.py`, step 1 (`sample_groups`): `sample` with `rl_row_seeds`, G = `group_size` rows per
# prompt, `lockstep=False` inside `dist.gathered`. Its `completion_logprobs` (`sequence_logprobs`) gives
# log π_old and log π_ref before the update (step 3) and log π_θ inside `update` (step 4).
# `atlas_min.evaluate.evaluate` (`eval.py`) decodes greedily with the same `sample` (temperature 0,
# `lockstep=False`). Tutorial 08 runs one such step on a trained model.
