"""Evaluate a checkpoint: greedy decoding with the hand-written sampler, the reward's answer checker.

    python eval.py --ckpt runs/sft --out runs/sft/eval.json            # toy held-out split
    python eval.py --ckpt runs/sft --blind                               # + blind_accuracy (blank images)
    python eval.py --ckpt runs/sft --intervene                           # + the token intervention probe
    python eval.py --ckpt runs/rl7b --data bench.jsonl --judge /models/Qwen2.5-7B-Instruct  # + judge_accuracy
    python eval.py --ckpt runs/rl7b --data bench.jsonl --judge-url http://judge-host:8000    # a served judge
    python eval.py --ckpt runs/rl7b --config qwen2_5_vl_7b --data bench.jsonl
    torchrun --nproc_per_node 8 eval.py --ckpt runs/rl7b --config qwen2_5_vl_7b --data bench.jsonl

The config defaults to the one the checkpoint was trained with; `field=value` overrides apply on top.
eval.json's keys are listed in docs/method.md, "Evaluation". `accuracy` is the rule-based verdict
(atlas_min.rewards); `--judge` adds `judge_accuracy`, the verdict of a local instruction model (or with
`--judge-url` of a served one: `vllm serve MODEL` on JUDGE-HOST) asked as ATLAS's harness asks its judge (docs/eval_protocol.md; the authors used Qwen3-VL-235B-A22B-Instruct).
"""
import argparse
import json
import os
from dataclasses import fields
from pathlib import Path

from atlas_min import checkpoint
from atlas_min.cli import UsageError, quiet_libraries, say_skipped, user_errors
from atlas_min.config import get_config
from atlas_min.data import check_lengths, data_file, file_record, load_examples
from atlas_min.dist import cleanup, print0, setup, shard
from atlas_min.evaluate import chance_by_task, evaluate, intervene
from atlas_min.judge import JudgeError, judge, judge_prompt, load_judge, probe_url
from atlas_min.model import adopt_shape, eval_image_processor, load_pretrained
from atlas_min.rewards import extract_answer
from atlas_min.run_folder import check_output

# 1. command line, config, data
p = argparse.ArgumentParser(description="Evaluate a checkpoint")
p.add_argument("--ckpt", required=True, help="a model folder written by train_sft.py / train_rl.py")
p.add_argument("--config", default=None, help="preset for eval settings (default: the checkpoint's config)")
p.add_argument("--data", default=None, help="eval JSONL (default: the config's eval_data, else the toy's)")
p.add_argument("--out", default=None, help="where to write eval.json (default CKPT/eval.json)")
p.add_argument("--blind", action="store_true", help="also evaluate with blank images: blind_accuracy")
p.add_argument("--intervene", action="store_true",
               help="also replace each output's first functional token by each of the five: intervention")
p.add_argument("--judge", default=None, metavar="MODEL_PATH",
               help="a local instruction model that also judges each extracted answer: judge_accuracy")
p.add_argument("--judge-url", default=None, metavar="URL",
               help="a served judge instead: an OpenAI-compatible server's root (POST URL/v1/chat/completions)")
p.add_argument("--judge-model", default=None, metavar="NAME", help="the served judge's model name (default: the server's)")
p.add_argument("--judge-prompt", default=None, metavar="FILE",
               help="the judge's prompt template ({question}, {gold}, {answer}); default: atlas_min.judge's")
