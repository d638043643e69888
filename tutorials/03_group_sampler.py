# %% [markdown]
# # 03 — The group sampler (docs/method.md, "Stage 2: GRPO" and "Log-probabilities"; paper §2.2)
#
# "For each prompt q, sample a group of G outputs o_1..o_G from π_old."
#
# GRPO needs, for every prompt q, G sampled outputs and the log-probability π_old(o_t | q, o_<t)
# of every sampled token. `atlas_min.sampler.sample` produces both in one pass:
#   * each prompt is repeated G times (its image encoded once, its features reused G times);
#   * one prefill forward over the left-padded prompts fills a KV cache;
#   * then one token per step for every row, at an explicit 3-D position (explained below):
#     temperature, top-p, a per-row random generator, a stop per row at `<|im_end|>` (or
#     `<|endoftext|>`), and the vision placeholders banned.
# `sequence_logprobs` recomputes the same log-probs with one full forward — that is the forward
# the GRPO update differentiates.

# %%
import math

import torch

from atlas_min.config import get_config
from atlas_min.data import collate_prompts, encode_example, load_examples
from atlas_min.model import forward, init_model, mrope_positions
from atlas_min.sampler import sample, sequence_logprobs
from atlas_min.tokens import VISION_TOKENS

torch.set_printoptions(precision=2, sci_mode=False, linewidth=120)

# %% [markdown]
# ## A model worth sampling from
# `init_model` gives the micro Qwen2.5-VL with the functional tokens, weights at the usual init
# (std 0.02). Such a model is a poor demo:
#   * its layers barely touch the residual stream, so the last hidden state is ≈ the normalised
#     embedding of the last input token, and with a tied head the largest logit is that same
#     token: greedy decoding echoes the prompt's last token ("Ċ", a newline) forever;
#   * its logits are all within ~±0.6, so sampling at temperature 1 is ≈ uniform over the
#     vocabulary (every log-prob ≈ log(1/440) = −6.1).
# Re-drawing the language model's matrices with std 0.3 makes the logits large and context-dependent
# (std ≈ 1.7): greedy decoding wanders, and sampled tokens have very different log-probs. This is
# for the demo only (the tests do the same); it is not how a model is initialised for training.

# %%
cfg = get_config("micro")
model, tokenizer, image_processor = init_model(cfg)
model.eval()

torch.manual_seed(0)
with torch.no_grad():
    for p in model.model.language_model.parameters():
        if p.dim() == 2:  # embeddings (tied to the head) and every projection; norms keep their 1s
            p.normal_(0, 0.3)

# %% [markdown]
# ## A batch of two prompts
# A "line" question and a "shape" question: different lengths, so the shorter is left-padded
# (tutorial 02). No replies: the sampler writes those.

# %%
examples = load_examples(cfg, "train")
chosen = [examples[1], examples[0]]
batch = collate_prompts([encode_example(ex, tokenizer, image_processor, cfg) for ex in chosen],
                        tokenizer.pad_token_id)
for ex, n in zip(chosen, batch["attention_mask"].sum(1).tolist()):
    print(f"{ex['task']:5s} {n} prompt tokens: {ex['question']!r}")
print("input_ids", tuple(batch["input_ids"].shape))

# %% [markdown]
# ## Positions in three dimensions (mrope)
# Qwen2.5-VL's rotary position embedding is multimodal ("mrope"): every token has three position
# ids (t, h, w), time, height and width, and each head's rotary dimensions are split between the
# three (`mrope_section`; at 7B [16, 24, 24] of its 64 frequency pairs).
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

# %% [markdown]
# This is why the decode loop passes explicit `position_ids`. The cached decode feeds one token at a
# time, so nothing in its input says where the image was; the sampler keeps `rope_deltas` from the
# prefill and gives each new token the position (its 1-D index among the row's real tokens) +
# `rope_deltas`, the same on all three axes, exactly what a full forward over prompt + completion
# assigns to it. With the wrong positions the cached decode would condition on different positions
# than the training forward, and the two log-probs of the same token would differ.

# %% [markdown]
# ## Let it stop sometimes
# Even the lively model gives `<|im_end|>` a probability of ~1/440 per step, so no row would stop
# within 10 tokens and the completion mask would be all True. To see the stop logic we pretend the
# model has learned to stop: a forward hook on the head sets `<|im_end|>`'s logit so that it gets
# ≈ 10% of the probability at every step. The hook acts on every forward (sampler and
# `sequence_logprobs` alike), so it is part of "the model" for the rest of this section.

# %%
eos = tokenizer.convert_tokens_to_ids("<|im_end|>")


def stop_sometimes(module, inputs, logits):
    stop = logits.logsumexp(-1, keepdim=True) - 2.2  # exp(-2.2) ≈ 0.11 x the rest's mass: p ≈ 0.10
    return logits.index_copy(-1, torch.tensor([eos]), stop)


