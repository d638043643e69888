"""Speed and memory, measured side by side in one run (the figures README.md's "Speed" section shows):

    python -m atlas_min.bench                               # toy preset, random-init model
    python -m atlas_min.bench --ckpt runs/experiment/sft    # a trained checkpoint (realistic lengths)
    python -m atlas_min.bench --config micro --rows 8 --peak-tflops 1 --bandwidth-gbs 10 --json bench.json
    python -m atlas_min.bench --config qwen2_5_vl_7b text_layers=4 vision_depth=4   # on one GPU

1. Decode: the hand-written group sampler against `model.generate` on the same model, prompts, batch
   (`--rows` rows: rows / G prompts × G) and settings (temperature, top-p, max_new_tokens, the vision
   placeholders suppressed): generated tokens per second (the prefill included), median of `--repeats`
   runs after a warm-up, and whether both decode the same tokens greedily. Each is also given as a
   share of the weight-bandwidth bound: a decode step reads the language model's weights (decoder
   layers, final norm, lm_head) and every row's KV cache once, so at most bandwidth ÷ (weight bytes + KV
   bytes at the decode's mean context) steps per second, and rows × that tokens per second.
2. Varied lengths ("varied"): the same two decoders, greedy, on the same rows, each row's reply length drawn
   by `reply_lengths` (log-normal, stated below) and forced by `ForcedLengths`: a random-init model never
   stops, a trained one stops when it likes. Our sampler drops a row once it stops; `generate` decodes every
   row until the longest ends. Also the row-steps each decodes (the speed-up if a step's cost followed its rows).
3. Update: one forward + backward + AdamW step as `train_rl.py` runs it on one GPU (fp32 weights, bf16
   autocast on CUDA, activation checkpointing and logprob_chunk as the preset says, gradient clipping) on
   `--update-rows` rows of prompt + `--completion-tokens` random completion tokens, median of `--repeats`
   after a warm-up. Model FLOP utilisation = model FLOPs ÷ seconds ÷ peak bf16 FLOP/s, with model FLOPs by
   the 6 · parameters · tokens rule per part (`update_flops`); attention scores and recomputation are not
   counted (the usual MFU, not hardware utilisation). Then the same rows with replies of varied lengths, in
   train_rl.py's micro-batches: padded to the rollout's width, cut per group, and cut per micro-batch of rows of
   similar length (as train_rl.py runs): tokens per second and the share of computed positions that are padding.
4. Memory: the peak of that update and of a no-grad log-prob pass on the same rows, with logprob_chunk=0
   ("plain") and with the preset's (or 256, "chunked"), each in a fresh subprocess (`probe_memory`):
   torch.cuda.max_memory_allocated on a GPU, the process's peak resident memory on a CPU; beside the fall
   `logit_fall` predicts.
5. The phases of RL steps, from `train_rl.py` itself (a subprocess of 3 steps; the last one's timings),
   for the toy presets and checkpoints.

Peak FLOP/s and bandwidth come from `--peak-tflops` / `--bandwidth-gbs`, else from PEAKS by the GPU's name;
without either (a CPU) the shares are n/a, null in the JSON. The model runs in bf16 for decoding on CUDA,
fp32 on CPU. `--skip` leaves sections out.

The `qwen2_5_vl_7b` preset (no `--ckpt`) builds a random-init model at the preset's sizes (or the widths the
overrides choose) with Qwen's special-token ids and 152,064-row vocabulary, and feeds it synthetic prompts:
one random image at max_pixels and `--prompt-tokens` text tokens each (words of `plan.qwen_vocab_standin`, a
tokenizer of Qwen's size). No weights, tokenizer or data needed; fewer layers (`text_layers=4
vision_depth=4`) keep the widths and fit one GPU. No RL step is timed there.
"""
import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig

from atlas_min import checkpoint
from atlas_min.cli import UsageError, quiet_libraries, user_errors
from atlas_min.run_folder import check_output
from atlas_min.config import get_config, to_dict
from atlas_min.data import collate_prompts, encode_example, load_examples, micro_batches, prompt_text, to_device
from atlas_min.dist import autocast, clip_grad_norm, shard
from atlas_min.model import adopt_shape, build_model, image_order, image_processor_for, init_model, load_pretrained
from atlas_min.optim import adamw
from atlas_min.plan import PROMPT_TEXT, qwen_vocab_standin
from atlas_min.sampler import STOP_TOKENS, rows_logprobs, sample
from atlas_min.tokens import VISION_TOKENS

ROOT = Path(__file__).resolve().parents[1]
NA = "n/a (pass --peak-tflops / --bandwidth-gbs)"

# (dense bf16 FLOP/s, memory bytes/s) by torch.cuda.get_device_name, from NVIDIA's datasheets: H100 SXM
# and H200 SXM "BF16 Tensor Core 1,979 TFLOPS" with sparsity (half dense), 3.35 and 4.8 TB/s; A100 "BF16
# Tensor Core 312 TFLOPS", 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s. Exact names only:
# other variants (H100 PCIe or NVL, H200 NVL) have other figures and get n/a unless given by flag.
PEAKS = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.039e12),
    "NVIDIA A100 80GB PCIe": (312e12, 1.935e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.555e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 1.555e12),
}


