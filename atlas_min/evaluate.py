"""Greedy evaluation with the hand-written sampler: accuracy, format, functional-token use, per task.

`blind=True` replaces every image by a blank one of the same size (the background colour of the
toy world): a model that reads the image falls to chance; one that guesses from text does not.
"""
import math
import time
from collections import defaultdict

import torch
from PIL import Image

from atlas_min.data import collate_prompts, encode, open_image, to_device
from atlas_min.dist import all_gather_objects, autocast, world_size
from atlas_min.rewards import compute_reward
from atlas_min.sampler import sample
from atlas_min.tokens import FUNCTIONAL_TOKENS
from atlas_min.toy import BACKGROUND


def decode_completion(tokenizer, ids, mask):
    """The generated text without the stop token; functional tokens stay visible."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    kept = [t for t, m in zip(ids.tolist(), mask.tolist()) if m and t != eos]
    return tokenizer.decode(kept, skip_special_tokens=False), int(mask.sum())


def _blank(ex):
    sizes = [open_image(p, ex.get("where", "")).size for p in ex["images"]]
    return [Image.new("RGB", size, BACKGROUND) for size in sizes]


@torch.no_grad()
def evaluate(model, tokenizer, image_processor, examples, cfg, device, blind=False):
    """Metrics over `examples` (split over ranks, gathered on all); keys as in DESIGN.md's eval.json."""
    rank = torch.distributed.get_rank() if world_size() > 1 else 0
    mine = examples[rank::world_size()]
    rows, n_tokens, t0 = [], 0, time.time()
    n_chunks = math.ceil(math.ceil(len(examples) / world_size()) / cfg.eval_batch_size)  # the same on every rank
    for i in range(0, n_chunks * cfg.eval_batch_size, cfg.eval_batch_size):
        chunk = mine[i:i + cfg.eval_batch_size]
        encoded = [encode(ex, tokenizer, image_processor, cfg.system_prompt, images=_blank(ex) if blind else None,
                          question_suffix=cfg.question_suffix)
                   for ex in chunk]
        if not encoded:  # a rank without examples still steps with the others (FSDP collectives)
            encoded = [encode(examples[0], tokenizer, image_processor, cfg.system_prompt, question_suffix=cfg.question_suffix)]
        batch = to_device(collate_prompts(encoded, tokenizer.pad_token_id), device)
        with autocast(device):
            out = sample(model, batch, tokenizer, max_new_tokens=cfg.eval_max_new_tokens, temperature=0)
        for ex, ids, mask in zip(chunk, out["completion_ids"], out["completion_mask"]):
            text, length = decode_completion(tokenizer, ids, mask)
            n_tokens += length
            reward = compute_reward(text, ex["answer"], cfg, num_tokens=length)
            rows.append({"id": ex["id"], "task": ex["task"], "answer": ex["answer"], "output": text, "length": length,
                         **{k: reward[k] for k in ("accuracy", "format", "n_functional")},
                         "tokens": [t for t in FUNCTIONAL_TOKENS if t in text]})
    seconds = time.time() - t0
    rows = [r for part in all_gather_objects(rows) for r in part]
    n_tokens, seconds = sum(all_gather_objects(n_tokens)), max(all_gather_objects(seconds))
    n = max(len(rows), 1)
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    return {
        "n": len(rows),
        "accuracy": sum(r["accuracy"] for r in rows) / n,
        "format_rate": sum(r["format"] for r in rows) / n,
        "functional_rate": sum(r["n_functional"] > 0 for r in rows) / n,
        "mean_functional_tokens": sum(r["n_functional"] for r in rows) / n,
        "mean_length": sum(r["length"] for r in rows) / n,
        "per_task": {t: sum(r["accuracy"] for r in rs) / len(rs) for t, rs in sorted(by_task.items())},
        "functional_by_task": {t: {tok: sum(tok in r["tokens"] for r in rs) / len(rs) for tok in FUNCTIONAL_TOKENS}
                               for t, rs in sorted(by_task.items())},
        "tokens_per_s": n_tokens / max(seconds, 1e-9),
        "samples": rows[:8],
    }
