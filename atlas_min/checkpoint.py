"""Checkpoints: a Hugging Face folder (stock transformers loads it) plus what resuming needs, each rank
writing its own shard.

    RUN/                         final model: config.json, model.safetensors, tokenizer, image processor
    RUN/checkpoints/step_000200/ the same, + trainer_state.json + the AdamW state: .metadata and one
                                 __<rank>_0.distcp file per rank that saved it (torch.distributed.checkpoint)

A save gathers nothing: no rank ever holds the whole state. Weights: every rank writes its shard of each tensor
(torch.distributed.checkpoint's HuggingFaceStorageWriter), then rank 0 stitches the shards into one
model.safetensors, a tensor at a time (one full tensor in memory), and deletes them. AdamW moments: every
rank writes its shard (`dcp.save`); `.metadata` records which file holds which slice, so `dcp.load` gives
each rank its own slice at any process count: saved by N processes, resumed on M. A resume reads the
weights as any model folder (`dist.shard`: rank 0 reads, each rank keeps its shard). No pickles of weights:
weights are safetensors; the AdamW tensors are read back with torch.load(weights_only=True); `.metadata`
is a pickle of the layout (torch's format: resume only checkpoints you trust).

A checkpoint is written to a hidden temporary folder inside the run folder, where the run proved it
can write, and renamed into place only once complete, so a run killed at any instant leaves complete
checkpoints only. There is no RNG state to save: every random draw derives from (seed, step), so a
resumed run draws exactly what an uninterrupted one would.
"""
import contextlib
import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict

from atlas_min.config import from_dict, to_dict
from atlas_min.dist import all_sum, is_main, print0, world_size

STATE = "trainer_state.json"
# what a save writes beside the small Hugging Face files, and replaces in a folder it saves into again
SAVED = (".metadata", "__*_*.distcp", "model*.safetensors*", "optimizer.safetensors")
OLD_FORMAT = ("an old-format checkpoint (AdamW state in one optimizer.safetensors, written before checkpoints were "
              "sharded with torch.distributed.checkpoint): this version cannot resume it; start a new run from its "
              "weights (--init, or model_path=)")


class CheckpointError(ValueError):
    """A folder that holds no usable checkpoint; the message names it."""


@contextlib.contextmanager
def _one_process_ok():
    """On one process there is no process group, by design; torch.distributed.checkpoint then warns on every
    call that it assumes one process. It is right: that one warning is silenced, here only."""
    with warnings.catch_warnings():
        if world_size() == 1:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _write_weights(tmp, model, dtype):
    """Every rank writes its shard of every weight, in `dtype` (tmp/sharded/, one file per rank); rank 0 then
    stitches them into tmp/model-00001-of-00001.safetensors, one full tensor in memory at a time."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in get_model_state_dict(model).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one tensor, two names: safetensors stores it once
    with _one_process_ok():
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True, enable_consolidation=True))


def _finish(folder, tmp, model, tokenizer, image_processor, dtype, trainer_state):
    """Rank 0: the stitched weights as model.safetensors (one file, no index), the small Hugging Face files and
    the trainer state into `tmp`, then `tmp` renamed to `folder` (or moved into it, the trainer state last)."""
    shutil.rmtree(tmp / "sharded")
    [stitched] = tmp.glob("model-*-of-*.safetensors")
    os.replace(stitched, tmp / "model.safetensors")
    (tmp / "model.safetensors.index.json").unlink()
    config = copy.deepcopy(model.config)
    config.dtype = dtype  # what stock transformers loads it as
    for part in (config, model.generation_config, tokenizer, image_processor):
        part.save_pretrained(tmp)
    (tmp / STATE).write_text(json.dumps(trainer_state, indent=1))
    if folder.exists():  # the run folder holds checkpoints/ and logs: move our files in, the state last
        (folder / STATE).unlink(missing_ok=True)  # until the new state lands, this folder is incomplete
        for pattern in SAVED:  # an earlier save's shards (maybe of more ranks) must not outlive it
            for old in folder.glob(pattern):
                old.unlink()
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == STATE):
            os.replace(item, folder / item.name)
        tmp.rmdir()
    else:
        os.replace(tmp, folder)


def _reason(error):
    """The first line of what went wrong, from an OSError or from torch.distributed.checkpoint's wrapper of the
    ranks' errors ({rank: wrapped error})."""
    if isinstance(error, CheckpointException):
        error = next(iter(error.failures.values()))[0]  # (exception, traceback) of the first rank that failed
    return getattr(error, "strerror", None) or str(error).strip().splitlines()[0]


def save(folder, model, tokenizer, image_processor, cfg, step, optimizer=None, extra=None, dtype="float32"):
    """Write `folder` atomically. Every rank must call it: each writes its shards, rank 0 the rest.

    With `optimizer` and fp32 weights the folder is resumable; a lean one (bf16 weights, no AdamW state:
    the final model of a 7B run, a sixth of the size) says so in its trainer state and is never resumed.
    A write that fails on any rank (a full disk) removes the temporary folder and raises CheckpointError on
    every rank: the last complete checkpoint stays as it was.
    """
    folder = Path(folder)
    # inside the run folder, where the run proved it may write: RUN/.tmp-save, RUN/checkpoints/.tmp-step_N (never
    # RUN's parent, which may be read-only)
    tmp = folder / ".tmp-save" if folder.is_dir() else folder.parent / f".tmp-{folder.name}"
    resumable = optimizer is not None and dtype == "float32"
    failed = None
    if is_main():
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            failed = _reason(e)
    if not all_sum(failed is not None):  # a barrier too: no rank writes before rank 0 made the empty folder
        try:  # the collective writes first, every rank alike; rank 0's own work last, so no rank waits alone
            _write_weights(tmp, model, getattr(torch, dtype))
            if resumable:  # keyed by parameter name, each rank its shard of every moment
                with _one_process_ok():
                    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=tmp)
            if is_main():
                _finish(folder, tmp, model, tokenizer, image_processor, getattr(torch, dtype),
                        {"step": step, "config": to_dict(cfg), "resumable": resumable, **(extra or {})})
        except (OSError, SafetensorError, CheckpointException) as e:
            failed = _reason(e)
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
    if all_sum(failed is not None):  # every rank learns every rank's outcome (and waits for it, as a barrier)
        raise CheckpointError(f"cannot save step {step} to {folder} ({failed or 'another rank failed'}): "
                              "the last complete checkpoint is kept")


