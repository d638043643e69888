"""The scripts as a user runs them: train_sft.py, train_rl.py and eval.py on the micro preset."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")


def run(*args, procs=1, check=True, env=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
    out = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, env=_env() | (env or {}), capture_output=True,
                         text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    if args[0] == "train_rl.py" and out.returncode == 0:  # every RL run of this file must have learned
        assert_learned(Path(args[list(args).index("--out" if "--out" in args else "--resume") + 1]))
    return out


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_learned(rl_run):
    """An RL run learned: some group's rewards differed (so some advantage was not 0), some gradient was not 0,
    and its weights moved from its --init. A test that two RL runs are equal proves nothing without it: from an
    SFT whose every reward is 0 (a 3-step micro SFT) every group is constant and no weight moves."""
    records = [json.loads(line) for line in (rl_run / "metrics_rl.jsonl").read_text().splitlines()]
    assert min(r["constant_group_share"] for r in records) < 1.0, f"{rl_run}: every group's rewards were equal"
    assert max(r["grad_norm"] for r in records) > 0.0, f"{rl_run}: every gradient was 0"
    init = json.loads((rl_run / "trainer_state.json").read_text())["init"]
    assert max_diff(weights(rl_run), weights(init)) > 1e-6, f"{rl_run}: no weight moved from {init}"


def assert_trained(sft_run, micro_init):
    """An SFT run moved its weights from the micro preset's random init (the one train_sft.py starts from)."""
    assert max_diff(weights(sft_run), micro_init) > 1e-4, f"{sft_run}: no weight moved from the init"


@pytest.fixture(scope="session")
def micro_init():
    """The micro preset's random-init weights (seed 0), as train_sft.py builds them."""
    from atlas_min.config import get_config
    from atlas_min.model import init_model
    state = init_model(get_config("micro"))[0].state_dict()
    return {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: saved once, as embed_tokens


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    run("train_sft.py", "--config", "micro", "--out", out, "max_steps=3", "save_every=1")
    return out


# RL with 2 mini-batches of 2 prompts per step and 2 PPO epochs: 4 updates a step, each of whole groups. On 2
# processes each rank holds 1 prompt of each mini-batch (data.rank_share).
RL = ["--config", "micro", "prompts_per_step=4", "rl_mini_batch=8", "ppo_epochs=2"]


def test_sft_loss_is_the_mean_cross_entropy_over_reply_tokens():
    import math
    from atlas_min.model import reply_nll
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])  # prompt/padding are -100
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(1, 5):  # the token at t is predicted by the logits at t-1
            if labels[b, t] != -100:
                row = logits[b, t - 1].tolist()
                expected += math.log(sum(math.exp(x) for x in row)) - row[labels[b, t]]
                count += 1
    nll = reply_nll(logits, labels)
    assert count == 6
    assert abs(nll.sum().item() / count - expected / count) < 1e-5
    assert (nll[labels[:, 1:] == -100] == 0).all()


def test_gradient_accumulation_of_micro_batches_equals_one_big_batch(tmp_path, micro_init):
    run("train_sft.py", "--config", "micro", "--out", tmp_path / "big", "max_steps=2", "batch_size=8", "micro_batch_size=8")
    run("train_sft.py", "--config", "micro", "--out", tmp_path / "acc", "max_steps=2", "batch_size=8", "micro_batch_size=2")
    assert_trained(tmp_path / "big", micro_init)
    assert max_diff(weights(tmp_path / "big"), weights(tmp_path / "acc")) < 1e-5  # Adam amplifies float32 noise


@pytest.fixture(scope="session")
def sft_two_procs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft2") / "run"
    run("train_sft.py", "--config", "micro", "--out", out, "max_steps=3", procs=2)
    return out


@pytest.fixture(scope="session")
def rl_two_procs(tmp_path_factory, learning_sft):
    out = tmp_path_factory.mktemp("rl2") / "run"
    run("train_rl.py", *RL, "max_steps=3", "--init", learning_sft, "--out", out, procs=2)
    return out


def test_one_and_two_processes_reach_the_same_sft_weights(sft_run, sft_two_procs, micro_init):
    assert_trained(sft_run, micro_init)
    assert max_diff(weights(sft_run), weights(sft_two_procs)) < 1e-5


def _kill_after(args, folder):
    """Start a run, SIGKILL it as soon as `folder` appears (possibly mid-write of the next one)."""
    proc = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not folder.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert folder.exists(), "the run ended before its checkpoint appeared"


