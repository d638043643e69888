"""Stage 2 of ATLAS: GRPO, or LA-GRPO when anchor_coef > 0, from an SFT checkpoint.

    python train_rl.py --config toy --init runs/sft-toy --out runs/rl-toy
    torchrun --nproc_per_node 2 train_rl.py --config toy --init runs/sft-toy --out runs/rl-toy
    python train_rl.py --config toy --init runs/sft-toy anchor_coef=0            # plain GRPO
    torchrun --nproc_per_node 8 train_rl.py --config qwen2_5_vl_7b --init runs/sft7b \\
        model_path=/path/to/Qwen2.5-VL-7B-Instruct train_data=rl.jsonl --out runs/rl7b
    python train_rl.py --resume runs/rl-toy                                       # latest checkpoint

Each step (DESIGN.md, stage 2): take `prompts_per_step` prompts (each rank its share), sample G
outputs per prompt with the hand-written sampler, score them (rewards.compute_reward), normalise
rewards within each group (group_advantages), compute π_old log-probs with a no-grad forward before
any update and π_ref log-probs with the frozen SFT model, then `ppo_epochs` passes of mini-batch
updates on grpo_loss. Mini-batches and micro-batches hold whole groups; every slice divides by the
counts of its whole mini-batch, so the update is the one the formula gives for the whole batch.

What does not depend on the number of processes: the prompts of each step, every row's random
draws (seeded by seed, step and global row), advantages (groups never straddle ranks), and the loss
normalisers. What does: float summation order, so logits (and rarely a sampled token) differ in
the last bits. Departure from the textbook: none in the loss; the old log-probs are recomputed
rather than taken from the sampler (they agree to ~1e-6 at temperature 1; see tests).
"""
import time

import torch

from atlas_min import checkpoint
from atlas_min.data import collate_prompts, encode, to_device
from atlas_min.config import die
from atlas_min.dist import all_sum, autocast, cleanup, clip_grad_norm, print0, reshard, setup, shard
from atlas_min.evaluate import decode_completion
from atlas_min.grpo import functional_grad_share, group_advantages, grpo_loss
from atlas_min.loop import Progress, examples, lr_at, parse, report, stream_indices
from atlas_min.model import load_pretrained
from atlas_min.rewards import compute_reward
from atlas_min.sampler import sample, sequence_logprobs
from atlas_min.tokens import FUNCTIONAL_TOKENS, functional_mask

args, cfg, resume_from = parse("Stage 2: GRPO / LA-GRPO", need_init=True)
rank, world, device = setup()
run = args.out or f"runs/rl-{cfg.name}"
total, G = cfg.max_steps or cfg.rl_steps, cfg.group_size
if cfg.prompts_per_step % world or cfg.rl_mini_batch % (G * world):
    die(f"prompts_per_step={cfg.prompts_per_step} and rl_mini_batch/G={cfg.rl_mini_batch}/{G} must divide by {world} processes")

# --- policy (the SFT checkpoint, or the checkpoint to resume) and the frozen reference (always the SFT one) ---
saved = checkpoint.read_state(resume_from)[0] if resume_from else {"init": args.init, "step": 0}
init, start = saved["init"], saved["step"]
model, tokenizer, image_processor = load_pretrained(resume_from or init, cfg)
if any(t not in tokenizer.get_vocab() for t in FUNCTIONAL_TOKENS):
    die(f"{init} has no functional tokens: pass a checkpoint made by train_sft.py")
model = shard(model, cfg, device)
reference = None
if cfg.kl_coef > 0:
    reference = load_pretrained(init, cfg)[0].requires_grad_(False)
    if device.type == "cuda":  # frozen: bf16 shards are enough, and half the memory
        reference = reference.to(torch.bfloat16)
    reference = shard(reference, cfg, device).eval()
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
if resume_from:
    checkpoint.load_optimizer(resume_from, model, optimizer)
    print0(f"resumed from {resume_from} at step {start}")