def save_final(run, model, tokenizer, image_processor, cfg, step, optimizer, extra=None):
    """The run folder's final model, in `cfg.final_dtype`. float32: also the run's resumable checkpoint.
    bfloat16: lean, and the resumable state goes to RUN/checkpoints/step_N, so --resume goes on exactly."""
    if cfg.final_dtype != "float32":
        save(step_folder(run, step), model, tokenizer, image_processor, cfg, step, optimizer, extra)
        prune(run, cfg.keep_checkpoints)
    save(run, model, tokenizer, image_processor, cfg, step, optimizer, extra, dtype=cfg.final_dtype)


def step_folder(run, step):
    return Path(run) / "checkpoints" / f"step_{step:06d}"


def _shard_files(folder):
    """{file name: the bytes it must hold} for every slice of AdamW state that folder/.metadata places."""
    try:
        layout = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # unpickling a damaged file can raise nearly any error
        raise CheckpointError(f".metadata cannot be read ({type(e).__name__})") from None
    need = {}
    for where in layout.storage_data.values():
        need[where.relative_path] = max(need.get(where.relative_path, 0), where.offset + where.length)
    return need


def problem(folder, resumable=True):
    """Why `folder` is not a complete Qwen2.5-VL model folder (`resumable`: also a trainer state and the AdamW
    state to resume from), or None. Reads headers, not tensors: config.json names the architecture, a
    tokenizer is there, every safetensors file (one, or an index's shards) has a header that fits its size,
    and every AdamW shard file that .metadata names is there, as long as .metadata says."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return "not a model folder (no config.json)"
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
        if kind != "qwen2_5_vl":
            return f"not a Qwen2.5-VL model (its config.json says model_type {kind!r})"
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            return "no tokenizer (tokenizer.json)"
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        for name in files:
            if not (folder / name).is_file():
                return f"no {name}"
            with safe_open(folder / name, "pt") as f:
                f.keys()
        if resumable:
            read_state(folder)
            if not (folder / ".metadata").is_file():
                return OLD_FORMAT if (folder / "optimizer.safetensors").is_file() else "no .metadata (the AdamW state)"
            for name, size in _shard_files(folder).items():
                if not (folder / name).is_file() or (folder / name).stat().st_size < size:
                    return f"{name} (AdamW state) is missing or shorter than .metadata says"
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def require_model(folder, what):
    """CheckpointError naming `what` (an option or field) unless `folder` is a complete model folder."""
    if reason := problem(folder, resumable=False):
        raise CheckpointError(f"{what} {folder}: {reason}")


def find(path, skipped=None):
    """The newest checkpoint of a run folder (its final model or checkpoints/step_*) that verifies
    (`problem`), or `path` itself when it is one. A damaged newer one never blocks an intact older one,
    nor a damaged old one a newer: each skipped folder and its reason is appended to `skipped`.
    Only old-format checkpoints: refused in one line naming the format."""
    path = Path(path)
    folders = [p for p in [path, *(path / "checkpoints").glob("step_*")] if (p / STATE).is_file() and not _lean(p)]
    reasons = {folder: problem(folder) for folder in folders}
    ranked = [(read_state(folder)[0]["step"], folder) for folder, reason in reasons.items() if not reason]
    if skipped is not None:
        skipped += [f"{folder}: {reason}" for folder, reason in reasons.items() if reason]
    if not ranked and OLD_FORMAT in reasons.values():
        raise CheckpointError(f"{path} holds {OLD_FORMAT}")
    if not ranked:
        raise CheckpointError(f"{path} holds no complete checkpoint (looked for {path}/checkpoints/step_*/{STATE})")
    return max(ranked, key=lambda r: r[0])[1]


def _lean(folder):
    """A folder written as a final model only (`save` with bf16 weights): not a checkpoint to resume."""
    try:
        return json.loads((folder / STATE).read_text()).get("resumable") is False
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: `problem` names it


def read_state(folder):
    """(trainer_state dict, Config) of a checkpoint folder."""
    path = Path(folder) / STATE
    try:
        state = json.loads(path.read_text())
        return state, from_dict(state["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable trainer state ({type(e).__name__}: {e})") from None


def load_optimizer(folder, model, optimizer):
    """Restore the AdamW moments `save` wrote, and say so. Every rank calls it and reads only its own slice of
    each moment (`dcp.load` reshards: the number of processes may differ from the one that saved them)."""
    state = get_optimizer_state_dict(model, optimizer)  # this run's layout, filled in place
    try:
        with _one_process_ok():
            dcp.load(state, checkpoint_id=folder)
    except CheckpointException as e:
        raise CheckpointError(f"{folder}: cannot read the AdamW state ({_reason(e)})") from None
    set_optimizer_state_dict(model, optimizer, state)
    print0(f"resumed from {folder} at step {read_state(folder)[0]['step']}")


def prune(run, keep):
    """Delete all but the newest `keep` checkpoints under RUN/checkpoints (rank 0; keep <= 0 keeps all)."""
    if is_main() and keep > 0:
        for old in sorted((Path(run) / "checkpoints").glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
