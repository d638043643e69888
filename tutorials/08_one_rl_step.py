# %% [markdown]
# # 08 — One RL step on a model (docs/method.md, "Stage 2: GRPO" and "LA-GRPO")
#
# Tutorials 05-07 took the GRPO pieces one at a time, on made-up numbers. Here they run together,
# on a model, in the order `train_rl.py` runs them in one step:
#
#     1. sample G completions of one prompt from π_old      `sampler.sample` (tutorial 03)
#     2. score them: R, then A_i within the group            `sampler.decode_completion`, `rewards.compute_reward`,
#                                                            `grpo.group_advantages` (05)
#     3. log π_old and log π_ref, no grad, before any update `sampler.sequence_logprobs` (03)
#     4. L_GRPO + λ·L_anchor, backward, one AdamW step       `grpo.grpo_loss` (06, 07), `optim.adamw`,
#                                                            `optim.clipped_step`
#
# and then look at what the step did to each completion's functional token.
#
# A random-init model is useless for this: every completion is gibberish, every reward is 0, every
# advantage is 0 and the step does nothing. That is what the fast micro runs of `train_sft.py` (4
# steps) then `train_rl.py` do: they check that the scripts run, not that RL learns. So first a short
# stage 1 (tutorial 04's step, in a loop) teaches the micro model the reply format; it then
# answers in the format but often wrongly, which is exactly what GRPO needs.
#
# Run time: the SFT loop is most of it and the RL step a small part (asserted at the end, where the
# tutorial prints its own times). The seconds themselves depend on what else runs on the cores, so
# they are printed, not promised.

# %%
import copy
import math
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from atlas_min.config import get_config
from atlas_min.data import IGNORE, collate_prompts, collate_sft, encode_example, load_examples, stream_indices
from atlas_min.grpo import constant_groups, functional_grad_share, group_advantages, grpo_loss
from atlas_min.model import forward, init_model, reply_nll
from atlas_min.optim import adamw, clipped_step, lr_at, set_lr
from atlas_min.rewards import compute_reward
from atlas_min.sampler import decode_completion, rl_row_seeds, rl_run_seed, sample, sequence_logprobs
from atlas_min.tokens import FUNCTIONAL_TOKENS, functional_mask

torch.set_printoptions(precision=4, sci_mode=False, linewidth=120)
t_start = time.time()

# %% [markdown]
# ## Stage 1, in a few seconds
# The micro preset, with overrides for this demo: 150 SFT steps of 16 examples at lr 1e-2 (the
# preset's 4 steps at 2e-3 only check that the script runs). The micro model (~112k parameters) then
# fits the 64 toy replies' *format* well: "lead-in, functional token, `<answer>…</answer>`". Its
# answers are far from always right, and it sometimes picks the wrong lead-in or token for the
# question. G = 8 completions per prompt, as in the toy and 7B presets (the micro preset has 4);
# `rl_lr` is for the RL step below.

# %%
cfg = get_config("micro", ["sft_steps=150", "sft_lr=1e-2", "sft_warmup=10", "batch_size=16",
                           "group_size=8", "rl_lr=1e-3"])
model, tokenizer, image_processor = init_model(cfg)
functional_ids = tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS)
train = load_examples(cfg, "train", need_response=True)
micro, toy, big = get_config("micro"), get_config("toy"), get_config("qwen2_5_vl_7b")
n_params = sum(p.numel() for p in model.parameters())
print(f"micro model: {n_params:,} parameters; {len(train)} toy examples")
assert (cfg.sft_steps, cfg.batch_size, cfg.sft_lr) == (150, 16, 1e-2) and (micro.sft_steps, micro.sft_lr) == (4, 2e-3)
assert round(n_params, -3) == 112_000 and len(train) == 64
assert cfg.group_size == toy.group_size == big.group_size == 8 and micro.group_size == 4
encoded_sft = [encode_example(ex, tokenizer, image_processor, cfg, with_reply=True) for ex in train]
optimizer = adamw(model, cfg, "sft")
model.train()
t0 = time.time()
for step in range(cfg.sft_steps):  # train_sft.py's step on one process, without micro-batches
    set_lr(optimizer, lr_at(step, cfg.sft_steps, cfg.sft_warmup, cfg.sft_lr))
    order = stream_indices(step, cfg.batch_size, len(train), seed=cfg.seed, epoch_seed_stride=cfg.epoch_seed_stride)
    batch = collate_sft([encoded_sft[i] for i in order], tokenizer.pad_token_id)
    logits = forward(model, batch, batch["input_ids"], batch["attention_mask"])[0].logits
    token_loss = reply_nll(logits, batch["labels"], IGNORE)  # (B, T-1)
    loss = token_loss.sum() / (batch["labels"] != IGNORE).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 30 == 0 or step == cfg.sft_steps - 1:
        print(f"SFT step {step + 1:3d}: loss {loss.item():.3f}")
