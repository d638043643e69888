"""Greedy evaluation with the hand-written sampler: accuracy, format, functional-token use, per task,
and the token intervention probe (does the answer depend on which functional token was written?).

`blind=True` replaces every image by a blank one of the same size, in the image processor's mean
colour (what normalises to 0): a model that reads the image falls to chance; one that guesses from
the question does not.
"""
import time
from collections import Counter, defaultdict

import torch
from PIL import Image

from atlas_min.data import collate_prompts, encode_example, open_image, to_device
from atlas_min.dist import all_gather_objects, autocast, gathered, world_size
from atlas_min.rewards import compute_reward
from atlas_min.sampler import decode_completion, sample
from atlas_min.tokens import FUNCTIONAL_TOKENS


def _blank(ex, image_processor):
    colour = tuple(round(255 * m) for m in image_processor.image_mean)
    return [Image.new("RGB", open_image(p, ex.get("where", "")).size, colour) for p in ex["images"]]


def _rank():
    return torch.distributed.get_rank() if world_size() > 1 else 0


def _greedy(model, tokenizer, encoded, filler, cfg, device):
    """Greedy completions of this rank's encoded prompts, up to eval_max_new_tokens: [(generated ids without
    padding, mask)] per prompt. Decoded in eval_batch_size chunks with the weights gathered once
    (`dist.gathered`): no collective per decode step, so each rank goes at its own pace. Only the first
    forward gathers, and every rank must take part in it: a rank without prompts decodes `filler` once."""
    outputs = []
    with gathered(model), autocast(device):
        for start in range(0, max(len(encoded), 1), cfg.eval_batch_size):  # at least one chunk, maybe empty
            chunk = encoded[start:start + cfg.eval_batch_size]
            batch = to_device(collate_prompts(chunk or [filler], tokenizer.pad_token_id), device)
            out = sample(model, batch, tokenizer, max_new_tokens=cfg.eval_max_new_tokens, temperature=0, lockstep=False)
            outputs += list(zip(out["completion_ids"].cpu(), out["completion_mask"].cpu()))[:len(chunk)]
    return outputs


@torch.no_grad()
def evaluate(model, tokenizer, image_processor, examples, cfg, device, blind=False):
    """Metrics over `examples` (split over ranks, gathered on all); the eval.json keys of docs/method.md."""
    def enc(ex):
        images = _blank(ex, image_processor) if blind else None
        return encode_example(ex, tokenizer, image_processor, cfg, images=images)

    mine = examples[_rank()::world_size()]
    t0 = time.time()
    outputs = _greedy(model, tokenizer, [enc(ex) for ex in mine], enc(examples[0]), cfg, device)
    rows = []
    for ex, (ids, mask) in zip(mine, outputs):
        text, length, functional = decode_completion(tokenizer, ids, mask)  # functional tokens by id
        reward = compute_reward(text, ex["answer"], cfg, question=ex["question"], num_tokens=length,
                                functional=functional)
        rows.append({**{k: ex[k] for k in ("id", "task", "question", "answer")}, "output": text, "length": length,
                     **{k: reward[k] for k in ("accuracy", "format", "n_functional")},
                     "tokens": sorted(set(functional), key=FUNCTIONAL_TOKENS.index),
                     "right_token": None if "token" not in ex else functional[:1] == [ex["token"]]})
    seconds = max(all_gather_objects(time.time() - t0))  # the slowest rank's decode
    rows = [r for part in all_gather_objects(rows) for r in part]
    n = max(len(rows), 1)
    by_task = {t: [r for r in rows if r["task"] == t] for t in sorted({r["task"] for r in rows})}
    mean = {key: sum(r[key] for r in rows) / n for key in ("accuracy", "format", "n_functional", "length")}
    return {
        "n": len(rows), "accuracy": mean["accuracy"], "format_rate": mean["format"],
        "functional_rate": sum(r["n_functional"] > 0 for r in rows) / n,
        "mean_functional_tokens": mean["n_functional"], "mean_length": mean["length"],
        "per_task": {t: sum(r["accuracy"] for r in rs) / len(rs) for t, rs in by_task.items()},
        "functional_by_task": {t: {tok: sum(tok in r["tokens"] for r in rs) / len(rs) for tok in FUNCTIONAL_TOKENS}
                               for t, rs in by_task.items()},
        # per task whose examples name their token: the share of outputs whose first functional token is it
        "right_token_rate": {t: sum(r["right_token"] for r in rs) / len(rs) for t, rs in by_task.items()
                             if all(r["right_token"] is not None for r in rs)},
        "tokens_per_s": sum(r["length"] for r in rows) / max(seconds, 1e-9), "samples": rows[:8],
        "outputs": rows,  # every row, for judging; eval.py leaves it out of eval.json
    }


def chance_by_task(examples):
    """Per task, the accuracy of always giving the task's most frequent gold answer: what a model that
    ignores the image can reach on this data (1 / #answers when the answers are balanced)."""
    answers = defaultdict(Counter)
    for ex in examples:
        answers[ex["task"]][ex["answer"]] += 1
    return {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in sorted(answers.items())}


