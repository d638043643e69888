"""What the three scripts share at their edges: the command line, user errors, progress lines, logs, and
how a training step and a run end (the checkpoint saved, Ctrl-C, the report).

    with user_errors():                                   # bad input: one line "error: ...", exit 2
        opts, cfg, resume_from, record, (rank, world, device) = start_run("Stage 1: SFT", "sft")
    progress = Progress(run, "sft", start, total, cfg)   # RUN/metrics_sft.jsonl, a line per log_every, log_to
    end_step(run, step, total, streak, "train_sft.py", model, ...)  # save when due, stop after a Ctrl-C
    finish(run, "SFT (toy)", ["final loss 0.1", ...])     # RUN/report.md, the lock released, the processes end

Library modules raise typed errors (ConfigError, DataError, CheckpointError, JudgeError, RunFolderError,
DivergedError, TrackingError, UsageError); only the scripts and the tools' `main` turn them into the one-line message, here.
What a run folder may become (lock, overwrite, resume, recorded settings, branches) is atlas_min.run_folder.
"""
import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from atlas_min import checkpoint, run_folder, tracking
from atlas_min.config import ConfigError, check_world
from atlas_min.data import DataError
from atlas_min.dist import all_sum, cleanup, is_main, print0, setup
from atlas_min.judge import JudgeError
from atlas_min.optim import DivergedError


class UsageError(ValueError):
    """A command line that cannot work (a missing --init, a finished run to resume, ...)."""


USER_ERRORS = (UsageError, ConfigError, DataError, checkpoint.CheckpointError, JudgeError, run_folder.RunFolderError,
               DivergedError, tracking.TrackingError)


def die(message):
    """A one-line error for the user, exit code 2, no traceback (scripts and tools' main only)."""
    sys.stderr.write(f"{_rank_tag()}error: {message}\n")  # one write: torchrun's ranks share the output
    sys.stderr.flush()
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


# Ctrl-C (SIGINT) and SIGTERM (a scheduler's "time is up"). torchrun runs its workers in a session of
# their own: the terminal's Ctrl-C reaches torchrun, which sends SIGINT to every worker and kills them
# after --shutdown-timeout seconds (default 30: raise it when a step takes longer).
_interrupts = []  # signals received since `catch_interrupts(run, defer=True)`


def _rank_tag():
    rank = int(os.environ.get("RANK", "0"))
    return f"rank {rank}: " if rank else ""


def catch_interrupts(run, defer):
    """Until the loop starts (`defer` False), Ctrl-C ends the process at once in one line (nothing is saved
    yet; the run folder's lock is released) rather than a traceback on every rank. From the loop's start
    (`defer` True), Ctrl-C asks the run to stop at the end of its current step (`end_step`): never in
    the middle of an update, a save or a collective that the other ranks are waiting in. A second Ctrl-C
    on the same process quits at once (the last complete checkpoint stays as it was)."""
    def handler(signum, frame):
        if defer and not _interrupts:
            _interrupts.append(signum)
            return
        run_folder.release(run)
        why = "again: stopped without saving" if defer else "before the first step: nothing saved"
        sys.stderr.write(f"{_rank_tag()}interrupted {why}\n")  # one write per line
        os._exit(130)  # 128 + SIGINT, the shell's convention
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def end_step(run, step, total, streak, script, model, tokenizer, image_processor, cfg, optimizer, extra):
    """After 0-based `step` of `total` (every rank calls it): save RUN/checkpoints/step_N when save_every says
    so or when a rank was interrupted (save_on_interrupt), never while `streak` (optim.count_nonfinite) counts
    non-finite steps; keep the newest keep_checkpoints. After an interrupt, leave the run: one line on each
    rank, the lock released, exit code 130."""
    # A Ctrl-C on any rank: every rank asks (one small all-reduce), gets the same answer and stops after this step.
    stop = step + 1 < total and all_sum(float(bool(_interrupts))) > 0
    due = cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total
    saved_to = None
    if (due or stop and cfg.save_on_interrupt) and not streak:
        saved_to = checkpoint.step_folder(run, step + 1)
        checkpoint.save(saved_to, model, tokenizer, image_processor, cfg, step + 1, optimizer, extra=extra)
        checkpoint.prune(run, cfg.keep_checkpoints)
    if not stop:
        return
    line = f"{_rank_tag()}interrupted after step {step + 1} of {total}"  # rank 0 (no tag) says what comes next
    if is_main() and saved_to:
        line += f": saved {saved_to}; python {script} --resume {run} goes on from it"
    elif is_main():
        line += ": nothing saved (save_on_interrupt=false, or a non-finite step)"
    sys.stdout.write(line + "\n")  # one write: the ranks share torchrun's output, and lines must not mix
    sys.stdout.flush()
    _leave(run, exit_code=130)
    sys.exit(130)  # on one process