t_sft = time.time() - t0
print(f"SFT: {cfg.sft_steps} steps in {t_sft:.1f} s")

# %% [markdown]
# ## The prompt and its group
# An RL run's random draws all derive from `rl_run_seed(cfg)` (`atlas_min/sampler.py`): `seed`, moved
# by `rl_seed` (0 leaves it as it is), so one SFT checkpoint can be trained with several RL seeds.
# `train_rl.py` takes its prompts from the same kind of shuffled stream as SFT, under the seed
# `rl_run_seed(cfg) + rl_seed_offset` (so not in SFT's order), step s taking the stream's next
# `prompts_per_step` prompts; and it seeds row r of step s with `rl_row_seeds(cfg, s, r, …)`, which
# derives from `rl_run_seed(cfg)`, s and r. We walk that stream from its start, seeding the k-th
# prompt's rows k·G … k·G + G − 1 as a step 0 holding k + 1 prompts would, and keep the first prompt
# whose G completions do *not* all get the same reward (and hold a functional token). (A constant
# group has all advantages 0 and teaches nothing, tutorial 05; `train_rl.py` does not skip them, it
# just gets no gradient from them and logs their share as `constant_group_share`.) The reference
# model π_ref is the frozen SFT model, a copy taken before any RL update.

# %%
G = cfg.group_size
reference = copy.deepcopy(model).requires_grad_(False).eval()
stream = stream_indices(0, 16, len(train), seed=rl_run_seed(cfg) + cfg.rl_seed_offset,
                        epoch_seed_stride=cfg.epoch_seed_stride)  # train_rl.py's prompt order, 16 prompts of it
assert rl_run_seed(cfg) == cfg.seed + cfg.rl_seed * cfg.epoch_seed_stride
assert stream[:cfg.prompts_per_step] == stream_indices(0, cfg.prompts_per_step, len(train), seed=rl_run_seed(cfg)
                                                       + cfg.rl_seed_offset, epoch_seed_stride=cfg.epoch_seed_stride)


def sample_group(k):
    """Step 1 for the stream's k-th prompt: its encoding, prompt batch, rollout, and G reward dicts."""
    ex = train[stream[k]]
    enc = encode_example(ex, tokenizer, image_processor, cfg)
    batch = collate_prompts([enc], tokenizer.pad_token_id)
    model.eval()
    rollout = sample(model, batch, tokenizer, group_size=G, max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, top_p=cfg.top_p, row_seeds=rl_row_seeds(cfg, 0, k * G, G))
    model.train()
    scores, texts = [], []
    for ids, mask in zip(rollout["completion_ids"], rollout["completion_mask"]):
        text, length, functional = decode_completion(tokenizer, ids, mask)
        texts.append(text)
        scores.append(compute_reward(text, ex["answer"], cfg, question=ex["question"], num_tokens=length,
                                     functional=functional))
    return ex, batch, rollout, texts, scores


walked_constant = []  # one bool per group walked: were all its G rewards equal?
for k in range(len(stream)):
    ex, batch, rollout, texts, scores = sample_group(k)
    walked_constant.append(bool(constant_groups(torch.tensor([s["total"] for s in scores]), G)))
    if len({s["total"] for s in scores}) > 1 and any(s["n_functional"] for s in scores):
        break
rewards = torch.tensor([s["total"] for s in scores], dtype=torch.float64)  # (G,), float64 as train_rl.py's `score`
assert len(set(rewards.tolist())) > 1, "every completion got the same reward: this step would teach nothing"

