# %% [markdown]
# # 01 — Functional tokens: five new words in the vocabulary
# (docs/method.md, "Functional tokens"; paper §2.1, Tab. 1)
#
# ATLAS adds five tokens to Qwen2.5-VL's vocabulary:
#
#     F = {<|Zoom|>, <|Line|>, <|Shape|>, <|Arrow|>, <|Text|>}
#
# Each one is an *ordinary* token: the model emits it by next-token prediction, like any word.
# Nothing is executed and no image is drawn. Adding them takes three things:
#   1. a tokenizer entry, so "<|Line|>" is one id and never split into pieces;
#   2. an embedding row for that id (and an output row too, when the head is untied);
#   3. an initial value for the new rows — here the mean of the rows that already existed.
#
# Implementation: `atlas_min.tokens.add_functional_tokens` and `functional_mask`.
# Here we use the `micro` preset: a random-init Qwen2.5-VL with a tiny BPE vocabulary trained on
# the toy world's texts (everything offline, on a CPU).
#
# In these tutorials every number the prose states is checked by an `assert` next to the code that makes it.

# %%
import math

import torch

from atlas_min.config import get_config
from atlas_min.model import build_model, build_tokenizer
from atlas_min.plan import meta_model
from atlas_min.tokens import FUNCTIONAL_TOKENS, add_functional_tokens, functional_mask
from atlas_min.toy import corpus

torch.set_printoptions(precision=4, sci_mode=False)
assert len(FUNCTIONAL_TOKENS) == 5

# %% [markdown]
# ## A tokenizer and a model *without* the functional tokens
# `init_model(cfg)` would add the tokens for us; here we build the two halves by hand to watch
# the addition happen. The micro model ties its input embedding and its output head (one matrix).

# %%
cfg = get_config("micro")
tokenizer = build_tokenizer(corpus(cfg), cfg.tokenizer_vocab)
model = build_model(cfg, tokenizer)
embed = model.get_input_embeddings().weight
print("tokenizer size        :", len(tokenizer))
print("embedding matrix      :", tuple(embed.shape), "(rows, hidden)")
print("config vocab_size     :", model.config.text_config.vocab_size)
print("head tied to embedding:", model.get_output_embeddings().weight is embed)
assert model.get_output_embeddings().weight is embed

# %% [markdown]
# ## Before: "<|Line|>" is just characters
# The BPE has never seen the string, so it falls apart into pieces ("Ġ" is byte-level BPE's
# marker for a leading space): three after a space, as in this sentence, four on its own. A model could still learn
# to write the pieces one by one, but the "one word" of the paper's title would be several, with
# no single row in the embedding (or single logit in the head) that stands for it.

# %%
text = "Let me compare the lines. <|Line|> <answer>A</answer>"


def show(ids):
    pieces = tokenizer.convert_ids_to_tokens(ids)
    print(f"{len(ids)} tokens:", " | ".join(f"{p}:{i}" for p, i in zip(pieces, ids)))


ids_before = tokenizer.encode(text, add_special_tokens=False)
show(ids_before)
after_space = tokenizer.convert_ids_to_tokens(tokenizer.encode(" <|Line|>", add_special_tokens=False))
alone = tokenizer.convert_ids_to_tokens(tokenizer.encode("<|Line|>", add_special_tokens=False))
print("' <|Line|>' (after a space) ->", after_space)
print("'<|Line|>' alone            ->", alone)
assert (len(after_space), len(alone)) == (3, 4)

# %% [markdown]
# ## Add them
# Remember the old matrix first, so we can compare.

# %%
old = embed.detach().clone()  # (n_old, hidden)
n_old = old.shape[0]
ids = add_functional_tokens(model, tokenizer)
embed = model.get_input_embeddings().weight
print("functional ids        :", dict(zip(FUNCTIONAL_TOKENS, ids)))
print("tokenizer size        :", len(tokenizer))
print("embedding matrix      :", tuple(embed.shape), f"(+{embed.shape[0] - n_old} rows)")
print("config vocab_size     :", model.config.text_config.vocab_size, "(follows the matrix: logits have this width)")
print("head still tied       :", model.get_output_embeddings().weight is embed)
assert ids == list(range(n_old, n_old + 5)) and embed.shape[0] == len(tokenizer) == n_old + 5

# %% [markdown]
# ## After: one id each
# Added with `normalized=False`, the tokenizer matches the whole string before BPE runs. They are
# *not* special tokens, so `decode(..., skip_special_tokens=True)` keeps them: they stay visible in
# the text that the reward function reads. The reward's count of functional tokens (n_F, behind
# R_ft, the functional-token reward) is taken from the token *ids*, not from that text: the same
# characters spelled out of ordinary tokens count 0 (tutorial 05). Note the space before `<|Line|>`:
# it no longer merges with "<|" and becomes its own "Ġ" token. The toy replies always put a
# space there, so the model simply learns "Ġ" then `<|Line|>`.

