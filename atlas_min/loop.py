"""What the training scripts share: command line, data source, learning-rate schedule, progress, logs.

Every stage appends to `RUN/metrics_<stage>.jsonl` (one JSON object per step) and `RUN/report.md`.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from atlas_min import checkpoint
from atlas_min.config import ConfigError, die, get_config
from atlas_min.data import DataError, load_jsonl
from atlas_min.dist import barrier, is_main, print0


def parse(description, need_init=False):
    """(args, cfg, start) from `--config NAME [--init DIR] [--out DIR] [--resume X] [field=value ...]`.

    With --resume the checkpoint's own config is the base (the command line may override fields);
    `start` is then the checkpoint folder, else None. Bad input exits with a one-line error.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="preset: micro, toy or qwen2_5_vl_7b")
    p.add_argument("--out", default=None, help="run folder (default runs/<stage>-<config>)")
    p.add_argument("--resume", default=None, help="a run folder (its latest checkpoint) or a checkpoint folder")
    if need_init:
        p.add_argument("--init", default=None, help="the SFT checkpoint to start from")
    p.add_argument("overrides", nargs="*", help="field=value")
    args = p.parse_intermixed_args()
    try:
        if args.resume:
            try:
                start = checkpoint.find(args.resume)
            except FileNotFoundError as e:
                die(f"--resume: {e}")
            _, saved = checkpoint.read_state(start)
            if args.config and args.config != saved.name:
                die(f"--resume {start} was trained with --config {saved.name}, not {args.config}: drop --config")
            cfg = get_config(overrides=args.overrides, base=saved)
            args.out = args.out or str(start.parent.parent if start.parent.name == "checkpoints" else start)
            step, total = checkpoint.read_state(start)[0]["step"], cfg.max_steps or (cfg.rl_steps if need_init else cfg.sft_steps)
            if step >= total:
                die(f"{start} is already at step {step} of {total}: pass max_steps=N (N > {step}) to go on")
            return args, cfg, start
        cfg = get_config(args.config or "micro", args.overrides)
    except ConfigError as e:
        die(f"{e}")
    if need_init and not args.init:
        die("--init DIR is required: the SFT checkpoint to start from (python train_sft.py --out DIR makes one)")
    if need_init and not (Path(args.init) / "config.json").is_file():
        die(f"--init {args.init}: not a model folder (no config.json); pass the --out folder of train_sft.py")
    return args, cfg, None


def examples(cfg, split, need_response=False):
    """The examples of `split` ("train" or "eval"): the JSONL file of the config, or the toy world."""
    path = cfg.train_data if split == "train" else cfg.eval_data
    try:
        if not path:
            from atlas_min.toy import ensure_toy_data
            if is_main():
                ensure_toy_data(cfg)
            barrier()  # rank 0 writes the toy data once; the others read it
            path = ensure_toy_data(cfg)[0 if split == "train" else 1]
        return load_jsonl(path, need_response=need_response)
    except DataError as e:
        die(str(e))


def stream_indices(step, per_step, n, seed):
    """Indices of `step`'s global batch: an endless stream of per-epoch shuffles of range(n), derived
    from (seed, step) alone, so a resumed run and any number of processes see the same batches."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(perm[pos].item())
    return out


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Progress:
    """One line per `every` steps with rate and ETA; a JSONL record per step (rank 0)."""

    def __init__(self, run, stage, start, total, every):
        self.path, self.start, self.total, self.every = Path(run) / f"metrics_{stage}.jsonl", start, total, every
        self.t0 = time.time()
        if is_main():
            Path(run).mkdir(parents=True, exist_ok=True)
            if self.path.exists():  # a resumed run: drop the records of steps it will redo
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < start]
                self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step, **metrics):
        elapsed = time.time() - self.t0
        record = {"step": step, **metrics, "elapsed_s": round(elapsed, 2)}
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        done = step + 1 - self.start
        if done % self.every == 0 or step + 1 == self.total:
            rate = done / max(elapsed, 1e-9)
            eta = (self.total - step - 1) / max(rate, 1e-9)
            shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print0(f"step {step + 1}/{self.total} | {shown} | {rate:.2f} steps/s | ETA {eta / 60:.1f} min")


def report(run, title, lines):
    """Append a section to RUN/report.md: every stage of a run leaves its summary there."""
    if is_main():
        with open(Path(run) / "report.md", "a") as f:
            f.write(f"\n## {title}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