image_path = Path(tempfile.mkdtemp(prefix="atlas_min_08_")) / "prompt.png"
Image.open(ex["images"][0]).save(image_path)
print(f"stream position {k}: example {ex['id']}")
print("image   :", image_path, f"({cfg.image_size}x{cfg.image_size}; open it to check the answer)")
print("question:", ex["question"])
print("gold    :", ex["answer"])

# %% [markdown]
# ## Steps 1-2: the G completions, their rewards, their advantages
# R = w_acc·R_acc + w_ft·R_ft + w_fmt·R_fmt − w_len·P_len − w_over·P_over with the micro weights
# (1, 0.5, 0.2, 0.2, 0.2; tutorial 05): a right answer with a functional token scores 1.7, right
# without one 1.2, wrong but well formed 0.2, malformed 0. n_F, the functional-token count behind
# R_ft and P_over, comes from the sampled token ids (`decode_completion`, tutorial 05). The replies
# are short (P_len starts at 48 tokens) and rarely hold more than one functional token (P_over starts
# beyond 3), so the penalties are usually 0 here.

# %%
mask = rollout["completion_mask"]  # (G, C)
fmask = functional_mask(rollout["completion_ids"], functional_ids) & mask  # (G, C)
advantages = group_advantages(rewards, G, cfg.adv_eps)  # (G,)
print(f"{'row':>3} {'acc':>4} {'ft':>4} {'fmt':>4} {'P_len':>5} {'P_ovr':>5} {'R':>5} {'A':>7} {'len':>4}  completion")
for i, (s, text) in enumerate(zip(scores, texts)):
    print(f"{i:3d} {s['accuracy']:4.1f} {s['functional']:4.1f} {s['format']:4.1f} {s['length_penalty']:5.2f} "
          f"{s['overuse_penalty']:5.2f} {s['total']:5.2f} {advantages[i].item():+7.3f} {int(mask[i].sum()):4d}  "
          f"{text!r}")
print("rewards in the group:", sorted({round(r, 3) for r in rewards.tolist()}),
      "| advantages sum to", round(advantages.sum().item(), 6))
w = (cfg.w_acc, cfg.w_ft, cfg.w_fmt, cfg.w_len, cfg.w_over)
assert w == (1, 0.5, 0.2, 0.2, 0.2) and (cfg.len_threshold, cfg.over_threshold) == (48, 3)
assert [round(w[0] + w[1] + w[2], 6), round(w[0] + w[2], 6), w[2]] == [1.7, 1.2, 0.2]
assert {round(r, 6) for r in rewards.tolist()} <= {1.7, 1.2, 0.2, 0.0, 1.5, 1.0}  # penalties 0 here
assert all(s["length_penalty"] == s["overuse_penalty"] == 0 for s in scores)
assert abs(advantages.sum().item()) < 1e-9

# %% [markdown]
# ## Step 3: log π_old and log π_ref, before any update
# `train_rl.py` recomputes log π_old with the same full forward (`sequence_logprobs`) that will give
# log π_θ during the update, so the ratio r is exactly 1 before the first update
# (docs/method.md, "Log-probabilities"); the sampler's own log-probs agree with it only to rounding,
# within the tests' 1e-4 (printed below).
# π_ref is the frozen SFT model; it equals π_θ at this first step, so every KL term is 0.

# %%
args = (batch, rollout["prompt_ids"], rollout["prompt_mask"], rollout["completion_ids"], mask)
with torch.no_grad():
    old_logp = sequence_logprobs(model, *args, repeats=G, temperature=cfg.temperature)  # (G, C)
    ref_logp = sequence_logprobs(reference, *args, repeats=G, temperature=cfg.temperature)  # (G, C)
print("max |sampler's log-probs - log π_old|:", (rollout["logprobs"] - old_logp).abs()[mask].max().item())
print("max |log π_ref - log π_old|          :", (ref_logp - old_logp).abs()[mask].max().item())
print("log π_old of the sampled tokens, row 0:", old_logp[0][mask[0]])
assert (rollout["logprobs"] - old_logp).abs()[mask].max() < 1e-4 and torch.equal(ref_logp, old_logp)

