"""What a run reads stays what it read: inputs recorded by content and checked on resume, a model folder's own
shape, drivers that never reuse a stage trained otherwise, and the one-line refusals of unclear inputs.

Script-level rules; the in-process ones call the functions the scripts call (run_folder.resolve, experiment's
check_reuse). Cost: ~45 s on 2 shared cores (a copy of the learning SFT and a 2-step RL run from it, the torchrun refusal 18 s, the
eval refusal 10 s; the rest under 4 s).
"""
import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest

from atlas_min import checkpoint, run_folder
from atlas_min.config import get_config
from atlas_min.run_folder import RunFolderError
from test_train import RL, run


def new_opts(config="micro", init=None, out=None, *overrides):
    return Namespace(resume=None, out=str(out) if out else None, overwrite=False, config=config,
                     overrides=list(overrides), init=None if init is None else str(init))


def resume_opts(folder, *overrides):
    return Namespace(resume=str(folder), out=None, overwrite=False, config=None, overrides=list(overrides), init=None)


def refused(out, message):
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        out.stderr[-2000:]


@pytest.fixture(scope="module")
def sft_and_rl(tmp_path_factory, learning_sft):
    """A copy of the SFT checkpoint RL learns from, and a 2-step RL run from it: {"sft", "rl"} folders."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(learning_sft, root / "sft")  # the tests below retrain it: a copy of its own
    run("train_rl.py", *RL, "--init", root / "sft", "--out", root / "rl", "max_steps=2")  # learned: `run`
    return {"sft": root / "sft", "rl": root / "rl"}


def _wider_checkpoint(folder):
    """A micro-built model 64 wide (micro is 32), saved as a checkpoint with its tokenizer: an --init of another shape."""
    from atlas_min.model import init_model
    cfg = get_config("micro", ["text_hidden=64", "text_intermediate=96", "vision_depth=1"])
    model, tokenizer, image_processor = init_model(cfg)
    checkpoint.save(folder, model, tokenizer, image_processor, cfg, 0)
    return folder


# --- 1. a run records what it read, by content; a resume checks it -----------------------------------------

def test_an_rl_run_records_its_init_by_resolved_path_and_the_sha256_of_its_weights(sft_and_rl):
    state, _ = checkpoint.read_state(sft_and_rl["rl"])
    seen = state["run"]["init"]
    assert seen["path"] == str(sft_and_rl["sft"].resolve()) and state["init"] == seen["path"]
    import hashlib
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):  # computed here, independently of run_folder
        digest.update(name.encode() + b"\0" + (sft_and_rl["sft"] / name).read_bytes())
    assert seen["sha256"] == digest.hexdigest()


def test_a_relative_init_is_resolved_at_the_start(sft_and_rl, tmp_path, monkeypatch):
    monkeypatch.chdir(sft_and_rl["sft"].parent)
    opts = new_opts("micro", "sft", tmp_path / "rl")
    _, _, record = run_folder.resolve(opts, "rl")
    assert opts.init == str(sft_and_rl["sft"].resolve()) == record["init"]["path"]


@pytest.mark.parametrize("change", ["retrained", "missing"])
def test_a_resume_refuses_an_init_that_changed_or_is_gone_in_one_line(sft_and_rl, tmp_path, change):
    sft, rl = tmp_path / "sft", tmp_path / "rl"
    shutil.copytree(sft_and_rl["sft"], sft)
    shutil.copytree(sft_and_rl["rl"], rl)
    for state_file in rl.rglob(checkpoint.STATE):  # the copy's record names the copied SFT
        state = json.loads(state_file.read_text())
        state["run"]["init"]["path"] = state["init"] = str(sft)
        state_file.write_text(json.dumps(state))
    if change == "missing":
        shutil.rmtree(sft)
    else:  # same shapes and headers, other weights: as a retrained SFT
        from safetensors.torch import load_file, save_file
        weights = load_file(sft / "model.safetensors")
        weights["model.language_model.norm.weight"] += 1.0
        save_file(weights, sft / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RunFolderError, match=f"--init {sft} is (missing|not the folder the run read)"):
        run_folder.resolve(resume_opts(rl, "max_steps=3"), "rl")


# --- 2. --init brings its own model shape (one rule: train_rl.py, eval.py, bench) ---------------------------

def test_an_init_of_another_shape_is_adopted_and_recorded(tmp_path, capsys):
    init = _wider_checkpoint(tmp_path / "wide")
    cfg, _, _ = run_folder.resolve(new_opts("micro", init, tmp_path / "rl"), "rl")
    assert (cfg.text_hidden, cfg.text_intermediate, cfg.vision_depth) == (64, 96, 1)
    assert cfg.name == "micro" and cfg.max_new_tokens == get_config("micro").max_new_tokens  # only the shape
    assert "text_hidden 32 -> 64" in capsys.readouterr().out


def test_a_model_folder_gives_any_preset_its_exact_shape(tmp_path):
    from atlas_min.model import adopt_shape
    init = _wider_checkpoint(tmp_path / "wide")
    cfg, changed = adopt_shape(get_config("toy"), init, "--init")
    assert changed["text_hidden"] == [128, 64] and changed["vision_hidden"] == [64, 32]
    assert adopt_shape(cfg, init, "--init")[1] == {}  # the adopted config describes the folder exactly


# --- 5. the unclear cases: one line each, before the work where the input is known before it ---------------

def test_a_full_disk_on_a_metrics_append_is_one_error_and_leaves_no_half_line_or_empty_file(tmp_path, monkeypatch):
    import errno

    from atlas_min import cli
    progress = cli.Progress(tmp_path, "sft", 0, 3, get_config("micro"))
    progress.log(0, loss=1.0)
    before = (tmp_path / "metrics_sft.jsonl").read_bytes()
    real_open = open

    class Full:  # the disk fills after a few bytes of the line
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(RunFolderError, match=r"metrics_sft.jsonl: cannot append step 2's record \(No space left"):
        progress.log(1, loss=0.5)
    assert (tmp_path / "metrics_sft.jsonl").read_bytes() == before  # no half line
    with pytest.raises(RunFolderError, match=r"samples_sft.jsonl: cannot append"):
        progress.samples(1, [{"text": "a"}])
    assert not (tmp_path / "samples_sft.jsonl").exists()  # no empty file


def test_a_dead_judge_url_is_refused_in_one_line_before_the_decode(sft_and_rl, tmp_path):
    out = run("eval.py", "--ckpt", sft_and_rl["sft"], "--out", tmp_path / "eval.json", "--judge-url",
              "http://127.0.0.1:9", check=False)  # port 9 (discard): nothing listens
    refused(out, "judge http://127.0.0.1:9: no answer to GET http://127.0.0.1:9/v1/models")
    assert "accuracy" not in out.stdout and not (tmp_path / "eval.json").exists()


def test_torchrun_with_an_indivisible_batch_says_so_once_before_the_run_folder_is_made(tmp_path):
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", "batch_size=5", procs=2, check=False)
    ours = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode != 0 and ours == ["error: batch_size=5 must be divisible by the 2 processes"]
    assert out.stderr.lstrip().startswith(ours[0])  # before torchrun's own report of the failed workers
    assert not (tmp_path / "run").exists()