# %%
ids_after = tokenizer.encode(text, add_special_tokens=False)
show(ids_after)
print("decoded, specials skipped:", repr(tokenizer.decode(ids_after, skip_special_tokens=True)))
assert ids_after.count(ids[1]) == 1 and tokenizer.convert_ids_to_tokens(ids_after[ids_after.index(ids[1]) - 1]) == "Ġ"
assert tokenizer.decode(ids_after, skip_special_tokens=True) == text

# %% [markdown]
# ## The new rows are the mean of the old rows
# Rows 0..n_old-1 are untouched; each new row equals their mean (per matrix: the input embedding,
# and the head's own rows when it is untied). **Ours**: the paper does not say how the rows start
# (docs/method.md, "Functional tokens").

# %%
mean_row = old.mean(0)
print("old rows unchanged, max |diff|     :", (embed[:n_old] - old).abs().max().item())
print("new rows vs mean of old, max |diff|:", (embed[ids] - mean_row).abs().max().item())
assert torch.equal(embed[:n_old], old) and torch.allclose(embed[ids], mean_row.expand(5, -1), rtol=0, atol=1e-7)

# %% [markdown]
# ### How long is the mean row?
# Much *shorter* than a typical row. At this random init the rows are independent random vectors;
# averaging n of them cancels most of each: the mean's norm shrinks like 1/sqrt(n) (a typical
# norm / sqrt(n) is what independent rows give). So the new rows start near the origin, not "with an
# ordinary norm". (The old row of norm 0 is the padding token's, `<|endoftext|>`, id 0, which the
# model's init sets to zeros.)

# %%
norms = old.norm(dim=-1)
print(f"norm of the new rows (the mean row): {embed[ids[0]].norm().item():.4f}")
print(f"norms of the {n_old} old rows        : mean {norms.mean():.4f}, min {norms.min():.4f}, max {norms.max():.4f}")
print(f"typical norm / sqrt(n)            : {norms.mean():.4f} / sqrt({n_old}) = {norms.mean() / math.sqrt(n_old):.4f}")
print(f"row of norm 0: id {int(norms.argmin())}, {tokenizer.convert_ids_to_tokens(int(norms.argmin()))!r}, "
      f"the padding token {tokenizer.pad_token!r}")
new_norm = embed[ids[0]].norm().item()
assert new_norm < norms.mean() / 10  # much shorter than a typical row ...
assert 0.5 < new_norm / (norms.mean() / math.sqrt(n_old)) < 2  # ... about a typical norm / sqrt(n)
assert norms[0] == 0 and tokenizer.pad_token_id == 0 and tokenizer.pad_token == "<|endoftext|>" and norms[1:].min() > 0

# %% [markdown]
# With trained embeddings (the 7B case) the rows are no longer independent random vectors, so the
# mean need not be this short. Whatever its length, it is the centre of the old rows, inside their
# cloud, not off in a direction no trained row points to (where a random new row would be).
#
# What the mean guarantees, trained or not, is the new token's starting *logit*. The head is linear,
# so in every context the new token's logit is exactly the average of the old tokens' logits:
# h·mean_j(e_j) = mean_j(h·e_j). It is reachable (an ordinary logit, not −∞-like) and cannot
# dominate: exp(mean logit) ≤ mean exp(logit) (Jensen), so its probability is at most 1/n.
# Checked on the micro model, at the last position of a prompt:

# %%
with torch.no_grad():
    x = torch.tensor([tokenizer.encode("Let me compare the lines.", add_special_tokens=False)])
    logits = model(input_ids=x).logits[0, -1]  # (V,): text only, so plain positions are enough here
probs = logits.softmax(-1)
print(f"logit of <|Line|>: {logits[ids[1]].item():+.5f} | "
      f"mean logit of the old tokens: {logits[:n_old].mean().item():+.5f}")
print(f"p(<|Line|>) = {probs[ids[1]].item():.5f} <= 1/n = 1/{n_old} = {1 / n_old:.5f}")
assert torch.isclose(logits[ids[1]], logits[:n_old].mean(), rtol=0, atol=1e-6) and probs[ids[1]] <= 1 / n_old

# %% [markdown]
# All five rows are identical at the start. They become different only through training: SFT
# puts `<|Line|>` after "Let me compare the lines." and `<|Shape|>` after "Let me mark the red
# shapes.", and the gradients through those positions pull the rows apart (tutorial 04).

# %%
assert all(torch.equal(embed[i], embed[ids[0]]) for i in ids)
replies = [line for line in corpus(cfg) if "<|Line|>" in line or "<|Shape|>" in line]
assert any("Let me compare the lines. <|Line|>" in r for r in replies)
assert any("Let me mark the red shapes. <|Shape|>" in r for r in replies)

