"""The GPU smoke script (`python -m atlas_min.smoke`) runs to its end on this CPU, as a user runs it.

`micro` on CPU: four script runs (SFT 2 steps, resume 1, RL 1, eval 8), ~40 s on 2 cores.
"""
import json
import subprocess
import sys

from safetensors import safe_open


def test_smoke_script_runs_sft_resume_rl_and_eval_to_its_end_and_passes(tmp_path):
    out = tmp_path / "smoke"
    run = subprocess.run([sys.executable, "-m", "atlas_min.smoke", "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "all checks passed" in run.stdout and "FAIL" not in run.stdout
    # what the checks read is there: 3 SFT steps (the third one resumed), an RL step, 8 examples evaluated
    assert [json.loads(line)["step"] for line in (out / "sft/metrics_sft.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert json.loads((out / "sft/trainer_state.json").read_text())["step"] == 3
    with safe_open(out / "rl/model.safetensors", "pt") as f:
        assert f.keys()
    assert len((out / "rl/metrics_rl.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "eval.json").read_text())["n"] == 8
