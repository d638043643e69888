"""What the three scripts share at their edges: the command line, user errors, progress lines, logs.

    with user_errors():                                   # bad input: one line "error: ...", exit 2
        opts, cfg, resume_from = parse_run_args("Stage 1: SFT", stage="sft")
    progress = Progress(run, "sft", start, total, cfg.log_every)   # RUN/metrics_sft.jsonl + a line per log_every

Library modules raise typed errors (ConfigError, DataError, CheckpointError, JudgeError, UsageError); only the
scripts and the tools' `main` turn them into the one-line message, here.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from atlas_min import checkpoint
from atlas_min.checkpoint import CheckpointError
from atlas_min.config import ConfigError, get_config
from atlas_min.data import DataError
from atlas_min.dist import is_main, print0
from atlas_min.judge import JudgeError


class UsageError(ValueError):
    """A command line that cannot work (a missing --init, a finished run to resume, ...)."""


USER_ERRORS = (UsageError, ConfigError, DataError, CheckpointError, JudgeError)


def die(message):
    """A one-line error for the user, exit code 2, no traceback (scripts and tools' main only)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def user_errors():
    """Turn the errors that bad input causes into `die`; anything else keeps its traceback (a bug)."""
    try:
        yield
    except USER_ERRORS as e:
        die(str(e))


def quiet_libraries():
    """No per-tensor "Loading weights" progress bars from transformers: a run prints its own progress."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def say_skipped(bad_lines):
    """What `skip_bad_examples=true` dropped, in one line (data.check_images's `on_skip`)."""
    print0(f"skipped {len(bad_lines)} example(s) with a bad image, e.g. {bad_lines[0]}")


def parse_run_args(description, stage):
    """(opts, cfg, resume_from) from `--config NAME [--init DIR] [--out DIR] [--resume X] [field=value ...]`.

    `stage` is "sft" or "rl" (which adds --init). With --resume the checkpoint's own config is the base
    (the command line may override fields) and `resume_from` is that checkpoint folder, else None.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="preset: micro, toy or qwen2_5_vl_7b")
    p.add_argument("--out", default=None, help=f"run folder (default runs/{stage}-<config>)")
    p.add_argument("--resume", default=None, help="a run folder (its latest checkpoint) or a checkpoint folder")
    if stage == "rl":
        p.add_argument("--init", default=None, help="the SFT checkpoint to start from")
    p.add_argument("overrides", nargs="*", help="field=value")
    opts = p.parse_intermixed_args()
    quiet_libraries()
    if opts.resume:
        resume_from = checkpoint.find(opts.resume)
        state, saved = checkpoint.read_state(resume_from)
        if opts.config and opts.config != saved.name:
            raise UsageError(f"--resume {resume_from} was trained with --config {saved.name}, not {opts.config}: "
                             "drop --config")
        cfg = get_config(overrides=opts.overrides, base=saved)
        in_run = resume_from.parent.name == "checkpoints"
        opts.out = opts.out or str(resume_from.parent.parent if in_run else resume_from)
        total = cfg.max_steps or (cfg.rl_steps if stage == "rl" else cfg.sft_steps)
        if state["step"] >= total:
            raise UsageError(f"{resume_from} is already at step {state['step']} of {total}: "
                             f"pass max_steps=N (N > {state['step']}) to go on")
        return opts, cfg, resume_from
    cfg = get_config(opts.config or "micro", opts.overrides)
    if stage == "rl" and not opts.init:
        raise UsageError("--init DIR is required: the SFT checkpoint to start from "
                         "(python train_sft.py --out DIR makes one)")
    if stage == "rl" and not (Path(opts.init) / "config.json").is_file():
        raise UsageError(f"--init {opts.init}: not a model folder (no config.json); "
                         "pass the --out folder of train_sft.py")
    return opts, cfg, None


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