def start_run(description, stage):
    """(opts, cfg, resume_from, record, (rank, world, device)) from `--config NAME [--init DIR] [--out DIR]
    [--resume X] [--overwrite] [field=value ...]`: every rule of atlas_min.run_folder checked, torchrun's world size
    checked (config.check_world), the run folder claimed (rank 0), then the processes set up (`dist.setup`).

    `stage` is "sft" or "rl" (which adds --init). With --resume the checkpoint's own config is the base and
    `resume_from` is that checkpoint folder, else None; `record` is what every checkpoint records of the run.
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
    cfg, resume_from, record = run_folder.resolve(opts, stage)
    tracking.require(cfg.log_to)
    if stage == "rl" and cfg.temperature <= 0:
        raise UsageError("temperature=0 samples greedily: a group's G outputs are then equal, every advantage "
                         "is 0 and no step changes a weight; RL needs temperature > 0 (the presets use 1)")
    try:  # torchrun's WORLD_SIZE, before the lock and the process group: nothing to undo, and rank 0 says it once
        check_world(cfg, int(os.environ.get("WORLD_SIZE", "1")), stage)
    except ConfigError:
        if int(os.environ.get("RANK", "0")):  # torchrun ends this rank once rank 0 has said it and exited
            time.sleep(60)
            sys.exit(2)
        raise
    catch_interrupts(opts.out, defer=False)  # before the lock exists: a Ctrl-C never leaves it behind
    if not int(os.environ.get("RANK", "0")):  # before the process group exists
        run_folder.claim(opts.out, opts.overwrite)
    rank, world, device = setup(cfg.collective_timeout_s)
    return opts, cfg, resume_from, record, (rank, world, device)


class Progress:
    """One line per log_every steps with rate and ETA; RUN/metrics_<stage>.jsonl, a record per step, and
    RUN/samples_<stage>.jsonl (rank 0), each also sent to the tracker (cfg.log_to, atlas_min.tracking)."""

    def __init__(self, run, stage, start, total, cfg):
        self.run, self.stage, self.start, self.total, self.every = Path(run), stage, start, total, cfg.log_every
        self.t0 = time.time()
        if is_main():  # the run folder exists: rank 0 claimed it (run_folder.claim)
            for path in (self.run / f"metrics_{stage}.jsonl", self.run / f"samples_{stage}.jsonl"):
                _drop_steps_from(path, start)
        tracking.start(cfg, run, start)

    def _append(self, kind, records):
        """Rank 0 appends whole lines; a write that fails (a full disk) leaves the file as it was (no half line,
        no empty file) and ends the run in one line: the last checkpoint is kept, --resume goes on from it."""
        if not is_main():
            return
        path = self.run / f"{kind}_{self.stage}.jsonl"
        size = path.stat().st_size if path.exists() else None
        try:
            with open(path, "a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))
        except OSError as e:
            with contextlib.suppress(OSError):
                path.unlink() if size is None else os.truncate(path, size)
            raise run_folder.RunFolderError(f"{path}: cannot append step {records[0]['step'] + 1}'s record "
                                            f"({e.strerror}): the run stops; --resume {self.run} goes on from its "
                                            "last checkpoint") from None

    def log(self, step, **metrics):
        elapsed = time.time() - self.t0
        record = {"step": step, **metrics, "elapsed_s": round(elapsed, 2)}
        self._append("metrics", [record])
        tracking.log(step, record)
        done = step + 1 - self.start
        if done % self.every == 0 or step + 1 == self.total:
            rate = done / max(elapsed, 1e-9)
            eta = (self.total - step - 1) / max(rate, 1e-9)
            shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print0(f"step {step + 1}/{self.total} | {shown} | {rate:.2f} steps/s | ETA {eta / 60:.1f} min")

    def samples(self, step, rows):
        """A few completions of `step` (dicts with the same keys), for a reader to see what the policy writes."""
        self._append("samples", [{"step": step, **row} for row in rows])
        tracking.table(step, f"samples_{self.stage}", rows)


def _drop_steps_from(path, start):
    """A resumed run: drop the records of the steps it will redo (and a line half-written when it was killed)."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < start:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                print0(f"note: dropping a half-written line of {path}")
        path.write_text("".join(line + "\n" for line in kept))


def finish(run, title, lines):
    """End a run whose final model is saved: a section appended to RUN/report.md (every stage of a run leaves
    its summary there), the lock released, the process group left (`dist.cleanup`)."""
    if is_main():
        with open(Path(run) / "report.md", "a") as f:
            f.write(f"\n## {title}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    print0(f"saved {run}")
    _leave(run)


def _leave(run, exit_code=0):
    """The tracked run closed, the lock released, then the process group left (under torchrun the process
    exits here with `exit_code`; on one process it returns)."""
    tracking.close()
    run_folder.release(run)
    cleanup(exit_code=exit_code)