# %% [markdown]
# ## Step 4: the loss with λ = 0 (GRPO) and λ > 0 (LA-GRPO)
# At r = 1 every token's clipped term is −A_i, so L_GRPO = −mean_i A_i = 0: the advantages of a
# group sum to 0 (and the KL terms are 0). The *value* is 0, the *gradient* is not. L_anchor = mean
# over I_F (the outputs with a functional token) of −A_i, which is not 0 unless I_F is the whole group.
# The functional gradient share (`functional_grad_share`) is the share of |∂L/∂log π| that lands on
# functional positions; the functional token share is the share of generated tokens that are
# functional (tutorial 07).

# %%
coefs = dict(clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef)
logp = sequence_logprobs(model, *args, repeats=G, temperature=cfg.temperature)  # (G, C), with grad: log π_θ
print("max |log π_θ - log π_old| before the step:", (logp.detach() - old_logp).abs()[mask].max().item(), "(so r = 1)")
in_IF = fmask.sum(1) > 0  # (G,)
print(f"functional positions: {int(fmask.sum())} of {int(mask.sum())} generated tokens "
      f"(functional token share {fmask.sum().item() / mask.sum().item():.3f}), in {int(in_IF.sum())} of {G} outputs (I_F)")
assert torch.equal(logp.detach(), old_logp)  # r = 1 exactly, not 1 ± rounding
asks, logged = {}, {}
for lam in (0.0, cfg.anchor_coef):
    loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, fmask, **coefs, anchor_coef=lam)
    share = functional_grad_share(logp, old_logp, ref_logp, advantages, mask, fmask, **coefs, anchor_coef=lam)
    print(f"λ = {lam}: loss {loss.item():+.4f} (L_anchor {stats['anchor']:+.4f}), "
          f"ratio_mean {stats['ratio_mean']:.6f}, kl {stats['kl']:.4f}, functional gradient share {share:.3f}")
    assert abs(loss.item() - lam * stats["anchor"]) < 1e-6 and stats["ratio_mean"] == 1.0 and stats["kl"] == 0.0
    assert abs(stats["anchor"] + advantages[in_IF].mean().item()) < 1e-6  # L_anchor = mean over I_F of −A_i
    logged[lam] = dict(stats, functional_grad_share=share)
    x = logp.detach().requires_grad_(True)  # what the loss asks of each log-prob: −∂L/∂log π_t
    (grad,) = torch.autograd.grad(grpo_loss(x, old_logp, ref_logp, advantages, mask, fmask, **coefs,
                                            anchor_coef=lam)[0], x)
    asks[lam] = -grad  # (G, C): > 0 asks for the token to become more likely

# %% [markdown]
# What the loss asks of each functional token, −∂L/∂log π_t (tutorial 07's gradient, on the model's
# own samples): the sign of A_i, and |A_i|/(G·|o_i|) from GRPO alone. The anchor adds
# λ·|A_i|/(|I_F|·|F_i|): with ~17-token replies and one token each, about ten times more
# (λ·G·|o_i|/|I_F| = 0.5·8·17/7 ≈ 9.7 for a 17-token reply when 7 of the 8 outputs are in I_F).
#
# Many outputs share their first words, so their functional token follows the *same* context: it is
# one probability, asked to move by the sum of their asks. The column `ctx` labels each distinct
# context (the completion up to and including the token); `net ask` is that sum.

# %%
contexts, rows_of_context = {}, {}
positions = [(i, t) for i in range(G) for t in fmask[i].nonzero().flatten().tolist()]
for i, t in positions:
    key = tuple(rollout["completion_ids"][i, :t + 1].tolist())
    contexts.setdefault(key, "abcdefghijklmnop"[len(contexts)])
    rows_of_context.setdefault(contexts[key], []).append((i, t))
net_ask = {c: sum(asks[cfg.anchor_coef][i, t].item() for i, t in where) for c, where in rows_of_context.items()}
lengths = mask.sum(1)
assert lengths[in_IF].median() == 17 and fmask.sum(1).max() == 1
anchor_over_grpo = [(asks[cfg.anchor_coef][i, t] - asks[0.0][i, t]).item() / asks[0.0][i, t].item() for i, t in positions]
assert all(abs(x / (cfg.anchor_coef * G * lengths[i].item() / int(in_IF.sum())) - 1) < 1e-3
           for x, (i, _) in zip(anchor_over_grpo, positions))
