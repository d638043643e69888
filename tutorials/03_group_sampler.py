# %% [markdown]
# # 03 — The group sampler (DESIGN.md, "Stage 2, GRPO": "sample a group of G outputs o_1..o_G from π_old")
#
# GRPO needs, for every prompt q, G sampled outputs and the log-probability π_old(o_t | q, o_<t)
# of every sampled token. `atlas_min.sampler.sample` produces both in one pass:
#   * each prompt is repeated G times (its image encoded once, its features reused G times);
#   * one prefill forward over the left-padded prompts fills a KV cache;
#   * then one token per step for every row: temperature, top-p, a per-row random generator,
#     a stop per row at `<|im_end|>`, and the vision placeholders banned.
# `sequence_logprobs` recomputes the same log-probs with one full forward — that is the forward
# the GRPO update differentiates.

# %%
import sys
from pathlib import Path

try:
    import atlas_min  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from atlas_min.config import get_config
from atlas_min.data import collate_prompts, encode, load_jsonl
from atlas_min.model import init_model
from atlas_min.sampler import sample, sequence_logprobs
from atlas_min.tokens import VISION_TOKENS
from atlas_min.toy import ensure_toy_data

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
train_path, _ = ensure_toy_data(cfg)
examples = load_jsonl(train_path)
chosen = [examples[1], examples[0]]
batch = collate_prompts([encode(ex, tokenizer, image_processor, cfg.system_prompt) for ex in chosen],
                        tokenizer.pad_token_id)
for ex, n in zip(chosen, batch["attention_mask"].sum(1).tolist()):
    print(f"{ex['task']:5s} {n} prompt tokens: {ex['question']!r}")
print("input_ids", tuple(batch["input_ids"].shape))

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
with torch.no_grad():  # in training this forward runs with grad: it is the one the GRPO loss differentiates
    recomputed = sequence_logprobs(model, batch, out["prompt_ids"], out["prompt_mask"], ids, mask, repeats=G)
diff = (recomputed - out["logprobs"]).abs()[mask]
print("sequence_logprobs (nan where masked):")
print(torch.where(mask, recomputed, torch.nan))
print(f"max |sampler - full forward| over {int(mask.sum())} tokens: {diff.max().item():.2e}")

# %% [markdown]
# Why it matters: GRPO's ratio is r = exp(log π_θ − log π_old). The sampler's log-probs *are*
# log π_old; the first update over a fresh batch computes log π_θ with `sequence_logprobs` on the
# very same weights, so r must be exactly 1 there (up to float rounding), and the clipped
# surrogate reduces to −A per token (tutorial 06). If the two paths disagreed — a different
# position scheme for the cached decode, the temperature applied in one and not the other,
# the image features placed on the wrong rows — r would start away from 1, clipping would fire
# on a policy that has not moved, and the "KL to π_old" would be noise. The sampler therefore
# computes its log-probs from the model's own distribution at the sampling temperature, before
# its top-p truncation and the ban on vision tokens.

# %%
hook.remove()  # back to the plain (lively) model

# %% [markdown]
# ## Greedy decoding matches `model.generate` token for token
# Temperature 0 means argmax. Our loop passes explicit 3-D (mrope) positions at every cached step
# (DESIGN.md, "Facts already checked"); if those were wrong, the continuation would drift from what
# Hugging Face's `generate` produces. `generate` needs `mm_token_type_ids` (1 at the image tokens)
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
