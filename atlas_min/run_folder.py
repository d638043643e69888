"""What a run folder may become: every rule of locking, overwriting, resuming and recording a run, here.

    cfg, resume_from, record = resolve(opts, stage)   # every rule checked; nothing written
    claim(opts.out, opts.overwrite)                     # rank 0: the lock, then (--overwrite) the clearing
    ... checkpoint.save(..., extra={"run": record}) ...
    release(opts.out)

The rules (README, "Runs and safety"), in the order `resolve` and `claim` check them:
1. A run's settings are fixed at its start. Every checkpoint's trainer state holds the full resolved config
   and `run`: the code's commit, the train data file (path, bytes, sha256) and one entry per resume (its
   step, the checkpoint it left from, the fields it changed). A resume may change only config.MUTABLE
   fields, and only while the train data file is byte for byte the one the run started with. Input paths are
   resolved at the start; an RL run records its --init's weights (`weights_record`), and a resume refuses an
   init that is gone or changed: it is read again as the KL reference. A model folder brings its own shape.
2. History is linear. Resuming a checkpoint older than its run's newest one into that run is refused:
   a later plain --resume would take the newer, abandoned one. `--resume A --out B` branches A into B,
   a folder that holds no run, and B's record names A.
3. Check, then change. Nothing is written before every check passed; --overwrite deletes the old run's
   files only once the lock is ours. No input (model_path, --init, train_data) lies inside --out, and
   no command writes its output onto one of its inputs (`check_output`).
4. One run per folder: RUN/.lock (pid, host) while a run lives; the lock of a dead pid is taken over.
   At exit (an error included) the lock goes, and a folder the run created and left empty goes too.
"""
import atexit
import hashlib
import json
import os
import shutil
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

from atlas_min import checkpoint
from atlas_min.config import FIELDS, MUTABLE, get_config
from atlas_min.data import data_file, file_record
from atlas_min.dist import print0

RUN_FILES = ("trainer_state.json", "model.safetensors", ".metadata", "optimizer.safetensors", "report.md", "eval.json",
             "samples_rl.jsonl", "tracker.json")
LOCK = ".lock"
_created = set()  # run folders this process created: removed at exit if still empty


class RunFolderError(ValueError):
    """A command that would break a rule of this module; the message names the rule and the way out."""


def holds_run(folder):
    """Whether `folder` already holds (part of) a training run."""
    folder = Path(folder)
    return (folder / "checkpoints").is_dir() or any((folder / name).exists() for name in RUN_FILES) \
        or any(folder.glob("metrics_*.jsonl"))


def code_commit():
    """The commit of the code that runs, "-dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except OSError:  # no git
        return None


def resolve(opts, stage):
    """(cfg, resume_from, record) from the parsed command line (`stage` "sft" or "rl"), rules 1-3 checked;
    sets opts.out. Writes nothing. `record` goes into every checkpoint's trainer state as "run"."""
    if opts.resume:
        cfg, resume_from, record = _resume(opts, stage)
    else:
        cfg, resume_from, record = absolute_paths(get_config(opts.config or "micro", opts.overrides)), None, None
        opts.out = opts.out or f"runs/{stage}-{cfg.name}"
        if stage == "rl" and not opts.init:
            raise RunFolderError("--init DIR is required: the SFT checkpoint to start from (train_sft.py's --out)")
        if stage == "rl":  # recorded as read, so a resume from another working folder reads the same one
            opts.init = str(Path(opts.init).resolve())
    init = getattr(opts, "init", None) or resume_from and checkpoint.read_state(resume_from)[0].get("init")
    for what, path in {"--init": init, "model_path": cfg.model_path, "train_data": cfg.train_data}.items():
        if path and Path(path).resolve().is_relative_to(Path(opts.out).resolve()):
            raise RunFolderError(f"--out {opts.out} is the {what} folder or holds it ({path}): the run would write "
                                 "over (and --overwrite delete) its own input; pass another --out")
    if not resume_from and holds_run(opts.out) and not opts.overwrite:
        raise RunFolderError(f"--out {opts.out} already holds a run: --resume {opts.out} continues it, "
                             "--overwrite starts again")
    if init and resume_from:
        checkpoint.require_model(init, "--init")
    what, base = ("model_path", cfg.model_path) if stage == "sft" else ("--init", init)  # a new run's start
    if base and not resume_from:  # model_path is read by a new SFT run only (a resume reads its checkpoint)
        checkpoint.require_model(base, what)
        from atlas_min.model import adopt_shape  # here: the other commands of this module need no transformers
        cfg = adopt_shape(cfg, base, what)[0]
    if not record:
        record = {"commit": code_commit(), "data": file_record(data_file(cfg, "train")), "resumes": []}
        if base and _first_rank():  # RL: its --init, read again as the KL reference by every resume (`_resume`)
            record[what.lstrip("-")] = weights_record(base)  # rank 0 writes the record: only it reads the weights
    return cfg, resume_from, record


