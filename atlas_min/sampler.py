"""The hand-written group sampler, and per-token log-probs of given completions.

`sample` prefills each prompt once, repeats its KV cache for its G rows, then decodes one
token per step with a KV cache and explicit mrope positions: temperature, top-p, a stop per row at
`<|im_end|>`, never a vision placeholder. A row that stops leaves the decode batch and the cache, so
a step costs what the rows still running need (replies vary from a few tokens to max_new_tokens).
`sequence_logprobs` recomputes the log-probs of given completions with one full forward, as training
does (docs/method.md, "Log-probabilities").

Randomness: row r draws its uniforms from its own generator seeded with `row_seeds[r]` (see
`rl_row_seeds`), so a row's sample depends on its seed and its logits only, not on which rows share its
batch or process.
"""
import torch
import torch.distributed as dist

from atlas_min.data import collate_prompts, to_device
from atlas_min.model import forward, log_partition_and_entropy, mrope_positions, token_logprobs
from atlas_min.optim import DivergedError
from atlas_min.tokens import FUNCTIONAL_TOKENS, VISION_TOKENS, functional_in


def rl_run_seed(cfg):
    """The seed of an RL run's draws: `seed`, moved by `rl_seed` (0 leaves it as it is)."""
    return cfg.seed + cfg.rl_seed * cfg.epoch_seed_stride


def rl_row_seeds(cfg, step, first_row, n_rows):
    """Generator seeds of the global rows first_row .. first_row + n_rows - 1 of RL step `step`."""
    base = (rl_run_seed(cfg) * cfg.step_seed_stride + step) * cfg.row_seed_stride
    return [base + first_row + r for r in range(n_rows)]


STOP_TOKENS = ["<|im_end|>", "<|endoftext|>"]  # the end of a turn, of a text; ATLAS's harness stops at both


def decode_completion(tokenizer, ids, mask):
    """(text, number of generated tokens, functional tokens): the text without the stop token (functional
    tokens stay visible in it), and the functional tokens found *by id*, in order. The reward counts n_F
    from that list, as the anchor's mask does: a reply that spells "<|Zoom|>" out of ordinary tokens
    decodes to the same text but holds no functional token (docs/method.md, "Reward")."""
    stops = set(tokenizer.convert_tokens_to_ids(STOP_TOKENS))
    kept = [t for t, m in zip(ids.tolist(), mask.tolist()) if m and t not in stops]
    functional = functional_in(kept, tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS))
    return tokenizer.decode(kept, skip_special_tokens=False), int(mask.sum()), functional


