"""Stage 2 of ATLAS: GRPO, or LA-GRPO when anchor_coef > 0, from an SFT checkpoint.

    python train_rl.py --config toy --init runs/sft-toy --out runs/rl-toy
    torchrun --nproc_per_node 2 train_rl.py --config toy --init runs/sft-toy --out runs/rl-toy
    python train_rl.py --config toy --init runs/sft-toy anchor_coef=0            # plain GRPO
    torchrun --nproc_per_node 8 train_rl.py --config qwen2_5_vl_7b --init runs/sft7b \\
        model_path=/path/to/Qwen2.5-VL-7B-Instruct train_data=rl.jsonl --out runs/rl7b
    python train_rl.py --resume runs/rl-toy                                       # latest checkpoint

Each step (docs/method.md, "Stage 2: GRPO"): take `prompts_per_step` prompts, sample G outputs per prompt,
score them (R), normalise rewards within each group (A), compute log π_old with a no-grad forward before any
update and log π_ref with the frozen SFT model, then `ppo_epochs` passes of mini-batch updates on L_LA-GRPO.
Mini-batch m holds the step's prompts m·M .. (m+1)·M − 1 (M = rl_mini_batch / G), their groups whole, on any
number of processes: each rank samples and updates its slice of every mini-batch, in micro-batches of rows of
similar length (so padding is what each micro-batch needs). Every micro-batch divides by the counts of its whole
mini-batch, so the update is the one the formula gives for it.

So the number of processes changes nothing but float summation order: which prompts each update holds, every
row's random draws (seeded by seed, step and global row), advantages (groups never straddle ranks) and the loss
normalisers are the same on 1, 2 or 16 processes. The order of sums (a rank's batch of rows, the all-reduce of
gradients) moves logits and weights in their last bits, and, rarely, a sampled token whose draw lands on a
boundary. Departure from the textbook: none in the loss. log π_old comes from the same full forward as log π_θ
rather than from the sampler, so r = 1 exactly before the first update (the sampler's cached decode agrees to
1e-4; docs/method.md, "Log-probabilities").
"""
import math
import time

import torch

from atlas_min import checkpoint
from atlas_min.cli import Progress, UsageError, catch_interrupts, end_step, finish, say_skipped, start_run, user_errors
from atlas_min.data import (check_lengths, collate_prompts, encode_example, load_examples, micro_batches, rank_share,
                            stream_indices, to_device)
from atlas_min.dist import all_sum, autocast, gathered, print0, reshard, shard, sync_replicas
from atlas_min.grpo import constant_groups, functional_grad_mass, group_advantages, grpo_loss
from atlas_min.model import eval_image_processor, load_pretrained
from atlas_min.optim import adamw, clipped_step, count_nonfinite, lr_at, set_lr
from atlas_min.rewards import compute_reward
from atlas_min.sampler import decode_completion, rl_row_seeds, rl_run_seed, rows_logprobs, sample
from atlas_min.tokens import FUNCTIONAL_TOKENS, functional_mask

# 1. command line, processes, data
with user_errors():
    opts, cfg, resume_from, record, (rank, world, device) = start_run("Stage 2: GRPO / LA-GRPO", "rl")
    G = cfg.group_size
    train = load_examples(cfg, "train", on_skip=say_skipped)
    if cfg.eval_every and cfg.train_data and not cfg.eval_data:
        raise UsageError(f"eval_every={cfg.eval_every} validates on eval_data, which is empty (the toy's split): "
                         "pass eval_data=FILE.jsonl, or eval_every=0")
    held_out = load_examples(cfg, "eval", on_skip=say_skipped)[:cfg.eval_examples] if cfg.eval_every else []
run = opts.out
total = cfg.max_steps or cfg.rl_steps