@pytest.mark.parametrize("script", ["train_sft.py", "train_rl.py"])
def test_sigkill_then_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, learning_sft, micro_init, script):
    args = [*RL, "--init", learning_sft] if script == "train_rl.py" else ["--config", "micro"]
    common = ["max_steps=12", "save_every=2"]
    run(script, *args, "--out", tmp_path / "straight", *common)  # an RL run: `run` asserts that it learned
    if script == "train_sft.py":
        assert_trained(tmp_path / "straight", micro_init)
    killed = tmp_path / "killed"
    _kill_after([script, *args, "--out", killed, *common], killed / "checkpoints" / "step_000004")
    run(script, "--resume", killed)
    state = json.loads((killed / "trainer_state.json").read_text())
    assert state["step"] == 12
    a, b = weights(tmp_path / "straight"), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_loads_with_stock_transformers(sft_run):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from atlas_min.tokens import FUNCTIONAL_TOKENS
    tokenizer = AutoTokenizer.from_pretrained(sft_run)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(sft_run)
    ours = weights(sft_run)
    theirs = model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in FUNCTIONAL_TOKENS)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)


def test_intermediate_checkpoints_are_folders_named_by_step(sft_run):
    # max_steps=3, save_every=1: steps 1 and 2 are intermediate; step 3 is the run folder itself
    assert sorted(s.name for s in (sft_run / "checkpoints").glob("step_*")) == ["step_000001", "step_000002"]


def test_intermediate_checkpoints_load_with_stock_transformers(sft_run):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    for step in sorted((sft_run / "checkpoints").glob("step_*")):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(step)
        AutoTokenizer.from_pretrained(step)
        saved = weights(step)
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)


def test_rl_on_one_and_two_processes_updates_on_the_same_groups_and_ends_at_the_same_weights(tmp_path, learning_sft,
                                                                                             rl_two_procs):
    # 3 steps of 2 mini-batches × 2 epochs: each update's groups and normalisers are those of 1 process, so only
    # the order of float sums differs (a split by contiguous blocks of prompts ends ~1e-3 apart: two runs)
    run("train_rl.py", *RL, "max_steps=3", "--init", learning_sft, "--out", tmp_path / "one")  # learned: `run`
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics_rl.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (rl_two_procs / "metrics_rl.jsonl").read_text().splitlines()]
    for key in ("completion_length", "reward", "constant_group_share"):  # the same samples, the same rewards
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], abs=1e-9), key
    # 1 process cuts each update's 8 rows into 2 micro-batches by length, 2 processes hold one group each: the
    # logged update terms are means over the step's tokens and rows, not over micro-batches, so they agree
    for key in ("kl", "clip_frac", "pg_loss", "ratio_mean", "functional_grad_share"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], rel=1e-4, abs=1e-7), key
    assert max_diff(weights(tmp_path / "one"), weights(rl_two_procs)) < 1e-5