# %% [markdown]
# ## Idempotent: a second call changes nothing
# The rows are initialised only when a token is new to the tokenizer, so calling again (say, on a
# checkpoint that already has them) returns the same ids and leaves every weight as it is.

# %%
snapshot = embed.detach().clone()
size = len(tokenizer)
again = add_functional_tokens(model, tokenizer)
print("same ids:", again == ids, "| same tokenizer size:", len(tokenizer) == size,
      "| weights identical:", torch.equal(model.get_input_embeddings().weight, snapshot))
assert again == ids and len(tokenizer) == size and torch.equal(model.get_input_embeddings().weight, snapshot)

# %% [markdown]
# ## `functional_mask`: where the functional tokens are
# LA-GRPO (tutorial 07) needs to know which generated positions hold a functional token. That is a
# plain membership test on ids, same shape as its input.

# %%
line, shape = tokenizer.convert_tokens_to_ids(["<|Line|>", "<|Shape|>"])
word = tokenizer.convert_tokens_to_ids("Let")
eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
small = torch.tensor([[word, line, eos, eos],
                      [shape, word, line, eos]])
print("ids :\n", small)
print("functional_mask:\n", functional_mask(small, ids))
assert functional_mask(small, ids).tolist() == [[False, True, False, False], [True, False, True, False]]

# %% [markdown]
# ## The 7B case: spare rows, no resize
# Qwen2.5-VL-7B's embedding matrix has 152,064 rows, but its tokenizer holds only 151,665 tokens:
# the matrix was padded to a round size (a multiple of 128, friendly to GPU kernels and to tensor
# parallel sharding). The five new ids (151,665 … 151,669) already have rows, so nothing needs to
# grow. Worse, the naive `model.resize_token_embeddings(len(tokenizer))` would *shrink* the matrix
# to 151,670 rows and change the logits' width. `add_functional_tokens` grows only when an id
# falls outside the matrix and never shrinks it.
#
# Checked at the real sizes: `atlas_min.plan.meta_model` builds the `qwen2_5_vl_7b` preset on the
# meta device (shapes only, no memory, no download) with a stand-in tokenizer of Qwen's size and
# special-token ids, and adds the tokens.

# %%
model_7b, n_tokens_7b, rows_7b, ids_7b = meta_model(get_config("qwen2_5_vl_7b"))
print(f"7B: {n_tokens_7b:,} tokens in {rows_7b:,} rows -> functional ids {ids_7b}, "
      f"rows after: {model_7b.get_input_embeddings().weight.shape[0]:,} (input) and {model_7b.lm_head.weight.shape[0]:,} (untied head)")
assert (n_tokens_7b, rows_7b) == (151_665, 152_064) and rows_7b % 128 == 0
assert ids_7b == list(range(151_665, 151_670)) and n_tokens_7b + 5 == 151_670
assert model_7b.get_input_embeddings().weight.shape[0] == model_7b.lm_head.weight.shape[0] == 152_064
assert model_7b.lm_head.weight is not model_7b.get_input_embeddings().weight  # untied at 7B
del model_7b

# %% [markdown]
# Meta tensors hold no values, so to watch the rows themselves we mimic that with the micro model:
# give it 16 spare rows first, then add the tokens.

# %%
tokenizer7 = build_tokenizer(corpus(cfg), cfg.tokenizer_vocab)
model7 = build_model(cfg, tokenizer7)
model7.resize_token_embeddings(len(tokenizer7) + 16, mean_resizing=False)  # like 7B: rows > tokens
rows_before = model7.get_input_embeddings().weight.shape[0]
print(f"before: {len(tokenizer7)} tokens, {rows_before} rows")
ids7 = add_functional_tokens(model7, tokenizer7)
w7 = model7.get_input_embeddings().weight
print(f"after : {len(tokenizer7)} tokens, {w7.shape[0]} rows (unchanged), ids {ids7}")
print("the 5 rows used are the mean of the real-token rows, max |diff|:",
      (w7[ids7] - w7[:min(ids7)].mean(0)).abs().max().item())
assert rows_before == len(tokenizer7) - 5 + 16 and w7.shape[0] == rows_before
assert torch.allclose(w7[ids7], w7[:min(ids7)].mean(0).expand(5, -1), rtol=0, atol=1e-7)

# %% [markdown]
# The mean is taken over the rows that hold real tokens (below the first new id), not over the
# spare rows, which hold whatever the checkpoint put there. With an untied head (as in the 7B
# model) `add_functional_tokens` sets the `lm_head` rows the same way, from the head's own rows.

# %% [markdown]
# ## Where this is used
# → `atlas_min.model.init_model` adds the tokens to every stage-1 starting model (random-init or a
# `model_path` checkpoint): `train_sft.py`, part 2 ("model … + functional tokens").
# `tokens.functional_mask` marks the functional positions of sampled completions in `train_rl.py`'s
# loop (part 3, `fmask`): the positions LA-GRPO's anchor averages over (tutorial 07).
