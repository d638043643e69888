"""Speed, measured side by side in one run (the figures README.md's "Speed" section shows):

    python -m atlas_min.bench                               # toy preset, random-init model
    python -m atlas_min.bench --ckpt runs/experiment/sft    # a trained checkpoint (realistic lengths)
    python -m atlas_min.bench --config micro --json bench.json

1. The hand-written group sampler against `model.generate` on the same model, prompts, batch
   (prompts_per_step × group_size rows) and settings (temperature, top-p, max_new_tokens, the vision
   placeholders suppressed): generated tokens per second, median of `--repeats` runs after a warm-up,
   and whether both decode the same tokens greedily.
2. The phases of RL steps, from `train_rl.py` itself (a subprocess of 3 steps; the last one's timings).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from atlas_min import checkpoint
from atlas_min.cli import quiet_libraries, user_errors
from atlas_min.config import get_config
from atlas_min.data import collate_prompts, encode_example
from atlas_min.data import load_examples
from atlas_min.model import image_order, init_model, load_pretrained
from atlas_min.sampler import STOP_TOKENS, sample
from atlas_min.tokens import VISION_TOKENS

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, repeats):
    fn()  # warm-up: first-call allocations and lazy initialisation are not what we measure
    seconds, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), out


def compare_samplers(model, tokenizer, batch, cfg, repeats):
    G, stops = cfg.group_size, tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    seeds = list(range(batch["input_ids"].shape[0] * G))
    rows = {k: v.repeat_interleave(G, 0) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    spans = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())  # each image's patches
    order = image_order(batch["images_per_row"], G)  # generate gets every row's own copy of its images
    pixels, grids = torch.cat([spans[i] for i in order]), batch["image_grid_thw"][order]

    def ours(temperature):
        out = sample(model, batch, tokenizer, group_size=G, max_new_tokens=cfg.max_new_tokens,
                     temperature=temperature, top_p=cfg.top_p, row_seeds=seeds)
        return out["completion_ids"], int(out["completion_mask"].sum())

    @torch.no_grad()
    def theirs(temperature):
        sampling = dict(do_sample=True, temperature=temperature, top_p=cfg.top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
        settings = GenerationConfig(max_new_tokens=cfg.max_new_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                    suppress_tokens=tokenizer.convert_tokens_to_ids(VISION_TOKENS), **sampling)
        ids = model.generate(**rows, pixel_values=pixels, image_grid_thw=grids, generation_config=settings,
                             mm_token_type_ids=(rows["input_ids"] == model.config.image_token_id).long())
        new = ids[:, rows["input_ids"].shape[1]:]
        is_stop = torch.isin(new, torch.tensor(stops))
        stopped = is_stop.cumsum(1) - is_stop.long()  # tokens after the first stop are padding
        return new, int((stopped == 0).sum())

    t_ours, (_, n_ours) = _timed(lambda: ours(cfg.temperature), repeats)
    t_theirs, (_, n_theirs) = _timed(lambda: theirs(cfg.temperature), repeats)
    greedy_ours, greedy_theirs = ours(0.0)[0], theirs(0.0)[0]
    C = min(greedy_ours.shape[1], greedy_theirs.shape[1])
    return {"rows": rows["input_ids"].shape[0], "sampler_tokens_per_s": n_ours / t_ours,
            "generate_tokens_per_s": n_theirs / t_theirs, "sampler_seconds": t_ours, "generate_seconds": t_theirs,
            "greedy_match": bool(torch.equal(greedy_ours[:, :C], greedy_theirs[:, :C]))}


def rl_phases(init, cfg_name, overrides):
    """Seconds per phase of the 3rd step of a real `train_rl.py` run (steps 1-2 warm up)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "train_rl.py", "--config", cfg_name, "--init", str(init), "--out", out,
                        "max_steps=3", "save_every=0", *overrides], cwd=ROOT, check=True, capture_output=True)
        last = json.loads((Path(out) / "metrics_rl.jsonl").read_text().splitlines()[-1])
    return {k[2:]: v for k, v in last.items() if k.startswith("t_")}


def main():
    p = argparse.ArgumentParser(description="sampler vs generate, and the phases of an RL step")
    p.add_argument("--config", default="toy")
    p.add_argument("--ckpt", default=None, help="a model folder (default: a random-init model of the preset)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--readme", action="store_true", help="also write the figures into README.md")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    quiet_libraries()
    cfg = get_config(args.config, args.overrides)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.ckpt:
            model, tokenizer, image_processor = load_pretrained(args.ckpt, cfg)
            init = args.ckpt
        else:
            model, tokenizer, image_processor = init_model(cfg)
            init = tmp
            checkpoint.save(init, model, tokenizer, image_processor, cfg, 0)
        model.eval()
        prompts = load_examples(cfg, "train")[:cfg.prompts_per_step]
        batch = collate_prompts([encode_example(ex, tokenizer, image_processor, cfg) for ex in prompts],
                                tokenizer.pad_token_id)
        result = {"config": cfg.name, "threads": torch.get_num_threads(), **compare_samplers(model, tokenizer, batch, cfg, args.repeats)}
        result["rl_step_seconds"] = rl_phases(init, args.config, args.overrides)
    lines = [f"`python -m atlas_min.bench {' '.join(a for a in sys.argv[1:] if a != '--readme')}`".replace("  ", " "), "",
             f"{cfg.name}: {result['rows']} rows ({cfg.prompts_per_step} prompts × G={cfg.group_size}), "
             f"max_new_tokens={cfg.max_new_tokens}, temperature={cfg.temperature}, {result['threads']} threads:", "",
             f"- hand-written sampler: {result['sampler_tokens_per_s']:.0f} tokens/s ({result['sampler_seconds']:.3f} s)",
             f"- `model.generate`: {result['generate_tokens_per_s']:.0f} tokens/s ({result['generate_seconds']:.3f} s)",
             f"- greedy outputs identical: {result['greedy_match']}",
             "- one RL step (train_rl.py's own timings, 3rd step): "
             + ", ".join(f"{k} {v:.3f} s" for k, v in result["rl_step_seconds"].items())]
    print("\n".join(lines))
    if args.readme:
        from atlas_min.experiment import update_readme
        with user_errors():
            update_readme("bench", "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