# 2. the policy (the SFT checkpoint, or the checkpoint to resume), the frozen reference (always the SFT one);
#    under torchrun rank 0 reads each and the others receive their shards (dist.shard)
saved = checkpoint.read_state(resume_from)[0] if resume_from else {"init": opts.init, "step": 0}
init, start = saved["init"], saved["step"]
model, tokenizer, image_processor = load_pretrained(resume_from or init, cfg, on_meta=rank > 0)
with user_errors():
    if any(t not in tokenizer.get_vocab() for t in FUNCTIONAL_TOKENS):
        raise UsageError(f"{init} has no functional tokens: pass a checkpoint made by train_sft.py")
    context = model.config.get_text_config().max_position_embeddings
    train = check_lengths(train, tokenizer, image_processor, cfg, generate=cfg.max_new_tokens, on_skip=say_skipped,
                          context=context)
    if held_out:  # measured as validation will see them: under the eval protocol's image bounds
        held_out = check_lengths(held_out, tokenizer, eval_image_processor(image_processor, cfg), cfg,
                                 generate=cfg.eval_max_new_tokens, on_skip=say_skipped, context=context)
model = shard(model, cfg, device)
reference = None
if cfg.kl_coef > 0:  # frozen: on CUDA bf16 shards are enough, and half the memory
    reference = load_pretrained(init, cfg, on_meta=rank > 0)[0].requires_grad_(False)
    reference = shard(reference.to(torch.bfloat16 if device.type == "cuda" else torch.float32), cfg, device).eval()
optimizer = adamw(model, cfg, "rl")
if resume_from:
    checkpoint.load_optimizer(resume_from, model, optimizer)  # says "resumed from ... at step N"
functional_ids = tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS)
# Mini-batch m holds the step's prompts m·M .. (m+1)·M − 1 (M = rl_mini_batch / G) on any number of processes;
# each rank samples and updates its slice of each (data.rank_share), so groups never straddle ranks
mine = rank_share(cfg.prompts_per_step, cfg.rl_mini_batch // G, rank, world)
print0(f"RL {cfg.name} from {init}: {'LA-GRPO λ=' + str(cfg.anchor_coef) if cfg.anchor_coef else 'GRPO'}, "
       f"{total} steps × {cfg.prompts_per_step} prompts × G={G}, {world} process(es), {device}")


def chunks(n, size):
    """Consecutive slices of range(n), `size` long (the last may be shorter)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def update_batches(rollout, cfg, world):
    """[(update's rows, [micro-batch's rows, ...]), ...] of this rank's rollout: its share of each mini-batch
    (rl_mini_batch / world rows, whole groups), cut into micro-batches of micro_batch_size rows rounded up to a
    whole group, rows of similar length together (`data.micro_batches`). log π_old and log π_ref are computed on
    the same micro-batches as the update, so before it r = 1 to the last bit."""
    lengths = (rollout["prompt_mask"].sum(1) + rollout["completion_mask"].sum(1)).cpu()  # (N,)
    size = max(1, cfg.micro_batch_size // cfg.group_size) * cfg.group_size
    return micro_batches(lengths, cfg.rl_mini_batch // world, size)


def per_row(micro_rows, logprobs):
    """(N, C): `logprobs(rows)` of every micro-batch's rows, each row put back in its place in the rollout."""
    values = torch.cat([logprobs(rows) for rows in micro_rows])  # (N, C), in micro-batch order
    return torch.empty_like(values).index_copy_(0, torch.cat(micro_rows).to(values.device), values)


def completion_logprobs(policy, encoded, rollout, rows, cfg, pad_id, device, grad=False):
    """log π(o_t) of the completions of `rows` (ascending indices into this rank's rollout): (rows, C), from a
    forward cut to these rows' own longest prompt and completion (`sampler.rows_logprobs`), not the rollout's width."""
    with torch.set_grad_enabled(grad), autocast(device):
        return rows_logprobs(policy, encoded, rollout, rows, group_size=cfg.group_size, pad_id=pad_id,
                             temperature=cfg.temperature, chunk=cfg.logprob_chunk)


def sample_groups(model, tokenizer, image_processor, prompts, row_seeds, cfg, device):
    """Step 1: G completions of each prompt, drawn from π_old (the current weights, no grad); row k's draws from
    generator seed row_seeds[k]."""
    encoded = [encode_example(ex, tokenizer, image_processor, cfg) for ex in prompts]
    batch = to_device(collate_prompts(encoded, tokenizer.pad_token_id), device)
    model.eval()
    with gathered(model), autocast(device):  # one all-gather per unit for the rollout, not one per token
        rollout = sample(model, batch, tokenizer, group_size=cfg.group_size,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                         row_seeds=row_seeds, lockstep=False)
    model.train()
    return encoded, rollout


