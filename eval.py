"""Evaluate a checkpoint: greedy decoding with the hand-written sampler, rewards' answer checker.

    python eval.py --ckpt runs/sft --out runs/sft/eval.json            # toy held-out split
    python eval.py --ckpt runs/sft --blind                               # + blind_accuracy (blank images)
    python eval.py --ckpt runs/rl7b --config qwen2_5_vl_7b --data bench.jsonl
    torchrun --nproc_per_node 8 eval.py --ckpt runs/rl7b --config qwen2_5_vl_7b --data bench.jsonl

The config defaults to the one the checkpoint was trained with; `field=value` overrides apply on top.
"""
import argparse
import json
from pathlib import Path

import torch

from atlas_min import checkpoint
from atlas_min.config import ConfigError, die, get_config
from atlas_min.dist import cleanup, print0, setup, shard
from atlas_min.evaluate import evaluate
from atlas_min.loop import examples
from atlas_min.model import load_pretrained, set_pixel_bounds
from atlas_min.toy import CHANCE

p = argparse.ArgumentParser(description="Evaluate a checkpoint")
p.add_argument("--ckpt", required=True, help="a model folder written by train_sft.py / train_rl.py")
p.add_argument("--config", default=None, help="preset for eval settings (default: the checkpoint's own config)")
p.add_argument("--data", default=None, help="eval JSONL (default: the config's eval_data, else the toy eval split)")
p.add_argument("--out", default=None, help="where to write eval.json (default CKPT/eval.json)")
p.add_argument("--blind", action="store_true", help="also evaluate with blank images: blind_accuracy")
p.add_argument("overrides", nargs="*", help="field=value")
args = p.parse_intermixed_args()
ckpt = Path(args.ckpt)
if not (ckpt / "config.json").is_file():
    die(f"--ckpt {ckpt}: not a model folder (no config.json)")
try:
    if args.config:
        cfg = get_config(args.config, args.overrides)
    elif (ckpt / checkpoint.STATE).is_file():
        cfg = get_config(overrides=args.overrides, base=checkpoint.read_state(ckpt)[1])
    else:
        die(f"--ckpt {ckpt} has no {checkpoint.STATE}: pass --config NAME")
    if args.data:
        cfg = get_config(overrides=[f"eval_data={args.data}"], base=cfg)
except ConfigError as e:
    die(str(e))

rank, world, device = setup()
model, tokenizer, image_processor = load_pretrained(ckpt, cfg)
if cfg.eval_min_pixels:  # the eval protocol's image bounds (ATLAS's harness at 7B)
    set_pixel_bounds(image_processor, cfg.eval_min_pixels, cfg.eval_max_pixels)
model = shard(model, cfg, device).eval()
data = examples(cfg, "eval")
result = evaluate(model, tokenizer, image_processor, data, cfg, device)
if args.blind:
    result["blind_accuracy"] = evaluate(model, tokenizer, image_processor, data, cfg, device, blind=True)["accuracy"]

tasks = result["per_task"]
chance = {t: CHANCE.get(t) for t in tasks}
print0(f"\n{'task':<10}{'accuracy':>10}{'chance':>8}  functional tokens used")
for t, acc in tasks.items():
    used = ", ".join(f"{tok} {share:.2f}" for tok, share in result["functional_by_task"][t].items() if share) or "-"
    print0(f"{t:<10}{acc:>10.3f}{chance[t] if chance[t] is not None else float('nan'):>8.3f}  {used}")
print0(f"\naccuracy {result['accuracy']:.3f}" + (f" | blind {result['blind_accuracy']:.3f}" if args.blind else "")
       + f" | format {result['format_rate']:.3f} | functional {result['functional_rate']:.3f}"
       + f" | {result['mean_functional_tokens']:.2f} functional tokens / output | length {result['mean_length']:.1f}"
       + f" | {result['tokens_per_s']:.0f} tokens/s | n={result['n']}")
known = [c for c in chance.values() if c is not None]
if known:
    result["chance"] = sum(known) / len(known)
    print0(f"average chance {result['chance']:.3f}")
print0("\nsample outputs:")
for s in result["samples"][:4]:
    print0(f"  [{s['task']}] answer={s['answer']!r} correct={bool(s['accuracy'])}: {s['output']!r}")
out = Path(args.out or ckpt / "eval.json")
if rank == 0:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
print0(f"wrote {out}")
cleanup()