p.add_argument("overrides", nargs="*", help="field=value")
opts = p.parse_intermixed_args()
quiet_libraries()
# what eval.json records of how it decoded and scored, beside the checkpoint, the config and the data's hash
PROTOCOL = ("eval_max_new_tokens", "answer_format", "system_prompt", "question_suffix", "image_separator")
ckpt = Path(opts.ckpt)
out = Path(opts.out or ckpt / "eval.json")
with user_errors():  # every check before any work: a late error would lose the whole decode
    checkpoint.require_model(ckpt, "--ckpt")
    saved = checkpoint.read_state(ckpt)[1] if (ckpt / checkpoint.STATE).is_file() else None
    base = get_config(opts.config) if opts.config else saved
    if base is None:
        raise UsageError(f"--ckpt {ckpt} has no {checkpoint.STATE}: pass --config NAME")
    cfg = get_config(overrides=opts.overrides + ([f"eval_data={opts.data}"] if opts.data else []), base=base)
    cfg, reshaped = adopt_shape(cfg, ckpt, "--ckpt")  # its own shape, as train_rl.py's --init and bench take it
    differ = [f.name for f in fields(base) if saved and getattr(base, f.name) != getattr(saved, f.name)
              and f.name not in reshaped]
    if differ:  # the prompt, the answer format, the toy's eval split may then not be the ones it was trained on
        print0(f"note: --config {opts.config} differs from the settings {ckpt} was trained with in {len(differ)} "
               f"field(s): {', '.join(differ[:8])}{', ...' if len(differ) > 8 else ''}")
    data_path = data_file(cfg, "eval")
    check_output(out, [ckpt, data_path, opts.judge, opts.judge_prompt])
    data = load_examples(cfg, "eval", on_skip=say_skipped)
    if opts.judge and opts.judge_url:
        raise UsageError("--judge MODEL_PATH or --judge-url URL: one judge")
    if opts.judge_url and not opts.judge_url.startswith(("http://", "https://")):
        raise UsageError(f"--judge-url {opts.judge_url}: not an http:// or https:// URL")
    if opts.judge_model and not opts.judge_url:
        raise UsageError("--judge-model goes with --judge-url URL")
    if opts.judge_prompt and not (opts.judge or opts.judge_url):
        raise UsageError("--judge-prompt goes with --judge MODEL_PATH or --judge-url URL")
    if opts.judge_prompt and not Path(opts.judge_prompt).is_file():
        raise UsageError(f"--judge-prompt {opts.judge_prompt}: no such file")
    template = Path(opts.judge_prompt).read_text() if opts.judge_prompt else None
    judge_prompt("q", "g", "a", template)  # a template missing a placeholder fails here, before decoding
    if opts.judge and not (Path(opts.judge) / "config.json").is_file():
        raise UsageError(f"--judge {opts.judge}: not a model folder (no config.json)")
    if opts.judge or opts.judge_url:  # the replies are written beside --out before judging
        check_output(out.with_name(f"{out.stem}.outputs.jsonl"), [ckpt, data_path, opts.judge, opts.judge_prompt])
    if opts.judge_url and not int(os.environ.get("RANK", "0")):  # a dead or silent server: named now, not after
        probe_url(opts.judge_url, opts.judge_model)  # the decode (rank 0 asks; the others wait in dist.setup)


def write_json(path, result):
    tmp = path.with_name(path.name + ".tmp")  # in out's folder, which check_output made
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # a killed eval leaves the previous eval.json, never half of one


# 2. the model, sharded under torchrun; the judge (rank 0) loaded before the decode, so it cannot fail after it
rank, world, device = setup(cfg.collective_timeout_s)
model, tokenizer, image_processor = load_pretrained(ckpt, cfg, on_meta=rank > 0)  # rank 0 reads the weights
image_processor = eval_image_processor(image_processor, cfg)  # the eval protocol's image bounds, if set
with user_errors():
    data = check_lengths(data, tokenizer, image_processor, cfg, generate=cfg.eval_max_new_tokens,
                         on_skip=say_skipped, context=model.config.get_text_config().max_position_embeddings)
    judge_model = load_judge(opts.judge, str(device)) if opts.judge and rank == 0 else None
model = shard(model, cfg, device).eval()

# 3. greedy decoding, scored; optional probes
result = evaluate(model, tokenizer, image_processor, data, cfg, device)
if opts.blind:
    result["blind_accuracy"] = evaluate(model, tokenizer, image_processor, data, cfg, device, blind=True)["accuracy"]