def test_four_processes_as_two_replicas_of_two_shards_reach_the_weights_of_one_process(tmp_path, sft_run, micro_init,
                                                                                      learning_sft):
    layout = json.loads(run("tests/hsdp_layout.py", procs=4).stdout.strip().splitlines()[-1])
    assert layout == {"mesh": [2, 2], "names": ["replicate", "shard"], "placements": ["R", "S(0)"]}  # replicated, dim 0 sharded
    # SFT: 2 examples a rank in 2 micro-batches, the replicas' all-reduce after the second only (sync_replicas)
    run("train_sft.py", "--config", "micro", "--out", tmp_path / "sft", "max_steps=3", "fsdp_shard_size=2",
        "micro_batch_size=1", procs=4)
    assert_trained(sft_run, micro_init)
    assert max_diff(weights(sft_run), weights(tmp_path / "sft")) < 1e-5
    rl = [*RL, "prompts_per_step=8", "rl_mini_batch=16", "max_steps=2", "--init", learning_sft]  # 1 prompt a rank
    run("train_rl.py", *rl, "--out", tmp_path / "one")  # each asserted to have learned (`run`)
    run("train_rl.py", *rl, "--out", tmp_path / "hsdp", "fsdp_shard_size=2", procs=4)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "hsdp")) < 1e-5
    for a, b in [(sft_run, tmp_path / "sft"), (tmp_path / "one", tmp_path / "hsdp")]:  # a norm over replicated
        stage = "rl" if (a / "metrics_rl.jsonl").exists() else "sft"  # shards counts each shard once
        norms = [[r["grad_norm"] for r in _records(folder / f"metrics_{stage}.jsonl")] for folder in (a, b)]
        assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def _two_nodes(*args):
    """README's two-node command, run as two launchers of one process each on this machine (c10d rendezvous on
    the loopback address; the port is one the system picked as free)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "atlas"]
    nodes = [subprocess.Popen(launcher + [str(a) for a in args], cwd=ROOT, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs


def test_two_launchers_as_two_nodes_train_the_weights_of_one_launcher_with_two_processes(tmp_path, learning_sft,
                                                                                         sft_two_procs, rl_two_procs,
                                                                                         micro_init):
    _two_nodes("train_sft.py", "--config", "micro", "--out", tmp_path / "sft", "max_steps=3")
    _two_nodes("train_rl.py", *RL, "max_steps=3", "--init", learning_sft, "--out", tmp_path / "rl")
    assert_trained(tmp_path / "sft", micro_init)
    assert_learned(tmp_path / "rl")
    for two_nodes, one_launcher in [(tmp_path / "sft", sft_two_procs), (tmp_path / "rl", rl_two_procs)]:
        a, b = weights(two_nodes), weights(one_launcher)
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same 2 ranks, the same reductions: bit for bit


def test_rl_metrics_carry_what_a_reviewer_reads_first(tmp_path, learning_sft):
    # 4 prompts in one mini-batch: one update, so ratio_mean is that of the weights that sampled
    run("train_rl.py", *RL, "rl_mini_batch=16", "ppo_epochs=1", "--init", learning_sft, "--out", tmp_path / "rl",
        "max_steps=1")
    (record,) = [json.loads(line) for line in (tmp_path / "rl" / "metrics_rl.jsonl").read_text().splitlines()]
    for share in ("constant_group_share", "truncated_share", "functional_token_share"):
        assert 0.0 <= record[share] <= 1.0, share
    # the micro vocabulary has ~600 tokens: a sampled policy's entropy per token lies in (0, log 600]
    assert 0.0 < record["entropy"] <= math.log(700)
    assert record["ratio_mean"] == 1.0  # log π_old comes from the same forward as log π_θ before the update
    assert record["skipped_steps"] == 0 and record["grad_norm"] >= 0.0 and math.isfinite(record["pg_loss"])


def test_eval_writes_every_contract_key(tmp_path, sft_run):
    out = tmp_path / "eval.json"
    run("eval.py", "--ckpt", sft_run, "--out", out, "--blind", "eval_max_new_tokens=4")
    result = json.loads(out.read_text())
    for key in ["accuracy", "format_rate", "functional_rate", "mean_functional_tokens", "mean_length", "per_task",
                "tokens_per_s", "functional_by_task", "blind_accuracy"]:
        assert key in result
    assert set(result["per_task"]) == {"shape", "line", "arrow", "zoom", "text"}
    assert result["n"] == 20


@pytest.mark.parametrize("args, message", [
    (["train_sft.py", "--config", "micro", "nosuch=1"], "unknown config field 'nosuch'"),
    (["train_sft.py", "--config", "micro", "seed=abc"], "seed='abc': expected int"),
    (["train_sft.py", "--config", "huge"], "unknown config 'huge'"),
    (["train_sft.py", "--resume", "/nonexistent/run"], "holds no complete checkpoint"),
    (["train_rl.py", "--config", "micro"], "--init DIR is required"),
    (["train_rl.py", "--config", "micro", "--init", "/nonexistent"], "not a model folder"),
    (["eval.py", "--ckpt", "/nonexistent"], "not a model folder"),
    (["train_sft.py", "--config", "micro", "train_data=/nonexistent.jsonl"], "no such data file"),
    (["train_sft.py", "--config", "qwen2_5_vl_7b"], "set model_path="),
])
def test_bad_input_gives_a_one_line_error_without_traceback(args, message):
    out = run(*args, check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def test_resuming_with_another_preset_is_refused(sft_run):
    out = run("train_sft.py", "--resume", sft_run, "--config", "toy", check=False)
    assert out.returncode != 0 and "drop --config" in out.stderr


def test_rl_refuses_an_init_without_functional_tokens(tmp_path, micro_cfg):
    from atlas_min.model import build_model, build_tokenizer
    from atlas_min.toy import corpus
    tokenizer = build_tokenizer(corpus(micro_cfg), micro_cfg.tokenizer_vocab)
    build_model(micro_cfg, tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    out = run("train_rl.py", "--config", "micro", "--init", tmp_path, check=False)
    assert out.returncode != 0 and "has no functional tokens" in out.stderr and "Traceback" not in out.stderr


def test_overrides_may_come_before_and_after_the_options(tmp_path):
    run("train_sft.py", "--config", "micro", "max_steps=1", "--out", tmp_path / "run", "batch_size=4")
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["config"]["batch_size"] == 4


def test_resuming_a_finished_run_says_how_to_go_on(sft_run):
    out = run("train_sft.py", "--resume", sft_run, check=False)
    assert out.returncode != 0 and "pass max_steps=N" in out.stderr and "Traceback" not in out.stderr


def test_resume_takes_the_latest_step_and_logs_each_step_once(tmp_path, sft_run):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run, run_dir)
    run("train_sft.py", "--resume", run_dir, "max_steps=5", "save_every=1")  # final folder (step 3) → 5
    from atlas_min.checkpoint import find
    assert find(run_dir) == run_dir  # the final model, step 5, is newer than checkpoints/step_000004
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics_sft.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


def test_eval_intervene_writes_the_intervention_table_and_gap(tmp_path, sft_run):
    out = tmp_path / "eval.json"
    run("eval.py", "--ckpt", sft_run, "--out", out, "--intervene", "eval_max_new_tokens=4")
    result = json.loads(out.read_text())
    assert {"intervention", "intervention_gap", "intervention_gap_trained", "intervention_skipped"} <= result.keys()
    assert set(result["intervention_skipped"]) == {"shape", "line", "arrow", "zoom", "text"}


def _warning_lines(out):
    return [line for line in (out.stdout + out.stderr).splitlines() if "Warning" in line]


def test_a_users_sft_run_prints_no_warning(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # transformers' logger at its default level
    # activation checkpointing on, as the 7B preset runs: its transformers call must not be a deprecated one
    out = subprocess.run([sys.executable, "train_sft.py", "--config", "micro", "--out", tmp_path / "run",
                          "max_steps=2", "activation_checkpointing=true"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and not _warning_lines(out), out.stderr[-2000:]


def test_a_users_two_process_rl_run_prints_no_warning(tmp_path, learning_sft):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_rl.py", *RL, "--init", str(learning_sft), "--out", str(tmp_path / "rl"),
                          "max_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and not _warning_lines(out), out.stderr[-2000:]
    assert_learned(tmp_path / "rl")  # a run that updates: the update's calls print nothing either



def test_eval_judge_writes_judge_accuracy_and_scores_a_reply_without_an_answer_0_unasked(tmp_path, sft_run):
    from test_judge import CHAT, _save_tiny_model
    judge_folder = _save_tiny_model(tmp_path / "judge", CHAT)
    out = tmp_path / "eval.json"
    run("eval.py", "--ckpt", sft_run, "--out", out, "--judge", judge_folder, "eval_max_new_tokens=4")
    result = json.loads(out.read_text())
    # 4 new tokens of a barely trained micro model never close an <answer> tag: nothing to ask the judge
    assert result["judge_accuracy"] == 0.0 and result["judge_asked"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--judge", "/nonexistent"], "--judge /nonexistent: not a model folder"),
    (["--judge-prompt", "/nonexistent.txt"], "--judge-prompt goes with --judge"),
    (["--judge-url", "judge-host:8000"], "--judge-url judge-host:8000: not an http:// or https:// URL"),
])
def test_eval_judge_input_is_checked_before_decoding(sft_run, extra, message):
    out = run("eval.py", "--ckpt", sft_run, *extra, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and message in out.stderr


def test_a_rollout_gathers_each_unit_once_whatever_its_length():
    out = run("tests/count_gathers.py", procs=2)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["sharded_9"] > counts["sharded_1"]  # the default: every decode step re-gathers (the probe works)
    assert counts["gathered_9"] == counts["gathered_1"] > 0  # kept gathered: once per unit, then never again


EVAL_TOKENS = 24  # the learning SFT's replies (~16 tokens) end with their answer inside it


@pytest.fixture(scope="session")
def sft_eval(tmp_path_factory, learning_sft):
    """eval.json of the learning SFT on one process: replies that answer, right now and then."""
    out = tmp_path_factory.mktemp("eval") / "one.json"
    run("eval.py", "--ckpt", learning_sft, "--out", out, f"eval_max_new_tokens={EVAL_TOKENS}")
    return json.loads(out.read_text())


def test_eval_gives_the_same_numbers_on_one_and_two_processes(tmp_path, learning_sft, sft_eval):
    keys = ["n", "accuracy", "format_rate", "functional_rate", "mean_functional_tokens", "mean_length", "per_task",
            "functional_by_task"]
    run("eval.py", "--ckpt", learning_sft, "--out", tmp_path / "two.json", f"eval_max_new_tokens={EVAL_TOKENS}",
        procs=2)
    one, two = sft_eval, json.loads((tmp_path / "two.json").read_text())
    assert 0 < one["accuracy"] < 1 and one["format_rate"] > 0  # replies that differ: a sum order could show
    assert {k: one[k] for k in keys} == {k: two[k] for k in keys}


def _data_with_a_broken_image(folder, n=40, broken_line=37):
    """A JSONL of n examples whose line `broken_line` points at a truncated PNG (toy images otherwise)."""
    import shutil
    from atlas_min.data import load_jsonl
    from atlas_min.toy import ensure_toy_data
    from atlas_min.config import get_config
    src = load_jsonl(ensure_toy_data(get_config("micro"))[0], need_response=True)[:n]
    folder.mkdir()
    lines = []
    for k, ex in enumerate(src, 1):
        name = f"{k}.png"
        shutil.copy(ex["images"][0], folder / name)
        if k == broken_line:
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[:len(data) // 2])  # cut mid-file, as a failed copy leaves it
        lines.append(json.dumps({k2: v for k2, v in ex.items() if k2 != "where"} | {"images": [name]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def test_a_bad_image_is_reported_with_its_line_before_any_training_step(tmp_path):
    data = _data_with_a_broken_image(tmp_path / "data")
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", f"train_data={data}", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{data}:37: field 'images[0]'" in out.stderr and "1 example(s) with a bad image" in out.stderr
    assert not (tmp_path / "run" / "metrics_sft.jsonl").exists()  # nothing trained


def test_skip_bad_examples_drops_them_and_says_how_many(tmp_path):
    data = _data_with_a_broken_image(tmp_path / "data")
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", f"train_data={data}",
              "skip_bad_examples=true", "max_steps=1")
    assert "skipped 1 example(s) with a bad image" in out.stdout


@pytest.mark.parametrize("script, knob, message", [
    ("train_sft.py", "max_steps=-1", "max_steps=-1: must be >= 0"),  # config.check (each range: test_run_folder)
    ("train_rl.py", "temperature=0", "temperature=0 samples greedily"),  # the RL stage's own rule
])
def test_a_bad_knob_is_refused_in_one_line_before_anything_is_written(tmp_path, sft_run, script, knob, message):
    init = ["--init", sft_run] if script == "train_rl.py" else []
    out = run(script, "--config", "micro", *init, "--out", tmp_path / "run", knob, check=False)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("gpus", ["0", "-8"])
def test_plan_refuses_a_gpu_count_below_one(gpus):
    out = run("-m", "atlas_min.plan", "--config", "micro", "--gpus", gpus, check=False)
    assert out.returncode == 2 and "need at least 1 GPU" in out.stderr and "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- a run folder belongs to one run

def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    import socket
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", check=False)
    assert out.returncode == 2 and "is in use by another run" in out.stderr
    assert not (tmp_path / "run" / "metrics_sft.jsonl").exists()


def test_the_lock_of_a_run_that_is_gone_is_taken_over_with_a_note(tmp_path):
    import socket
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", "max_steps=1")
    assert "taking over" in out.stdout and not (tmp_path / "run" / ".lock").exists()  # released at the end


def test_a_new_run_into_a_run_folder_is_refused_without_overwrite(tmp_path, sft_run):
    import shutil
    shutil.copytree(sft_run, tmp_path / "run")
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", check=False)
    assert out.returncode == 2 and "already holds a run" in out.stderr and "--overwrite" in out.stderr


def test_overwrite_starts_again_and_leaves_no_old_checkpoint(tmp_path, sft_run):
    import shutil
    shutil.copytree(sft_run, tmp_path / "run")  # 3 steps, checkpoints at steps 1 and 2
    run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", "--overwrite", "max_steps=1")
    assert not (tmp_path / "run" / "checkpoints").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics_sft.jsonl").read_text().splitlines()]
    assert steps == [0]


def test_rl_refuses_to_write_into_its_init_folder(sft_run):
    out = run("train_rl.py", "--config", "micro", "--init", sft_run, "--out", sft_run, check=False)
    assert out.returncode == 2 and "is the --init folder" in out.stderr


def test_resume_refuses_a_run_of_the_other_stage(tmp_path, sft_run, learning_sft):
    rl = tmp_path / "rl"
    run("train_rl.py", *RL, "--init", learning_sft, "--out", rl, "max_steps=1")
    out = run("train_sft.py", "--resume", rl, "max_steps=5", check=False)
    assert out.returncode == 2 and "is an RL run: resume it with python train_rl.py" in out.stderr
    out = run("train_rl.py", "--resume", sft_run, "max_steps=5", check=False)
    assert out.returncode == 2 and "is an SFT run: resume it with python train_sft.py" in out.stderr


def test_resume_skips_a_damaged_newest_checkpoint_for_the_newest_intact_one(tmp_path, sft_run):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run, run_dir)  # final model at step 3, checkpoints at steps 1 and 2
    (run_dir / "model.safetensors").write_bytes(b"garbage")  # the final (newest) one is damaged
    out = run("train_sft.py", "--resume", run_dir, "max_steps=4")
    assert "skipping the damaged checkpoint" in out.stdout and "resumed from" in out.stdout
    assert "step_000002 at step 2" in out.stdout


def test_a_half_written_metrics_line_is_dropped_on_resume(tmp_path, sft_run):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run, run_dir)
    with open(run_dir / "metrics_sft.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed mid-write
    out = run("train_sft.py", "--resume", run_dir, "max_steps=4")
    assert "half-written line" in out.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics_sft.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_eval_judge_asks_the_model_about_every_extracted_answer(tmp_path, learning_sft):
    from test_judge import CHAT, _save_tiny_model
    out = tmp_path / "eval.json"
    run("eval.py", "--ckpt", learning_sft, "--out", out, "--judge", _save_tiny_model(tmp_path / "judge", CHAT))
    result = json.loads(out.read_text())
    assert result["judge_asked"] > 0  # replies with an answer went to the judge model
    assert result["judge_unparsed"] <= result["judge_asked"]
    assert result["judge_accuracy"] * result["n"] <= result["judge_asked"] - result["judge_unparsed"]


def _interrupt_at(launcher, args, metrics, at_step):
    """Start a run and send it SIGINT (Ctrl-C) once `metrics` holds `at_step` records; its CompletedProcess."""
    proc = subprocess.Popen(launcher + [str(a) for a in args], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at_step:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("script, seed", [("train_sft.py", 1), ("train_rl.py", 2)])
def test_ctrl_c_saves_the_step_it_ends_and_resume_is_bit_identical(tmp_path, learning_sft, micro_init, script, seed):
    import random
    at_step = random.Random(seed).randint(2, 8)  # a random step, the same on every run of the suite
    stage = "rl" if script == "train_rl.py" else "sft"
    args = [*RL, "--init", learning_sft, "max_steps=30"] if stage == "rl" else ["--config", "micro", "max_steps=60"]
    run(script, *args, "--out", tmp_path / "straight")  # an RL run: `run` asserts that it learned
    if stage == "sft":
        assert_trained(tmp_path / "straight", micro_init)
    stopped = tmp_path / "stopped"
    out = _interrupt_at([sys.executable], [script, *args, "--out", stopped], stopped / f"metrics_{stage}.jsonl",
                        at_step)
    assert out.returncode == 130 and "Traceback" not in out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "saved" in lines[0]
    step = int(lines[0].split("after step ")[1].split()[0])
    assert step >= at_step and (stopped / "checkpoints" / f"step_{step:06d}" / ".metadata").is_file()
    assert not (stopped / ".lock").exists()
    run(script, "--resume", stopped)
    a, b = weights(tmp_path / "straight"), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_under_torchrun_ends_every_rank_in_one_line_and_saves_once(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_dir = tmp_path / "two"
    out = _interrupt_at(launcher, ["train_sft.py", "--config", "micro", "--out", run_dir, "max_steps=2000"],
                        run_dir / "metrics_sft.jsonl", 3)
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "interrupted after step" in line]
    assert sorted(line.startswith("rank 1: ") for line in ours) == [False, True]  # one line per rank
    assert "train_sft.py\", line" not in out.stderr and "atlas_min" not in out.stderr  # no traceback of ours
    from atlas_min.checkpoint import problem
    saved = list((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and problem(saved[0]) is None


def test_a_question_longer_than_the_context_is_reported_with_its_line_before_any_step(tmp_path):
    data = _data_with_a_broken_image(tmp_path / "data", n=5, broken_line=0)
    lines = data.read_text().splitlines()
    lines[2] = json.dumps(json.loads(lines[2]) | {"question": "how many shapes? " * 2000})
    data.write_text("\n".join(lines) + "\n")
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", f"train_data={data}", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{data}:3: field 'question'" in out.stderr and "4096 positions" in out.stderr
    assert not (tmp_path / "run" / "metrics_sft.jsonl").exists()  # nothing trained


def test_under_torchrun_only_rank_0_reads_the_checkpoint_and_each_rank_holds_its_shards(sft_run):
    out = run("tests/sharded_load.py", sft_run, procs=2)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["rank1"] == {"reads": [], "on_meta": True, "at_most_half": True}  # no weight read on rank 1
    assert seen["rank0_on_meta"] is False  # rank 0 read them
    assert seen["weights_equal"] and seen["buffers_equal"]  # as the checkpoint holds them


def test_a_bfloat16_final_model_is_lean_and_the_run_still_resumes_exactly(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    straight, lean = tmp_path / "straight", tmp_path / "lean"
    run("train_sft.py", "--config", "micro", "--out", straight, "max_steps=4")
    run("train_sft.py", "--config", "micro", "--out", lean, "max_steps=2", "final_dtype=bfloat16")
    final = weights(lean)
    assert {v.dtype for v in final.values()} == {torch.bfloat16} and not (lean / ".metadata").exists()
    assert Qwen2_5_VLForConditionalGeneration.from_pretrained(lean).dtype == torch.bfloat16  # as stock loads it
    exact = weights(lean / "checkpoints" / "step_000002")  # the resumable state, fp32 and AdamW beside it
    assert all(torch.equal(exact[k].to(torch.bfloat16), final[k]) for k in final)
    run("train_sft.py", "--resume", lean, "max_steps=4")  # on from step 2, not from the lean bf16 weights
    a, b = weights(lean / "checkpoints" / "step_000004"), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_ctrl_c_while_a_run_starts_ends_it_in_one_line_and_frees_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_sft.py", "--config", "micro", "--out", str(run_dir),
                             "max_steps=2000"], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (run_dir / ".lock").exists() and proc.poll() is None:  # the folder is claimed: Ctrl-C is ours
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert len([line for line in (out + err).splitlines() if "interrupted" in line]) == 1
    assert not (run_dir / ".lock").exists()


def test_a_served_judge_slower_than_the_collective_timeout_does_not_kill_a_two_process_eval(tmp_path, learning_sft):
    from test_judge import serve_judge
    url, bodies = serve_judge(["Correct"], delay_s=10)  # its first reply comes after the collectives' 6 s
    out = tmp_path / "eval.json"
    run("eval.py", "--ckpt", learning_sft, "--out", out, "--judge-url", url, "--judge-model", "served",
        "collective_timeout_s=6", procs=2)
    result = json.loads(out.read_text())
    assert result["judge_asked"] == len(bodies) > 0 and {b["model"] for b in bodies} == {"served"}
    assert result["judge_accuracy"] * result["n"] == pytest.approx(result["judge_asked"])  # each verdict: Correct


@pytest.fixture(scope="session")
def watched_rl(tmp_path_factory, learning_sft):
    """An RL run watched in tensorboard: validation at steps 0 and 2, samples at steps 0 and 2 of 3."""
    out = tmp_path_factory.mktemp("watched") / "rl"
    run("train_rl.py", *RL, "--init", learning_sft, "--out", out, "max_steps=3", "log_to=tensorboard",
        "eval_every=2", "log_every=2", f"eval_max_new_tokens={EVAL_TOKENS}")
    return out


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (folder,) = (run_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_holds_every_number_of_metrics_rl_jsonl_and_the_resolved_config(watched_rl):
    import textwrap
    events = _tensorboard(watched_rl)
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    expected = {(k, r["step"]): v for r in _records(watched_rl / "metrics_rl.jsonl") for k, v in r.items() if k != "step"}
    assert logged.keys() == expected.keys()
    assert all(logged[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in expected.items())  # stored as float32
    (config,) = events.Tensors("config/text_summary")
    text = textwrap.dedent(config.tensor_proto.string_val[0].decode())
    assert json.loads(text) == json.loads((watched_rl / "trainer_state.json").read_text())["config"]


def test_rl_validation_at_step_0_gives_eval_pys_numbers_then_comes_every_eval_every_steps(sft_eval, watched_rl):
    records = _records(watched_rl / "metrics_rl.jsonl")
    assert [r["step"] for r in records if "val/accuracy" in r] == [0, 2]
    result = sft_eval  # of the RL run's init, on the same 20 examples (micro's eval split, eval_examples=20)
    assert result["accuracy"] > 0  # a validation that reads 0 from a model that never answers would match anything
    assert [records[0][f"val/{k}"] for k in ("accuracy", "format", "functional_rate")] == \
        [result[k] for k in ("accuracy", "format_rate", "functional_rate")]


def test_every_log_every_rl_steps_one_group_goes_to_samples_rl_jsonl_and_the_tracker(watched_rl):
    rows = _records(watched_rl / "samples_rl.jsonl")
    assert [r["step"] for r in rows] == [0] * 4 + [2] * 4  # G = 4
    for step in (0, 2):
        group = [r for r in rows if r["step"] == step]
        assert len({r["prompt_id"] for r in group}) == 1 and all(r["task"] and isinstance(r["text"], str) for r in group)
        totals = [r["total"] for r in group]
        mean = sum(totals) / 4
        std = math.sqrt(sum((t - mean) ** 2 for t in totals) / 3)
        expected = [0.0] * 4 if max(totals) == min(totals) else [(t - mean) / (std + 1e-6) for t in totals]
        assert [r["advantage"] for r in group] == pytest.approx(expected)
        assert all({"accuracy", "format", "functional", "length_penalty", "overuse_penalty"} <= r.keys() for r in group)
    assert [e.step for e in _tensorboard(watched_rl).Tensors("samples_rl/text_summary")] == [0, 2]


def _wandb_records(path):
    """The records of a wandb transaction log (RUN/wandb/offline-run-*/run-ID.wandb): a header, then 32 KiB
    blocks of chunks (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last), each record a protobuf."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data, pos, part, records = Path(path).read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records


