"""The anchor study: does LA-GRPO's anchor help where the functional token decides the answer, and is
that more than a bigger step?

    python -m atlas_min.anchor_study --jobs 2 --procs 1            # runs/anchor-study: results.json, results.md, curves.png
    python -m atlas_min.anchor_study --seeds 3 --anchors 0.5,2 --lr-scales 2 rl_steps=120   # overrides go to every stage
    python -m atlas_min.anchor_study --plot-only                   # redraw the table and picture from what is on disk
    python -m atlas_min.anchor_study --readme                      # also write the table into README.md

On the decisive toy (`--config toy_decisive`: the picture's frame selects the operation, the reply's
functional token carries it out, and the SFT teacher writes the wrong token in most replies of one
family), for each reply length (`toy_reply` short: the token is 1 of 12 generated tokens; long: ~1 of 38):
one SFT checkpoint, then on each of `--seeds` RL seeds (`rl_seed`) from that same checkpoint (and so for the
variants of the long replies, `SETTINGS`: a second SFT checkpoint, untied embeddings; `--variant-seeds` each)
- GRPO (λ = 0) at the preset's learning rate;
- the controls: GRPO with its learning rate multiplied by each of `--lr-scales` (does a bigger step
  do what the anchor does?);
- LA-GRPO at each λ of `--anchors`.
Every stage is the user's own command line (train_sft.py, train_rl.py through torchrun, eval.py
--intervene), and a finished stage is reused, so an interrupted study continues where it stopped.
`--jobs 2 --procs 1` runs two single-process stages side by side (what 2 cores do best for a 0.6 M
model); the numbers do not depend on the number of processes beyond float summation order.
Each stage records the commit of the code it ran on (`commit.txt`); the table names them.
"""
import json
import statistics
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from atlas_min.cli import user_errors
from atlas_min.config import get_config
from atlas_min.experiment import ROOT, check_reuse, driver_parser, launcher, recorded_config, run_stage, update_readme

# The table's rows: {label: (folder, overrides of every stage)}. The two reply lengths, then two variants of the
# long replies (where the anchor's claim is made): a second SFT checkpoint on the same data (its own init and batch
# order), and input and output embeddings untied, as the 7B preset has them (the toy ties them, so the anchor's
# gradient on the functional tokens' output rows also moves the input rows that the intervention probe forces).
SETTINGS = {"short": ("short", ["toy_reply=short"]), "long": ("long", ["toy_reply=long"]),
            "long, sft_seed=1": ("long-sft-seed-1", ["toy_reply=long", "sft_seed=1"]),
            "long, untied": ("long-untied", ["toy_reply=long", "tie_embeddings=false"])}
VARIANTS = ("long, sft_seed=1", "long, untied")
TAIL = 10  # "final" values average the RL run's last TAIL steps (one step's 128 samples are noisy)


def methods(anchors, lr_scales, rl_lr):
    """{method name: (λ, learning rate)}: GRPO, the larger-lr GRPO controls, LA-GRPO at each λ."""
    out = {"grpo": (0.0, rl_lr)}
    out |= {f"grpo-lr{s:g}x": (0.0, rl_lr * s) for s in lr_scales}
    return out | {f"la-grpo-{a:g}": (a, rl_lr) for a in anchors}


def _method(run):
    return run.rsplit("-s", 1)[0]


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics_rl.jsonl").read_text().splitlines()]


def _result(folder):
    """A finished stage's eval.json, with the commit its training ran on."""
    code = folder / "commit.txt"
    return json.loads((folder / "eval.json").read_text()) | {
        "commit": code.read_text().strip() if code.is_file() else "unknown"}


def _mean(rows, key):
    return statistics.mean(r[key] for r in rows)


def summary(result, metrics):
    """The numbers of one run: held-out greedy eval, and from its RL samples the mean over steps, the final
    (last TAIL steps) values, the largest KL, and the drift of functional tokens and length per reply from
    the SFT policy's own samples (the first RL step samples from the SFT weights). Each intervention gap is
    its eval.json's mean over tasks; an eval.json from before the trained-swap gap leaves that one None."""
    gap, trained = result.get("intervention_gap", {}), result.get("intervention_gap_trained", {})
    right = result.get("right_token_rate", {})
    row = {"accuracy": result["accuracy"], "right_token": statistics.mean(right.values()) if right else None,
           "gap": statistics.mean(gap.values()) if gap else None,
           "gap_trained": statistics.mean(trained.values()) if trained else None, "length": result["mean_length"],
           "mean_functional_tokens": result["mean_functional_tokens"], "commit": result.get("commit", "unknown")}
    if metrics:
        last = metrics[-TAIL:]
        row |= {"sampled_right_token": _mean(metrics, "right_token_rate"),
                "final_right_token": _mean(last, "right_token_rate"),
                "kl": _mean(last, "kl"), "max_kl": max(m["kl"] for m in metrics),
                "token_spam": _mean(last, "functional_per_completion") - metrics[0]["functional_per_completion"],
                "length_drift": _mean(last, "completion_length") - metrics[0]["completion_length"],
                "entropy": _mean(last, "entropy"), "constant_groups": _mean(metrics, "constant_group_share"),
                "functional_token_share": _mean(last, "functional_token_share")}
    return row


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


