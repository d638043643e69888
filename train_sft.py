"""Stage 1 of ATLAS: plain supervised fine-tuning with the functional tokens in the vocabulary.

    python train_sft.py --config toy --out runs/sft                       # the CPU demo, ~1 min on 2 cores
    torchrun --nproc_per_node 2 train_sft.py --config micro --out runs/m  # FSDP2 on CPU (gloo)
    torchrun --nproc_per_node 8 train_sft.py --config qwen2_5_vl_7b \\
        model_path=/path/to/Qwen2.5-VL-7B-Instruct train_data=atlas.jsonl --out runs/sft7b
    python train_sft.py --resume runs/sft                                 # on from the latest checkpoint

Loss (docs/method.md, "Stage 1: SFT"): the mean cross-entropy over the reply tokens of the global batch,
functional tokens included with no special weight; prompt, image and padding positions carry none.
The global batch (its examples, their order, the normalising token count) is the same on any number
of processes: each rank takes a contiguous slice and divides its summed loss by the global count.
"""
import math
import time

import torch

from atlas_min import checkpoint
from atlas_min.cli import Progress, UsageError, catch_interrupts, end_step, finish, say_skipped, start_run, user_errors
from atlas_min.data import IGNORE, check_lengths, collate_sft, encode_example, load_examples, stream_indices, to_device
from atlas_min.dist import all_sum, autocast, print0, shard, sync_replicas
from atlas_min.model import forward, init_model, load_pretrained, reply_nll, sft_run_seed
from atlas_min.optim import adamw, clipped_step, count_nonfinite, lr_at, set_lr
from atlas_min.tokens import FUNCTIONAL_TOKENS

# 1. command line, processes, data
with user_errors():
    opts, cfg, resume_from, record, (rank, world, device) = start_run("Stage 1: SFT with functional tokens", "sft")
    if cfg.vocab_rows and not cfg.model_path and not resume_from:
        raise UsageError(f"config {cfg.name} trains a pretrained model: set model_path=/path/to/Qwen2.5-VL-7B-Instruct")
    train = load_examples(cfg, "train", need_response=True, on_skip=say_skipped)
run = opts.out
total = cfg.max_steps or cfg.sft_steps

# 2. model (the base model + functional tokens, or the checkpoint to resume; read by rank 0 only), optimizer
start = checkpoint.read_state(resume_from)[0]["step"] if resume_from else 0
model, tokenizer, image_processor = (load_pretrained(resume_from, cfg, on_meta=rank > 0) if resume_from
                                     else init_model(cfg, on_meta=rank > 0))
with user_errors():
    train = check_lengths(train, tokenizer, image_processor, cfg, with_reply=True, on_skip=say_skipped,
                          context=model.config.get_text_config().max_position_embeddings)
functional_ids = torch.tensor(tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS), device=device)
model = shard(model, cfg, device).train()
optimizer = adamw(model, cfg, "sft")
if resume_from:
    checkpoint.load_optimizer(resume_from, model, optimizer)  # says "resumed from ... at step N"
n_params = sum(p.numel() for p in model.parameters())  # a sharded parameter's numel() is the global one
print0(f"SFT {cfg.name}: ~{n_params / 1e6:.2f}M parameters, {world} process(es), {device}, {total} steps")
pad_id, per_rank = tokenizer.pad_token_id, cfg.batch_size // world


def sft_step(model, encoded, n_reply, cfg, pad_id, functional_ids, world, device):
    """Forward and backward over this rank's examples in micro-batches; the loss divides by the global
    reply-token count `n_reply`, so accumulation and ranks add up to the global batch's mean.
    Returns this rank's summed loss, and the summed loss and count at functional-token positions."""
    loss_sum = ft_loss_sum = ft_count = 0.0
    for i in range(0, len(encoded), cfg.micro_batch_size):
        sync_replicas(model, last=i + cfg.micro_batch_size >= len(encoded))  # HSDP: one all-reduce per step
        batch = to_device(collate_sft(encoded[i:i + cfg.micro_batch_size], pad_id), device)
        with autocast(device):
            logits = forward(model, batch, batch["input_ids"], batch["attention_mask"])[0].logits
        token_loss = reply_nll(logits, batch["labels"], IGNORE, cfg.logprob_chunk)  # (b, T-1)
        (token_loss.sum() / n_reply * world).backward()  # FSDP averages gradients over ranks: undo it
        is_functional = torch.isin(batch["labels"][:, 1:], functional_ids)  # (b, T-1)
        loss_sum += token_loss.sum().item()
        ft_loss_sum += token_loss[is_functional].sum().item()
        ft_count += is_functional.sum().item()
    return loss_sum, ft_loss_sum, ft_count


# 3. the loop; a run that diverges (optim.count_nonfinite) or cannot save ends in one line, its lock released
progress = Progress(run, "sft", start, total, cfg)
catch_interrupts(run, defer=True)  # from here on, Ctrl-C stops the run after the step it is in
streak = 0  # steps in a row whose loss or gradient norm was not finite: none of them is ever saved
with user_errors():
    for step in range(start, total):
        t0 = time.time()
        lr = set_lr(optimizer, lr_at(step, total, cfg.sft_warmup, cfg.sft_lr))
        order = stream_indices(step, cfg.batch_size, len(train), seed=sft_run_seed(cfg),
                               epoch_seed_stride=cfg.epoch_seed_stride)
        encoded = [encode_example(train[i], tokenizer, image_processor, cfg, with_reply=True)
                   for i in order[rank * per_rank:(rank + 1) * per_rank]]
        n_reply = all_sum(sum(len(e["reply_ids"]) for e in encoded))  # the global normaliser
        loss_sum, ft_loss_sum, ft_count = sft_step(model, encoded, n_reply, cfg, pad_id, functional_ids, world, device)
        grad_norm = clipped_step(model, optimizer, cfg.grad_clip)  # not finite: the update is skipped
        if not math.isfinite(grad_norm):
            print0(f"note: step {step + 1}: the gradient norm was not finite, the update was skipped")

        loss = all_sum(loss_sum) / n_reply
        progress.log(step, loss=loss, ft_loss=all_sum(ft_loss_sum) / max(all_sum(ft_count), 1), lr=lr,
                     grad_norm=grad_norm, tokens_per_s=round(n_reply / (time.time() - t0), 1))
        streak = count_nonfinite(streak, math.isfinite(loss) and math.isfinite(grad_norm), step, total,
                                 cfg.max_nonfinite_steps)
        end_step(run, step, total, streak, "train_sft.py", model, tokenizer, image_processor, cfg, optimizer,
                 extra={"run": record})

# 4. the final model (a resumable checkpoint too, unless final_dtype makes it lean) and the run report
with user_errors():
    checkpoint.save_final(run, model, tokenizer, image_processor, cfg, total, optimizer, extra={"run": record})
finish(run, f"SFT ({cfg.name})", [f"steps {start}→{total}, {world} process(es)", f"final loss {loss:.4f}",
                                  f"checkpoint: {run}"])
