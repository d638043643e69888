"""Size a preset and its FSDP plan before renting GPUs: no GPU, no download, nothing allocated.

    python -m atlas_min.plan --config qwen2_5_vl_7b --gpus 8 [--gpu-mem-gb 80] [--json FILE] [field=value ...]
    python -m atlas_min.plan --config qwen2_5_vl_7b --gpus 8 --rehearse   # + every phase on fake tensors (~2.5 min)
    python -m atlas_min.plan --config qwen2_5_vl_7b --gpus 16 --nodes 2 fsdp_shard_size=8 [--nic-gbps 400]
    torchrun --nproc_per_node 2 -m atlas_min.plan --config qwen2_5_vl_7b --gpus 2   # also shards it, on meta

The preset's model is built on the `meta` device (shapes only; `model_path` is ignored: the preset's sizes are
Qwen2.5-VL-7B's). Its vocabulary is stood in by a tokenizer with Qwen's size and special-token ids (151,643
ordinary + 22 special = 151,665 entries, no merges): the five functional tokens get ids 151,665..151,669, inside
the 152,064 rows, so nothing is resized. Small presets use their own tokenizer and grow by five rows.
Under torchrun, every rank also applies the trainers' FSDP2 wrapping (`dist.wrap`: `dist.fsdp_units`, then the
root) to the meta model and the measured local shard sizes are reported.

The per-GPU budget (N GPUs, P parameters, GB = 1e9 bytes) of the plan `dist.shard` applies to policy and reference:
fully_shard on each vision block, the vision tower, each decoder layer, then the root (embeddings, lm_head, norm),
bf16 compute, fp32 reduce. `--rehearse` checks it: each phase run on fake tensors (atlas_min.rehearse), its peak
printed beside the plan's. Assumptions:
- Persistent: fp32 params 4P/N; AdamW m and v 8P/N. RL with kl_coef > 0 adds the reference as train_rl.py holds it
  on GPUs: bf16 shards 2P/N (resharded after use). With HSDP (fsdp_shard_size=K) N is K: shards of K ranks.
- A training step (SFT micro-step, RL update micro-batch) peaks at the larger of two moments. Backward's start: the
  root gathered in bf16 (FSDP2 keeps it from forward to the end of backward) plus two of the largest other unit
  (current + prefetched), the activations kept for backward, and the logits' buffers (or, if larger, the one layer
  that activation checkpointing recomputes at a time, after those are freed). Backward's end: the fp32 grads 4P/N
  and the root's grads, unsharded in bf16 and copied to fp32 for their reduce-scatter (6 bytes per root parameter).
- Sequence: one image per prompt at max_pixels (max_pixels/28² tokens, 4× as many vision patches) + PROMPT_TEXT
  text tokens; the reply (SFT) or completion (RL) is max_new_tokens. SFT forwards micro_batch_size rows; an RL
  update forwards whole groups (max(1, micro_batch_size // G) prompts × G rows, images encoded once per prompt);
  the sampler prefills a rank's distinct prompts, then decodes all their prompts × G rows at once.
- Activations: `layer_bytes` (20h + 8f + 4kv bytes per token and layer; 2h with activation checkpointing).
  Attention is a fused kernel (SDPA flash / memory-efficient, or flash_attention_2): no T² scores. No dropout.
- Logits, per row, position and vocabulary entry: 14 bytes all at once (bf16 logits, the fp32 log-softmax kept for
  backward, two fp32 gradients in backward); 6 with `logprob_chunk` (bf16 logits kept for backward, the bf16
  gradient of logits[:, :-1], and that gradient padded back to the logits' shape by the slice's backward; the fp32
  copy and log-softmax, 8 bytes per entry, exist for one piece of logprob_chunk positions at a time, in forward and
  again in backward). SFT scores every position, RL the completion's max_new_tokens + 1.
  KV cache: 2 (k, v) × kv width × 2 bytes per token and layer.
- Save: `checkpoint.save` gathers nothing: each GPU holds its shards, and for a bf16 final model their bf16 copy
  (2P/N) while it writes; the host RAM and seconds are in `host`, the bytes between nodes in `network`.
- Not counted: CUDA context and NCCL buffers (~1-3 GB), allocator fragmentation, one unit's all-gather and fp32
  reduce-scatter buffers in flight (1.4 GB at 7B in the rehearsal). Hence "fits" = peak <= (1 - HEADROOM) × GPU memory.
"""
import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