def hardware_peaks(device_name, peak_tflops=None, bandwidth_gbs=None):
    """(peak FLOP/s or None, bandwidth bytes/s or None, where they come from): a flag wins over PEAKS."""
    table_flops, table_bw = PEAKS.get(device_name, (None, None))
    flops = peak_tflops * 1e12 if peak_tflops is not None else table_flops
    bandwidth = bandwidth_gbs * 1e9 if bandwidth_gbs is not None else table_bw
    flags = (("--peak-tflops", peak_tflops), ("--bandwidth-gbs", bandwidth_gbs))
    sources = [f"{flag} flag" for flag, value in flags if value is not None]
    if device_name in PEAKS and (peak_tflops is None or bandwidth_gbs is None):
        sources.append(f"NVIDIA datasheet of the {device_name}")
    return flops, bandwidth, ", ".join(sources) or "none"


def decode_weight_bytes(model):
    """Bytes of the weights one decode step reads: the language model's decoder layers and final norm, and
    lm_head (the input embedding is a gather of one row per token; the vision tower does not run)."""
    lm, head = model.model.language_model, model.get_output_embeddings().weight
    embed = lm.get_input_embeddings().weight
    body = [p for p in lm.parameters() if p is not embed]
    return sum(p.numel() * p.element_size() for p in body) + head.numel() * head.element_size()


def kv_cache_bytes(rows, context, layers, kv_width, value_bytes):
    """Bytes of the K and V caches of `rows` rows holding `context` positions in each of `layers` layers."""
    return rows * context * layers * 2 * kv_width * value_bytes


def decode_bound(weight_bytes, kv_bytes, bandwidth):
    """Decode steps/s if a step only had to read `weight_bytes` + `kv_bytes` at `bandwidth` bytes/s."""
    return bandwidth / (weight_bytes + kv_bytes)


def update_flops(parts):
    """Model FLOPs of one forward + backward: 6 · parameters · tokens summed over (parameters, tokens) parts
    (2 FLOPs per parameter and token forward, 4 backward; Kaplan et al. 2020)."""
    return 6 * sum(params * tokens for params, tokens in parts)


def share(measured, bound):
    """measured / bound, or None when the bound is unknown."""
    return None if bound is None else measured / bound


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats, warm_up=True):
    if warm_up:  # first-call allocations and lazy initialisation are not what we measure
        fn()
    seconds, out = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), out


def synthetic_prompts(cfg, tokenizer, image_processor, n, seed, text_tokens=PROMPT_TEXT):
    """`n` encoded prompts: one random-noise image at max_pixels and `text_tokens` text tokens (chat template,
    system prompt and a question of random words; the template alone if it is longer) each; words are `w<id>`
    entries of `tokenizer`."""
    gen = np.random.default_rng(seed)
    empty = prompt_text(cfg.question_suffix, 1, cfg.system_prompt, cfg.image_separator)
    template = len(tokenizer.encode(empty, add_special_tokens=False)) - 1  # less the image's placeholder
    side = math.isqrt(cfg.max_pixels)
    out = []
    for _ in range(n):
        words = " ".join(f"w{i}" for i in gen.integers(1, 150_000, max(0, text_tokens - template)))
        image = Image.fromarray(gen.integers(0, 256, (side, side, 3), dtype=np.uint8))
        out.append(encode_example({"question": words}, tokenizer, image_processor, cfg, images=[image]))
    return out


def bench_model(cfg, ckpt, device):
    """(model, tokenizer, image_processor, kind): a checkpoint, the Qwen-width random init ("synthetic", no
    tokenizer: Qwen's ids, the stand-in for lookups) or the preset's own init (toy, or its model_path)."""
    if ckpt:
        return *load_pretrained(ckpt, cfg), "checkpoint"
    if cfg.vocab_rows and not cfg.model_path:
        with torch.device(device):  # built where it runs: a 7B-width init on the CPU would take minutes
            model = build_model(cfg)
        return model, qwen_vocab_standin(), image_processor_for(cfg), "synthetic"
    return *init_model(cfg), "preset"


def decoders(model, tokenizer, batch, cfg):
    """(ours, theirs): functions of the temperature that decode the rows of `batch` (G per prompt) with `sample`
    and with `model.generate` under the same settings; each returns (completion ids, generated tokens)."""
    G, stops = cfg.group_size, tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    seeds = list(range(batch["input_ids"].shape[0] * G))
    rows = {k: v.repeat_interleave(G, 0) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    spans = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())  # each image's patches
    order = image_order(batch["images_per_row"], G)  # generate gets every row's own copy of its images
    pixels, grids = torch.cat([spans[i] for i in order]), batch["image_grid_thw"][order]

    def ours(temperature):
        out = sample(model, batch, tokenizer, group_size=G, max_new_tokens=cfg.max_new_tokens,
                     temperature=temperature, top_p=cfg.top_p, row_seeds=seeds)
        return out["completion_ids"], int(out["completion_mask"].sum())

    @torch.no_grad()
    def theirs(temperature):
        sampling = (dict(do_sample=True, temperature=temperature, top_p=cfg.top_p, top_k=0) if temperature > 0
                    else dict(do_sample=False))
        settings = GenerationConfig(max_new_tokens=cfg.max_new_tokens, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id,
                                    suppress_tokens=tokenizer.convert_tokens_to_ids(VISION_TOKENS),
                                    **sampling)
        ids = model.generate(**rows, pixel_values=pixels, image_grid_thw=grids, generation_config=settings,
                             mm_token_type_ids=(rows["input_ids"] == model.config.image_token_id).long())
        new = ids[:, rows["input_ids"].shape[1]:]
        is_stop = torch.isin(new, torch.tensor(stops, device=new.device))
        stopped = is_stop.cumsum(1) - is_stop.long()  # tokens after the first stop are padding
        return new, int((stopped == 0).sum())

    return ours, theirs


