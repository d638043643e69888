"""The study drivers' arithmetic (atlas_min.anchor_study, atlas_min.experiment): what each table column and the
demo's check mean, on records written by hand. The drivers themselves run whole trainings and are not part of the suite."""
import json

import pytest

from atlas_min.anchor_study import methods, summary


def _step(step, kl, rate, n_f, length):
    return {"step": step, "kl": kl, "right_token_rate": rate, "functional_per_completion": n_f,
            "completion_length": length, "entropy": 1.0, "constant_group_share": 0.5,
            "functional_token_share": n_f / length}


def test_the_controls_are_grpo_at_scaled_learning_rates_and_the_anchored_runs_keep_the_presets_rate():
    assert methods([0.5, 2.0], [2.0], 3e-5) == {"grpo": (0.0, 3e-5), "grpo-lr2x": (0.0, 6e-5),
                                                "la-grpo-0.5": (0.5, 3e-5), "la-grpo-2": (2.0, 3e-5)}


def test_stability_columns_are_the_largest_kl_and_the_drift_from_the_sft_policys_own_samples():
    # 12 steps: the first samples from the SFT weights (1 token, 38 long); the last 10 average 2 tokens, 40 long
    metrics = [_step(0, 0.0, 0.5, 1.0, 38.0), _step(1, 0.3, 0.6, 1.0, 38.0)]
    metrics += [_step(s, 0.01 * s, 1.0, 2.0, 40.0) for s in range(2, 12)]
    result = {"accuracy": 1.0, "right_token_rate": {"a": 1.0, "b": 0.5}, "intervention_gap": {"a": 0.2, "b": 0.4},
              "mean_length": 40.0, "mean_functional_tokens": 2.0}
    row = summary(result, metrics)
    assert row["max_kl"] == 0.3  # step 1's, not the last steps'
    assert row["kl"] == pytest.approx(sum(0.01 * s for s in range(2, 12)) / 10)
    assert row["token_spam"] == pytest.approx(1.0) and row["length_drift"] == pytest.approx(2.0)
    assert row["final_right_token"] == 1.0 and row["sampled_right_token"] == pytest.approx((0.5 + 0.6 + 10) / 12)
    assert row["right_token"] == 0.75 and row["gap"] == pytest.approx(0.3)


@pytest.mark.parametrize("sft_line, rl_lines, verdict", [
    (0.0, [1.0, 1.0, 0.995], "PASS"),  # SFT copied the slip, every RL run repaired it
    (0.0, [1.0, 0.5, 1.0], "FAIL"),  # one RL run did not repair it
    (0.6, [1.0, 1.0, 1.0], "FAIL"),  # SFT did not copy the slip: the demo shows no repair
])
def test_the_demos_check_passes_only_when_sft_copies_the_slip_and_every_rl_run_repairs_it(sft_line, rl_lines, verdict):
    from atlas_min.config import get_config
    from atlas_min.experiment import slip_check
    results = {"SFT": {"per_task": {"puzzle_line": sft_line, "puzzle_shape": 1.0}}}
    results |= {name: {"per_task": {"puzzle_line": acc, "puzzle_shape": 1.0}}
                for name, acc in zip(["grpo", "grpo-lr2x", "la-grpo"], rl_lines)}
    passed, line = slip_check(results, get_config("toy_decisive"))
    assert passed == (verdict == "PASS") and line.startswith(f"check: {verdict}") and "puzzle_line: SFT" in line


def test_the_demos_check_is_silent_where_the_preset_slips_no_token():
    from atlas_min.config import get_config
    from atlas_min.experiment import slip_check
    results = {"SFT": {"per_task": {"line": 0.0}}, "grpo": {"per_task": {"line": 1.0}}}
    assert slip_check(results, get_config("toy")) is None


def _stage(folder, cfg, init=None):
    """A stage folder as a finished run leaves it, written by hand: its trainer state and a model file."""
    from atlas_min.checkpoint import STATE
    from atlas_min.config import to_dict
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / STATE).write_text(json.dumps({"step": 2, "config": to_dict(cfg), "run": {"init": init} if init else {}}))
    return folder


def test_a_driver_refuses_a_stage_folder_trained_with_other_settings_before_any_stage_runs(tmp_path):
    from atlas_min.cli import UsageError
    from atlas_min.config import get_config
    from atlas_min.experiment import check_reuse
    sft = _stage(tmp_path / "sft", get_config("micro", ["max_steps=3"]))
    cmd = ["python", "train_sft.py", "--config", "micro", "--out", sft, "max_steps=3"]
    check_reuse([(sft, cmd)])  # the same settings: reused
    with pytest.raises(UsageError, match=r"sft holds a stage trained with other inputs \(settings seed 0, not 1\)"):
        check_reuse([(sft, [*cmd, "seed=1"])])


def test_a_driver_refuses_an_rl_stage_whose_init_has_changed_since(tmp_path):
    from atlas_min.cli import UsageError
    from atlas_min.config import get_config
    from atlas_min.experiment import check_reuse
    from atlas_min.run_folder import weights_record
    sft = _stage(tmp_path / "sft", get_config("micro"))
    (sft / "config.json").write_text("{}")
    rl = _stage(tmp_path / "rl", get_config("micro"), init=weights_record(sft))
    cmd = ["torchrun", "train_rl.py", "--config", "micro", "--init", sft, "--out", rl]
    check_reuse([(rl, cmd)])
    (sft / "model.safetensors").write_bytes(b"retrained")
    with pytest.raises(UsageError, match=r"rl holds a stage trained with other inputs \(--init .*sft is not the folder"):
        check_reuse([(rl, cmd)])


def test_a_tables_settings_come_from_the_runs_record(tmp_path):
    from atlas_min.config import get_config
    from atlas_min.experiment import recorded_config
    assert recorded_config(_stage(tmp_path / "grpo", get_config("micro", ["seed=3"]))).seed == 3