assert all(5 < x < 20 for x in anchor_over_grpo)  # "about ten times"
assert (cfg.anchor_coef, G, int(in_IF.sum())) == (0.5, 8, 7) and round(0.5 * 8 * 17 / 7, 1) == 9.7
assert all(abs(asks[0.0][i, t].item() - advantages[i].item() / (G * lengths[i].item())) < 1e-6 for i, t in positions)
print(f"{'row':>3} {'A':>7}  {'token':<10} {'pos':>3} {'ctx':>3} {'ask λ=0':>9} "
      f"{f'ask λ={cfg.anchor_coef}':>9} {'net ask':>8}")
for i, t in positions:
    c = contexts[tuple(rollout["completion_ids"][i, :t + 1].tolist())]
    token = tokenizer.convert_ids_to_tokens(rollout["completion_ids"][i, t].item())
    print(f"{i:3d} {advantages[i].item():+7.3f}  {token:<10} {t:3d} {c:>3} {asks[0.0][i, t].item():+9.5f} "
          f"{asks[cfg.anchor_coef][i, t].item():+9.5f} {net_ask[c]:+8.4f}")

# %% [markdown]
# ## One AdamW step on L_LA-GRPO (λ = `anchor_coef`)
# As in `train_rl.py`'s `update`: backward, then `optim.clipped_step` (clip the global gradient norm
# to `grad_clip`, step, clear the gradients; a norm that is not finite skips the step and counts in
# `skipped_steps`), with the RL optimiser (betas 0.9, 0.99). The lr is 1e-3 (the override at the top;
# the micro preset has 1e-4), so that one step moves the probabilities visibly.

# %%
rl_optimizer = adamw(model, cfg, "rl")
assert optimizer.defaults["betas"] != rl_optimizer.defaults["betas"] == (cfg.rl_beta1, cfg.rl_beta2) == (0.9, 0.99)
assert rl_optimizer.defaults["lr"] == cfg.rl_lr == 1e-3 and micro.rl_lr == 1e-4
loss, _ = grpo_loss(logp, old_logp, ref_logp, advantages, mask, fmask, **coefs, anchor_coef=cfg.anchor_coef)
loss.backward()
grad_norm = clipped_step(model, rl_optimizer, cfg.grad_clip)  # the norm before clipping
skipped_steps = 0 if math.isfinite(grad_norm) else 1
with torch.no_grad():
    new_logp = sequence_logprobs(model, *args, repeats=G, temperature=cfg.temperature)  # (G, C)
_, moved = grpo_loss(new_logp, old_logp, ref_logp, advantages, mask, fmask, **coefs, anchor_coef=cfg.anchor_coef)
print(f"grad norm {grad_norm:.4f} | now ratio_mean {moved['ratio_mean']:.4f}, "
      f"clip_frac {moved['clip_frac']:.4f}, kl {moved['kl']:.4f}  (what a second mini-batch or ppo epoch would see)")
assert skipped_steps == 0 and all(p.grad is None for p in model.parameters())

# %% [markdown]
# ## The step's log line
# `train_rl.py` writes one record per step to `metrics_rl.jsonl` (docs/method.md, "What a run logs").
# Here are its terms for this one-group step. From the rollout (`rollout_metrics`): the mean reward and
# accuracy; the functional token share; `entropy`, the policy's entropy H = −Σ p log p per generated
# token (nats; `sample` returns it per position, tutorial 03); `truncated_share`, the completions cut
# at `max_new_tokens` without a stop token; `constant_group_share`, the groups whose G rewards were all
# equal (here over the groups walked above). `right_token_rate`, the share of outputs whose first
# functional token is the one the example names, appears only when the data names it (the micro toy
# does not). From the update (`update`, the loss terms as the micro-batch computed them, before its
# optimiser step): `kl`, `clip_frac`, `pg_loss`, `ratio_mean`, `anchor`, the functional gradient share,
# the mean gradient norm (before clipping) and `skipped_steps`.

# %%
at = logged[cfg.anchor_coef]  # the λ = anchor_coef loss the update differentiates
log_line = {
    "reward": rewards.mean().item(), "accuracy": sum(s["accuracy"] for s in scores) / G,
    "functional_token_share": fmask.sum().item() / mask.sum().item(),
    "entropy": rollout["entropy"][mask].mean().item(), "truncated_share": rollout["truncated"].float().mean().item(),
    "constant_group_share": sum(walked_constant) / len(walked_constant),
    "kl": at["kl"], "clip_frac": at["clip_frac"], "pg_loss": at["pg_loss"], "ratio_mean": at["ratio_mean"],
    "anchor": at["anchor"], "functional_grad_share": at["functional_grad_share"], "grad_norm": grad_norm,
    "skipped_steps": skipped_steps}