def same_tokens(a, b):
    """True when two decodes hold the same tokens over the width both reached."""
    C = min(a.shape[1], b.shape[1])
    return bool(torch.equal(a[:, :C], b[:, :C]))


def compare_samplers(model, tokenizer, batch, cfg, repeats):
    """Tokens/s of `sample` and `model.generate` on the rows of `batch` (G per prompt); greedy agreement."""
    ours, theirs = decoders(model, tokenizer, batch, cfg)
    t_ours, (_, n_ours) = _timed(lambda: ours(cfg.temperature), repeats)
    t_theirs, (_, n_theirs) = _timed(lambda: theirs(cfg.temperature), repeats)
    return {"rows": batch["input_ids"].shape[0] * cfg.group_size, "sampler_tokens_per_s": n_ours / t_ours,
            "generate_tokens_per_s": n_theirs / t_theirs, "sampler_seconds": t_ours,
            "generate_seconds": t_theirs, "greedy_match": same_tokens(ours(0.0)[0], theirs(0.0)[0])}


# Reply lengths of the varied workload: log-normal, clipped to [2, max_new_tokens] (an answer, then the stop). The mean is ATLAS's 203.7
# tokens of the 7B preset's 1,024 (a share of 0.2); σ = 0.8 is ours (a spread where most replies are short and a
# few of 64 run several times the mean: the longest row sets how long an uncompacted batch decodes).
LENGTH_MEAN_SHARE, LENGTH_SIGMA = 0.2, 0.8


def reply_lengths(n, max_new_tokens, seed):
    """`n` lengths from the log-normal above: μ = ln(mean) − σ²/2 makes exp(μ + σ²/2) the mean."""
    mu = math.log(LENGTH_MEAN_SHARE * max_new_tokens) - LENGTH_SIGMA ** 2 / 2
    drawn = np.random.default_rng(seed).lognormal(mu, LENGTH_SIGMA, n)
    return torch.from_numpy(np.clip(np.rint(drawn), 2, max_new_tokens).astype(np.int64))


class ForcedLengths:
    """A forward hook on the model that makes row r's reply exactly `lengths[r]` tokens: the stop tokens are
    banned before its last step and <|im_end|> is made the favourite at it; every other logit is the model's.

    It follows the rows itself: a call with more than one position is a prefill (step 0: of every row for
    `generate`, of each distinct prompt for the sampler; no row stops there, every length being ≥ 2); a decode
    call with fewer rows than the last one means the sampler dropped the rows that stopped (keeping the order),
    while `generate` keeps every row."""

    def __init__(self, lengths, stop_ids, eos_id):
        self.lengths, self.stops, self.eos = lengths, torch.tensor(stop_ids), eos_id

    def __call__(self, module, args, kwargs, out):
        logits = out.logits[:, -1]  # (n, V), changed in place
        stops = self.stops.to(logits.device)
        if kwargs["input_ids"].shape[1] > 1:
            self.rows, self.step = torch.arange(len(self.lengths)), 0
            logits[:, stops] = float("-inf")
            return out
        self.step += 1
        if kwargs["input_ids"].shape[0] < len(self.rows):
            self.rows = self.rows[self.lengths[self.rows] > self.step]
        left = (self.lengths[self.rows] - 1 - self.step).to(logits.device)  # (n,) steps after this one
        logits[:, stops] = torch.where(left[:, None] > 0, float("-inf"), logits[:, stops])
        last = left == 0
        logits[last, self.eos] = logits[last].max(-1).values + 30  # e^30: a greedy and a sampled certainty
        return out


