"""An experiment tracker beside the JSONL record (config `log_to`): wandb or tensorboard, on rank 0 only.

    require(cfg.log_to)               # before any work: TrackingError when the package is not installed
    start(cfg, run, step)             # a new tracked run, or on --resume the one RUN/tracker.json names
    log(step, record)                 # a metrics line, every number under its JSONL key
    table(step, "samples_rl", rows)   # rows: dicts with the same keys (a wandb Table; tensorboard: text)
    close()

The JSONL files stay the record; the tracker shows the same numbers live. wandb: the run's config is the
resolved Config, its id is kept in RUN/tracker.json so that --resume continues the same run
(WANDB_MODE=offline writes it under RUN/wandb/ for a later `wandb sync`; WANDB_PROJECT names the project,
"atlas_min" by default). wandb drops what a resumed run logs again at steps it already has. tensorboard:
event files in RUN/tensorboard/<id>/ (`tensorboard --logdir RUN/tensorboard`), the config as text; a resumed
run writes on in the same folder and first purges the steps it will redo.
"""
import importlib
import json
import os
import time
from pathlib import Path

from atlas_min.config import to_dict
from atlas_min.dist import is_main

_active = {}  # this process's tracked run: {"kind": ..., "handle": wandb Run or SummaryWriter}


class TrackingError(ValueError):
    """A tracker that cannot run: its package is not installed."""


def require(kind):
    """TrackingError, with the install command, unless the package that `kind` ("none" needs none) imports."""
    if kind != "none":
        try:
            importlib.import_module(kind)  # torch.utils.tensorboard imports the tensorboard package itself
        except ImportError:
            raise TrackingError(f"log_to={kind}: the {kind} package is not installed "
                                f"(pip install -e '.[{kind}]')") from None


def start(cfg, run, step):
    """Rank 0: open the tracked run of `run` (a run folder) for cfg.log_to, from `step` on."""
    if cfg.log_to == "none" or not is_main():
        return
    path = Path(run) / "tracker.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    run_id = saved.get("id") if saved.get("log_to") == cfg.log_to else None  # else a new tracked run
    if cfg.log_to == "wandb":
        import wandb
        handle = wandb.init(project=os.environ.get("WANDB_PROJECT", "atlas_min"), dir=run, id=run_id,
                            name=Path(run).name, resume="allow")
        handle.config.update(to_dict(cfg), allow_val_change=True)  # a resume may change the MUTABLE fields
        run_id = handle.id
    else:
        from torch.utils.tensorboard import SummaryWriter
        run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
        handle = SummaryWriter(Path(run) / "tensorboard" / run_id, purge_step=step if saved else None)
        handle.add_text("config", "    " + json.dumps(to_dict(cfg), indent=1).replace("\n", "\n    "), step)
    path.write_text(json.dumps({"log_to": cfg.log_to, "id": run_id}))
    _active.update(kind=cfg.log_to, handle=handle)


def log(step, record):
    """The numbers of a metrics line at `step` (its "step" key aside)."""
    numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    if _active.get("kind") == "wandb":
        _active["handle"].log(numbers, step=step)
    elif _active:
        for key, value in numbers.items():
            _active["handle"].add_scalar(key, value, step)
        _active["handle"].flush()  # a killed run keeps what it logged


def table(step, name, rows):
    """`rows` (dicts with the same keys) as one table at `step`."""
    if _active.get("kind") == "wandb":
        import wandb
        _active["handle"].log({name: wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])},
                              step=step)
    elif _active:  # one JSON line per row, as the samples file has them (an indented block: shown as written)
        _active["handle"].add_text(name, "    " + "\n    ".join(json.dumps(r) for r in rows), step)
        _active["handle"].flush()


def close():
    """End the tracked run (before the process leaves: dist.cleanup skips the interpreter's exit handlers)."""
    if _active.get("kind") == "wandb":
        _active["handle"].finish()
    elif _active:
        _active["handle"].close()
    _active.clear()