functional_ids = tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS)
train = examples(cfg, "train")
prompts_per_rank = cfg.prompts_per_step // world
prompts_per_mini = cfg.rl_mini_batch // G // world
prompts_per_micro = max(1, cfg.micro_batch_size // G)
print0(f"RL {cfg.name} from {init}: {'LA-GRPO λ=' + str(cfg.anchor_coef) if cfg.anchor_coef else 'GRPO'}, "
       f"{total} steps × {cfg.prompts_per_step} prompts × G={G}, {world} process(es), {device}")


def logprobs_of(policy, encoded, rollout, prompts, grad=False):
    """log π(o_t) for the completions of `prompts` (a range of local prompt indices), (rows, C)."""
    rows = slice(prompts.start * G, prompts.stop * G)
    images = to_device(collate_prompts(encoded[prompts], tokenizer.pad_token_id), device)
    with torch.set_grad_enabled(grad), autocast(device):
        return sequence_logprobs(policy, images, rollout["prompt_ids"][rows], rollout["prompt_mask"][rows],
                                 rollout["completion_ids"][rows], rollout["completion_mask"][rows],
                                 repeats=G, temperature=cfg.temperature)


def chunks(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


progress = Progress(run, "rl", start, total, cfg.log_every)
for step in range(start, total):
    times = {}
    lr = lr_at(step, total, cfg.rl_warmup, cfg.rl_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # 1. sample G completions for each of this rank's prompts
    t = time.time()
    first = rank * prompts_per_rank
    # the prompt stream is SFT's shuffle scheme under another seed, so RL does not replay SFT's order
    mine = [train[i] for i in stream_indices(step, cfg.prompts_per_step, len(train), cfg.seed + 7919)[first:first + prompts_per_rank]]
    encoded = [encode(ex, tokenizer, image_processor, cfg.system_prompt, question_suffix=cfg.question_suffix) for ex in mine]
    row_seeds = [(cfg.seed * 1_000_003 + step) * 65_537 + (first * G + r) for r in range(len(mine) * G)]
    model.eval()
    with autocast(device):
        rollout = sample(model, to_device(collate_prompts(encoded, tokenizer.pad_token_id), device), tokenizer, group_size=G,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, row_seeds=row_seeds)
    model.train()
    reshard(model)
    mask = rollout["completion_mask"]  # (N, C)
    fmask = functional_mask(rollout["completion_ids"], functional_ids) & mask  # (N, C)
    times["sampling"] = time.time() - t

    # 2. rewards and advantages (each group lives on one rank, so this is exact)
    t = time.time()
    scores = []
    for i, (ids, m) in enumerate(zip(rollout["completion_ids"], mask)):
        text, length = decode_completion(tokenizer, ids, m)
        scores.append(compute_reward(text, mine[i // G]["answer"], cfg, num_tokens=length))
    rewards = torch.tensor([s["total"] for s in scores])
    advantages = group_advantages(rewards, G, cfg.adv_eps).to(device)  # (N,)
    times["scoring"] = time.time() - t

    # 3. π_old (before any update) and π_ref log-probs, no grad
    t = time.time()
    old_logp = torch.cat([logprobs_of(model, encoded, rollout, s) for s in chunks(len(mine), prompts_per_micro)])
    times["old_logprobs"] = time.time() - t
    t = time.time()
    ref_logp = None
    if reference is not None:
        ref_logp = torch.cat([logprobs_of(reference, encoded, rollout, s) for s in chunks(len(mine), prompts_per_micro)])
        reshard(reference)
    times["reference"] = time.time() - t

    # 4. ppo_epochs × mini-batches of grpo_loss; slices divide by their whole mini-batch's counts
    t = time.time()
    # logged: token-mean stats averaged over micro-batches; L_anchor summed over its slices (each
    # divides by the whole mini-batch's count), then averaged over the mini-batches
    stats_sum, grad_share, n_micro, n_mini, anchor_sum, grad_norm = {}, 0.0, 0, 0, 0.0, 0.0
    for _ in range(cfg.ppo_epochs):
        for mini in chunks(len(mine), prompts_per_mini):
            rows = slice(mini.start * G, mini.stop * G)
            counts = {"num_outputs": int(all_sum(int((mask[rows].sum(1) > 0).sum()))),
                      "num_anchor_outputs": int(all_sum(int((fmask[rows].sum(1) > 0).sum())))}
            for micro in chunks(mini.stop - mini.start, prompts_per_micro):
                p = slice(mini.start + micro.start, mini.start + micro.stop)
                r = slice(p.start * G, p.stop * G)
                logp = logprobs_of(model, encoded, rollout, p, grad=True)
                ref = None if ref_logp is None else ref_logp[r]
                args = (logp, old_logp[r], ref, advantages[r], mask[r], fmask[r])
                coefs = dict(clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, anchor_coef=cfg.anchor_coef, **counts)
                loss, st = grpo_loss(*args, **coefs)
                (loss * world).backward()  # FSDP averages gradients over ranks: undo it
                grad_share += functional_grad_share(*args, **coefs)
                stats_sum = {k: stats_sum.get(k, 0.0) + v for k, v in st.items()}
                anchor_sum, n_micro = anchor_sum + st["anchor"], n_micro + 1
            grad_norm = clip_grad_norm(model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_mini += 1
    times["update"] = time.time() - t

    # 5. log (means over all ranks' completions) and save
    N = all_sum(len(scores))
    mean = {k: all_sum(sum(s[k] for s in scores)) / N for k in scores[0]}
    n_gen = all_sum(int(mask.sum()))
    progress.log(step, reward=mean["total"], accuracy=mean["accuracy"], format=mean["format"],
                 functional_reward=mean["functional"], length_penalty=mean["length_penalty"],
                 overuse_penalty=mean["overuse_penalty"], functional_per_completion=mean["n_functional"],
                 functional_token_share=all_sum(int(fmask.sum())) / max(n_gen, 1), completion_length=n_gen / N,
                 kl=all_sum(stats_sum["kl"]) / all_sum(n_micro), clip_frac=all_sum(stats_sum["clip_frac"]) / all_sum(n_micro),
                 anchor=all_sum(anchor_sum) / n_mini, grad_norm=grad_norm,
                 functional_grad_share=all_sum(grad_share) / all_sum(n_micro), lr=lr,
                 **{f"t_{k}": round(all_sum(v) / world, 3) for k, v in times.items()})
    if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
        checkpoint.save(checkpoint.step_folder(run, step + 1), model, tokenizer, image_processor, cfg, step + 1,
                        optimizer, extra={"init": str(init)})
        checkpoint.prune(run, cfg.keep_checkpoints)

checkpoint.save(run, model, tokenizer, image_processor, cfg, total, optimizer, extra={"init": str(init)})
report(run, f"RL ({'LA-GRPO' if cfg.anchor_coef else 'GRPO'}, {cfg.name})",
       [f"init {init}, steps {start}→{total}, {world} process(es)", f"last step: reward {mean['total']:.3f}, "
        f"accuracy {mean['accuracy']:.3f}", f"checkpoint: {run}"])
print0(f"saved {run}")
cleanup()