def compare_varied(model, tokenizer, batch, cfg, repeats, warm_up):
    """Greedy tokens/s of `sample` and `model.generate` on the rows of `batch` with reply lengths drawn by
    `reply_lengths` and forced by `ForcedLengths`, and whether both made the same tokens. `warm_up`: a first
    untimed call of each, needed unless the decode section has warmed both up."""
    ours, theirs = decoders(model, tokenizer, batch, cfg)
    lengths = reply_lengths(batch["input_ids"].shape[0] * cfg.group_size, cfg.max_new_tokens, cfg.seed)
    hook = model.register_forward_hook(ForcedLengths(lengths, tokenizer.convert_tokens_to_ids(STOP_TOKENS),
                                                     tokenizer.convert_tokens_to_ids("<|im_end|>")), with_kwargs=True)
    try:
        t_ours, (ids_ours, n_ours) = _timed(lambda: ours(0.0), repeats, warm_up)
        t_theirs, (ids_theirs, n_theirs) = _timed(lambda: theirs(0.0), repeats, warm_up)
    finally:
        hook.remove()
    return {"rows": len(lengths), "sampler_tokens_per_s": n_ours / t_ours, "generate_tokens_per_s": n_theirs / t_theirs,
            "sampler_seconds": t_ours, "generate_seconds": t_theirs, "greedy_match": same_tokens(ids_ours, ids_theirs),
            "tokens": n_ours, "lengths_as_drawn": n_ours == n_theirs == int(lengths.sum()),
            # rows × steps each decodes: the speed-up if a step's cost were proportional to its rows
            "row_steps": {"sampler": int(lengths.sum()), "generate": len(lengths) * int(lengths.max())},
            "lengths": {"distribution": f"log-normal, mean {LENGTH_MEAN_SHARE} × max_new_tokens, σ {LENGTH_SIGMA}, "
                                        "clipped to [2, max_new_tokens]", "max_new_tokens": cfg.max_new_tokens,
                        "mean": float(lengths.float().mean()), "max": int(lengths.max()), "drawn": lengths.tolist()}}


def decode_figures(model, rows, prompt_tokens, new_tokens, bandwidth):
    """The bound's inputs and result: weight bytes, KV bytes per step at the decode's mean context (the prompt
    + half the new tokens), steps/s and tokens/s (None without a bandwidth)."""
    text = model.config.get_text_config()
    kv_width = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    value_bytes = next(model.parameters()).element_size()
    weights = decode_weight_bytes(model)
    kv = kv_cache_bytes(rows, prompt_tokens + new_tokens / 2, text.num_hidden_layers, kv_width, value_bytes)
    steps = None if bandwidth is None else decode_bound(weights, kv, bandwidth)
    return {"decode_weight_bytes": weights, "kv_bytes_per_step": kv, "bound_steps_per_s": steps,
            "bound_tokens_per_s": None if steps is None else rows * steps}


def random_completions(tokenizer, rows, length, seed):
    """(rows, length) token ids drawn uniformly from the vocabulary less the vision placeholders."""
    allowed = torch.ones(len(tokenizer), dtype=torch.bool)
    allowed[tokenizer.convert_tokens_to_ids(VISION_TOKENS)] = False
    pool = allowed.nonzero()[:, 0]
    return pool[torch.randint(len(pool), (rows, length), generator=torch.Generator().manual_seed(seed))]


def update_step(model, encoded, completion_ids, cfg, device, pad_id, lengths=None, trim=True, micros=None):
    """(one RL update step: forward + backward of each micro-batch, clip, AdamW, the model as train_rl.py holds it on
    one GPU; a no-grad log-prob pass of the first micro-batch; the model) on the prompts `encoded`, each repeated G
    times and followed by its rows of `completion_ids` (row r's first lengths[r] tokens; all of them without
    `lengths`). `micros`: the micro-batches' rows, ascending (default: all rows in one); `trim` as in
    `sequence_logprobs`. Casts `model` to fp32 in place."""
    G, (rows, C) = cfg.group_size, completion_ids.shape
    batch = to_device(collate_prompts(encoded, pad_id), device)
    if lengths is None:
        lengths = torch.full((rows,), C, device=completion_ids.device)
    rollout = {"prompt_ids": batch["input_ids"].repeat_interleave(G, 0),
               "prompt_mask": batch["attention_mask"].repeat_interleave(G, 0), "completion_ids": completion_ids,
               "completion_mask": torch.arange(C, device=completion_ids.device) < lengths[:, None]}  # (rows, C)
    micros = micros or [torch.arange(rows)]
    model = shard(model.float(), cfg, device).train()  # one process: checkpointing as the preset says
    optimizer = adamw(model, cfg, "rl")

    def logprobs(rows):
        with autocast(device):
            return rows_logprobs(model, encoded, rollout, rows, group_size=G, pad_id=pad_id, chunk=cfg.logprob_chunk,
                                 trim=trim)

    def step():
        mask = rollout["completion_mask"]
        for rows in micros:  # the token mean over all rows, as micro-batches add up
            (-(logprobs(rows) * mask[rows]).sum() / mask.sum()).backward()
        clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, lambda: logprobs(micros[0]), model


