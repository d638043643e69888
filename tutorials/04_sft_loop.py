# %% [markdown]
# # 04 — One SFT step by hand (docs/method.md, "Stage 1: SFT"; paper §2.2)
#
# Stage 1 teaches the model *where* functional tokens go: plain next-token cross-entropy on the
# assistant's reply, functional tokens included with no special weight; prompt, image and padding
# positions carry no loss. Over the reply tokens R of a batch:
#
#     L_SFT = (1/|R|) * sum_{(b,t) in R} -log p_theta(x_{b,t} | x_{b,<t}, image_b)
#
# Pieces: `collate_sft` (labels, tutorial 02), `atlas_min.model.forward` (the multimodal forward
# with explicit 3-D positions, tutorial 03), `atlas_min.model.reply_nll` (the per-token loss),
# `atlas_min.optim.adamw` (the optimiser).
# `train_sft.py` is exactly this step, plus the things a real run needs (see the end).

# %%
import math

import torch
import torch.nn.functional as F

from atlas_min.config import get_config
from atlas_min.data import IGNORE, collate_sft, encode_example, load_examples
from atlas_min.model import forward, init_model, reply_nll
from atlas_min.optim import adamw
from atlas_min.tokens import FUNCTIONAL_TOKENS

torch.set_printoptions(precision=3, sci_mode=False, linewidth=120)

# %% [markdown]
# ## Model, data, one batch
# The micro preset: a random-init Qwen2.5-VL with the functional tokens (tutorial 01), and four
# toy examples from four of the toy's five task families, one of them a "perception" reply without
# a functional token.

# %%
cfg = get_config("micro")
model, tokenizer, image_processor = init_model(cfg)
model.train()
functional_ids = tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS)

examples = load_examples(cfg, "train", need_response=True)
chosen = [examples[i] for i in (1, 2, 3, 5)]
encoded = [encode_example(ex, tokenizer, image_processor, cfg, with_reply=True) for ex in chosen]
batch = collate_sft(encoded, tokenizer.pad_token_id)
for ex in chosen:
    print(f"{ex['task']:6s} reply: {ex['response']!r}")
print("input_ids / labels:", tuple(batch["input_ids"].shape), "| pixel_values:", tuple(batch["pixel_values"].shape))
print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
assert len({ex["task"] for ex in chosen}) == 4 and len(cfg.toy_tasks.split(",")) == 5
assert [any(t in ex["response"] for t in FUNCTIONAL_TOKENS) for ex in chosen] == [True, True, True, False]

# %% [markdown]
# ## Forward and the per-token loss
# `forward` encodes the images, places their features on the `<|image_pad|>` positions, computes
# Qwen2.5-VL's 3-D (mrope) positions from the ids (tutorial 03; never from cached state) and runs
# the language model. Logits are (B, T, V). `reply_nll` shifts by one — the logits at position t
# predict token t+1 — and returns −log p(label) where there is a label, 0 elsewhere: (B, T−1).

# %%
logits = forward(model, batch, batch["input_ids"], batch["attention_mask"])[0].logits
labels = batch["labels"]
token_loss = reply_nll(logits, labels, IGNORE)  # (B, T-1)
has_loss = labels[:, 1:] != IGNORE  # (B, T-1): position t carries loss iff token t+1 is a reply token
print("logits", tuple(logits.shape), "| token_loss", tuple(token_loss.shape))
print("positions with loss per row:", has_loss.sum(1).tolist(), "of", token_loss.shape[1])
B, T, V = logits.shape
assert token_loss.shape == (B, T - 1) and (token_loss[~has_loss] == 0).all()

# %% [markdown]
# Row 0 around its reply: each line is "at position t, having read `input`, predict `target`".
# The first position with a loss is the last *prompt* token (the newline after
# "<|im_start|>assistant"): it predicts the first reply token. The last one predicts `<|im_end|>`.
# Everything before carries 0 — including the image tokens and the question.

# %%
row = 0
ids = batch["input_ids"][row].tolist()
first = int(has_loss[row].nonzero()[0])
last = int(has_loss[row].nonzero()[-1])


def name(i):
    return repr(tokenizer.convert_ids_to_tokens(i))[1:-1]