from atlas_min.cli import die, user_errors
from atlas_min.config import ConfigError, check_world, get_config
from atlas_min.dist import cleanup
from atlas_min.model import build_model, build_tokenizer
from atlas_min.tokens import add_functional_tokens

GB = 1e9
PROMPT_TEXT = 256  # system prompt + question + chat-template tokens of one prompt
HEADROOM = 0.10
SAVE_GBPS = 1.0  # storage rate per node assumed for a save, read or write (local NVMe: faster; network storage: slower)
QWEN_ORDINARY = 151_643  # Qwen2.5's BPE entries; its 22 special tokens follow, from <|endoftext|> = 151,643
QWEN_SPECIAL = ("<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
                "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> "
                "<|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> "
                "<|repo_name|> <|file_sep|>").split()


def qwen_vocab_standin():
    """A real (word-level) tokenizer with Qwen2.5's size and special-token ids, built in a fraction of a second."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(QWEN_ORDINARY)} | {t: QWEN_ORDINARY + k for k, t in enumerate(QWEN_SPECIAL)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def meta_model(cfg):
    """(model on meta with the functional tokens added, tokenizer length before, rows before, functional ids)."""
    from atlas_min.toy import corpus
    tokenizer = qwen_vocab_standin() if cfg.vocab_rows else build_tokenizer(corpus(cfg), cfg.tokenizer_vocab)
    n_tokens = len(tokenizer)
    with torch.device("meta"):
        model = build_model(cfg, tokenizer)
        rows = model.get_input_embeddings().weight.shape[0]
        ids = add_functional_tokens(model, tokenizer)
    return model, n_tokens, rows, ids


def layer_bytes(tokens, h, f, kv):
    """Activation bytes one transformer layer keeps for backward (bf16 compute), in the manner of Korthikanti et al.

    Per token: attention half = RMSNorm (its fp32 input 4h, bf16 normalised input 2h and output 2h) + q (2h) + k, v
    (2·2kv) + attention output (2h) = 12h + 4kv; MLP half = RMSNorm (8h) + gate, up, act(gate), act(gate)·up (4 × 2f)
    = 8h + 8f. In all 20h + 8f + 4kv bytes per token: within 1% of the tensors autograd saves for one Qwen2.5-VL
    decoder layer (bf16, SDPA). Vision blocks use the same formula (kv = their hidden size). With activation
    checkpointing a layer keeps only its bf16 input (2h per token), and one layer at a time is recomputed in full.
    """
    return tokens * (20 * h + 8 * f + 4 * kv)


def activations(cfg, rows, images, seq, checkpointing):
    """(bytes kept for backward, bytes of the one layer recomputed at a time in backward; 0 without checkpointing)."""
    text = rows * seq
    patches = images * 4 * (cfg.max_pixels // 784)
    kv = cfg.text_kv_heads * cfg.text_hidden // cfg.text_heads
    lm = layer_bytes(text, cfg.text_hidden, cfg.text_intermediate, kv)
    vis = layer_bytes(patches, cfg.vision_hidden, cfg.vision_intermediate, cfg.vision_hidden)
    if not checkpointing:
        return cfg.text_layers * lm + cfg.vision_depth * vis, 0
    kept = cfg.text_layers * text * cfg.text_hidden + cfg.vision_depth * patches * cfg.vision_hidden  # layer inputs
    return 2 * kept, max(lm, vis)


def plan(cfg, gpus, gpu_mem_gb=80.0, nodes=1, nic_gbps=400.0):
    """Parameter counts, vocabulary, and the per-GPU budget in bytes of each phase (a dict; see the docstring)."""
    model, n_tokens, rows_before, ids = meta_model(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    P, vision = count(model), count(model.model.visual)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embeddings = embed.numel() + (head.numel() if head is not embed else 0)
    blocks = [count(m) for m in model.model.visual.blocks]
    unit = max(*blocks, vision - sum(blocks), *(count(m) for m in model.model.language_model.layers))
    root = P - vision - sum(count(m) for m in model.model.language_model.layers)
    largest = max(p.numel() for p in model.parameters())
    V, G, image = embed.shape[0], cfg.group_size, cfg.max_pixels // 784  # one token per 28×28 pixels
    N = cfg.fsdp_shard_size or gpus  # ranks a unit is sharded over
    prompt, sample_prompts = image + PROMPT_TEXT, cfg.prompts_per_step // gpus
    T, sample_rows = prompt + cfg.max_new_tokens, sample_prompts * G
    sft_rows, rl_prompts = cfg.micro_batch_size, max(1, cfg.micro_batch_size // G)
    kv_token = cfg.text_layers * 2 * (cfg.text_kv_heads * cfg.text_hidden // cfg.text_heads) * 2  # bf16 k and v
    # all at once: bf16 logits (2) + fp32 log-softmax kept for backward (4) + two fp32 grads in backward (2 × 4);
    # chunked: bf16 logits (2) + the bf16 grad of logits[:, :-1] (2) + that grad padded back to the logits' shape by
    # the slice's backward (2), and one piece's fp32 copy and log-softmax (8 bytes per entry)
    logit_bytes, piece = (6, 8 * cfg.logprob_chunk * V) if cfg.logprob_chunk else (14, 0)
    ref = {"reference (bf16 shards)": 2 * P / N if cfg.kl_coef > 0 else 0}
    persistent = {"fp32 params (sharded)": 4 * P / N, "AdamW m, v (fp32, sharded)": 8 * P / N}
    # dist.gathered keeps every unit gathered for the rollout: all bf16 weights at once. The largest of: the KV
    # cache of all rows; during the prefill of the distinct prompts their cache + one layer's MLP (6f bytes per
    # token); the root's all-gather buffer beside its gathered copy (a small model's peak)
    cache = max(sample_rows * T * kv_token, sample_prompts * prompt * (kv_token + 6 * cfg.text_intermediate), 2 * root)

    def train(rows, images, scored, ckpt, frozen):
        """The larger of a training step's two peaks: backward's start (the logits' buffers beside the activations
        kept) or its end (all grads, and the root's: unsharded bf16, then an fp32 copy for its reduce-scatter)."""
        kept, layer = activations(cfg, rows, images, T, ckpt)
        start = {"gathered bf16 params (root + 2 units)": 2 * root + 2 * 2 * unit, "activations (kept)": kept,
                 "logits (or one layer recomputed, the larger)": max(rows * scored * V * logit_bytes + piece, layer)}
        end = {"fp32 grads (sharded)": 4 * P / N, "root's grads (bf16, fp32 for reduce-scatter)": 6 * root}
        return {**persistent, **frozen, **max(start, end, key=lambda d: sum(d.values()))}

    def phases(ckpt):
        return {"SFT": train(sft_rows, sft_rows, T, ckpt, {}),
                "RL update": train(rl_prompts * G, rl_prompts, cfg.max_new_tokens + 1, ckpt, ref),
                "RL sampling": {**persistent, "gathered bf16 params (all, for the rollout)": 2 * P, **ref,
                                "KV cache, prefill or all-gather (the largest)": cache},
                # checkpoint.save: each rank writes its shards (an RL run's GPUs hold the reference's too); a bf16
                # final model casts them first (its `_write_weights`): a bf16 copy of the shards
                "save": {**persistent, **ref, "bf16 copy of the shards (final model)":
                         2 * P / N if cfg.final_dtype == "bfloat16" else 0}}

    budget, rows_after = phases(cfg.activation_checkpointing), embed.shape[0]
    totals = {k: sum(v.values()) for k, v in budget.items()}
    return {"config": cfg.name, "gpus": gpus, "nodes": nodes, "gpu_mem_gb": gpu_mem_gb, "save_every": cfg.save_every,
            "params": {"total": P, "vision": vision, "language": P - vision - embeddings, "embeddings": embeddings},
            "vocab": {"tokenizer": n_tokens, "functional_ids": ids, "rows_before": rows_before, "rows": rows_after,
                      "resized": rows_after != rows_before},
            "units": {"root": root, "largest_other": unit},
            "sequence": {"tokens": T, "image_tokens": image, "sft_rows": sft_rows, "rl_rows": rl_prompts * G,
                         "sample_rows": sample_rows},
            "activation_checkpointing": cfg.activation_checkpointing, "budget": budget, "total": totals,
            "total_checkpointing_flipped": {k: sum(v.values())
                                            for k, v in phases(not cfg.activation_checkpointing).items()},
            "fits": max(totals.values()) <= (1 - HEADROOM) * gpu_mem_gb * GB,
            "host": host(cfg, P, largest, gpus, nodes), "network": network(cfg, P, root, gpus, nodes, nic_gbps)}


def host(cfg, P, largest, gpus, nodes):
    """Host (CPU) memory and checkpoint sizes in bytes, a save's seconds. Loading: `dist.shard` has rank 0 read the
    fp32 model (4P), the other ranks nothing. Saving (`checkpoint.save`) gathers nothing, but stages on the host:
    - every rank at once: its fp32 weight shards (4P/gpus; under HSDP torch.distributed.checkpoint splits the replicas'
      copies among them) go through HuggingFaceStorageWriter, which copies each to host memory and keeps them all
      until safetensors' `save` serialises the rank's file into bytes, two more copies at its peak (it peaked 1.91x a
      400 MB tensor above that tensor, here): 3 x 4P/gpus per rank, times the ranks of a node on that node;
    - the AdamW moments (`dcp.save`, FileSystemWriter) go to disk one tensor at a time (10 MB copied ahead): less;
    - then rank 0 stitches model.safetensors a tensor at a time: one full tensor in fp32 (the largest) in a buffer,
      plus one rank's shard of it read from disk and its slice copied in: 4L (1 + 2/gpus).
    Seconds at SAVE_GBPS, one node's storage rate shared by its ranks (nodes in parallel): the shards (weights 4P,
    AdamW 8P) spread over the nodes, then rank 0 alone reads the weights' shards back and writes them stitched (2 x 4P;
    reads served from the page cache would be faster). A bf16 final model: 2P of shards, then 2 x 2P."""
    w = 2 if cfg.final_dtype == "bfloat16" else 12  # bytes per parameter of the final model
    staged, stitch = 3 * 4 * P / gpus, 4 * largest * (1 + 2 / gpus)
    rate = SAVE_GBPS * GB
    return {"rank0_load": 4 * P, "rank_save_staged": staged, "node_save_staged": staged * gpus / nodes,
            "rank0_stitch": stitch, "resumable_checkpoint": 12 * P, "final_model": w * P,
            "save_s": (12 * P / nodes + 2 * 4 * P) / rate, "final_save_s": (w * P / nodes + 2 * min(w, 4) * P) / rate}


def network(cfg, P, root, gpus, nodes, nic_gbps):
    """Bytes one GPU sends to other nodes per micro-batch (a training forward and backward), and seconds at its NIC's
    full rate (`nic_gbps` Gb/s per GPU, one NIC per GPU), for plain FSDP over all ranks and for HSDP sharded within a
    node (fsdp_shard_size = GPUs per node), with fp32 and bf16 gradient reduction (grad_reduce_dtype).

    Plain FSDP: bf16 all-gathers in forward (2P) and backward (2(P - root): FSDP2 keeps the root gathered between)
    and the gradients' reduce-scatter (4P or 2P); an RL update's micro-batch adds the no-grad forwards of log pi_old
    and log pi_ref (2P each). In NCCL's ring each of the n ranks sends (n - 1)/n of those bytes; the rings (one per
    NIC) cross to the next node once per node, so a GPU's NIC carries 1/(GPUs per node) of its ring traffic.
    HSDP: the all-gathers and reduce-scatters stay on a node; across nodes each rank all-reduces its reduced gradient
    shard (4P/K or 2P/K) with its replicas (a ring of R = nodes ranks: 2(R - 1)/R of it), once per optimizer step
    (`dist.sync_replicas` defers it to a step's last micro-batch): its row is that spread over the step's
    micro-batches. Not counted: the rollout's one all-gather per RL step, and latency."""
    if nodes < 2:
        return None
    per_node, R = gpus // nodes, nodes
    rl_rows = max(1, cfg.micro_batch_size // cfg.group_size) * cfg.group_size  # an update's micro-batch: whole groups
    rate = nic_gbps / 8 * GB
    gathers = {"SFT": 2 * P + 2 * (P - root)}
    gathers["RL update"] = gathers["SFT"] + 2 * P * (2 if cfg.kl_coef > 0 else 1)
    out = {"gpus_per_node": per_node, "nic_gbps": nic_gbps, "rows": {},
           "micro_batches_per_step": {"SFT": cfg.batch_size // (gpus * cfg.micro_batch_size),
                                      "RL update": max(1, cfg.rl_mini_batch // gpus // rl_rows)}}
    for dtype, b in (("float32", 4), ("bfloat16", 2)):
        plain = {k: (gpus - 1) / gpus * (g + b * P) / per_node for k, g in gathers.items()}
        hsdp = {k: 2 * (R - 1) / R * b * P / per_node / out["micro_batches_per_step"][k] for k in gathers}
        for name, sent in ((f"plain FSDP, {gpus} ranks", plain), (f"HSDP {per_node} x {R}", hsdp)):
            out["rows"][f"{name}, {dtype} reduce"] = {k: {"bytes": v, "s": v / rate} for k, v in sent.items()}
    return out


def measure_sharding(cfg):
    """Under torchrun: the trainers' FSDP2 wrapping on the meta model; per unit, its size and each rank's shard."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from atlas_min.dist import all_gather_objects, fsdp_units, wrap
    dist.init_process_group("gloo")
    model = meta_model(cfg)[0]
    wrap(model, bf16=False)  # as dist.shard: bottom-up, the root last
    names = {id(m): n for n, m in model.named_modules()}
    mine = {names[id(u)]: (sum(p.numel() for p in u.parameters()), sum(p.to_local().numel() for p in u.parameters()),
                           all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in u.parameters()))
            for u in [*fsdp_units(model), model]}
    ranks = all_gather_objects(mine)
    return {"world": len(ranks), "units": {n: {"numel": v[0], "local": [r[n][1] for r in ranks],
                                               "shard0": all(r[n][2] for r in ranks)} for n, v in mine.items()}}


def report(p):
    n, v, s, u, phases = p["params"], p["vocab"], p["sequence"], p["units"], list(p["budget"])

    def row(label, values):
        print(f"  {label:<45}" + "".join(f"{x / GB:13.2f}" if x else f"{'-':>13}" for x in values))

    print(f"{p['config']} on the meta device: {n['total']:,} parameters")
    for k in ("vision", "language", "embeddings"):
        print(f"  {k:<12}{n[k]:>15,}")
    ids = v["functional_ids"]
    print(f"vocabulary: {v['tokenizer']:,} tokens + {len(ids)} functional (ids {ids[0]:,}..{ids[-1]:,}) "
          f"in {v['rows']:,} rows: " + (f"resized from {v['rows_before']:,}" if v["resized"] else "no resize"))
    print(f"FSDP2 units: root {u['root']:,} params (embeddings, lm_head, norm), largest other {u['largest_other']:,}")
    print(f"sequence: {s['tokens']:,} tokens ({s['image_tokens']:,} image + {PROMPT_TEXT} text + completion); "
          f"rows per GPU: SFT {s['sft_rows']}, RL update {s['rl_rows']}, RL sampling {s['sample_rows']}")
    title = f"per-GPU memory on {p['gpus']} GPUs (GB)"
    print(f"\n{title:<47}" + "".join(f"{k:>13}" for k in phases))
    for line in dict.fromkeys(k for ph in p["budget"].values() for k in ph):
        row(line, [p["budget"][ph].get(line, 0) for ph in phases])
    row("total", [p["total"][ph] for ph in phases])
    row(f"total {'without' if p['activation_checkpointing'] else 'with'} activation checkpointing",
        [p["total_checkpointing_flipped"][ph] for ph in phases])
    print(f"fits {p['gpu_mem_gb']:g} GB with {HEADROOM:.0%} headroom: {'yes' if p['fits'] else 'NO'}")
    h, nodes = p["host"], p["nodes"]
    print(f"host RAM: rank 0 reads the fp32 model, {h['rank0_load'] / GB:.1f} GB (the others: their shards only); a save "
          f"stages every rank's fp32\n  weight shards 3 times at once ({h['rank_save_staged'] / GB:.1f} GB per rank, "
          f"{h['node_save_staged'] / GB:.1f} GB per node), then rank 0 stitches them a tensor at a time "
          f"({h['rank0_stitch'] / GB:.1f} GB)")
    print(f"checkpoints: resumable {h['resumable_checkpoint'] / GB:.1f} GB (fp32 weights + AdamW m, v), "
          f"{h['save_s']:.0f} s per save at {SAVE_GBPS:g} GB/s per node "
          f"({h['resumable_checkpoint'] / nodes / GB:.1f} GB of shards\n  per node, then rank 0 reads and writes the "
          f"{h['rank0_load'] / GB:.1f} GB of weights); final model "
          f"{h['final_model'] / GB:.1f} GB ({h['final_save_s']:.0f} s); save_every={p['save_every']}")
    if p["network"]:
        n, steps = p["network"], p["network"]["micro_batches_per_step"]
        print(f"\nsent by one GPU to the other nodes per micro-batch ({nodes} nodes x {n['gpus_per_node']} GPUs, one "
              f"{n['nic_gbps']:g} Gb/s NIC per GPU)\n{'':<40}" + "".join(f"{k:>21}" for k in steps))
        for name, row in n["rows"].items():
            print(f"  {name:<38}" + "".join(f"{v['bytes'] / GB:9.2f} GB {v['s']:6.3f} s" for v in row.values()))
        print(f"  {'micro-batches per optimizer step':<38}" + "".join(f"{v:>21}" for v in steps.values()))
        print("  HSDP all-reduces once per optimizer step (after its last micro-batch): its row is that spread over "
              "the step's micro-batches")
    if "rehearsal" in p:
        r, phases = p["rehearsal"], p["rehearsal"]["phases"]
        print(f"\nrehearsed on fake tensors ({r['world_size']} ranks, {r['parameters']:,} parameters, "
              f"{r['seconds']:.0f} s): rank 0's peak (GB)")
        print(f"  {'phase':<12}{'rehearsed':>10}{'planned':>9}{'ratio':>7}  largest parts of the rehearsed peak")
        apart = {name: abs(ph["peak_gb"] / ph["planned_gb"] - 1) > 0.15 for name, ph in phases.items()}
        for name, ph in phases.items():
            parts = sorted(ph["by_category"].items(), key=lambda kv: -kv[1])[:4]
            print(f"  {name:<12}{ph['peak_gb']:10.2f}{ph['planned_gb']:9.2f}{ph['peak_gb'] / ph['planned_gb']:7.2f}"
                  f"{'*' if apart[name] else ' '} " + ", ".join(f"{k} {v:.2f}" for k, v in parts))
        print("  * more than 15% apart" if any(apart.values()) else "  every phase within 15% of the plan")
        print(f"  save: rank 0's host RAM (not in the peak) {phases['save']['host_gb']:.1f} GB while its fp32 weight "
              f"shards are written, {phases['save']['stitch_gb']:.1f} GB while it stitches")
    if "measured" in p:
        m, whole = p["measured"], p["measured"]["units"][""]
        print(f"measured under torchrun ({m['world']} ranks, meta, FSDP2): local shards "
              f"{', '.join(f'{x:,}' for x in whole['local'])} of {whole['numel']:,}; "
              f"every unit Shard(0): {all(x['shard0'] for x in m['units'].values())}")


def main():
    ap = argparse.ArgumentParser(description="Parameter count and per-GPU memory budget of a preset")
    ap.add_argument("--config", default="qwen2_5_vl_7b")
    ap.add_argument("--gpus", type=int, default=int(os.environ.get("WORLD_SIZE", "8")))
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    ap.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (>= 2: the bytes between them)")
    ap.add_argument("--nic-gbps", type=float, default=400.0, help="network bandwidth per GPU between nodes, Gb/s")
    ap.add_argument("--json", default=None, help="also write the plan here")
    ap.add_argument("--readme", action="store_true", help="also write the printed plan into README.md")
    ap.add_argument("--rehearse", action="store_true",
                    help="also run each phase on fake tensors and a fake process group (atlas_min.rehearse)")
    ap.add_argument("overrides", nargs="*", help="field=value")
    args = ap.parse_intermixed_args()
    if args.gpus < 1 or args.gpu_mem_gb <= 0 or args.nodes < 1 or args.gpus % args.nodes or args.nic_gbps <= 0:
        die(f"--gpus {args.gpus} --nodes {args.nodes} --gpu-mem-gb {args.gpu_mem_gb} --nic-gbps {args.nic_gbps}: need "
            "at least 1 GPU, the same number on each node, positive memory and bandwidth")
    try:
        cfg = get_config(args.config, args.overrides)
        for stage in ("sft", "rl"):  # a layout the trainers refuse has no budget to print
            check_world(cfg, args.gpus, stage)
    except ConfigError as e:
        die(str(e))
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun and args.rehearse:
        die("--rehearse fakes its own process group of --gpus ranks: run it without torchrun")
    if args.rehearse and cfg.fsdp_shard_size not in (0, args.gpus):
        die(f"--rehearse runs plain FSDP over --gpus ranks: leave fsdp_shard_size={cfg.fsdp_shard_size} out")
    measured = measure_sharding(cfg) if torchrun else None
    if not int(os.environ.get("RANK", "0")):
        result = plan(cfg, args.gpus, args.gpu_mem_gb, args.nodes, args.nic_gbps)
        result |= {"measured": measured} if measured else {}
        if args.rehearse:
            from atlas_min.rehearse import PLANNED, rehearse
            result["rehearsal"] = rehearse(cfg, args.gpus)
            for name, column in PLANNED.items():
                result["rehearsal"]["phases"][name]["planned_gb"] = result["total"][column] / GB
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            report(result)
        print(printed.getvalue(), end="")
        if args.readme:
            from atlas_min.experiment import update_readme
            shown = " ".join(a for a in sys.argv[1:] if a != "--readme")
            with user_errors():
                update_readme("plan", f"`python -m atlas_min.plan {shown}`\n\n```\n{printed.getvalue().rstrip()}\n```")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    cleanup()


if __name__ == "__main__":
    main()