hook = model.lm_head.register_forward_hook(stop_sometimes)

# %% [markdown]
# ## G = 3 completions per prompt
# Rows come in contiguous groups, prompt-major: rows 0-2 answer prompt 0, rows 3-5 prompt 1 (the
# layout `group_advantages` expects, tutorial 05). `row_seeds` gives each row its own random
# generator, so a row's sample depends on its seed and its logits only, not on which other rows
# share the batch or the process (the same data on 1 or 8 GPUs).

# %%
G = 3
out = sample(model, batch, tokenizer, group_size=G, max_new_tokens=10, temperature=1.0, row_seeds=range(6))
for key, value in out.items():
    print(f"{key:16s}", tuple(value.shape), value.dtype)

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

# %% [markdown]
# Each row's last counted entry, −2.30 = log 0.10, is its `<|im_end|>`, at the probability the hook
# gave it. The other entries vary between ≈ −1 (a likely token) and ≈ −7 (an unlikely one).

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

# %% [markdown]
# What the printed difference is: the same quantity computed twice, a cached one-token-at-a-time
# decode and one full forward, whose floating-point sums may run in a different order. On a CPU in
# fp32 it can print exactly 0 (both paths round alike at these sizes); it need not be 0 (other
# kernels, thread counts, bf16 autocast on a GPU round differently; on the SFT-trained model of
# tutorial 08 it is ~1e-6). The test `test_sampler_logprobs_equal_the_training_forward` holds it
# within 1e-4 (docs/method.md, "Log-probabilities"). A real disagreement (a wrong position scheme,
# the temperature applied in one path only, image features on the wrong rows) would be far larger.
#
# ### Which of the two is log π_old?
# GRPO's ratio is r = exp(log π_θ − log π_old). The sampler's log-probs are log π_old already: the
# log-probs of the drawn tokens under the weights that drew them. Yet `train_rl.py` does not use
# them. Before any update it runs `sequence_logprobs` without grad on the same weights and takes
# *that* as log π_old; during the update log π_θ comes from the same function on the same inputs.
# So before the first optimiser step the two are one computation, and r is exactly 1, bit for bit
# (not 1 ± the difference above; tutorial 08 prints it). The clipped surrogate then reduces to −A
# per token (tutorial 06), and clipping cannot fire on a policy that has not moved. The price is one
# extra no-grad forward per step.
#
# Both are log-probs under softmax(logits / T) over the *whole* vocabulary, computed before the
# sampler's top-p truncation and its ban on vision tokens: the distribution the update differentiates.
# With top-p < 1 the sampler draws only from the nucleus, the smallest set of tokens holding
# probability ≥ top_p, renormalised. A token in it is drawn with probability π/mass, not π, and one
# outside it never is. The samples then come from a different distribution than the π_old in the
# ratio: the update is off-policy by that truncation. For the first step of the model above (the
# stop hook included):

# %%
with torch.no_grad():
    first = forward(model, batch, batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[0].logits[:, -1]
probs = first.softmax(-1).sort(-1, descending=True).values  # (B, V)
for top_p in (0.9, 0.5):
    kept = (probs.cumsum(-1) - probs) < top_p  # the nucleus: the smallest prefix holding >= top_p
    mass = (probs * kept).sum(-1)
    print(f"top_p {top_p}: the nucleus keeps {kept.sum(-1).tolist()} of {probs.shape[-1]} tokens, mass "
          f"{[round(m, 3) for m in mass.tolist()]}: a kept token is drawn at log π + "
          f"{[round(-math.log(m), 3) for m in mass.tolist()]}")

# %% [markdown]
# Both presets sample with T = 1 and top_p = 1: the samples come from π_old itself, up to the ban on
# vision placeholders, a truncation of the same kind but of the tiny mass a trained model gives them.

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

# %% [markdown]
# Why hand-write a sampler at all, when `generate` exists? It returns exactly what GRPO needs
# (per-token log-probs under the sampling temperature, a mask that includes the stop token),
# seeds each row independently, encodes each image once for the G copies of its prompt, keeps all
# FSDP ranks stepping until every rank is done (a rank that stops early would deadlock the
# others), and is short enough to read.

# %% [markdown]
# ## Where this is used
# → `train_rl.py`, step 1 (`sample_groups`): `sample` with `rl_row_seeds`, G = `group_size` rows per
# prompt. Its `completion_logprobs` (`sequence_logprobs`) gives log π_old and log π_ref before the
# update (step 3) and log π_θ inside `update` (step 4). `atlas_min.evaluate.evaluate` (`eval.py`) decodes
# greedily with the same `sample` (temperature 0). Tutorial 08 runs one such step on a trained model.