def time_update(model, encoded, completion_ids, cfg, repeats, device, pad_id):
    """(median seconds of one `update_step` on all rows at once, {part: (parameters, tokens)})."""
    step, _, model = update_step(model, encoded, completion_ids, cfg, device, pad_id)
    seconds, _ = _timed(step, repeats)
    G, visual = cfg.group_size, model.model.visual
    batch = collate_prompts(encoded, pad_id)
    merger = sum(p.numel() for p in visual.merger.parameters())
    embed = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.model.language_model.parameters() if p is not embed)
    patches = batch["pixel_values"].shape[0] if batch["pixel_values"] is not None else 0
    rows, C = completion_ids.shape
    head = model.get_output_embeddings().weight.numel()
    parts = {"text": (body, rows * (batch["input_ids"].shape[1] + C)),  # every position, padding included
             "lm_head": (head, rows * (C + 1)),  # the scored positions only
             "vision": (sum(p.numel() for p in visual.parameters()) - merger, patches),  # once per prompt
             "merger": (merger, patches // visual.spatial_merge_size ** 2)}
    return seconds, parts


DRAWS = 1000  # draws of the replies' lengths for the expected padded share: one draw of 16 rows is noisy


def cut_ways(prompt, lengths, width, size):
    """{way: (positions computed, micro-batches' rows)} of an update whose row r has prompt[r] prompt tokens and
    lengths[r] reply tokens, the rollout `width` wide, in micro-batches of `size` rows: "uncut" (groups in order,
    every row as wide as the rollout), "group" (groups in order, each micro-batch cut to its own longest prompt
    and reply) and "cut" (rows of similar length together, cut: `data.micro_batches`, as train_rl.py runs)."""
    by_group = [torch.arange(k, min(k + size, len(lengths))) for k in range(0, len(lengths), size)]
    by_length = micro_batches(prompt + lengths, len(lengths), size)[0][1]

    def cut(micros):  # left-padded prompts, right-padded replies: each micro-batch as wide as its longest of each
        return sum(len(m) * int(prompt[m].max() + lengths[m].max()) for m in micros)
    return {"uncut": (len(lengths) * (int(prompt.max()) + width), by_group), "group": (cut(by_group), by_group),
            "cut": (cut(by_length), by_length)}


def compare_cut(model, encoded, completion_ids, cfg, repeats, device, pad_id):
    """The update of `update_step` on replies of varied lengths (`reply_lengths`: the log-normal of the varied
    decode) in train_rl.py's micro-batches (micro_batch_size rows, rounded up to whole groups), the three ways of
    `cut_ways`: seconds, real tokens per second and the share of the positions computed that are padding; and
    each way's padded share averaged over DRAWS draws of the lengths (arithmetic only)."""
    G, (rows, C) = cfg.group_size, completion_ids.shape
    lengths = reply_lengths(rows, C, cfg.seed)
    prompt = torch.tensor([len(e["prompt_ids"]) for e in encoded]).repeat_interleave(G)  # (rows,)
    real = int(prompt.sum() + lengths.sum())  # the positions a row truly needs: its prompt and its reply
    size = max(1, cfg.micro_batch_size // G) * G
    drawn = [(int(prompt.sum() + draw.sum()), cut_ways(prompt, draw, C, size))
             for draw in (reply_lengths(rows, C, seed) for seed in range(DRAWS))]
    out = {"lengths": {"mean": float(lengths.float().mean()), "max": int(lengths.max()), "width": C},
           "micro_batch_rows": size, "draws": DRAWS}
    for name, (computed, micros) in cut_ways(prompt, lengths, C, size).items():
        step, _, model = update_step(model, encoded, completion_ids, cfg, device, pad_id, lengths.to(device),
                                     name != "uncut", micros)
        seconds, _ = _timed(step, repeats)
        out[name] = {"seconds": seconds, "tokens_per_s": real / seconds, "padded_share": 1 - real / computed,
                     "expected_padded_share": statistics.mean(1 - need / ways[name][0] for need, ways in drawn)}
    return out


def _peak_reset(device):
    """Start a new peak: the GPU allocator's counter, or the process's peak resident memory (Linux's VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _memory(device, key):
    """Bytes now ("now") or at the peak since `_peak_reset` ("peak")."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) if key == "now" else torch.cuda.max_memory_allocated(device)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS" if key == "now" else "VmHWM"].split()[0]) * 1024


def probe_memory(args, cfg, device):
    """{"before", "peak"} bytes of the second of two RL updates ("update") or no-grad log-prob passes ("logprobs"),
    in this fresh process: after the first, AdamW's state and the allocator's pools exist, as in a run's steps."""
    model, tokenizer, image_processor, kind = bench_model(cfg, args.ckpt, device)
    G, rows, C = cfg.group_size, args.update_rows, args.completion_tokens or cfg.max_new_tokens
    encoded = bench_prompts(cfg, tokenizer, image_processor, kind, rows // G, args.update_prompt_tokens)
    step, logprobs, model = update_step(model, encoded, random_completions(tokenizer, rows, C, cfg.seed).to(device),
                                        cfg, device, tokenizer.pad_token_id)
    run = step if args.probe == "update" else torch.no_grad()(logprobs)
    run()
    _sync()
    _peak_reset(device)
    before = _memory(device, "now")
    run()
    _sync()
    return {"before": before, "peak": _memory(device, "peak")}


def logit_fall(rows, C, V, chunk, value_bytes):
    """Bytes by which chunked log-probs should lower the peak of an update and of a no-grad log-prob pass over
    rows × C scored positions of V logits (entries), less the piece of min(chunk, C) positions they hold.

    float32 logits (a CPU): all at once, the log-softmax of the logits' view `[:, :-1]` first copies it to a
    contiguous tensor, so a pass holds logits, copy and log-softmax (12 bytes an entry), chunked the logits and a
    piece's log-softmax (4 bytes a piece entry); an update's peak, forward or backward, is 12 bytes an entry all at
    once, 8 chunked (the logits kept and their gradient). bf16 logits (a GPU, `plan`'s bookings): an update's 14
    bytes become 4; a pass's logits, float32 copy and log-softmax (10 bytes) become the logits (2), each chunked
    path plus one piece's float32 copy and log-softmax (8 bytes a piece entry).
    """
    entries, piece = rows * C * V, min(chunk, C) * V
    if value_bytes == 4:
        return {"update": 4 * entries - 4 * piece, "logprobs": 8 * entries - 4 * piece}
    return {"update": 10 * entries - 8 * piece, "logprobs": 8 * entries - 8 * piece}


def compare_memory(args, cfg, device, model_rows, value_bytes):
    """The peaks of `probe_memory` for logprob_chunk = 0 ("plain") and the preset's (or 256) ("chunked"), each in a
    fresh subprocess, and the falls `logit_fall` predicts."""
    chunk = cfg.logprob_chunk or 256
    peaks = {}
    for name, value in (("plain", 0), ("chunked", chunk)):
        peaks[name] = {}
        for kind in ("update", "logprobs"):
            argv = [sys.executable, "-m", "atlas_min.bench", "--config", args.config, "--probe", kind,
                    "--update-rows", str(args.update_rows), "--update-prompt-tokens", str(args.update_prompt_tokens),
                    *(["--completion-tokens", str(args.completion_tokens)] if args.completion_tokens else []),
                    *(["--ckpt", args.ckpt] if args.ckpt else []), *args.overrides, f"logprob_chunk={value}"]
            out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            peaks[name][kind] = json.loads(out.splitlines()[-1])
    C = args.completion_tokens or cfg.max_new_tokens
    return {**peaks, "chunk": chunk, "rows": args.update_rows, "completion_tokens": C,
            "predicted_fall": logit_fall(args.update_rows, C, model_rows, chunk, value_bytes),
            "fall": {k: peaks["plain"][k]["peak"] - peaks["chunked"][k]["peak"] for k in ("update", "logprobs")}}


def rl_phases(init, cfg_name, overrides):
    """Seconds per phase of the 3rd step of a real `train_rl.py` run (steps 1-2 warm up)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "train_rl.py", "--config", cfg_name, "--init", str(init),
                        "--out", out, "max_steps=3", "save_every=0", *overrides],
                       cwd=ROOT, check=True, capture_output=True)
        last = json.loads((Path(out) / "metrics_rl.jsonl").read_text().splitlines()[-1])
    return {k[2:]: v for k, v in last.items() if k.startswith("t_")}


def check_args(args, cfg):
    """UsageError for flags that cannot work with this preset."""
    G = cfg.group_size
    for flag, value in (("--rows", args.rows), ("--update-rows", args.update_rows)):
        if value is not None and (value < 0 or value % G or (flag == "--rows" and value == 0)):
            raise UsageError(f"{flag} {value}: must be a {'positive ' if flag == '--rows' else ''}"
                             f"multiple of group_size={G} (whole groups)")
    for flag, value in (("--repeats", args.repeats), ("--completion-tokens", args.completion_tokens),
                        ("--peak-tflops", args.peak_tflops), ("--bandwidth-gbs", args.bandwidth_gbs)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} {value}: must be > 0")


def bench_prompts(cfg, tokenizer, image_processor, kind, n, text_tokens=PROMPT_TEXT):
    """`n` encoded prompts: synthetic for the Qwen-width random init, else the train data's first."""
    if kind == "synthetic":
        return synthetic_prompts(cfg, tokenizer, image_processor, n, cfg.seed, text_tokens)
    examples = load_examples(cfg, "train")[:n]
    if len(examples) < n:
        raise UsageError(f"{n} prompts needed (--rows, --update-rows), the train data has {len(examples)}")
    return [encode_example(ex, tokenizer, image_processor, cfg) for ex in examples]


def run(args, cfg):
    """Every figure of one bench run, as a dict (what --json writes)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, bandwidth, source = hardware_peaks(name, args.peak_tflops, args.bandwidth_gbs)
    G, command = cfg.group_size, shlex.join(["python", "-m", "atlas_min.bench", *sys.argv[1:]])
    update_rows = args.update_rows
    torch.manual_seed(cfg.seed)
    r = {"command": command, "device": device.type, "device_name": name, "threads": torch.get_num_threads(),
         "config": to_dict(cfg), "peak_flops": peak, "bandwidth_bytes_per_s": bandwidth,
         "peaks_source": source, "skipped": args.skip}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, image_processor, kind = bench_model(cfg, args.ckpt, device)
        if kind == "preset" and args.rl_step:  # train_rl.py starts from a checkpoint of the same model
            checkpoint.save(tmp, model, tokenizer, image_processor, cfg, 0)
        encoded = bench_prompts(cfg, tokenizer, image_processor, kind, args.rows // G, args.prompt_tokens)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = model.to(device, dtype).eval()
        batch = to_device(collate_prompts(encoded[:args.rows // G], tokenizer.pad_token_id), device)
        r |= {"model": kind, "decode_dtype": str(dtype).removeprefix("torch."), "prompts": args.rows // G,
              "group_size": G, "rows": args.rows, "prompt_tokens": batch["input_ids"].shape[1],
              "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
        r |= dict.fromkeys(["sampler_tokens_per_s", "generate_tokens_per_s", "greedy_match"])
        if "decode" not in args.skip:
            r |= compare_samplers(model, tokenizer, batch, cfg, args.repeats)
        r |= decode_figures(model, r["rows"], r["prompt_tokens"], cfg.max_new_tokens, bandwidth)
        for who in ("sampler", "generate"):
            tokens_per_s = r[f"{who}_tokens_per_s"]
            r[f"{who}_share_of_bound"] = None if tokens_per_s is None else share(tokens_per_s, r["bound_tokens_per_s"])
        r["varied"] = None if "varied" in args.skip else compare_varied(model, tokenizer, batch, cfg, args.repeats,
                                                                         warm_up="decode" in args.skip)
        vocab_rows = model.get_output_embeddings().weight.shape[0]
        r["update"] = None
        if update_rows:
            C = args.completion_tokens or cfg.max_new_tokens
            prompts = bench_prompts(cfg, tokenizer, image_processor, kind, update_rows // G, args.update_prompt_tokens)
            pad_id = tokenizer.pad_token_id
            completions = random_completions(tokenizer, update_rows, C, cfg.seed).to(device)
            seconds, parts = time_update(model, prompts, completions, cfg, args.repeats, device, pad_id)
            flops = update_flops(parts.values())
            cut = compare_cut(model, prompts, completions, cfg, args.repeats, device, pad_id)
            r["update"] = {"rows": update_rows, "tokens": parts["text"][1],  # every position of the update
                           "varied": cut, "padded_share": cut["cut"]["padded_share"],
                           "completion_tokens": C, "activation_checkpointing": cfg.activation_checkpointing,
                           "logprob_chunk": cfg.logprob_chunk, "parts": parts, "seconds": seconds, "flops": flops,
                           "flops_per_s": flops / seconds, "mfu": share(flops / seconds, peak)}
        del model, batch, encoded
        rl = kind != "synthetic" and args.rl_step
        r["rl_step_seconds"] = rl_phases(args.ckpt or tmp, args.config, args.overrides) if rl else None
    logits_bytes = 2 if device.type == "cuda" else 4  # bf16 autocast on a GPU
    r["memory"] = (compare_memory(args, cfg, device, vocab_rows, logits_bytes)
                   if update_rows and "memory" not in args.skip else None)
    return r


def _of_bound(x):
    return NA if x is None else f"{100 * x:.3g}% of the bound"


def report_lines(r):
    """The printed (and --readme) text of a result of `run`."""
    GB, u = 1e9, r["update"]
    shown = " ".join(a for a in shlex.split(r["command"])[3:] if a != "--readme")
    bound = NA if r["bound_tokens_per_s"] is None else (
        f"{r['bound_steps_per_s']:,.0f} steps/s = {r['bound_tokens_per_s']:,.0f} tokens/s "
        f"at {r['bandwidth_bytes_per_s'] / GB:,.0f} GB/s")
    lines = [f"`python -m atlas_min.bench {shown}`", "",
             f"{r['config']['name']} ({r['model']} model) on {r['device_name']}, {r['decode_dtype']} decode, "
             f"{r['threads']} threads; peaks from: {r['peaks_source']}", "",
             f"- decode: {r['rows']} rows ({r['prompts']} prompts × G={r['group_size']}), "
             f"prompt {r['prompt_tokens']} tokens, max_new_tokens={r['max_new_tokens']}, "
             f"temperature={r['temperature']}",
             f"- weight-bandwidth bound: {r['decode_weight_bytes'] / GB:.3g} GB weights + "
             f"{r['kv_bytes_per_step'] / GB:.3g} GB KV cache per step: {bound}"]
    if r["sampler_tokens_per_s"] is not None:
        for who, label in (("sampler", "hand-written sampler"), ("generate", "`model.generate`")):
            lines.append(f"- {label}: {r[who + '_tokens_per_s']:,.0f} tokens/s ({r[who + '_seconds']:.3f} s), "
                         f"{_of_bound(r[who + '_share_of_bound'])}")
        lines.append(f"- greedy outputs identical: {r['greedy_match']}")
    if v := r["varied"]:
        lines.append(f"- varied reply lengths ({v['lengths']['distribution']}; here mean {v['lengths']['mean']:.1f}, "
                     f"longest {v['lengths']['max']}), greedy: sampler {v['sampler_tokens_per_s']:,.1f} tokens/s "
                     f"({v['sampler_seconds']:.2f} s), `model.generate` {v['generate_tokens_per_s']:,.1f} tokens/s "
                     f"({v['generate_seconds']:.2f} s): {v['sampler_tokens_per_s'] / v['generate_tokens_per_s']:.2f}× "
                     f"(row-steps decoded: {v['row_steps']['generate'] / v['row_steps']['sampler']:.2f}× fewer); "
                     f"outputs identical: {v['greedy_match']}")
    if u:
        peak = None if u["mfu"] is None else r["peak_flops"] / 1e12
        mfu = NA if peak is None else f"MFU {100 * u['mfu']:.3g}% of {peak:,.0f} TFLOP/s"
        lines.append(f"- update (forward + backward + AdamW): {u['rows']} rows × {u['tokens'] // u['rows']} "
                     f"tokens, activation checkpointing {'on' if u['activation_checkpointing'] else 'off'}: "
                     f"{u['seconds']:.3f} s, {u['flops'] / 1e12:.3g} TFLOP = "
                     f"{u['flops_per_s'] / 1e12:.3g} TFLOP/s, {mfu}")
        v = u["varied"]
        ways = (("uncut", "every row as wide as the rollout"), ("group", "each group cut to its own longest"),
                ("cut", "rows of similar length together, cut (train_rl.py)"))
        lines.append(f"- the update on varied reply lengths (the log-normal above; here mean {v['lengths']['mean']:.1f}, "
                     f"longest {v['lengths']['max']} of {v['lengths']['width']}), micro-batches of "
                     f"{v['micro_batch_rows']} rows: " + "; ".join(
                         f"{label} {v[k]['tokens_per_s']:,.1f} tokens/s ({v[k]['seconds']:.3f} s), padded share "
                         f"{v[k]['padded_share']:.2f} (over {v['draws']:,} draws of the lengths "
                         f"{v[k]['expected_padded_share']:.3f})" for k, label in ways)
                     + " (tokens/s: the prompt and reply positions the rows truly need)")
    if m := r["memory"]:
        where = "peak GPU memory allocated" if r["device"] == "cuda" else "peak resident memory of a fresh process"
        for kind, label in (("update", "one RL update"), ("logprobs", "one no-grad log-prob pass")):
            lines.append(f"- {label}, {where}, {m['rows']} rows × {m['completion_tokens']} completion tokens: "
                         f"all at once {m['plain'][kind]['peak'] / GB:.2f} GB, logprob_chunk={m['chunk']} "
                         f"{m['chunked'][kind]['peak'] / GB:.2f} GB: {m['fall'][kind] / GB:.2f} GB less "
                         f"(predicted {m['predicted_fall'][kind] / GB:.2f} GB)")
    if r["rl_step_seconds"]:
        lines.append("- one RL step (train_rl.py's own timings, 3rd step): "
                     + ", ".join(f"{k} {v:.3f} s" for k, v in r["rl_step_seconds"].items()))
    return lines


def main():
    p = argparse.ArgumentParser(description="decode and update speed, against the GPU's bounds")
    p.add_argument("--config", default="toy")
    p.add_argument("--ckpt", default=None, help="a model folder (default: a random-init model of the preset)")
    p.add_argument("--rows", type=int, default=64, help="rows decoded at once (prompts × G)")
    p.add_argument("--update-rows", type=int, default=None,
                   help="rows of the timed update (default: train_rl.py's micro-batch; 0: no update)")
    p.add_argument("--completion-tokens", type=int, default=None,
                   help="completion tokens per row in the timed update (default: max_new_tokens)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: PEAKS)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory GB/s (default: PEAKS)")
    p.add_argument("--no-rl-step", dest="rl_step", action="store_false", help="skip the train_rl.py phases")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TEXT,
                   help="text tokens of each synthetic prompt (Qwen-width random init), chat template included")
    p.add_argument("--update-prompt-tokens", type=int, default=None,
                   help="text tokens of the update's synthetic prompts (default: --prompt-tokens); the 7B preset's "
                        "prompts are ~1,536 tokens beside 1,024 reply tokens, and padding depends on the ratio")
    p.add_argument("--skip", nargs="+", default=[], choices=["decode", "varied", "memory"],
                   help="sections not to run (the update: --update-rows 0; the RL step: --no-rl-step)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write every figure here")
    p.add_argument("--readme", action="store_true", help="also write the figures into README.md")
    p.add_argument("--probe", choices=["update", "logprobs"], help=argparse.SUPPRESS)  # compare_memory's subprocess
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    quiet_libraries()
    with user_errors():
        cfg = get_config(args.config, args.overrides)
        if args.ckpt:  # the checkpoint brings its own shape, recorded in the result's config (as train_rl.py's --init)
            checkpoint.require_model(args.ckpt, "--ckpt")
            cfg = adopt_shape(cfg, args.ckpt, "--ckpt")[0]
        args.update_prompt_tokens = args.prompt_tokens if args.update_prompt_tokens is None else args.update_prompt_tokens
        if args.update_rows is None:  # train_rl.py's micro-batch: whole groups
            args.update_rows = max(1, cfg.micro_batch_size // cfg.group_size) * cfg.group_size
        check_args(args, cfg)
        if args.probe:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            print(json.dumps(probe_memory(args, cfg, device)))
            return
        if args.json:  # before the minutes of measuring, not after them
            check_output(args.json, [args.ckpt])
        result = run(args, cfg)
    lines = report_lines(result)
    print("\n".join(lines))
    if args.readme:
        from atlas_min.experiment import update_readme
        with user_errors():
            update_readme("bench", "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
