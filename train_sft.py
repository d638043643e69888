"""Stage 1 of ATLAS: plain supervised fine-tuning with the functional tokens in the vocabulary.

    python train_sft.py --config toy --out runs/sft                       # the CPU demo, ~5 min on 2 cores
    torchrun --nproc_per_node 2 train_sft.py --config micro --out runs/m  # FSDP2 on CPU (gloo)
    torchrun --nproc_per_node 8 train_sft.py --config qwen2_5_vl_7b \\
        model_path=/path/to/Qwen2.5-VL-7B-Instruct train_data=atlas.jsonl --out runs/sft7b
    python train_sft.py --resume runs/sft                                 # continue from the latest checkpoint

Loss (DESIGN.md, stage 1): the mean cross-entropy over the reply tokens of the global batch,
functional tokens included with no special weight; prompt, image and padding positions carry none.
The global batch (its examples, their order, the normalising token count) is the same on any number
of processes: each rank takes a contiguous slice and divides its summed loss by the global count.
"""
import time

import torch

from atlas_min import checkpoint
from atlas_min.config import die
from atlas_min.data import IGNORE, collate_sft, encode, to_device
from atlas_min.dist import all_sum, autocast, cleanup, clip_grad_norm, print0, setup, shard
from atlas_min.loop import Progress, examples, lr_at, parse, report, stream_indices
from atlas_min.model import forward, init_model, load_pretrained, reply_nll
from atlas_min.tokens import FUNCTIONAL_TOKENS

args, cfg, resume_from = parse("Stage 1: SFT with functional tokens")
rank, world, device = setup()
run = args.out or f"runs/sft-{cfg.name}"
total = cfg.max_steps or cfg.sft_steps
if cfg.vocab_rows and not cfg.model_path and not resume_from:
    die(f"config {cfg.name} trains a pretrained model: set model_path=/path/to/Qwen2.5-VL-7B-Instruct")
if cfg.batch_size % world:
    die(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")

# --- model, tokenizer, optimizer ---
if resume_from:
    model, tokenizer, image_processor = load_pretrained(resume_from, cfg)
    start = checkpoint.read_state(resume_from)[0]["step"]
else:
    model, tokenizer, image_processor = init_model(cfg)
    start = 0
functional_ids = torch.tensor(tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS), device=device)
model = shard(model, cfg, device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
if resume_from:
    checkpoint.load_optimizer(resume_from, model, optimizer)
    print0(f"resumed from {resume_from} at step {start}")
n_params = sum(p.numel() for p in model.parameters())  # a sharded parameter's numel() is the global one
print0(f"SFT {cfg.name}: ~{n_params / 1e6:.2f}M parameters, {world} process(es), {device}, {total} steps")

train = examples(cfg, "train", need_response=True)
pad_id = tokenizer.pad_token_id


# --- the loop ---
progress = Progress(run, "sft", start, total, cfg.log_every)
for step in range(start, total):
    t0 = time.time()
    lr = lr_at(step, total, cfg.sft_warmup, cfg.sft_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    per_rank = cfg.batch_size // world
    mine = stream_indices(step, cfg.batch_size, len(train), cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
    encoded = [encode(train[i], tokenizer, image_processor, cfg.system_prompt, with_reply=True, question_suffix=cfg.question_suffix) for i in mine]
    n_reply = all_sum(sum(len(e["reply_ids"]) for e in encoded))  # the global normaliser
    loss_sum = ft_sum = ft_count = 0.0
    for i in range(0, len(encoded), cfg.micro_batch_size):
        batch = to_device(collate_sft(encoded[i:i + cfg.micro_batch_size], pad_id), device)
        with autocast(device):
            logits = forward(model, batch, batch["input_ids"], batch["attention_mask"])[0].logits
        token_loss = reply_nll(logits, batch["labels"], IGNORE)  # (b, T-1)
        (token_loss.sum() / n_reply * world).backward()  # FSDP averages gradients over ranks: undo it
        is_ft = torch.isin(batch["labels"][:, 1:], functional_ids)
        loss_sum += token_loss.sum().item()
        ft_sum, ft_count = ft_sum + token_loss[is_ft].sum().item(), ft_count + is_ft.sum().item()
    grad_norm = clip_grad_norm(model, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    loss_sum, ft_sum, ft_count = all_sum(loss_sum), all_sum(ft_sum), all_sum(ft_count)
    progress.log(step, loss=loss_sum / n_reply, ft_loss=ft_sum / max(ft_count, 1), lr=lr, grad_norm=grad_norm,
                 tokens_per_s=round(n_reply / (time.time() - t0), 1))
    if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
        checkpoint.save(checkpoint.step_folder(run, step + 1), model, tokenizer, image_processor, cfg, step + 1, optimizer)
        checkpoint.prune(run, cfg.keep_checkpoints)

checkpoint.save(run, model, tokenizer, image_processor, cfg, total, optimizer)
report(run, f"SFT ({cfg.name})", [f"steps {start}→{total}, {world} process(es)", f"final loss {loss_sum / n_reply:.4f}",
                                  f"checkpoint: {run}"])
print0(f"saved {run}")
cleanup()