for key, value in log_line.items():
    print(f"  {key:24s} {value:+.4f}" if isinstance(value, float) else f"  {key:24s} {value}")
assert "token" not in ex and 0 < log_line["entropy"] <= math.log(len(tokenizer))
assert log_line["truncated_share"] == 0 and (lengths < cfg.max_new_tokens).all()  # every row stopped
assert (at["kl"], at["clip_frac"], at["ratio_mean"]) == (0.0, 0.0, 1.0) and abs(at["pg_loss"]) < 1e-6
assert walked_constant[-1] is False

# %% [markdown]
# ## What the step did to each functional token
# π(token | prompt, the completion before it) at each functional position, under the weights before
# (π_old) and after the step, one line per distinct context.

# %%
print(f"{'ctx':>3} {'rows':<16} {'net ask':>8} {'p before':>9} {'p after':>9} {'change':>8}")
agree = 0
for c, where in rows_of_context.items():
    i, t = where[0]
    before, after = old_logp[i, t].exp().item(), new_logp[i, t].exp().item()
    rows = ",".join(str(r) for r, _ in where)
    print(f"{c:>3} {rows:<16} {net_ask[c]:+8.4f} {before:9.4f} {after:9.4f} {after - before:+8.4f}")
    agree += (after - before) * net_ask[c] > 0
print(f"{agree} of {len(rows_of_context)} contexts moved the way their net ask points")
seq_change = torch.where(mask, new_logp - old_logp, 0.0).sum(1)  # (G,): change of log π(whole completion)
print("A_i                               :", advantages)
print("change of each completion's log π :", seq_change)
print(f"mean change, outputs with A_i > 0: {seq_change[advantages > 0].mean().item():+.3f} | "
      f"with A_i < 0: {seq_change[advantages < 0].mean().item():+.3f}")
assert seq_change[advantages > 0].mean() > seq_change[advantages < 0].mean()
t_total = time.time() - t_start
print(f"\ntutorial run time: {t_total:.1f} s after the imports, the SFT loop {t_sft:.1f} s of it")
assert t_total - t_sft < t_sft  # the RL step (and everything after SFT) takes less than the SFT loop

# %% [markdown]
# Do not expect every functional token to move the way its own output's advantage points:
#   * Outputs that share their words up to the token share one probability. It gets the net of their
#     asks, which can be small even when one of them is the group's best answer.
#   * A step changes weights, not probabilities one at a time. Every `<|Zoom|>` (say) is scored by the
#     same row of the head, tied to its embedding row, so pushing the token down after one context
#     also pushes it down after another, and the gradients of all the other positions move the same
#     weights. Adam's first step moves each weight by about lr in the direction of its gradient's
#     sign, so a small ask is not proportionally small in its effect.
# So one step's change at one position is the sum of every position's ask through every shared
# weight; the asks themselves (the table before the step) are what the loss says about each token.
# The whole completions read more cleanly: compare the mean change of the outputs with A_i > 0 and
# of the others (the `mean change` line). Over many steps and prompts these pushes add up; one step
# shows little more than their direction.

# %%
assert cfg.tie_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight

# %% [markdown]
# ## From this to `train_rl.py`
# `train_rl.py`'s loop (its part 3) is this step, with its phases as named functions: `sample_groups`
# (step 1), `score` (step 2), `completion_logprobs` for log π_old and log π_ref (step 3), and
# `update` (step 4), then `rollout_metrics` and the log line. `update` differs from the single step
# above in what a real run needs: `prompts_per_step` prompts per step, `ppo_epochs` passes over
# mini-batches of `rl_mini_batch` completions (after the first mini-batch r is no longer 1 and
# clipping can act), micro-batches that divide by the whole mini-batch's counts, FSDP over processes,
# and the lr schedule.
#
#     python train_sft.py --config toy --out runs/sft-toy
#     python train_rl.py --config toy --init runs/sft-toy --out runs/rl-toy
