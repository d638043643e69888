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
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from atlas_min import checkpoint
from atlas_min.checkpoint import CheckpointError
from atlas_min.config import ConfigError, get_config
from atlas_min.data import DataError
from atlas_min.dist import all_sum, cleanup, is_main, print0
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


def say_skipped(bad_lines, what):
    """What `skip_bad_examples=true` dropped, in one line (data.keep_good's `on_skip`)."""
    print0(f"skipped {len(bad_lines)} example(s) {what}, e.g. {bad_lines[0]}")


RUN_FILES = ("trainer_state.json", "model.safetensors", "optimizer.safetensors", "report.md", "eval.json")
LOCK = ".lock"


def _is_rank0():
    return int(os.environ.get("RANK", "0")) == 0  # before the process group exists


def holds_run(folder):
    """Whether `folder` already holds (part of) a training run."""
    folder = Path(folder)
    return (folder / "checkpoints").is_dir() or any((folder / name).exists() for name in RUN_FILES) \
        or any(folder.glob("metrics_*.jsonl"))


def _clear_run(folder):
    """--overwrite: remove what a run writes into `folder` (and nothing else that may be there)."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    for item in [*(folder / name for name in RUN_FILES), *folder.glob("metrics_*.jsonl")]:
        item.unlink(missing_ok=True)


def claim_run_folder(run):
    """Make `run` this run's own (rank 0): refuse it while another live process holds its lock, take over
    a stale lock (a dead pid on this host) with a note, remove half-written `.tmp-*` checkpoints a kill
    left behind, and prove the folder writable before any model is built."""
    run = Path(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock = run / LOCK
        if lock.exists():
            holder = json.loads(lock.read_text() or "{}")
            alive = holder.get("host") == socket.gethostname() and _pid_alive(holder.get("pid", -1))
            if alive or holder.get("host") not in (None, socket.gethostname()):
                raise UsageError(f"{run} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}); "
                                 f"if that run is gone, delete {lock}")
            print0(f"note: taking over {lock} of a run that is gone (pid {holder.get('pid')})")
        lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except OSError as e:
        raise UsageError(f"--out {run}: cannot write there ({e.strerror})") from None
    for tmp in [*(run / "checkpoints").glob(".tmp-*"), run.parent / f".tmp-{run.name}"]:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def release_run_folder(run):
    """The run is over: drop its lock (rank 0), if it is this process's."""
    lock = Path(run) / LOCK
    try:
        if _is_rank0() and json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError, AttributeError):
        pass  # no lock, or not ours: nothing to release


# Ctrl-C (SIGINT) and SIGTERM (a scheduler's "time is up"). torchrun runs its workers in a session of
# their own: the terminal's Ctrl-C reaches torchrun, which sends SIGINT to every worker and kills them
# after --shutdown-timeout seconds (default 30: raise it when a step takes longer).
_interrupts = []  # signals received since `defer_interrupts`


def _rank_tag():
    rank = int(os.environ.get("RANK", "0"))
    return f"rank {rank}: " if rank else ""


def quit_on_interrupt(run=None):
    """Until the loop starts, Ctrl-C ends the process at once in one line (nothing is saved yet; the
    run folder's lock is released) rather than a traceback on every rank."""
    def quit_now(signum, frame):
        if run is not None:
            release_run_folder(run)
        sys.stderr.write(f"{_rank_tag()}interrupted before the first step: nothing saved\n")  # one write per line
        os._exit(130)  # 128 + SIGINT, the shell's convention
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, quit_now)


def defer_interrupts(run):
    """From the loop's start, Ctrl-C asks the run to stop at the end of its current step (`interrupted`):
    never in the middle of an update, a save or a collective that the other ranks are waiting in. A
    second Ctrl-C on the same process quits at once (the last complete checkpoint stays as it was)."""
    def note(signum, frame):
        if _interrupts:
            release_run_folder(run)
            sys.stderr.write(f"{_rank_tag()}interrupted again: stopped without saving\n")
            os._exit(130)
        _interrupts.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note)


def interrupted():
    """Whether any rank was interrupted: every rank calls it at the end of each step and gets the same
    answer (one small all-reduce), so all stop after the same step."""
    return all_sum(float(bool(_interrupts))) > 0