print(f"{'t':>3}  {'input token t':<14} {'target t+1':<14} {'loss':>6}")
for t in range(first - 3, min(last + 3, len(ids) - 1)):
    loss = f"{token_loss[row, t].item():6.3f}" if has_loss[row, t] else "     -"
    flag = "  <- functional token" if ids[t + 1] in functional_ids and has_loss[row, t] else ""
    print(f"{t:>3}  {name(ids[t]):<14} {name(ids[t + 1]):<14} {loss}{flag}")
n_prompt = len(encoded[row]["prompt_ids"])
assert first == n_prompt - 1 and name(ids[first]) == "Ċ" and name(ids[first - 1]) == "t"  # "…assistant" + newline
assert name(ids[last + 1]) == "<|im_end|>" and not has_loss[row, :first].any()

# %% [markdown]
# At this random init every loss is within 0.5 of log V: the model spreads its probability almost
# evenly over the whole vocabulary.

# %%
n_reply = has_loss.sum()
loss = token_loss.sum() / n_reply
print(f"mean over {int(n_reply)} reply tokens: {loss.item():.4f}   (log V = log {logits.shape[-1]} = "
      f"{math.log(logits.shape[-1]):.4f})")

# The same number with torch's cross_entropy, which skips IGNORE (-100) labels by default:
ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
print(f"F.cross_entropy on shifted logits: {ce.item():.4f}")

is_ft = torch.isin(labels[:, 1:], torch.tensor(functional_ids))  # (B, T-1): targets that are functional tokens
ft_share = is_ft.sum().item() / n_reply.item()
print(f"loss on the {int(is_ft.sum())} functional-token positions alone: {token_loss[is_ft].mean().item():.4f} "
      f"({int(is_ft.sum())} of {int(n_reply)} reply tokens = {ft_share:.1%})")
assert ((token_loss[has_loss] - math.log(V)).abs() < 0.5).all()
assert torch.isclose(ce, loss, rtol=0, atol=1e-5)
assert 0.04 < ft_share < 0.06 and round(100 * 4.8 / 203.7, 1) == 2.4  # here ~5%; the paper's replies 2.4%

# %% [markdown]
# The functional-token loss is reported on its own (`ft_loss` in train_sft.py's log) but does not
# enter the objective separately: SFT gives these tokens no extra weight. Their *functional token
# share* (functional tokens / reply tokens) is ~5% here; in the paper's long replies 2.4% (4.8 of
# 203.7 tokens, §2.3): the dilution that LA-GRPO addresses in stage 2 (tutorial 07).
#
# Normalisation: the sum over reply tokens divided by the number of reply tokens *in the batch*,
# so every token weighs the same and a long reply weighs more than a short one. (GRPO, tutorial 06,
# instead averages per output first.)

# %% [markdown]
# ## Backward, gradient norm, one AdamW step
# The optimiser is train_sft.py's, `optim.adamw(model, cfg, "sft")`: AdamW with betas
# (`sft_beta1`, `sft_beta2`) = (0.9, 0.95), lr `cfg.sft_lr`, weight decay `cfg.weight_decay`; the
# gradient norm is clipped at `cfg.grad_clip`. `clip_grad_norm_` returns the norm *before* clipping.

# %%
optimizer = adamw(model, cfg, "sft")
print("AdamW:", {k: optimizer.defaults[k] for k in ("lr", "betas", "weight_decay")})
assert optimizer.defaults["betas"] == (cfg.sft_beta1, cfg.sft_beta2) == (0.9, 0.95)
loss.backward()
embed_grad = model.get_input_embeddings().weight.grad
row_grads = embed_grad[functional_ids].norm(dim=-1)  # (5,): Zoom, Line, Shape, Arrow, Text
print("gradient on the functional rows (norm per token):", row_grads)
grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
after_clip = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
print(f"grad norm before clipping: {grad_norm.item():.4f}  (clipped to {cfg.grad_clip}: now {after_clip.item():.4f})")
assert grad_norm > cfg.grad_clip == 1.0 and torch.isclose(after_clip, torch.tensor(1.0), atol=1e-4)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
optimizer.step()
optimizer.zero_grad(set_to_none=True)