def _first_rank():
    return not int(os.environ.get("RANK", "0"))


def absolute_paths(cfg, cwd="."):
    """`cfg` with its input paths (model_path, train_data, eval_data) resolved from `cwd`: what the run records is
    what it read, and a resume from another working folder reads the same files."""
    return replace(cfg, **{k: str((Path(cwd) / getattr(cfg, k)).resolve())
                           for k in ("model_path", "train_data", "eval_data") if getattr(cfg, k)})


def weights_fingerprint(folder):
    """sha256 over a model folder's config.json and weight files (model.safetensors, or the index and its
    shards), names and full contents. Contents, not the safetensors headers and sizes: a checkpoint retrained
    with another seed has the same headers and sizes, only its bytes differ. It costs one read of the weights
    (sha256 ran at ~690 MiB/s on one core here: ~25 s for a 7B's 16.6 GB bf16 checkpoint, once at the start
    and once per resume, on rank 0 only)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    digest = hashlib.sha256()
    for name in ["config.json", *([index.name, *shards] if shards else ["model.safetensors"])]:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def weights_record(folder):
    """{"path" (resolved), "sha256" (`weights_fingerprint`)} of a model folder a run reads."""
    return {"path": str(Path(folder).resolve()), "sha256": weights_fingerprint(folder)}


def changed_input(what, seen):
    """Why the model folder a run recorded as `seen` ({"path", "sha256"}) is not what it read, or None."""
    try:
        now = weights_fingerprint(seen["path"])
    except (OSError, ValueError, KeyError):
        return f"{what} {seen['path']} is missing or unreadable"
    return None if now == seen["sha256"] else f"{what} {seen['path']} is not the folder the run read (its weights' sha256 differs)"


def _resume(opts, stage):
    """Rules 1 and 2 for `--resume X [--out B] [field=value ...]`."""
    if opts.overwrite or getattr(opts, "init", None):
        raise RunFolderError(f"--resume continues a run as it started: {'--overwrite' if opts.overwrite else '--init'} "
                             "goes with a new run only")
    skipped = []
    resume_from = checkpoint.find(opts.resume, skipped)
    for note in skipped:
        print0(f"note: skipping the damaged checkpoint {note}")
    state, saved = checkpoint.read_state(resume_from)
    start = state["step"]
    if ("init" in state) != (stage == "rl"):
        kind, script = ("an RL", "train_rl.py") if "init" in state else ("an SFT", "train_sft.py")
        raise RunFolderError(f"--resume {opts.resume} is {kind} run: resume it with python {script} --resume")
    if opts.config and opts.config != saved.name:
        raise RunFolderError(f"--resume {resume_from} was trained with --config {saved.name}, not {opts.config}: "
                             "drop --config")
    cfg = get_config(overrides=opts.overrides, base=saved)
    changed = {n: [getattr(saved, n), getattr(cfg, n)] for n in FIELDS if getattr(saved, n) != getattr(cfg, n)}
    if fixed := ", ".join(f"{n} {changed[n][0]!r} -> {changed[n][1]!r}" for n in changed if n not in MUTABLE):
        raise RunFolderError(f"--resume {opts.resume}: {fixed} would change what the run computes, and a run's settings "
                             "are fixed at its start (config.RESUME_MAY_CHANGE lists what a resume may change)")
    run = resume_from.parent.parent if resume_from.parent.name == "checkpoints" else resume_from
    opts.out = opts.out or str(run)
    newest = checkpoint.find(run)
    if Path(opts.out).resolve() != run.resolve() and holds_run(opts.out):
        raise RunFolderError(f"--out {opts.out} holds another run: --resume {opts.resume} goes on in its own folder "
                             f"{run}, or branches into a folder that holds no run")
    if Path(opts.out).resolve() == run.resolve() and checkpoint.read_state(newest)[0]["step"] > start:
        raise RunFolderError(f"{resume_from} (step {start}) is older than {newest}: going on from it here would leave a "
                             "newer branch that a later --resume takes; branch it with --out NEW, or delete the newer")
    total = cfg.max_steps or (cfg.rl_steps if stage == "rl" else cfg.sft_steps)
    if start >= total:
        raise RunFolderError(f"{resume_from} is already at step {start} of {total}: "
                             f"pass max_steps=N (N > {start}) to go on")
    old = state.get("run") or {}  # a checkpoint written before runs were recorded has none
    if old.get("init") and _first_rank():  # RL reads its SFT checkpoint again on every resume: the KL reference
        # (rank 0 alone: under torchrun the others wait for it in dist.setup, and torchrun ends them if it stops)
        if problem := changed_input("--init", old["init"]):
            raise RunFolderError(f"--resume {opts.resume}: {problem}; it is this run's KL reference, and going on "
                                 "against another would mix two runs: restore it, or start a new run")
    data = file_record(data_file(cfg, "train"))
    if old.get("data") and old["data"]["sha256"] != data["sha256"]:
        raise RunFolderError(f"train data {data['path']} is not the file this run started with (its sha256 differs): "
                             "resuming would train on a mix; start a new run")
    entry = {"step": start, "from": str(resume_from), "changed": changed, "commit": code_commit()}
    return cfg, resume_from, dict(old, resumes=[*old.get("resumes", []), entry])


def claim(run, overwrite=False):
    """Make `run` this run's own (rank 0): refuse it while another live process holds its lock, take over
    a stale lock (a dead pid on this host) with a note, prove the folder writable; only then --overwrite
    removes the old run's files. Removes half-written `.tmp-*` checkpoints a kill left behind."""
    run = Path(run)
    try:
        if not run.exists():
            _created.add(run)
        run.mkdir(parents=True, exist_ok=True)
        lock = run / LOCK
        if lock.exists():
            holder = json.loads(lock.read_text() or "{}")
            alive = holder.get("host") == socket.gethostname() and _pid_alive(holder.get("pid", -1))
            if alive or holder.get("host") not in (None, socket.gethostname()):
                raise RunFolderError(f"{run} is in use by another run (pid {holder.get('pid')} on "
                                     f"{holder.get('host')}); if that run is gone, delete {lock}")
            print0(f"note: taking over {lock} of a run that is gone (pid {holder.get('pid')})")
        staged = run / f"{LOCK}.{os.getpid()}"  # written whole, then renamed: a Ctrl-C never meets a half-written lock
        staged.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        staged.replace(lock)
    except OSError as e:
        raise RunFolderError(f"--out {run}: cannot write there ({e.strerror})") from None
    atexit.register(release, run)  # an error that ends the process (cli.die) frees the folder too
    if overwrite:  # the files a run writes, and nothing else that may be there
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        for item in [*(run / name for name in RUN_FILES), *run.glob("metrics_*.jsonl"), *run.glob("__*_*.distcp")]:
            item.unlink(missing_ok=True)
    for tmp in [*(run / "checkpoints").glob(".tmp-*"), *run.glob(".tmp-*")]:  # checkpoint.save's, inside the run
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def release(run):
    """The run is over: drop its lock, if it is this process's, and the folder if this run made it and left
    it empty (a run that failed before its first save leaves nothing behind)."""
    run, lock = Path(run), Path(run) / LOCK
    (run / f"{LOCK}.{os.getpid()}").unlink(missing_ok=True)  # a Ctrl-C between claim's write and its rename
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
        if run in _created:
            run.rmdir()  # only when empty
    except (OSError, ValueError, AttributeError):
        pass  # no lock, not ours, or a folder with files: nothing to release


def check_output(path, inputs=()):
    """Refuse, before any work, an output `path` that cannot be written or is one of the command's `inputs`
    (files, or folders whose existing files are inputs; resolved paths compared). In an input folder a
    new file, or an earlier result named eval*.json, may be written."""
    path, target = Path(path), Path(path).resolve()
    if path.is_dir():
        raise RunFolderError(f"{path} is a folder: name the file to write, e.g. {path / 'eval.json'}")
    for given in filter(None, inputs):
        source = Path(given).resolve()
        ours = not target.exists() or target.name.startswith("eval") and target.suffix == ".json"
        if target == source or source.is_dir() and target.is_relative_to(source) and not ours:
            raise RunFolderError(f"{path} is an input of this command ({given}): writing there would replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.{os.getpid()}.probe")  # one per process: under torchrun every rank
        probe.write_text("")  # checks, and a shared name raced (one rank unlinked the other's probe)
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"{path}: cannot write there ({e.strerror})") from None