def test_wandb_offline_holds_the_metrics_and_config_and_a_resume_continues_the_same_run(tmp_path, learning_sft):
    env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path),
           "WANDB_DATA_DIR": str(tmp_path)}
    out = tmp_path / "rl"
    run("train_rl.py", *RL, "--init", learning_sft, "--out", out, "max_steps=1", "log_to=wandb", env=env)
    run("train_rl.py", "--resume", out, "max_steps=2", env=env)
    run_id = json.loads((out / "tracker.json").read_text())["id"]
    logs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"] * 2  # the resume wrote on in the same run
    logged, config = {}, {}
    for record in (r for p in logs for r in _wandb_records(p)):
        items = {"history": record.history.item, "config": record.config.update}.get(record.WhichOneof("record_type"), [])
        values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
        if record.HasField("config"):
            config |= values
        elif values:
            logged |= {(k, values["_step"]): v for k, v in values.items() if not k.startswith("_")}
    tables = {key: logged.pop(key) for key in list(logged) if key[0].startswith("samples_rl/")}
    assert tables[("samples_rl/nrows", 0)] == tables[("samples_rl/nrows", 1)] == 4  # a group's G completions
    expected = {(k, r["step"]): v for r in _records(out / "metrics_rl.jsonl") for k, v in r.items() if k != "step"}
    assert logged == pytest.approx(expected)
    saved = json.loads((out / "trainer_state.json").read_text())["config"]
    assert {k: config[k] for k in saved} == saved


def test_a_tracker_whose_package_is_missing_is_refused_in_one_line_before_any_work(tmp_path):
    fake = tmp_path / "site" / "wandb"  # what an environment without wandb imports
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    out = run("train_sft.py", "--config", "micro", "--out", tmp_path / "run", "log_to=wandb", check=False,
              env={"PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: log_to=wandb: the wandb package is not installed (pip install -e '.[wandb]')"
    assert not (tmp_path / "run").exists()