def stop_interrupted(run, step, total, saved, script):
    """Leave an interrupted run after `step`: one line on each rank, the lock released, exit code 130."""
    if not is_main():
        line = f"{_rank_tag()}interrupted after step {step} of {total}"
    elif saved:
        line = (f"interrupted after step {step} of {total}: saved {saved}; python {script} --resume {run} "
                "goes on from it")
    else:
        line = f"interrupted after step {step} of {total} (save_on_interrupt=false: nothing saved)"
    sys.stdout.write(line + "\n")  # one write: the ranks share torchrun's output, and lines must not mix
    sys.stdout.flush()
    release_run_folder(run)
    cleanup(exit_code=130)  # under torchrun; on one process it returns
    sys.exit(130)


def parse_run_args(description, stage):
    """(opts, cfg, resume_from) from `--config NAME [--init DIR] [--out DIR] [--resume X] [--overwrite]
    [field=value ...]`, with the run folder claimed (`claim_run_folder`) and `opts.out` set.

    `stage` is "sft" or "rl" (which adds --init). With --resume the checkpoint's own config is the base
    (the command line may override fields) and `resume_from` is that checkpoint folder, else None. A new
    run refuses a folder that holds a run unless --overwrite, and RL refuses --out equal to --init.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="preset: micro, toy or qwen2_5_vl_7b")
    p.add_argument("--out", default=None, help=f"run folder (default runs/{stage}-<config>)")
    p.add_argument("--resume", default=None, help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="start a new run in a folder that holds one")
    if stage == "rl":
        p.add_argument("--init", default=None, help="the SFT checkpoint to start from")
    p.add_argument("overrides", nargs="*", help="field=value")
    opts = p.parse_intermixed_args()
    quiet_libraries()
    opts, cfg, resume_from = _resolve(opts, stage)
    if stage == "rl" and cfg.temperature <= 0:
        raise UsageError("temperature=0 samples greedily: a group's G outputs are then equal, every advantage "
                         "is 0 and no step changes a weight; RL needs temperature > 0 (the presets use 1)")
    quit_on_interrupt(opts.out)  # before the lock exists: a Ctrl-C never leaves it behind
    if _is_rank0():
        if opts.overwrite and not resume_from:
            _clear_run(Path(opts.out))
        claim_run_folder(opts.out)
    return opts, cfg, resume_from


def _resolve(opts, stage):
    """Config, start and run folder from the parsed command line, every rule checked; writes nothing."""
    if opts.resume:
        skipped = []
        resume_from = checkpoint.find(opts.resume, skipped)
        for note in skipped:
            print0(f"note: skipping the damaged checkpoint {note}")
        state, saved = checkpoint.read_state(resume_from)
        if ("init" in state) != (stage == "rl"):
            kind, script = ("an RL", "train_rl.py") if "init" in state else ("an SFT", "train_sft.py")
            raise UsageError(f"--resume {opts.resume} is {kind} run: resume it with python {script} --resume")
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
    opts.out = opts.out or f"runs/{stage}-{cfg.name}"
    if stage == "rl" and not opts.init:
        raise UsageError("--init DIR is required: the SFT checkpoint to start from "
                         "(python train_sft.py --out DIR makes one)")
    if stage == "rl" and not (Path(opts.init) / "config.json").is_file():
        raise UsageError(f"--init {opts.init}: not a model folder (no config.json); "
                         "pass the --out folder of train_sft.py")
    if stage == "rl" and Path(opts.init).resolve() == Path(opts.out).resolve():
        raise UsageError(f"--out {opts.out} is the --init folder: RL would overwrite the SFT model, which is "
                         "also its KL reference; pass another --out")
    if holds_run(opts.out) and not opts.overwrite:
        raise UsageError(f"--out {opts.out} already holds a run: --resume {opts.out} continues it, "
                         "--overwrite starts again")
    return opts, cfg, None


class Progress:
    """One line per `every` steps with rate and ETA; a JSONL record per step (rank 0)."""

    def __init__(self, run, stage, start, total, every):
        self.path, self.start, self.total, self.every = Path(run) / f"metrics_{stage}.jsonl", start, total, every
        self.t0 = time.time()
        if is_main():
            Path(run).mkdir(parents=True, exist_ok=True)
            if self.path.exists():  # a resumed run: drop the records of steps it will redo
                kept = []
                for line in self.path.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] < start:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):  # a line half-written when the run was killed
                        print0(f"note: dropping a half-written line of {self.path}")
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