def usual_tokens(examples):
    """Per task, the functional token its examples call for: their `token` field where they have one,
    else the one their reference replies (`response`) use most; tasks with neither are left out."""
    used = defaultdict(Counter)
    for ex in examples:
        named = [ex["token"]] if "token" in ex else [t for t in FUNCTIONAL_TOKENS if t in ex.get("response", "")]
        for tok in named:
            used[ex["task"]][tok] += 1
    return {t: c.most_common(1)[0][0] for t, c in sorted(used.items())}


def trained_swaps(examples):
    """Per task with a usual token (`usual_tokens`): the usual tokens of the other tasks whose examples ask
    the same question. Those are the swaps the training data teaches after this very prompt, where only the
    image says which token fits (on toy_decisive: `<|Line|>` for puzzle_shape, `<|Shape|>` for puzzle_line);
    a task whose question is its own has none and is left out. docs/method.md, "Token interventions"."""
    usual, questions = usual_tokens(examples), defaultdict(set)
    for ex in examples:
        questions[ex["task"]].add(ex["question"])
    swaps = {t: sorted({usual[o] for o in usual if o != t and questions[o] & questions[t]} - {usual[t]},
                       key=FUNCTIONAL_TOKENS.index) for t in usual}
    return {t: toks for t, toks in swaps.items() if toks}


def token_gap(accuracy, usual, against):
    """{task: accuracy[task][usual[task]] − the mean of accuracy[task][token] over the tokens `against[task]`},
    for each task that all three name (docs/method.md, "Token interventions")."""
    return {t: acc[usual[t]] - sum(acc[tok] for tok in against[t]) / len(against[t])
            for t, acc in accuracy.items() if t in usual and t in against and against[t]}


@torch.no_grad()
def intervene(model, tokenizer, image_processor, examples, cfg, device):
    """The token intervention probe (docs/method.md, "Token interventions").

    For each example: the model's own greedy output up to its first functional token, that token
    replaced by each of the five in turn, then greedy continuation; each continuation is scored.
    Returns {"intervention": {task: {token: accuracy}}, "intervention_gap": {task: accuracy with the
    task's usual token − mean accuracy with the other four}, "intervention_gap_trained": {task: accuracy
    with the usual token − mean accuracy with the task's trained swaps (`trained_swaps`: the usual tokens
    of the tasks that ask the same question)}, "intervention_skipped": {task: outputs without a functional
    token (left out)}}. A task without a usual token (`usual_tokens`) has no gap, one without a trained
    swap no trained gap.
    """
    functional_ids = tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS)
    mine = examples[_rank()::world_size()]
    encoded = [encode_example(ex, tokenizer, image_processor, cfg) for ex in mine]
    filler = encode_example(examples[0], tokenizer, image_processor, cfg)
    greedy = _greedy(model, tokenizer, encoded, filler, cfg, device)
    variants, owners, skipped = [], [], Counter()  # owners: (example, prefix ids, token)
    for ex, enc, (ids, mask) in zip(mine, encoded, greedy):
        kept = ids[mask].tolist()
        first = next((k for k, t in enumerate(kept) if t in functional_ids), None)
        if first is None:
            skipped[ex["task"]] += 1
            continue
        for tok, tok_id in zip(FUNCTIONAL_TOKENS, functional_ids):
            forced = kept[:first] + [tok_id]
            variants.append(dict(enc, prompt_ids=enc["prompt_ids"] + forced))
            owners.append((ex, forced, tok))
    continued = _greedy(model, tokenizer, variants, filler, cfg, device)
    hits = []  # (task, token, accuracy) of each continuation
    for (ex, forced, tok), (ids, mask) in zip(owners, continued):
        keep = max(0, cfg.eval_max_new_tokens - len(forced))  # the forced tokens count against the eval's budget
        text, length, functional = decode_completion(tokenizer, torch.tensor(forced + ids[:keep].tolist()),
                                                     torch.cat([torch.ones(len(forced), dtype=torch.bool), mask[:keep]]))
        hits.append((ex["task"], tok, compute_reward(text, ex["answer"], cfg, question=ex["question"],
                                                     num_tokens=length, functional=functional)["accuracy"]))
    merged_hits, merged_skipped = defaultdict(lambda: defaultdict(list)), sum(all_gather_objects(skipped), Counter())
    for task, tok, acc in (hit for part in all_gather_objects(hits) for hit in part):
        merged_hits[task][tok].append(acc)
    accuracy = {t: {tok: sum(v) / len(v) for tok, v in per.items()} for t, per in sorted(merged_hits.items())}
    usual = usual_tokens(examples)
    others = {t: [tok for tok in acc if tok != usual.get(t)] for t, acc in accuracy.items()}
    return {"intervention": accuracy, "intervention_gap": token_gap(accuracy, usual, others),
            "intervention_gap_trained": token_gap(accuracy, usual, trained_swaps(examples)),
            "intervention_skipped": {t: merged_skipped.get(t, 0) for t in sorted({ex["task"] for ex in examples})}}