def _draw(probs, top_p, uniforms):
    """One token per row from `probs` (N, V), probabilities up to a factor per row (0 on banned tokens),
    truncated to its top-p nucleus, by inverse CDF.

    Row n takes the first token k with cum_k > u_n * total (cum: the running sum of the kept
    probabilities), so P(k) = p_k / total. The threshold is kept strictly below `total`: then the token
    taken has cum_k > cum_{k-1} in floating point, i.e. a probability > 0, for every u in [0, 1)
    (u = 0 included: a rule `cum < u * total` would take token 0 whatever its probability).
    """
    order = None
    if top_p < 1.0:  # the nucleus needs the tokens by probability; without it any order gives the same draw
        probs, order = (probs / probs.sum(-1, keepdim=True)).sort(dim=-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # smallest prefix with mass >= top_p
    cum = probs.cumsum(-1)  # (N, V), non-decreasing
    total = cum[:, -1:]  # (N, 1)
    if not torch.isfinite(total).all():  # NaN or inf logits: a diverged policy has no distribution to draw from
        raise DivergedError("the policy's next-token probabilities are not finite: the run diverged")
    threshold = torch.minimum(uniforms[:, None].to(cum.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    pick = torch.searchsorted(cum, threshold, right=True).squeeze(-1)  # (N,): #{k : cum_k <= threshold}
    return pick if order is None else order.gather(-1, pick[:, None]).squeeze(-1)


def _all_done(done):
    """True once every row on every rank is done: under FSDP a rank that stops early deadlocks the rest."""
    flag = torch.tensor(float(done.all()), device=done.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


@torch.no_grad()
def sample(model, batch, tokenizer, *, group_size=1, max_new_tokens=32, temperature=1.0, top_p=1.0, row_seeds=None,
           lockstep=True):
    """G completions for each left-padded prompt of `batch`; temperature 0 is greedy decoding.

    `lockstep`: every rank keeps stepping until all ranks' rows are done, as FSDP needs while the
    weights are sharded (each forward is a collective); a rank whose rows are all done steps one
    stand-in row. Under `dist.gathered` no step is a collective, so pass False and a rank stops as
    soon as its own rows are done.

    Returns prompt_ids / prompt_mask (B·G, P), completion_ids (B·G, C), completion_mask (B·G, C) bool
    (True on generated tokens up to and including <|im_end|>), logprobs (B·G, C) of the sampled
    tokens under softmax(logits / temperature) (temperature 1 when greedy), the model's distribution
    before the sampler's masking and truncation: the quantity training's forward computes; entropy
    (B·G, C) of that same distribution at each position (both 0 where the mask is False); truncated
    (B·G,) bool, rows that reached max_new_tokens without a stop token.
    """
    prompt_ids, prompt_mask = (batch[k].repeat_interleave(group_size, 0) for k in ("input_ids", "attention_mask"))
    N, device = prompt_ids.shape[0], prompt_ids.device  # (N, P) prompts, N = B·G
    stop_ids, pad_id = torch.tensor(tokenizer.convert_tokens_to_ids(STOP_TOKENS), device=device), tokenizer.pad_token_id
    if temperature > 0 and row_seeds is None:
        raise ValueError("sampling (temperature > 0) needs row_seeds: one seed per row, B·G of them")
    if temperature > 0:  # all of a row's uniforms up front: one call per row, not one per row and step
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)))
                                for s in row_seeds]).to(device)  # (N, max_new_tokens)

    # One prefill of the distinct prompts (positions: a Python loop per row inside transformers); its KV cache
    # and last logits are then repeated G times, so a prompt is encoded once, not once per row of its group
    image_ids = (batch["input_ids"] == model.config.image_token_id).long()
    positions, rope_deltas = mrope_positions(model, batch["input_ids"], batch["attention_mask"], image_ids,
                                             batch["image_grid_thw"])  # (3, B, P), (B, 1)
    out, _ = forward(model, batch, batch["input_ids"], batch["attention_mask"], logits_to_keep=1, use_cache=True,
                     position_ids=positions)
    out.cache.batch_repeat_interleave(group_size)
    out.logits = out.logits.repeat_interleave(group_size, 0)  # (N, 1, V)
    rope_deltas = rope_deltas.repeat_interleave(group_size, 0)  # (N, 1)
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)  # pad after a row's stop
    logprobs, entropies = (torch.zeros(N, max_new_tokens, device=device) for _ in range(2))  # 0 after it
    masks = torch.zeros(N, max_new_tokens, dtype=torch.bool, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    # The decode batch holds only the rows still running (`rows`, indices into the N rows): a finished row
    # leaves it with its KV cache, so a step costs what the running rows need. `live` is False only for a
    # stand-in row kept when all of this rank's rows are done but another rank's are not (lockstep).
    rows, live, attention_mask = torch.arange(N, device=device), done.logical_not(), prompt_mask
    work = torch.empty(N, out.logits.shape[-1], device=device)  # exp(logits − max) of each step: one buffer
    # never drawn: a vision placeholder, or a row past the tokenizer (Qwen pads its matrix)
    not_tokens = torch.cat([torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS), device=device),
                            torch.arange(len(tokenizer), work.shape[1], device=device)])
    for step in range(max_new_tokens):
        scaled = out.logits[:, -1].float()  # (n, V), n = rows in the decode batch; changed in place below
        if temperature not in (0, 1):
            scaled = scaled.div_(temperature)
        log_z, entropy = log_partition_and_entropy(scaled, work[:len(rows)])  # (n,), the model's distribution
        scaled.index_fill_(-1, not_tokens, float("-inf"))  # the drawn token is none of them: its logit stays
        if temperature > 0:
            weights = work[:len(rows)].index_fill_(-1, not_tokens, 0.0)  # relative to the largest of all logits
            redo = weights.amax(-1) < 1  # a never-drawn token held it: the kept ones could have underflowed to 0
            weights[redo] = torch.exp(scaled[redo] - scaled[redo].amax(-1, keepdim=True))  # (rows of redo, V)
            token = _draw(weights, top_p, uniforms[rows, step])  # (n,)
        else:
            token = scaled.argmax(-1)
        at = rows[live]
        tokens[at, step], masks[at, step] = token[live], True
        logprobs[at, step] = (scaled.gather(-1, token[:, None])[:, 0] - log_z)[live]
        entropies[at, step] = entropy[live]
        stopped = live & torch.isin(token, stop_ids)  # (n,)
        done[rows[stopped]] = True
        if step == max_new_tokens - 1 or (_all_done(done) if lockstep else bool(done.all())):
            break
        if stopped.any():  # drop the finished rows from the batch and the cache; keep one if none is left
            keep = (live & ~stopped).nonzero()[:, 0]
            keep = keep if len(keep) else torch.zeros(1, dtype=torch.long, device=device)
            out.cache.batch_select_indices(keep)
            rows, live, token = rows[keep], live[keep] & ~stopped[keep], token[keep]
            attention_mask, rope_deltas = attention_mask[keep], rope_deltas[keep]
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        position = (attention_mask.cumsum(-1) - 1)[:, -1:] + rope_deltas  # (n, 1): continues each row's text
        out = model(input_ids=token[:, None], attention_mask=attention_mask,
                    position_ids=position.expand(3, len(rows), 1), cache=out.cache, use_cache=True)
    C = step + 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": tokens[:, :C],
            "completion_mask": masks[:, :C], "logprobs": logprobs[:, :C], "entropy": entropies[:, :C],
            "truncated": ~done}


