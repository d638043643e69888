"""Checkpoints: a Hugging Face folder (stock transformers loads it) plus what resuming needs.

    RUN/                         final model: config.json, model.safetensors, tokenizer, image processor
    RUN/checkpoints/step_000200/ the same, + optimizer.safetensors (AdamW moments) + trainer_state.json

No pickles: weights and optimizer moments are safetensors, everything else JSON. A checkpoint is
written to a hidden temporary folder and renamed into place only once complete, so a run killed at
any instant leaves complete checkpoints only. There is no RNG state to save: every random draw
derives from (seed, step), so a resumed run draws exactly what an uninterrupted one would.
"""
import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from atlas_min.config import from_dict, to_dict
from atlas_min.dist import FULL, all_sum, full_model_state, is_main, print0, world_size

STATE = "trainer_state.json"


class CheckpointError(ValueError):
    """A folder that holds no usable checkpoint; the message names it."""


def _write_model(folder, model, state, tokenizer, image_processor, dtype):
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one tensor, two names: safetensors stores it once
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.dtype = dtype  # what stock transformers loads it as
    for part in (config, model.generation_config, tokenizer, image_processor):
        part.save_pretrained(folder)


def _flatten_optimizer(state):
    """AdamW's tensors as one flat dict {"parameter name::key": tensor} (key: exp_avg, exp_avg_sq, step):
    safetensors holds no nesting. `_unflatten_optimizer` undoes it."""
    return {f"{name}::{key}": value for name, per in state["state"].items() for key, value in per.items()}


def _unflatten_optimizer(tensors, param_groups):
    state = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": param_groups}


def save(folder, model, tokenizer, image_processor, cfg, step, optimizer=None, extra=None, dtype="float32"):
    """Write `folder` atomically. Every rank must call it (the state is gathered); rank 0 writes.

    With `optimizer` and fp32 weights the folder is resumable; a lean one (bf16 weights, no AdamW state:
    the final model of a 7B run, a sixth of the size) says so in its trainer state and is never resumed.
    A write that fails (a full disk) removes its temporary folder and raises CheckpointError on every
    rank: the last complete checkpoint stays as it was.
    """
    folder = Path(folder)
    state = full_model_state(model)
    resumable = optimizer is not None and dtype == "float32"
    optim = get_optimizer_state_dict(model, optimizer, options=FULL) if resumable else None  # keyed by parameter name
    failed = None
    if is_main():
        tmp = folder.parent / f".tmp-{folder.name}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_model(tmp, model, state, tokenizer, image_processor, getattr(torch, dtype))
            trainer_state = {"step": step, "config": to_dict(cfg), "resumable": resumable, **(extra or {})}
            if optim is not None:
                save_file(_flatten_optimizer(optim), tmp / "optimizer.safetensors")
                trainer_state["param_groups"] = optim["param_groups"]
            (tmp / STATE).write_text(json.dumps(trainer_state, indent=1))
            if folder.exists():  # the run folder holds checkpoints/ and logs: move our files in, the state last
                (folder / STATE).unlink(missing_ok=True)  # until the new state lands, this folder is incomplete
                for item in sorted(tmp.iterdir(), key=lambda p: p.name == STATE):
                    os.replace(item, folder / item.name)
                tmp.rmdir()
            else:
                os.replace(tmp, folder)
        except (OSError, SafetensorError) as e:
            failed = getattr(e, "strerror", None) or str(e)
            shutil.rmtree(tmp, ignore_errors=True)
    if all_sum(failed is not None):  # every rank learns rank 0's outcome (and waits for it, as a barrier)
        raise CheckpointError(f"cannot save step {step} to {folder} ({failed or 'rank 0 failed'}): "
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


def problem(folder, resumable=True):
    """Why `folder` is not a complete Qwen2.5-VL model folder (`resumable`: also a trainer state and the AdamW
    state to resume from), or None. Reads headers, not tensors: config.json names the architecture, a
    tokenizer is there, every safetensors file (one, or an index's shards) has a header that fits its size."""
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
        if resumable:
            read_state(folder)
            files.append("optimizer.safetensors")
        for name in files:
            if not (folder / name).is_file():
                return f"no {name}"
            with safe_open(folder / name, "pt") as f:
                f.keys()
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def require_model(folder, what):
    """CheckpointError naming `what` (an option or field) unless `folder` is a complete model folder."""
    reason = problem(folder, resumable=False)
    if reason:
        raise CheckpointError(f"{what} {folder}: {reason}")


def find(path, skipped=None):
    """The newest checkpoint of a run folder (its final model or checkpoints/step_*) that verifies
    (`problem`), or `path` itself when it is one. A damaged newer one never blocks an intact older one,
    nor a damaged old one a newer: each skipped folder and its reason is appended to `skipped`."""
    path = Path(path)
    folders = [p for p in [path, *(path / "checkpoints").glob("step_*")] if (p / STATE).is_file() and not _lean(p)]
    reasons = {folder: problem(folder) for folder in folders}
    ranked = [(read_state(folder)[0]["step"], folder) for folder, reason in reasons.items() if not reason]
    if skipped is not None:
        skipped += [f"{folder}: {reason}" for folder, reason in reasons.items() if reason]
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
    """Restore AdamW moments saved by `save` (every rank calls it; rank 0 reads the file and broadcasts it,
    each rank keeping its shard), and say so."""
    state, _ = read_state(folder)
    full = _unflatten_optimizer(load_file(Path(folder) / "optimizer.safetensors"), state["param_groups"]) if is_main() else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world_size() > 1)
    set_optimizer_state_dict(model, optimizer, full, options=options)
    print0(f"resumed from {folder} at step {state['step']}")


def prune(run, keep):
    """Delete all but the newest `keep` checkpoints under RUN/checkpoints (rank 0; keep <= 0 keeps all)."""
    if is_main() and keep > 0:
        for old in sorted((Path(run) / "checkpoints").glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
