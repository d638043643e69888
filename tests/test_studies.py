"""The study drivers' arithmetic (atlas_min.anchor_study, atlas_min.experiment): what each table column and the
demo's check mean, on records written by hand. The drivers themselves run whole trainings and are not part of the suite."""
import json
import re
from pathlib import Path

import pytest

from atlas_min.anchor_study import methods, summary, table


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


def test_the_trained_swap_gap_column_is_the_mean_over_tasks_and_blank_where_eval_json_lacks_it():
    result = {"accuracy": 1.0, "mean_length": 40.0, "mean_functional_tokens": 1.0,
              "intervention_gap": {"puzzle_line": 0.5, "puzzle_shape": 0.7},
              "intervention_gap_trained": {"puzzle_line": 0.25, "puzzle_shape": 1.0}}
    new, old = summary(result, []), summary({k: v for k, v in result.items() if k != "intervention_gap_trained"}, [])
    assert new["gap_trained"] == pytest.approx((0.25 + 1.0) / 2) and new["gap"] == pytest.approx(0.6)
    assert old["gap_trained"] is None
    rows = table({"long": {"sft": new | {"commit": "abc"}}, "short": {"sft": old | {"commit": "abc"}}}, "cmd", "")
    lines = rows.splitlines()  # the command, a blank line, the settings, a blank line, then the table
    header, long_row, short_row = (lines[i].split(" | ") for i in (4, 6, 7))
    column = header.index("intervention gap, against the trained swap only (Shape ↔ Line)")
    assert long_row[column] == "0.625 [0.625, 0.625]" and short_row[column] == "-"  # one run: min = max = mean


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


# a number standing alone: not the digits in "k3", "G=8" counts, nor the "-" of "la-grpo-0.5"; − and + are signs
NUMBER = re.compile(r"(?<![\w.])[-−+]?\d+(?:\.\d+)?")


def _numbers(text):
    return {n.replace("−", "-").lstrip("+") for n in NUMBER.findall(text)}


def test_every_number_in_readmes_study_reading_is_in_the_studys_table_block():
    # the table block is what the study wrote (the command, its settings, the table, the commits); the reading is
    # README's "How to read it" bullets. Costs milliseconds.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- anchor-study -->")[1].split("<!-- /anchor-study -->")[0]
    reading = readme.split("\nHow to read it")[1].split("\n\n")[0]
    assert reading.count("\n- ") >= 5  # the bullets were found
    assert _numbers("0.850 [0.838, 0.861], −0.030 to +0.001, la-grpo-0.5, k3") == {
        "0.850", "0.838", "0.861", "-0.030", "0.001", "0.5"}
    assert sorted(_numbers(reading) - _numbers(block)) == []