def sequence_logprobs(model, batch, prompt_ids, prompt_mask, completion_ids, completion_mask, repeats=1,
                      temperature=1.0, chunk=0, trim=True):
    """log π(o_t | q, o_<t) of every completion token, (B, C), from one full forward (with grad if enabled);
    `repeats` as in `model.forward` (rows per prompt of `batch`), `chunk` as in `model.token_logprobs` (the
    config's `logprob_chunk`).

    `trim`: the forward runs on these rows' own longest prompt (columns of left padding that every row has are
    dropped) and own longest completion, not on the width of the batch they were sampled in; the positions cut
    off get log π = 0 (masked out of every sum). Causal attention and mask-derived positions make the kept
    values those of the uncut forward, up to float rounding. A rank's rollout is padded to its longest row;
    an update's micro-batch (rows of similar length, `data.micro_batches`) is often far shorter. False: the whole
    block (bench).
    """
    C = completion_ids.shape[1]
    if trim:
        used = prompt_mask.bool().any(0)  # (P,) columns some row's prompt uses (prompts are left-padded)
        first = int(used.nonzero()[0]) if used.any() else 0
        kept = completion_mask.bool().any(0).nonzero()  # completions are right-padded
        width = int(kept[-1]) + 1 if len(kept) else 1
        prompt_ids, prompt_mask = prompt_ids[:, first:], prompt_mask[:, first:]
        completion_ids, completion_mask = completion_ids[:, :width], completion_mask[:, :width]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    width = completion_ids.shape[1]
    out, _ = forward(model, batch, input_ids, attention_mask, repeats=repeats, logits_to_keep=width + 1)
    logits = out.logits[:, :-1]  # (B, width, V): the logits at position P-1+t predict completion token t
    if temperature not in (0, 1):  # (a division would copy the (B, C, V) logits for nothing at T = 1)
        logits = logits / temperature
    logp = token_logprobs(logits, completion_ids, chunk)  # (B, width)
    return torch.nn.functional.pad(logp, (0, C - width))  # (B, C)


def rows_logprobs(model, prompts, rollout, rows, *, group_size, pad_id, temperature=1.0, chunk=0, trim=True):
    """`sequence_logprobs` of some rows of a rollout, (len(rows), C): `rows` ascending indices into `rollout`
    (prompt_ids, prompt_mask, completion_ids, completion_mask), whose row k answers `prompts[k // group_size]`
    (encoded prompts). Each prompt among the rows is encoded once, its images with it (an update's micro-batch of
    rows of similar length, `data.micro_batches`, holds some rows of one prompt and some of another)."""
    held, counts = torch.unique_consecutive(rows // group_size, return_counts=True)  # a prompt's rows adjoin
    batch = to_device(collate_prompts([prompts[p] for p in held.tolist()], pad_id), rollout["prompt_ids"].device)
    return sequence_logprobs(model, batch, rollout["prompt_ids"][rows], rollout["prompt_mask"][rows],
                             rollout["completion_ids"][rows], rollout["completion_mask"][rows],
                             repeats=counts.tolist(), temperature=temperature, chunk=chunk, trim=trim)