if opts.intervene:
    result.update(intervene(model, tokenizer, image_processor, data, cfg, device))
outputs = result.pop("outputs")
if rank > 0:  # every collective is done: the other ranks leave now, so none waits in one while rank 0 judges
    cleanup(together=False)
chance = chance_by_task(data)
result["chance"] = sum(chance.values()) / len(chance)
result |= {"config": cfg.name, "shape_from_checkpoint": reshaped, "checkpoint": str(ckpt.resolve()),
           "data": file_record(data_path),
           "protocol": {**{k: getattr(cfg, k) for k in PROTOCOL}, "image_size_bounds": dict(image_processor.size)}}
write_json(out, result)  # the decode's metrics, kept whatever the judge does
if opts.judge or opts.judge_url:  # a missing, unclosed or empty final answer is 0 without asking, as the harness
    rows = out.with_name(f"{out.stem}.outputs.jsonl")  # every reply, to judge again later if the judge fails
    rows.write_text("".join(json.dumps(r) + "\n" for r in outputs))
    items = [{"question": r["question"], "gold": r["answer"],
              "answer": extract_answer(r["output"], cfg.answer_format)} for r in outputs]
    print0(f"judging {len(items)} answers with {opts.judge or opts.judge_url} ...")
    with user_errors():
        try:
            verdicts = judge(judge_model or opts.judge_url, items, template=template, device=str(device),
                             url_model=opts.judge_model)
        except JudgeError as e:
            raise JudgeError(f"{e} (the decode is kept: {out} without judge_accuracy, the replies in {rows})") from None
    result |= {"judge_accuracy": sum(verdicts) / len(verdicts),
               "judge_asked": sum(reply is not None for reply in verdicts.replies), "judge_unparsed": verdicts.unparsed}
    write_json(out, result)

# 4. the table, eval.json
print0(f"\n{'task':<14}{'accuracy':>10}{'chance':>8}  functional tokens used")
for task, acc in result["per_task"].items():
    shares = result["functional_by_task"][task].items()
    used = ", ".join(f"{tok} {share:.2f}" for tok, share in shares if share)
    print0(f"{task:<14}{acc:>10.3f}{chance[task]:>8.3f}  {used or '-'}")
blind_shown = f" | blind {result['blind_accuracy']:.3f}" if opts.blind else ""
print0(f"\naccuracy {result['accuracy']:.3f}{blind_shown} | format {result['format_rate']:.3f}"
       f" | functional {result['functional_rate']:.3f} | {result['mean_functional_tokens']:.2f} functional tokens / output"
       f" | length {result['mean_length']:.1f} | {result['tokens_per_s']:.0f} tokens/s | n={result['n']}")
print0(f"chance (always the task's most frequent answer), averaged over tasks: {result['chance']:.3f}")
if "judge_accuracy" in result:
    print0(f"judge_accuracy {result['judge_accuracy']:.3f} ({opts.judge or opts.judge_url}: asked about "
           f"{result['judge_asked']} answers, {result['judge_unparsed']} verdicts unread)")
if opts.intervene and not result["intervention"]:
    print0("\nintervention: no output held a functional token, so there was none to replace")
elif opts.intervene:
    print0("\nintervention: accuracy with each functional token forced at the output's first one")
    for task, per_token in result["intervention"].items():
        gap, trained = result["intervention_gap"].get(task), result["intervention_gap_trained"].get(task)
        print0(f"  {task:<14}" + "  ".join(f"{tok} {a:.2f}" for tok, a in per_token.items())
               + (f"  | gap {gap:+.2f}" if gap is not None else "")
               + (f" | against the trained swaps {trained:+.2f}" if trained is not None else ""))
print0("\nsample outputs:")
for s in result["samples"][:4]:
    print0(f"  [{s['task']}] answer={s['answer']!r} correct={bool(s['accuracy'])}: {s['output']!r}")
print0(f"wrote {out}")
cleanup(together=False)  # the other ranks have left