def score(tokenizer, prompts, rollout, cfg, group_size):
    """Step 2: each completion's text and reward components (n_F counted from the token ids), and, where its
    example names its right token, whether the output's first functional token is it."""
    texts, scores = [], []
    for i, (ids, mask) in enumerate(zip(rollout["completion_ids"], rollout["completion_mask"])):
        text, length, functional = decode_completion(tokenizer, ids, mask)
        ex = prompts[i // group_size]
        texts.append(text)
        scores.append(compute_reward(text, ex["answer"], cfg, question=ex["question"], num_tokens=length,
                                     functional=functional))
        if "token" in ex:
            scores[-1]["right_token"] = float(functional[:1] == [ex["token"]])
    return texts, scores


def validate(model, tokenizer, image_processor, held_out, cfg, rank, world, device):
    """val/ metrics of the current weights: greedy replies (eval_max_new_tokens) to the held-out slice, each rank
    its share in eval_batch_size pieces, scored by the reward's rules. Decoded as eval.py decodes: its prompt,
    its image bounds (eval_min_pixels..eval_max_pixels, not training's), greedy. The weights stay gathered for
    all pieces (as eval.py's): no rank waits in a collective for another's decode; a rank without examples
    decodes one."""
    image_processor = eval_image_processor(image_processor, cfg)
    mine, scores = held_out[rank::world], []
    model.eval()
    with gathered(model), autocast(device):
        for piece in chunks(max(len(mine), 1), cfg.eval_batch_size):
            prompts = mine[piece] or held_out[:1]
            batch = collate_prompts([encode_example(ex, tokenizer, image_processor, cfg) for ex in prompts],
                                    tokenizer.pad_token_id)
            out = sample(model, to_device(batch, device), tokenizer, max_new_tokens=cfg.eval_max_new_tokens,
                         temperature=0, lockstep=False)
            scores += score(tokenizer, prompts, out, cfg, 1)[1][:len(mine[piece])]
    model.train()
    n = all_sum(len(scores))
    val = {k: all_sum(sum(s[key] > 0 for s in scores)) / n  # accuracy and format are 0 or 1
           for k, key in [("accuracy", "accuracy"), ("format", "format"), ("functional_rate", "n_functional")]}
    return {f"val/{k}": v for k, v in (val | right_token_rate(scores)).items()}


def right_token_rate(scores):
    """{"right_token_rate": the share of outputs whose first functional token is the one their example names},
    over all ranks' outputs whose example names one; {} when none does."""
    named = all_sum(sum("right_token" in s for s in scores))
    return {"right_token_rate": all_sum(sum(s.get("right_token", 0.0) for s in scores)) / named} if named else {}


def update(model, optimizer, encoded, rollout, batches, old_logp, ref_logp, advantages, fmask, cfg, world, pad_id,
           device):
    """Step 4: `ppo_epochs` passes of mini-batch steps on L_LA-GRPO over `batches` (`update_batches`: the ones
    log π_old and log π_ref were computed on); returns the step's logged loss terms.

    Every micro-batch divides by its whole mini-batch's counts (num_outputs, num_anchor_outputs, summed
    over ranks), so the micro-batches' gradients add up to the mini-batch's. Logged over all the step's updates,
    whichever rows shared a micro-batch: kl, clip_frac and ratio_mean as token means, pg_loss as the mean of the
    rows' token means, the functional gradient share as functional Σ|g| over all Σ|g|; L_anchor per mini-batch
    (the sum of its slices) and the gradient norm, averaged over mini-batches. A mini-batch
    whose gradient norm is not finite is not applied (every rank sees the same global norm, so all
    skip it together) and counted in `skipped_steps` (docs/method.md, "Numerical guards").
    """
    mask = rollout["completion_mask"]
    coefs = dict(clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, anchor_coef=cfg.anchor_coef)
    per_token = ("kl", "clip_frac", "ratio_mean")
    sums = dict.fromkeys([*per_token, "pg_loss", "tokens", "rows", "anchor", "functional", "mass", "grad_norm"], 0.0)
    n_mini = skipped = 0
    for _epoch in range(cfg.ppo_epochs):
        for mini_rows, micros in batches:
            counts = {"num_outputs": int(all_sum(int((mask[mini_rows].sum(1) > 0).sum()))),
                      "num_anchor_outputs": int(all_sum(int((fmask[mini_rows].sum(1) > 0).sum())))}
            for rows in micros:
                sync_replicas(model, last=rows is micros[-1])  # HSDP: one all-reduce per update
                logp = completion_logprobs(model, encoded, rollout, rows, cfg, pad_id, device, grad=True)
                loss_inputs = (logp, old_logp[rows], None if ref_logp is None else ref_logp[rows],
                               advantages[rows], mask[rows], fmask[rows])
                loss, stats = grpo_loss(*loss_inputs, **coefs, **counts)
                (loss * world).backward()  # FSDP averages gradients over ranks: undo it
                tokens, outputs = int(mask[rows].sum()), int((mask[rows].sum(1) > 0).sum())
                functional, mass = functional_grad_mass(*loss_inputs, **coefs, **counts)
                weighted = {key: stats[key] * tokens for key in per_token} | {  # back to sums over the slice
                    "pg_loss": stats["pg_loss"] * outputs, "tokens": tokens, "rows": outputs,
                    "anchor": stats["anchor"], "functional": functional, "mass": mass}
                for key, value in weighted.items():
                    sums[key] += value
            grad_norm = clipped_step(model, optimizer, cfg.grad_clip)
            if math.isfinite(grad_norm):
                sums["grad_norm"] += grad_norm
            else:
                skipped += 1
            n_mini += 1
    total = {key: all_sum(sums[key]) for key in sums if key != "grad_norm"}
    logged = {key: total[key] / max(total["tokens"], 1) for key in per_token}
    return {**logged, "pg_loss": total["pg_loss"] / max(total["rows"], 1), "anchor": total["anchor"] / n_mini,
            "functional_grad_share": total["functional"] / total["mass"] if total["mass"] > 0 else 0.0,
            "grad_norm": sums["grad_norm"] / max(n_mini - skipped, 1), "skipped_steps": skipped}


def rollout_metrics(scores, rollout, fmask, constant):
    """Means over all ranks' completions: reward components, lengths, functional-token use, the policy's
    entropy per generated token, the share of completions cut at max_new_tokens and of constant groups."""
    mask = rollout["completion_mask"]
    n_outputs = all_sum(len(scores))
    mean = {k: all_sum(sum(s[k] for s in scores)) / n_outputs for k in scores[0] if k != "right_token"}
    n_generated = all_sum(int(mask.sum()))
    return {"reward": mean["total"], "accuracy": mean["accuracy"], "format": mean["format"],
            "functional_reward": mean["functional"], "length_penalty": mean["length_penalty"],
            "overuse_penalty": mean["overuse_penalty"], "functional_per_completion": mean["n_functional"],
            "functional_token_share": all_sum(int(fmask.sum())) / max(n_generated, 1),
            "completion_length": n_generated / n_outputs,
            "entropy": all_sum(float(rollout["entropy"][mask].sum())) / max(n_generated, 1),
            "truncated_share": all_sum(int(rollout["truncated"].sum())) / n_outputs,
            "constant_group_share": all_sum(int(constant.sum())) / all_sum(len(constant)), **right_token_rate(scores)}


# 3. the loop: sample, score, log-probs before the update, update, log, save; a run that diverges
#    (optim.count_nonfinite) or cannot save ends in one line, its lock released
progress = Progress(run, "rl", start, total, cfg)
catch_interrupts(run, defer=True)  # from here on, Ctrl-C stops the run after the step it is in
streak = 0  # steps in a row whose loss or gradient norm was not finite: none of them is ever saved
with user_errors():
    for step in range(start, total):
        seconds, val = {}, {}
        if cfg.eval_every and step % cfg.eval_every == 0:  # before the step's update: step 0 is the SFT model
            t0 = time.time()
            val = validate(model, tokenizer, image_processor, held_out, cfg, rank, world, device)
            seconds["validation"] = time.time() - t0
        lr = set_lr(optimizer, lr_at(step, total, cfg.rl_warmup, cfg.rl_lr))
        order = stream_indices(step, cfg.prompts_per_step, len(train), seed=rl_run_seed(cfg) + cfg.rl_seed_offset,
                               epoch_seed_stride=cfg.epoch_seed_stride)
        prompts = [train[order[p]] for p in mine]  # this rank's share of each mini-batch, in update order
        row_seeds = [seed for p in mine for seed in rl_row_seeds(cfg, step, p * G, G)]  # by global row

        t0 = time.time()
        encoded, rollout = sample_groups(model, tokenizer, image_processor, prompts, row_seeds, cfg, device)
        fmask = functional_mask(rollout["completion_ids"], functional_ids) & rollout["completion_mask"]  # (N, C)
        seconds["sampling"] = time.time() - t0

        t0 = time.time()
        texts, scores = score(tokenizer, prompts, rollout, cfg, G)
        rewards = torch.tensor([s["total"] for s in scores], dtype=torch.float64)  # (N,)
        advantages = group_advantages(rewards, G, cfg.adv_eps).to(device)  # each group lives on one rank: exact
        constant = constant_groups(rewards, G)  # all G rewards equal: A = 0, no signal
        seconds["scoring"] = time.time() - t0

        # log π_old before any update, log π_ref from the frozen SFT model; no grad
        t0 = time.time()
        batches = update_batches(rollout, cfg, world)  # the update's micro-batches, once for the whole step
        micro_rows = [rows for _, micros in batches for rows in micros]
        pad_id = tokenizer.pad_token_id
        old_logp = per_row(micro_rows, lambda rows: completion_logprobs(model, encoded, rollout, rows, cfg, pad_id,
                                                                        device))  # (N, C)
        seconds["old_logprobs"] = time.time() - t0
        t0 = time.time()
        ref_logp = None
        if reference is not None:
            ref_logp = per_row(micro_rows, lambda rows: completion_logprobs(reference, encoded, rollout, rows, cfg,
                                                                            pad_id, device))  # (N, C)
            reshard(reference)
        seconds["reference"] = time.time() - t0

        t0 = time.time()
        losses = update(model, optimizer, encoded, rollout, batches, old_logp, ref_logp, advantages, fmask, cfg,
                        world, pad_id, device)
        seconds["update"] = time.time() - t0
        if losses["skipped_steps"]:
            print0(f"note: step {step + 1}: {losses['skipped_steps']} update(s) skipped, the gradient norm was not finite")

        metrics = rollout_metrics(scores, rollout, fmask, constant)
        if step % cfg.log_every == 0:  # the first group of rank 0, as a reader compares it: rewards, advantages
            progress.samples(step, [{"prompt_id": prompts[0]["id"], "task": prompts[0]["task"], "text": texts[k],
                                     **scores[k], "advantage": advantages[k].item()} for k in range(G)])
        progress.log(step, **val, **metrics, **losses, lr=lr,
                     **{f"t_{k}": round(all_sum(v) / world, 3) for k, v in seconds.items()})
        finite = not losses["skipped_steps"] and all(math.isfinite(losses[k]) for k in ("pg_loss", "kl", "anchor"))
        streak = count_nonfinite(streak, finite, step, total, cfg.max_nonfinite_steps)
        end_step(run, step, total, streak, "train_rl.py", model, tokenizer, image_processor, cfg, optimizer,
                 extra={"init": str(init), "run": record})

# 4. the final model (a resumable checkpoint too, unless final_dtype makes it lean) and the run report
with user_errors():
    checkpoint.save_final(run, model, tokenizer, image_processor, cfg, total, optimizer,
                          extra={"init": str(init), "run": record})
finish(run, f"RL ({'LA-GRPO' if cfg.anchor_coef else 'GRPO'}, {cfg.name})",
       [f"init {init}, steps {start}→{total}, {world} process(es)",
        f"last step: reward {metrics['reward']:.3f}, accuracy {metrics['accuracy']:.3f}",
        f"checkpoint: {run}"])
