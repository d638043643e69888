"""The anchor study: does LA-GRPO's anchor help where the functional token decides the answer?

    python -m atlas_min.anchor_study                          # runs/anchor-study: results.json, results.md, curves.png
    python -m atlas_min.anchor_study --seeds 3 --anchors 0.5,2 rl_steps=120   # overrides go to every stage
    python -m atlas_min.anchor_study --plot-only              # redraw from what is on disk
    python -m atlas_min.anchor_study --readme                 # also write the table into README.md

On the decisive toy (`--config toy_decisive`: the picture's frame selects the operation, the reply's
functional token carries it out, and the SFT teacher writes the wrong token in most replies of one
family), for each reply length (`toy_reply` short: functional tokens ≈ 10% of the reply; long: ≤ 3%):
one SFT checkpoint, then GRPO (λ = 0) and LA-GRPO at each λ of `--anchors`, each on `--seeds` RL
seeds (`rl_seed`) from that same checkpoint. Every stage is the user's own command line (train_sft.py,
torchrun train_rl.py, eval.py --intervene), and a finished stage is reused, so an interrupted study
continues where it stopped. The table shows mean [min, max] over seeds.
"""
import json
import shutil
import statistics
import sys
from pathlib import Path

from atlas_min.cli import user_errors
from atlas_min.config import get_config
from atlas_min.experiment import ROOT, driver_parser, launcher, run_stage, update_readme

LENGTHS = ("short", "long")


def _runs(anchors, seeds):
    """{run name: (λ, rl_seed)}: GRPO and each LA-GRPO λ, on every seed."""
    methods = {"grpo": 0.0, **{f"la-grpo-{a:g}": a for a in anchors}}
    return {f"{m}-s{s}": (a, s) for m, a in methods.items() for s in range(seeds)}


def _method(run):
    return run.rsplit("-s", 1)[0]


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics_rl.jsonl").read_text().splitlines()]


def _summary(result, metrics, tail):
    """The numbers of one run the table shows: held-out (greedy) eval, and the RL run's last `tail` steps."""
    gap = result.get("intervention_gap", {})
    right = result.get("right_token_rate", {})
    row = {"accuracy": result["accuracy"], "right_token": statistics.mean(right.values()) if right else None,
           "gap": statistics.mean(gap.values()) if gap else None, "length": result["mean_length"],
           "functional_per_output": result["mean_functional_tokens"]}
    if metrics:
        last = metrics[-tail:]
        row |= {"sampled_right_token": statistics.mean(m["right_token_rate"] for m in metrics),
                "kl": statistics.mean(m["kl"] for m in last),
                "functional_token_share": statistics.mean(m["functional_token_share"] for m in last)}
    return row


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(results, command, settings):
    """results.md: one row per (length, method), mean [min, max] over seeds."""
    cols = [("accuracy", "held-out accuracy"), ("right_token", "right-token rate"),
            ("sampled_right_token", "right-token rate of RL samples, mean over steps"), ("gap", "intervention gap"),
            ("kl", "KL (last 10 steps)"), ("length", "reply length"), ("functional_token_share",
                                                                             "functional share of tokens")]
    lines = [f"`{command}`", "", settings, "",
             "| reply | model | " + " | ".join(title for _, title in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for length, runs in results.items():
        by_method = {}
        for run, row in runs.items():
            by_method.setdefault("SFT" if run == "sft" else _method(run), []).append(row)
        for method, rows in by_method.items():
            lines.append(f"| {length} | {method} | " + " | ".join(_spread([r.get(k) for r in rows]) for k, _ in cols)
                         + " |")
    return "\n".join(lines)


def plot(out, lengths, runs):
    """curves.png: sampled accuracy and right-token rate over RL steps, mean line and min-max band per
    method, one column of panels per reply length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("accuracy", "accuracy of samples"), ("right_token_rate", "right-token rate of samples")]
    fig, axes = plt.subplots(len(keys), len(lengths), figsize=(6 * len(lengths), 7), squeeze=False)
    for col, length in enumerate(lengths):
        methods = {}
        for run in runs:
            methods.setdefault(_method(run), []).append(_metrics(out / length / run))
        for method, per_seed in methods.items():
            steps = [m["step"] for m in per_seed[0]]
            for row, (key, title) in enumerate(keys):
                smooth = [[statistics.mean(m[key] for m in ms[max(0, i - 9):i + 1]) for i in range(len(ms))]
                          for ms in per_seed]  # 10-step running mean per seed
                n = min(map(len, smooth))
                mean = [statistics.mean(s[i] for s in smooth) for i in range(n)]
                ax = axes[row][col]
                ax.plot(steps[:n], mean, label=method)
                ax.fill_between(steps[:n], [min(s[i] for s in smooth) for i in range(n)],
                                [max(s[i] for s in smooth) for i in range(n)], alpha=0.2)
                ax.set_title(f"{length} replies: {title} (10-step mean)")
                ax.set_xlabel("RL step")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    print(f"wrote {out / 'curves.png'}")


def main():
    p = driver_parser(__doc__.splitlines()[0], "runs/anchor-study", "toy_decisive")
    p.add_argument("--seeds", type=int, default=3, help="RL seeds per method")
    p.add_argument("--anchors", default="0.5,2", help="λ values of the LA-GRPO runs (GRPO, λ = 0, always runs)")
    p.add_argument("--readme", action="store_true", help="also write the table into README.md (anchor-study)")
    p.add_argument("overrides", nargs="*", help="field=value, passed to every stage")
    args = p.parse_intermixed_args()
    with user_errors():
        cfg = get_config(args.config, args.overrides)
    out = Path(args.out).resolve()
    runs = _runs([float(a) for a in args.anchors.split(",") if a], args.seeds)
    if args.plot_only:
        return plot(out, LENGTHS, runs)

    results = {}
    for length in LENGTHS:
        base = ["--config", args.config, *args.overrides, f"toy_reply={length}"]
        sft_dir = out / length / "sft"
        sft = run_stage(sft_dir, [sys.executable, "train_sft.py", *base, "--out", sft_dir],
                     ["--intervene"])
        results[length] = {"sft": _summary(sft, [], 10)}
        for run, (anchor, seed) in runs.items():
            folder = out / length / run
            result = run_stage(folder, [*launcher(args.procs), "train_rl.py", *base, "--init", sft_dir, "--out", folder,
                                     f"anchor_coef={anchor}", f"rl_seed={seed}"], ["--intervene"])
            results[length][run] = _summary(result, _metrics(folder), 10)
    (out / "results.json").write_text(json.dumps(results, indent=1))

    shown = [a for a in sys.argv[1:] if a != "--readme"]
    command = " ".join(["python -m atlas_min.anchor_study", *shown])
    settings = (f"(preset {args.config}: {cfg.max_steps or cfg.rl_steps} RL steps × {cfg.prompts_per_step} prompts × "
                f"G={cfg.group_size}, lr {cfg.rl_lr:g}, {args.seeds} RL seeds per method, {args.procs} process(es); "
                f"held-out split of {cfg.toy_eval_size} examples, greedy; mean [min, max] over seeds)")
    text = table(results, command, settings)
    (out / "results.md").write_text(text + "\n")
    print(text)
    if args.readme:
        with user_errors():
            update_readme("anchor-study", text)
    try:
        plot(out, LENGTHS, runs)
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no curves.png")
    if args.readme and (out / "curves.png").is_file():  # README shows the picture from docs/
        shutil.copy(out / "curves.png", ROOT / "docs" / "anchor_study.png")


if __name__ == "__main__":
    main()