# Each header says what it averages: the held-out columns one greedy eval, the others the RL samples of
# all steps or of the last TAIL; the gaps are means over tasks (docs/method.md, "Token interventions"). No
# "|" in a header: it would split the Markdown cell, so the trained swap's tokens go by their names.
COLUMNS = [("accuracy", "held-out accuracy"), ("right_token", "held-out right-token rate"),
           ("sampled_right_token", "right-token rate of RL samples, mean over all steps"),
           ("final_right_token", f"… mean over the last {TAIL} steps"),
           ("gap", "intervention gap, against the other four tokens"),
           ("gap_trained", "intervention gap, against the trained swap only (Shape ↔ Line)"),
           ("kl", f"KL from SFT, mean over the last {TAIL} steps"), ("max_kl", "KL from SFT, largest of a step"),
           ("token_spam", "functional tokens / output, change"), ("length_drift", "reply length, change"),
           ("entropy", f"entropy (nats/token), mean over the last {TAIL} steps"),
           ("constant_groups", "constant-group share, mean over all steps")]


def table(results, command, settings):
    """results.md: one row per (setting, method), mean [min, max] over seeds; the commits the stages ran on."""
    lines = [f"`{command}`", "", settings, "",
             "| reply | model | " + " | ".join(title for _, title in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for length, runs in results.items():
        by_method = {}
        for run, row in runs.items():
            by_method.setdefault("SFT" if run == "sft" else _method(run), []).append(row)
        for method, rows in by_method.items():
            lines.append(f"| {length} | {method} | " + " | ".join(_spread([r.get(k) for r in rows]) for k, _ in COLUMNS)
                         + " |")
    commits = sorted({row["commit"] for runs in results.values() for row in runs.values()})
    lines += ["", f"Code: commit {', '.join(commits)} (`commit.txt` of each stage, written when it trained)."]
    return "\n".join(lines)


def plot(out, results, seed_runs):
    """curves.png, one column per setting (`SETTINGS`): the right-token rate of RL samples over steps; the same
    against the KL from SFT (an equal-distance comparison); each run's final intervention gap against its
    mean sampled right-token rate (what the speed cost in token dependence). Mean line and min-max band
    over seeds; 10-step running means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = list(results)
    fig, axes = plt.subplots(3, len(lengths), figsize=(6.5 * len(lengths), 13), squeeze=False)
    for col, length in enumerate(lengths):
        by_method, folder = {}, out / SETTINGS[length][0]
        for run in seed_runs[length]:
            by_method.setdefault(_method(run), []).append((_metrics(folder / run), results[length][run]))
        for method, per_seed in by_method.items():
            smooth = {key: [[statistics.mean(m[key] for m in ms[max(0, i - 9):i + 1]) for i in range(len(ms))]
                            for ms, _ in per_seed] for key in ("right_token_rate", "kl")}
            n = min(map(len, smooth["kl"]))
            steps = [m["step"] for m in per_seed[0][0]][:n]
            rate = smooth["right_token_rate"]
            line, = axes[0][col].plot(steps, [statistics.mean(s[i] for s in rate) for i in range(n)], label=method)
            axes[0][col].fill_between(steps, [min(s[i] for s in rate) for i in range(n)],
                                      [max(s[i] for s in rate) for i in range(n)], alpha=0.2, color=line.get_color())
            for k, (kl, r) in enumerate(zip(smooth["kl"], rate)):
                axes[1][col].plot(kl, r, color=line.get_color(), alpha=0.6, label=method if k == 0 else None)
            axes[2][col].scatter([row["sampled_right_token"] for _, row in per_seed], [row["gap"] for _, row in per_seed],
                                 color=line.get_color(), label=method)
        gap_sft = results[length]["sft"]["gap"]
        axes[2][col].axhline(gap_sft, color="gray", linestyle=":", label="SFT")
        titles = [("RL step", "right-token rate of samples", "over RL steps"),
                  ("KL from SFT (k3, per token)", "right-token rate of samples", "against KL from SFT"),
                  ("right-token rate of samples, mean over steps", "intervention gap after RL", "token dependence")]
        for row, (xlabel, ylabel, title) in enumerate(titles):
            axes[row][col].set_title(f"{length}: {title}")
            axes[row][col].set_xlabel(xlabel)
            axes[row][col].set_ylabel(ylabel)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    print(f"wrote {out / 'curves.png'}")


def _stages(folder, base, runs, procs):
    """[(folder, train command)] of one setting's RL runs."""
    return [(folder / run, [*launcher(procs), "train_rl.py", *base, "--init", folder / "sft", "--out", folder / run,
                            f"anchor_coef={anchor}", f"rl_lr={lr:g}", f"rl_seed={seed}"])
            for run, (anchor, lr, seed) in runs.items()]


def main():
    p = driver_parser(__doc__.splitlines()[0], "runs/anchor-study", "toy_decisive")
    p.add_argument("--seeds", type=int, default=5, help="RL seeds per method")
    p.add_argument("--variant-seeds", type=int, default=None,
                   help=f"RL seeds per method of the variants ({', '.join(VARIANTS)}; default: --seeds; 0: none)")
    p.add_argument("--anchors", default="0.5,2", help="λ values of the LA-GRPO runs (GRPO, λ = 0, always runs)")
    p.add_argument("--lr-scales", default="2,4", help="the GRPO controls: the preset's rl_lr times each of these")
    p.add_argument("--jobs", type=int, default=1, help="stages run side by side (each with --procs processes)")
    p.add_argument("--readme", action="store_true", help="also write the table into README.md (anchor-study)")
    p.add_argument("overrides", nargs="*", help="field=value, passed to every stage")
    args = p.parse_intermixed_args()
    with user_errors():
        cfg = get_config(args.config, args.overrides)
    out = Path(args.out).resolve()
    named = methods([float(a) for a in args.anchors.split(",") if a],
                    [float(s) for s in args.lr_scales.split(",") if s], cfg.rl_lr)
    variant_seeds = args.seeds if args.variant_seeds is None else args.variant_seeds
    seed_runs = {label: {f"{m}-s{s}": (anchor, lr, s) for m, (anchor, lr) in named.items()
                         for s in range(variant_seeds if label in VARIANTS else args.seeds)}
                 for label in SETTINGS if label not in VARIANTS or variant_seeds}

    results = {}
    for label, runs in seed_runs.items():
        folder, overrides = SETTINGS[label]
        base = ["--config", args.config, *args.overrides, *overrides]
        sft_dir = out / folder / "sft"
        stages = _stages(out / folder, base, runs, args.procs)
        sft_cmd = [sys.executable, "train_sft.py", *base, "--out", sft_dir]
        if not args.plot_only:
            with user_errors():
                check_reuse([(sft_dir, sft_cmd), *stages])
            run_stage(sft_dir, sft_cmd, ["--intervene"])
            log = None if args.jobs == 1 else "stage.log"
            with ThreadPoolExecutor(args.jobs) as pool:  # each stage is a subprocess: threads only wait
                list(pool.map(lambda s: run_stage(s[0], s[1], ["--intervene"], log and s[0] / log), stages))
        results[label] = {"sft": summary(_result(sft_dir), [])}
        results[label] |= {run: summary(_result(folder), _metrics(folder)) for (folder, _), run in zip(stages, runs)}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    cfg = recorded_config(stages[0][0])  # the table states what the runs recorded, not what this command asked
    shown = [a for a in sys.argv[1:] if a not in ("--readme", "--plot-only")]
    command = " ".join(["python -m atlas_min.anchor_study", *shown])
    settings = (f"(preset {args.config}: {cfg.max_steps or cfg.rl_steps} RL steps × {cfg.prompts_per_step} prompts × "
                f"G={cfg.group_size}, lr {cfg.rl_lr:g} (controls: × {args.lr_scales}), {args.seeds} RL seeds per "
                f"method ({variant_seeds} for the variants) from one SFT checkpoint per row's setting; held-out split of {cfg.toy_eval_size} examples, "
                f"greedy; mean [min, max] over seeds; changes are the last {TAIL} steps' samples minus the first "
                f"step's, i.e. the SFT policy's own samples)")
    text = table(results, command, settings)
    (out / "results.md").write_text(text + "\n")
    print(text)
    if args.readme:
        with user_errors():
            update_readme("anchor-study", text)
    try:
        plot(out, results, seed_runs)
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no curves.png")
    if args.readme and (out / "curves.png").is_file():  # README shows the picture from docs/
        shutil.copy(out / "curves.png", ROOT / "docs" / "anchor_study.png")


if __name__ == "__main__":
    main()
