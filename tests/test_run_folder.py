"""What a run folder may become, and what a command may write (atlas_min.run_folder): one rule per test.

The scripts run as a user runs them (one line "error: ...", exit 2, nothing changed on disk); rules that
need no training run are checked in-process on `run_folder.resolve`, the function the scripts call.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import safetensors.torch

from atlas_min import checkpoint, run_folder
from atlas_min.config import CHOICES, TOY_TASKS, ConfigError, get_config, to_dict
from atlas_min.run_folder import RunFolderError
from test_train import ROOT, _env, run


def refused(out, message):
    """The command failed in exactly one line "error: ..." that holds `message`, and with no traceback."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        out.stderr[-2000:]


def snapshot(folder):
    """Every file under `folder` with the hash of its bytes: equal snapshots, an untouched folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def copy_of(folder, tmp_path, name="run"):
    shutil.copytree(folder, tmp_path / name)
    return tmp_path / name


def resume_opts(folder, *overrides, out=None, init=None):
    return Namespace(resume=str(folder), out=out, overwrite=False, config=None, overrides=list(overrides), init=init)


@pytest.fixture(scope="module")
def sft4(tmp_path_factory):
    """A finished 4-step micro SFT run: the final model (step 4) and checkpoints/step_000001..3."""
    out = tmp_path_factory.mktemp("sft4") / "run"
    run("train_sft.py", "--config", "micro", "--out", out, "max_steps=4", "save_every=1")
    return out


# --- check, then change: --overwrite and inputs -------------------------------------------------------------

def test_overwrite_of_a_folder_a_live_run_holds_changes_nothing(sft4, tmp_path):
    folder = copy_of(sft4, tmp_path)
    (folder / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive
    before = snapshot(folder)
    refused(run("train_sft.py", "--config", "micro", "--out", folder, "--overwrite", check=False),
            "is in use by another run")
    assert snapshot(folder) == before


def test_overwrite_never_deletes_an_init_inside_out(sft4, tmp_path):
    folder = copy_of(sft4, tmp_path)
    before = snapshot(folder)
    out = run("train_rl.py", "--config", "micro", "--init", folder / "checkpoints" / "step_000002", "--out", folder,
              "--overwrite", check=False)
    refused(out, "is the --init folder or holds it")
    assert snapshot(folder) == before


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "eval.jsonl"])
def test_eval_never_writes_its_result_over_one_of_its_inputs(sft4, toy_files, tmp_path, target):
    ckpt = copy_of(sft4, tmp_path, "ckpt")
    data = copy_of(Path(toy_files[1]).parent, tmp_path, "data") / "eval.jsonl"  # the benchmark file
    out = data if target == "eval.jsonl" else ckpt / target
    before = snapshot(tmp_path)
    refused(run("eval.py", "--ckpt", ckpt, "--data", data, "--out", out, check=False),
            "is an input of this command")
    assert snapshot(tmp_path) == before


def test_eval_may_replace_an_earlier_eval_json_in_the_checkpoint(sft4, tmp_path):
    ckpt = copy_of(sft4, tmp_path, "ckpt")
    (ckpt / "eval_blind.json").write_text("{}")
    run_folder.check_output(ckpt / "eval_blind.json", [ckpt])  # no error
    with pytest.raises(RunFolderError, match="is an input"):
        run_folder.check_output(ckpt / "trainer_state.json", [ckpt])


def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunFolderError, match="cannot write there"):
        run_folder.check_output(tmp_path / "a_file" / "eval.json")  # its "folder" is a file


def test_convert_never_writes_over_its_input(tmp_path, capsys):
    from atlas_min.convert import main
    source = tmp_path / "bench.jsonl"
    source.write_text('{"qid": 1, "question": "2+2?", "gt_answer": "4"}\n')
    (tmp_path / "alias.jsonl").symlink_to(source)  # another name, the same file once resolved
    assert main(["harness", str(source), str(tmp_path / "alias.jsonl")]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert source.read_text() == '{"qid": 1, "question": "2+2?", "gt_answer": "4"}\n'


def test_convert_of_an_empty_list_is_an_error_and_writes_nothing(tmp_path, capsys):
    from atlas_min.convert import main
    (tmp_path / "empty.json").write_text("[]")
    assert main(["harness", str(tmp_path / "empty.json"), str(tmp_path / "out.jsonl")]) == 2
    assert "holds no records" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()


# --- a run's settings are fixed at its start ---------------------------------------------------------------

def test_the_trainer_state_records_the_config_the_data_file_and_the_commit(sft4):
    state = json.loads((sft4 / "trainer_state.json").read_text())
    assert state["config"] == to_dict(get_config("micro", ["max_steps=4", "save_every=1"]))
    data = Path(state["run"]["data"]["path"])
    assert data.name == "train.jsonl" and state["run"]["data"]["bytes"] == data.stat().st_size
    assert state["run"]["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert state["run"]["commit"].startswith(head) if head else state["run"]["commit"] is None
    assert state["run"]["resumes"] == []


def test_a_resume_that_changes_what_the_run_computes_is_refused_in_one_line_naming_the_fields(sft4, tmp_path):
    folder = copy_of(sft4, tmp_path)
    before = snapshot(folder)
    refused(run("train_sft.py", "--resume", folder, "max_steps=6", "sft_lr=0.5", "seed=7", check=False),
            "seed 0 -> 7, sft_lr 0.002 -> 0.5 would change what the run computes")
    assert snapshot(folder) == before


@pytest.mark.parametrize("stage, overrides, named", [
    ("sft", ["text_hidden=64"], "text_hidden 32 -> 64"),
    ("rl", ["anchor_coef=0", "kl_coef=0"], "kl_coef 0.01 -> 0.0, anchor_coef 0.5 -> 0.0"),
])
def test_a_resume_may_not_change_the_model_or_the_loss(sft4, tmp_path, stage, overrides, named):
    folder = copy_of(sft4, tmp_path)
    if stage == "rl":  # an RL checkpoint is an SFT one whose trainer state names its init
        state = json.loads((folder / "trainer_state.json").read_text())
        (folder / "trainer_state.json").write_text(json.dumps(state | {"init": str(sft4)}))
    with pytest.raises(RunFolderError, match=named):
        run_folder.resolve(resume_opts(folder, "max_steps=6", *overrides), stage)


def test_a_resume_may_change_the_runs_length_and_records_the_change_with_its_step(sft4, tmp_path):
    folder = copy_of(sft4, tmp_path)
    run("train_sft.py", "--resume", folder, "max_steps=5", "log_every=2")
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["config"]["max_steps"] == 5
    [entry] = state["run"]["resumes"]
    assert entry["step"] == 4 and entry["changed"] == {"max_steps": [4, 5], "log_every": [1, 2]}


def test_a_resume_refuses_train_data_that_changed_since_the_start(sft4, toy_files, tmp_path):
    folder = copy_of(sft4, tmp_path)
    data = copy_of(Path(toy_files[0]).parent, tmp_path, "data") / "train.jsonl"  # the same bytes, elsewhere
    state = json.loads((folder / "trainer_state.json").read_text())
    state["config"]["train_data"] = str(data)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    run_folder.resolve(resume_opts(folder, "max_steps=6"), "sft")  # the same bytes: it may go on
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # one example fewer
    with pytest.raises(RunFolderError, match="is not the file this run started with"):
        run_folder.resolve(resume_opts(folder, "max_steps=6"), "sft")


def test_resume_with_init_is_refused(sft4):
    with pytest.raises(RunFolderError, match="--init goes with a new run only"):
        run_folder.resolve(resume_opts(sft4, "max_steps=6", init=str(sft4)), "rl")


# --- history is linear; a branch is a new folder ------------------------------------------------------------

def test_resume_into_a_folder_that_holds_another_run_is_refused(sft4, tmp_path):
    a, b = copy_of(sft4, tmp_path, "a"), copy_of(sft4, tmp_path, "b")
    before = snapshot(b)
    refused(run("train_sft.py", "--resume", a, "--out", b, "max_steps=6", check=False), "holds another run")
    assert snapshot(b) == before


def test_going_back_to_an_older_checkpoint_in_its_own_run_folder_is_refused(sft4, tmp_path):
    folder = copy_of(sft4, tmp_path)
    before = snapshot(folder)
    refused(run("train_sft.py", "--resume", folder / "checkpoints" / "step_000002", "max_steps=6", check=False),
            "(step 2) is older than")
    assert snapshot(folder) == before


def test_going_back_into_a_new_folder_branches_and_a_plain_resume_follows_the_branch(sft4, tmp_path):
    before, branch = snapshot(sft4), tmp_path / "branch"
    run("train_sft.py", "--resume", sft4 / "checkpoints" / "step_000002", "--out", branch, "max_steps=3")
    run("train_sft.py", "--resume", branch, "max_steps=4")
    state = json.loads((branch / "trainer_state.json").read_text())
    assert state["step"] == 4 and [r["step"] for r in state["run"]["resumes"]] == [2, 3]
    assert state["run"]["resumes"][0]["from"] == str(sft4 / "checkpoints" / "step_000002")
    assert snapshot(sft4) == before  # the run it branched from is as it was


# --- divergence stops the run -------------------------------------------------------------------------------

def test_a_diverging_sft_run_stops_in_one_line_and_keeps_only_checkpoints_of_finite_steps(tmp_path):
    folder = tmp_path / "run"
    out = run("train_sft.py", "--config", "micro", "--out", folder, "sft_lr=1e30", "max_steps=8", "save_every=1",
              check=False)
    refused(out, "not finite for 3 step(s) in a row")
    losses = [json.loads(line)["loss"] for line in (folder / "metrics_sft.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[0] < 100 and all(loss != loss for loss in losses[1:])  # step 1 finite, then NaN
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_000001"]
    assert not (folder / "model.safetensors").exists() and not (folder / ".lock").exists()


def test_a_non_finite_step_is_counted_and_a_finite_one_resets_the_count():
    from atlas_min.optim import count_nonfinite
    assert count_nonfinite(0, False, 5, 10, 3) == 1
    assert count_nonfinite(1, False, 6, 10, 3) == 2
    assert count_nonfinite(2, True, 7, 10, 3) == 0


@pytest.mark.parametrize("streak, step, says", [(2, 5, "step 6: the loss or gradient norm was not finite for 3"),
                                                (0, 9, "step 10: the loss or gradient norm was not finite for 1")])
def test_the_limit_or_a_non_finite_last_step_ends_the_run(streak, step, says):
    from atlas_min.optim import DivergedError, count_nonfinite
    with pytest.raises(DivergedError, match=says):
        count_nonfinite(streak, False, step, 10, 3)


def test_an_rl_policy_that_is_not_finite_stops_the_run_in_one_line_unsaved(sft4, tmp_path):
    from safetensors.torch import load_file, save_file
    init = copy_of(sft4, tmp_path, "init")
    weights = load_file(init / "model.safetensors")
    weights["model.language_model.layers.0.mlp.down_proj.weight"].fill_(float("nan"))
    save_file(weights, init / "model.safetensors", metadata={"format": "pt"})
    out = run("train_rl.py", "--config", "micro", "--init", init, "--out", tmp_path / "rl", "max_steps=3",
              "save_every=1", check=False)
    refused(out, "not finite: the run diverged")
    assert not list(tmp_path.glob("rl/**/model.safetensors"))


# --- refuse what cannot work, before any work ---------------------------------------------------------------

@pytest.mark.parametrize("knob, named", [
    ("toy_token_slip=2", "toy_token_slip=2.0: must be in [0, 1]"),
    ("toy_reply=medium", "toy_reply='medium': must be one of short, long"),
    ("toy_tasks=shape,foo", "toy_tasks='shape,foo': must be a comma-separated list"),
    ("group_size=1", "group_size=1: must be >= 2"),
    ("text_heads=5", "text_heads=5: must be a multiple of text_kv_heads"),
    ("text_kv_heads=3", "text_heads=4: must be a multiple of text_kv_heads=3"),
    ("vision_heads=3", "vision_heads=3: must be a divisor of vision_hidden"),
    ("mrope_section=1,2", "mrope_section='1,2': must be three counts"),
    ("mrope_section=1,1,1", "summing to half the text head size (4)"),
    ("max_steps=-1", "max_steps=-1: must be >= 0"),
    ("group_size=0", "group_size=0: must be > 0"),
    ("batch_size=0", "batch_size=0: must be > 0"),
    ("micro_batch_size=0", "micro_batch_size=0: must be > 0"),
    ("max_new_tokens=0", "max_new_tokens=0: must be > 0"),
    ("log_every=0", "log_every=0: must be > 0"),
    ("sft_lr=nan", "sft_lr=nan: must be a finite number"),
    ("save_every=-1", "save_every=-1: must be >= 0"),
    ("top_p=1.5", "top_p=1.5: must be in (0, 1]"),
    ("anchor_coef=-0.5", "anchor_coef=-0.5: must be >= 0"),
    ("sft_beta2=1", "sft_beta2=1.0: must be in [0, 1)"),
    ("answer_format=json", "answer_format='json': must be one of tag, boxed"),
    ("eval_min_pixels=3136", "eval_max_pixels=0: must be set with eval_min_pixels"),
    ("eval_max_pixels=3136", "eval_min_pixels=0: must be set with eval_max_pixels"),
])
def test_a_config_that_cannot_build_or_train_is_refused_naming_the_field(knob, named):
    with pytest.raises(ConfigError) as e:
        get_config("micro", [knob])
    assert named in str(e.value)


def test_eval_pixel_bounds_with_min_above_max_are_refused_naming_both():
    with pytest.raises(ConfigError, match="eval_min_pixels=5000: must be <= eval_max_pixels=4000"):
        get_config("micro", ["eval_min_pixels=5000", "eval_max_pixels=4000"])


def test_every_preset_passes_its_own_checks_and_the_toy_lists_match_the_toy_world():
    from atlas_min import toy
    from atlas_min.config import PRESETS
    for name in PRESETS:
        get_config(name)
    assert TOY_TASKS == tuple(toy.ANSWERS) and CHOICES["toy_reply"] == toy.REPLY_LENGTHS


def test_a_bad_toy_knob_leaves_no_run_folder(tmp_path):
    refused(run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", "toy_tasks=shape,foo", check=False),
            "toy_tasks='shape,foo'")
    assert not (tmp_path / "run").exists()


def test_a_model_path_that_is_not_qwen2_5_vl_is_named_before_any_weight_is_read(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 48}))  # no weights
    out = run("train_sft.py", "--config", "micro", f"model_path={tmp_path / 'gpt2'}", "--out", tmp_path / "run",
              check=False)
    refused(out, "not a Qwen2.5-VL model (its config.json says model_type 'gpt2')")
    assert not (tmp_path / "run").exists()


def test_a_text_only_qwen2_folder_is_named_as_not_qwen2_5_vl(tmp_path):
    from test_judge import CHAT, _save_tiny_model
    folder = _save_tiny_model(tmp_path / "qwen2", CHAT)
    with pytest.raises(checkpoint.CheckpointError, match="model_type 'qwen2'"):
        checkpoint.require_model(folder, "model_path")


def test_an_init_whose_config_json_was_overwritten_is_refused_not_built(sft4, tmp_path):
    folder = copy_of(sft4, tmp_path)
    (folder / "config.json").write_text(json.dumps({"accuracy": 0.0, "n": 20}))  # an eval.json written over it
    with pytest.raises(checkpoint.CheckpointError, match="not a Qwen2.5-VL model"):
        run_folder.resolve(Namespace(resume=None, out=str(tmp_path / "rl"), overwrite=False, config="micro",
                                     overrides=[], init=str(folder)), "rl")


def test_a_truncated_model_is_named_for_eval_and_init_as_for_resume(sft4, tmp_path):
    folder = copy_of(sft4, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"--init .*: unreadable \(SafetensorError"):
        checkpoint.require_model(folder, "--init")
    assert checkpoint.problem(folder).startswith("unreadable (SafetensorError")  # what --resume prints


def test_a_missing_model_path_is_named(tmp_path):
    opts = Namespace(resume=None, out=str(tmp_path / "run"), overwrite=False, config="micro",
                     overrides=[f"model_path={tmp_path / 'nowhere'}"])
    with pytest.raises(checkpoint.CheckpointError, match="model_path .*nowhere: not a model folder"):
        run_folder.resolve(opts, "sft")


def test_train_data_without_examples_is_refused_in_one_line_and_leaves_no_folder(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", f"train_data={tmp_path / 'empty.jsonl'}",
              check=False)
    refused(out, "empty.jsonl: holds no examples")
    assert not (tmp_path / "run").exists()  # neither the folder it made nor a stale lock


def test_skipping_every_example_is_an_error_not_an_empty_run():
    from atlas_min.data import DataError, keep_good
    examples = [{"where": "d.jsonl:1"}, {"where": "d.jsonl:2"}]
    bad = ["d.jsonl:1: field 'images[0]': x", "d.jsonl:2: field 'images[0]': y"]
    with pytest.raises(DataError, match="dropped them all"):
        keep_good(examples, bad, "with a bad image", skip=True, on_skip=None)


def test_a_symlink_loop_in_images_is_a_data_error_naming_the_line(tmp_path):
    from atlas_min.data import DataError, load_jsonl
    os.symlink("b.png", tmp_path / "a.png")
    os.symlink("a.png", tmp_path / "b.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "1", "images": ["a.png"], "question": "q", "answer": "a",
                                                  "task": "t"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'images\[0\]'"):
        load_jsonl(tmp_path / "d.jsonl")


def test_plan_refuses_a_gpu_count_the_trainers_refuse(monkeypatch, capsys):
    from atlas_min import plan
    monkeypatch.setattr(sys, "argv", ["plan", "--config", "qwen2_5_vl_7b", "--gpus", "3"])
    with pytest.raises(SystemExit) as e:
        plan.main()
    assert e.value.code == 2 and "must be divisible by the 3 processes" in capsys.readouterr().err


def test_two_ranks_errors_come_on_lines_of_their_own(tmp_path, micro_cfg):
    from atlas_min.model import build_model, build_tokenizer
    from atlas_min.toy import corpus
    tokenizer = build_tokenizer(corpus(micro_cfg), micro_cfg.tokenizer_vocab)  # an init without functional tokens:
    build_model(micro_cfg, tokenizer).save_pretrained(tmp_path / "init")     # every rank finds it, after dist.setup
    tokenizer.save_pretrained(tmp_path / "init")
    out = run("train_rl.py", "--config", "micro", "--init", tmp_path / "init", "--out", tmp_path / "run", procs=2,
              check=False)
    ours = [line for line in out.stderr.splitlines() if "has no functional tokens" in line]
    said = f"error: {tmp_path / 'init'} has no functional tokens: pass a checkpoint made by train_sft.py"
    assert sorted(ours) == [said, "rank 1: " + said], out.stderr[-2000:]


# --- finished work is never lost to a late error ------------------------------------------------------------

def test_a_save_that_fails_removes_its_temporary_folder_and_keeps_the_last_checkpoint(micro, micro_cfg, tmp_path,
                                                                                       monkeypatch):
    model, tokenizer, image_processor = micro
    checkpoint.save(checkpoint.step_folder(tmp_path, 1), model, tokenizer, image_processor, micro_cfg, 1)
    before = snapshot(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save", full_disk)  # where each rank's shard of the weights is written
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot save step 2 .*\(No space left on device\)"):
        checkpoint.save(checkpoint.step_folder(tmp_path, 2), model, tokenizer, image_processor, micro_cfg, 2)
    assert snapshot(tmp_path) == before and not list(tmp_path.rglob(".tmp-*"))


def test_a_judge_that_cannot_load_fails_before_the_decode(sft4, tmp_path):
    out = run("eval.py", "--ckpt", sft4, "--out", tmp_path / "eval.json", "--judge", sft4, check=False)  # a VL model
    refused(out, "cannot load a causal LM")
    assert "accuracy" not in out.stdout and not (tmp_path / "eval.json").exists()


def test_a_judge_folder_without_a_tokenizer_is_an_error_naming_it(tmp_path):
    from test_judge import CHAT, _save_tiny_model
    from atlas_min.judge import JudgeError, load_judge
    folder = _save_tiny_model(tmp_path / "judge", CHAT)
    for name in [*folder.glob("tokenizer*"), *folder.glob("special_tokens_map.json")]:
        name.unlink()
    with pytest.raises(JudgeError, match=f"judge model {folder}: no tokenizer"):
        load_judge(folder)


def test_bench_refuses_a_json_destination_that_is_a_folder_before_measuring(tmp_path):
    out = subprocess.run([sys.executable, "-m", "atlas_min.bench", "--config", "micro", "--json", str(tmp_path)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    refused(out, "is a folder")
    assert "tokens/s" not in out.stdout


@pytest.fixture(scope="module")
def evaluated(sft4, tmp_path_factory):
    """eval.py on sft4 with --config micro (sft4 trained with max_steps=4 save_every=1) and --intervene."""
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    done = run("eval.py", "--ckpt", sft4, "--config", "micro", "--out", out, "--intervene", "eval_max_new_tokens=1")
    return done, json.loads(out.read_text())


def test_eval_json_records_the_config_the_checkpoint_the_data_hash_and_the_protocol(evaluated, sft4, toy_files):
    _, result = evaluated
    data = Path(toy_files[1])
    assert result["config"] == "micro" and result["checkpoint"] == str(sft4.resolve())
    assert result["data"] == {"path": str(data.resolve()), "bytes": data.stat().st_size,
                              "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert result["protocol"]["eval_max_new_tokens"] == 1 and result["protocol"]["answer_format"] == "tag"


def test_eval_with_a_config_other_than_the_checkpoints_own_names_the_fields_that_differ(evaluated):
    done, _ = evaluated
    [note] = [line for line in done.stdout.splitlines() if line.startswith("note: --config micro differs")]
    assert "2 field(s): max_steps, save_every" in note


def test_intervene_without_any_functional_token_says_there_was_none_to_replace(evaluated):
    done, result = evaluated
    assert result["intervention"] == {}  # one new token of a 4-step model: "Let", never a functional token
    assert "no output held a functional token" in done.stdout