# %% [markdown]
# The rows are printed in FUNCTIONAL_TOKENS order (Zoom, Line, Shape, Arrow, Text). The batch's
# replies hold `<|Line|>`, `<|Arrow|>` and `<|Zoom|>`, and those rows get a real gradient (the head
# is tied to the embedding, so each row is pushed both as an output — "predict me here" — and as
# an input that the next tokens are predicted from). `<|Shape|>` (its example is the perception
# reply) and `<|Text|>` get only the small output-side gradient that every vocabulary row receives
# through the softmax ("not here"): here more than 10 times smaller.

# %%
zoom, line, shape, arrow, text = row_grads.tolist()
assert min(line, arrow, zoom) > 10 * max(shape, text)

# %% [markdown]
# ## The same batch after the step
# Adam's first update is ≈ lr · sign(gradient) (its m / sqrt(v) is g / |g| at step 1): every weight
# with a gradient moves by ≈ lr = 2e-3 in the direction that lowers this batch's loss, so the loss
# on the same batch goes down. A few more steps on the same batch continue the trend (this is
# memorising four examples, not learning the task; the toy preset trains on 4,000).

# %%
moved = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters() if n in grads])
g = torch.cat([grads[n].flatten() for n in grads])
big_g = g.abs() > 1e-6  # weights with a real gradient (Adam's eps is 1e-8)
print(f"lr {cfg.sft_lr}: |change| of the {int(big_g.sum()):,} weights with |gradient| > 1e-6: "
      f"median {moved[big_g].abs().median().item():.6f}, opposite to the gradient's sign: "
      f"{(moved[big_g].sign() == -g[big_g].sign()).float().mean().item():.0%}")
assert cfg.sft_lr == 2e-3 and cfg.weight_decay == 0.0 and get_config("toy").toy_train_size == 4000
assert torch.isclose(moved[big_g].abs().median(), torch.tensor(2e-3), rtol=0.01)
assert (moved[big_g].sign() == -g[big_g].sign()).all()


def batch_loss():
    with torch.no_grad():
        out = forward(model, batch, batch["input_ids"], batch["attention_mask"])[0].logits
        per_token = reply_nll(out, labels, IGNORE)
    return (per_token.sum() / n_reply).item(), per_token[is_ft].mean().item()


after, ft_after = batch_loss()
print(f"step 1: loss {loss.item():.4f} -> {after:.4f}   functional-token loss {token_loss[is_ft].mean().item():.4f} -> {ft_after:.4f}")
assert after < loss.item()
for step in range(2, 6):
    logits = forward(model, batch, batch["input_ids"], batch["attention_mask"])[0].logits
    step_loss = reply_nll(logits, labels, IGNORE).sum() / n_reply
    step_loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after, ft_after = batch_loss()
    print(f"step {step}: loss {step_loss.item():.4f} -> {after:.4f}   functional-token loss -> {ft_after:.4f}")
    assert after < step_loss.item()

# %% [markdown]
# ## From this to `train_sft.py`
# → `train_sft.py`, part 3 (the loop) and `sft_step`: `sft_step` runs this same step (`forward` →
# `reply_nll` → sum / number of reply tokens → backward), then the loop clips and steps AdamW with
# `optim.clipped_step`, which skips the update (and says so) when the gradient norm is not finite
# (docs/method.md, "Numerical guards"). It adds:
#   * a learning-rate schedule, `optim.lr_at`: linear warm-up over `sft_warmup` steps, then cosine
#     decay to 0;
#   * each step's examples from `data.stream_indices` (per-epoch shuffles, derived from the seed and
#     the step alone, so a resumed run sees the same batches);
#   * gradient accumulation: the global batch (`batch_size`) is cut into `micro_batch_size`
#     pieces, each backward adds its share, and the normaliser is the reply-token count of the
#     *whole* global batch, so the result does not depend on how the batch is cut;
#   * FSDP2 over several processes (`torchrun`), each rank taking a slice of the same global batch,
#     and bf16 autocast on GPU;
#   * resumable checkpoints every `save_every` steps, and a final one that loads with stock
#     `transformers`, plus a metrics log (`loss`, `ft_loss`, `lr`, `grad_norm`, `tokens_per_s`).
#
#     python train_sft.py --config toy --out runs/sft-toy      # the CPU demo
#
# Tutorial 08 runs this step in a loop on the micro model, then one RL step on the result.
