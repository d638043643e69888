"""Sharded checkpoints (atlas_min.checkpoint): each rank writes its own shard, a checkpoint saved by N processes
resumes on M, damaged or old-format ones are named; images are checked once per job; RL validation decodes
under the eval protocol's image bounds. ~70 s on 2 cores (two micro runs of 4 steps, 1 and 2 processes, and
the resumes from their step 2)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from atlas_min import checkpoint
from test_train import ROOT, _env, max_diff, run, weights

COMMON = ["--config", "micro", "max_steps=4", "save_every=2"]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """A 4-step micro SFT on 1 process: checkpoints/step_000002 and the final model (step 4)."""
    out = tmp_path_factory.mktemp("one") / "run"
    run("train_sft.py", *COMMON, "--out", out)
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The same run on 2 processes."""
    out = tmp_path_factory.mktemp("two") / "run"
    run("train_sft.py", *COMMON, "--out", out, procs=2)
    return out


def test_a_checkpoint_saved_by_two_processes_holds_metadata_and_one_shard_file_per_rank(two):
    step = two / "checkpoints" / "step_000002"
    assert (step / ".metadata").is_file()
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step / "optimizer.safetensors").exists() and not (step / "sharded").exists()
    assert checkpoint.problem(step) is None


@pytest.mark.parametrize("saved_by, procs", [("two", 1), ("one", 2)])
def test_a_checkpoint_saved_by_n_processes_resumes_on_m_to_the_weights_of_a_run_never_stopped(
        request, tmp_path, one, saved_by, procs):
    step2 = request.getfixturevalue(saved_by) / "checkpoints" / "step_000002"
    assert max_diff(weights(step2), weights(one)) > 1e-3  # steps 3 and 4 moved the weights
    run("train_sft.py", "--resume", step2, "--out", tmp_path / "branch", procs=procs)  # on to step 4
    assert max_diff(weights(tmp_path / "branch"), weights(one)) < 1e-5


def test_a_shard_file_cut_short_is_named_and_the_resume_skips_that_checkpoint(tmp_path, two):
    run_dir = tmp_path / "run"
    shutil.copytree(two, run_dir)
    shard = run_dir / "__1_0.distcp"  # the final checkpoint's (step 4), rank 1's AdamW shard
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint.problem(run_dir) == "__1_0.distcp (AdamW state) is missing or shorter than .metadata says"
    assert checkpoint.find(run_dir) == run_dir / "checkpoints" / "step_000002"


def test_an_unreadable_metadata_file_is_named(tmp_path, two):
    step = shutil.copytree(two / "checkpoints" / "step_000002", tmp_path / "step")
    (step / ".metadata").write_bytes(b"garbage")
    assert checkpoint.problem(step).startswith("unreadable (CheckpointError: .metadata cannot be read")


def test_an_old_format_checkpoint_is_refused_in_one_line_naming_the_format(tmp_path, one):
    old = shutil.copytree(one / "checkpoints" / "step_000002", tmp_path / "old")
    for name in [".metadata", *(p.name for p in old.glob("*.distcp"))]:
        (old / name).unlink()
    save_file({"lm_head.weight::exp_avg": torch.zeros(2)}, old / "optimizer.safetensors")  # AdamW state before DCP
    out = run("train_sft.py", "--resume", old, "--out", tmp_path / "new", "max_steps=6", check=False)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "an old-format checkpoint (AdamW state in one optimizer.safetensors" in lines[0]


def test_the_final_save_writes_its_temporary_folder_inside_the_run_folder(micro, micro_cfg, tmp_path, monkeypatch):
    model, tokenizer, image_processor = micro
    run_dir = tmp_path / "parent" / "run"
    run_dir.mkdir(parents=True)  # a claimed run folder: the one place a run proved it may write
    temporary, finish = [], checkpoint._finish

    def spy(folder, tmp, *args):
        temporary.append(tmp)
        return finish(folder, tmp, *args)
    monkeypatch.setattr(checkpoint, "_finish", spy)
    checkpoint.save(run_dir, model, tokenizer, image_processor, micro_cfg, 1)
    assert temporary[0].parent == run_dir and not temporary[0].exists()
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["run"]
    assert checkpoint.problem(run_dir, resumable=False) is None


IMAGE_COUNT = """
import json, sys
from atlas_min import data
from atlas_min.config import get_config
from atlas_min.dist import all_gather_objects, cleanup, setup
rank = setup()[0]
opened, inspect = [], data.inspect_image
data.inspect_image = lambda path: opened.append(path) or inspect(path)
examples = data.load_examples(get_config("micro"), "train")
sizes = [ex["image_sizes"] for ex in examples]
seen = all_gather_objects({"opened": len(opened), "sizes": sizes, "n": len(examples)})
if rank == 0:
    print(json.dumps(seen[0] | {"rank1_opened": seen[1]["opened"], "same_sizes": seen[0]["sizes"] == seen[1]["sizes"]}))
cleanup()
"""


def test_under_torchrun_only_rank_0_opens_the_images_and_every_rank_gets_their_sizes(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(IMAGE_COUNT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = subprocess.run(launcher + [str(script)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    images = sum(len(s) for s in seen["sizes"])
    assert seen["n"] > 0 and images >= seen["n"] and seen["opened"] == images  # rank 0 opened each image once
    assert seen["rank1_opened"] == 0 and seen["same_sizes"]


def test_the_eval_image_processor_takes_the_eval_bounds_and_leaves_trainings_untouched(micro_cfg, micro):
    from atlas_min.config import get_config
    from atlas_min.model import eval_image_processor
    image_processor = micro[2]
    before = dict(image_processor.size)
    assert eval_image_processor(image_processor, micro_cfg) is image_processor  # no eval bounds set: the same
    cfg = get_config("micro", ["eval_min_pixels=3136", "eval_max_pixels=12544"])
    assert dict(eval_image_processor(image_processor, cfg).size) == {"shortest_edge": 3136, "longest_edge": 12544}
    assert dict(image_processor.size) == before


def test_rl_measures_its_held_out_prompts_under_the_eval_image_bounds(tmp_path, one):
    # 2000 × 2000 pixels (~5,100 image tokens) overflow micro's 4,096 positions under the eval bounds only
    out = run("train_rl.py", "--config", "micro", "--init", one, "--out", tmp_path / "rl", "eval_every=1",
              "eval_min_pixels=4000000", "eval_max_pixels=4000000", "max_steps=1", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "longer than the model's context" in out.stderr and "eval.jsonl" in out.stderr
    assert not (tmp_path / "rl" / "metrics_rl.jsonl").exists()
