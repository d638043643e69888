"""The full-size model rehearsed on a CPU: fake tensors, a fake process group, FSDP2's memory tracker.

    python -m atlas_min.plan --config qwen2_5_vl_7b --gpus 8 --rehearse [--json FILE]

Every tensor is a `FakeTensor` (shape, dtype, device; no storage), every collective a no-op of the `fake` process
group with `gpus` ranks: rank 0 builds the preset's whole model (every layer), wraps it as the trainers do
(`dist.wrap`: each vision block, the vision tower, each decoder layer, the root; bf16 gathered, fp32 reduced, over
a mesh of `gpus` ranks) and runs four phases at the preset's longest shapes (one image at max_pixels + plan's
PROMPT_TEXT text tokens + max_new_tokens), while `FSDPMemTracker` records rank 0's peak bytes by category:

- sft_step: one micro-batch (micro_batch_size rows) through the project's `model.forward` and `reply_nll`
  (logprob_chunk), backward, gradient clipping and the AdamW step;
- rl_rollout: as `sampler.sample` under `dist.gathered`: the prefill of this rank's distinct prompts, their KV
  cache repeated G times, grown to prompt + max_new_tokens positions, then DECODE_STEPS cached decode steps with
  the sampler's float32 (rows, V) buffers (`log_partition_and_entropy`);
- rl_update: the policy's no-grad forward (log pi_old), the bf16 reference's (log pi_ref, then resharded), one
  micro-batch of whole groups through `sampler.sequence_logprobs` with grad, L_LA-GRPO, backward, clip, AdamW;
- save: what `checkpoint.save` does on each rank, as in an RL run: the sharded `get_model_state_dict(model)` cast to
  `final_dtype` (a bf16 final model: a bf16 copy of the shards on the GPU; fp32 checkpoints: no copy) and the sharded
  `get_optimizer_state_dict(model, optimizer)`; nothing gathered. The writes cannot run on fake tensors: the host RAM
  they take is computed from rank 0's own shards and recorded apart (`host_gb`: its fp32 weight shards staged three
  times, as torch's HuggingFaceStorageWriter and safetensors hold them; `stitch_gb`: rank 0's stitch, the largest
  tensor in fp32 and two copies of its shard; plan.host says why).

AdamW's moments exist before any phase (as from a run's second step on). The four phases run in this order.

What cannot run on fake tensors, and how it is covered (each reads tensor values):
- the mrope positions (`get_rope_index`) and the vision tower's patch positions, window order and cu_seqlens:
  computed beforehand on real, small integer tensors of the same shapes and handed in (`FakeTensorMode(
  allow_non_fake_inputs=True)`); positions are (3, B, T) int64 tensors, as the real ones;
- the vision tower's per-window attention (SDPA split by `cu_seqlens.tolist()`): one fused SDPA call over all
  patches of an image ("flash" path: the same q, k, v, output and log-sum-exp a varlen fused kernel keeps);
- the sampler's draw (top-p, stop tests, dropping finished rows): the rollout decodes a fixed token per row, all
  rows to the end (a real rollout's batch only shrinks);
- the update's cut of each micro-batch to its own longest prompt and completion (`sequence_logprobs`, `trim`):
  off; every row here is at the longest shapes, so there is nothing to cut;
- `grpo_loss` (its statistics are Python floats): computed on real (rows, C) tensors, its gradient w.r.t. log pi
  fed to the fake backward; `optim.clipped_step` (reads the norm): `clip_grad_norm_` then `step`, no check;
- transformers' check that image tokens and image features match in number: off (TRANSFORMERS_DISABLE_TORCH_CHECK)
  while the phases run; they match by construction.
The tracker follows the policy and its optimizer: the reference's shards (there all along) are added to each RL
phase from their measured sizes. Fake tensors run on the CPU: bf16 autocast is the CPU's, standing in for CUDA's.
Not counted (as in `plan`): the CUDA context, NCCL's buffers, allocator fragmentation.
"""
import contextlib
import os
import time
import warnings

import torch
import torch.distributed as dist

GB = 1e9
DECODE_STEPS = 3
PHASES = ("sft_step", "rl_rollout", "rl_update", "save")
PLANNED = dict(zip(PHASES, ("SFT", "RL sampling", "RL update", "save")))  # plan's column for each phase


def fake_world(world):
    """The fake process group of `world` ranks (this process is rank 0) and its 1-D CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return init_device_mesh("cpu", (world,))  # outside the fake mode: it reads tensor values


def image_grid(cfg, vision_config):
    """(1, 3) grid (t, h, w in patches) of one image at max_pixels, as close to square as whole merges allow."""
    tokens = cfg.max_pixels // 784  # one merged token per 28×28 pixels
    side = max(d for d in range(1, int(tokens ** 0.5) + 1) if tokens % d == 0)
    m = vision_config.spatial_merge_size
    return torch.tensor([[1, side * m, tokens // side * m]])


def fused_attention(module, query, key, value, attention_mask=None, scaling=None, **_):
    """The vision tower's packed-window attention as one fused SDPA call: (1, heads, S, d) -> (1, S, heads, d)."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2), None


class Inputs:
    """One phase's batch as real tensors (token ids, image grid, the vision tower's values), made outside the fake
    mode: every row the same prompt (one image at max_pixels, PROMPT_TEXT tokens in all) and completion."""

    def __init__(self, model, cfg, rows, prompts, completion):
        from atlas_min.plan import PROMPT_TEXT
        c = model.config
        self.grid = image_grid(cfg, c.vision_config).repeat(prompts, 1)  # (prompts, 3)
        self.image_tokens = int(self.grid[0].prod()) // c.vision_config.spatial_merge_size ** 2
        prompt = [c.vision_start_token_id, *[c.image_token_id] * self.image_tokens, c.vision_end_token_id]
        self.prompt_ids = torch.tensor([prompt + [1] * (PROMPT_TEXT - 2)] * rows)  # (rows, P)
        self.completion_ids = torch.full((rows, completion), 2)  # (rows, C)
        self.ids = torch.cat([self.prompt_ids, self.completion_ids], 1)  # (rows, P + C)
        self.patches = int(self.grid.prod(-1).sum())
        v = c.vision_config
        self.pixels = v.in_channels * v.temporal_patch_size * v.patch_size ** 2  # values per patch
        self.vision = vision_values(model, self.grid)


def vision_values(model, grid):
    """The vision tower's value-dependent inputs (patch positions, window order, cu_seqlens), computed on real
    tensors by transformers' own functions; the tower takes them as keyword arguments."""
    from transformers.vision_utils import (get_max_seqlen, get_vision_attention_seqlens, get_vision_position_ids,
                                           get_vision_window_index)
    visual = model.model.visual
    cu, longest = get_vision_attention_seqlens(grid, visual.config)
    window, cu_window = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                window_size=visual.window_size, patch_size=visual.patch_size)
    return {"position_ids": get_vision_position_ids(grid, visual.spatial_merge_size), "cu_seqlens": cu,
            "max_seqlen": longest, "window_index": window, "cu_window_seqlens": cu_window,
            "max_window_seqlen": get_max_seqlen(cu_window, visual.config)}


@contextlib.contextmanager
def value_oracles(models, cases):
    """Inside: each model's `get_rope_index` answers from positions computed on real ids beforehand (keyed by the
    ids' shape), and `get_image_features` passes the tower its precomputed values. `cases`: the phases' Inputs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    answers = {}
    with unset_fake_temporarily():
        for case in cases:
            for ids, grid in ((case.prompt_ids[::max(1, len(case.prompt_ids) // len(case.grid))], case.grid),
                              (case.ids, case.grid[torch.arange(len(case.ids)) * len(case.grid) // len(case.ids)])):
                mm = (ids == models[0].config.image_token_id).long()
                answers[tuple(ids.shape)] = models[0].model.get_rope_index(ids, mm, image_grid_thw=grid,
                                                                           attention_mask=torch.ones_like(ids))
    by_patches = {case.patches: case for case in cases}
    for model in models:

        def image_features(pixel_values, image_grid_thw, model=model, **kwargs):
            case = by_patches[pixel_values.shape[0]]
            out = model.model.visual(pixel_values.type(model.model.visual.dtype), grid_thw=case.grid, **case.vision)
            out.pooler_output = torch.split(out.pooler_output, [case.image_tokens] * len(case.grid))
            return out

        model.model.get_rope_index = lambda ids, *a, **k: answers[tuple(ids.shape)]
        model.model.get_image_features = image_features
    # transformers' count check of image tokens against image features reads values; equal here by construction
    before = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK") if before is None else os.environ.update(
            TRANSFORMERS_DISABLE_TORCH_CHECK=before)


def batch_of(case):
    """The `batch` dict `model.forward` reads: fake pixels (made inside the fake mode), the real grid."""
    return {"pixel_values": torch.empty(case.patches, case.pixels), "image_grid_thw": case.grid,
            "images_per_row": [1] * len(case.grid)}


def build(cfg, mesh, bf16_frozen=False):
    """The preset's model (functional tokens added), wrapped as the trainers wrap it, on fake CPU tensors."""
    from atlas_min.dist import wrap
    from atlas_min.plan import meta_model
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    with unset_fake_temporarily():  # on meta, then sharded on meta: nothing allocated yet
        model = meta_model(cfg)[0]
        if bf16_frozen:  # train_rl.py's reference: frozen, bf16 shards
            model = model.to(torch.bfloat16).requires_grad_(False).eval()
        elif cfg.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        wrap(model, bf16=True, mesh=mesh)
    ALL_ATTENTION_FUNCTIONS["rehearsal_flash"] = fused_attention  # "flash" in the name: the tower's packed path
    model.config.vision_config._attn_implementation = "rehearsal_flash"
    model.to_empty(device="cpu")  # inside the fake mode: fake tensors
    with torch.no_grad():  # as dist.shard: the first module to run forward becomes FSDP's root
        model(input_ids=torch.zeros((1, 1), dtype=torch.long), position_ids=torch.zeros((3, 1, 1), dtype=torch.long))
    model.reshard()
    return model


def step(model, optimizer, max_norm):
    """`optim.clipped_step` without its finiteness test (it reads the norm's value)."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rehearse(cfg, world):
    """{"parameters", "world_size", "seconds", "phases": {phase: {"peak_gb", "by_category" (GB), ...}}}."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from atlas_min.dist import gathered, reshard
    from atlas_min.grpo import grpo_loss
    from atlas_min.data import IGNORE
    from atlas_min.model import forward, log_partition_and_entropy, reply_nll
    from atlas_min.sampler import sequence_logprobs
    t0 = time.time()
    mesh = fake_world(world)
    G, C = cfg.group_size, cfg.max_new_tokens
    results = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build(cfg, mesh)
        reference = build(cfg, mesh, bf16_frozen=True) if cfg.kl_coef > 0 else None
        P = sum(p.numel() for p in model.parameters())
        frozen = sum(p.to_local().nbytes for p in reference.parameters()) if reference is not None else 0
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        # A first step outside the tracker: AdamW's moments exist from then on, and DTensor has cached the sharding
        # of clip_grad_norm_'s ops and of the save's cast (the first call runs them on global-shape fake tensors,
        # which the tracker would count as full copies)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        step(model, optimizer, cfg.grad_clip)
        [p.to(getattr(torch, cfg.final_dtype)) for p in model.parameters()]
        with unset_fake_temporarily():
            sft = Inputs(model, cfg, cfg.micro_batch_size, cfg.micro_batch_size, C)
            per_rank = max(1, cfg.prompts_per_step // world)
            roll = Inputs(model, cfg, per_rank, per_rank, C)
            upd = Inputs(model, cfg, max(1, cfg.micro_batch_size // G) * G, max(1, cfg.micro_batch_size // G), C)
        autocast = torch.autocast("cpu", torch.bfloat16)  # the CUDA runs' bf16 autocast

        trackers = []

        def again():  # FSDPMemTracker follows one forward per module: a new forward starts its per-module stats
            trackers[-1].reset_mod_stats()  # (the phase's peak stays)

        def phase(name, run):
            tracker = FSDPMemTracker(model, optimizer)
            trackers.append(tracker)
            with tracker, warnings.catch_warnings():
                # transformers >= 5.25 runs functions such as apply_rotary_pos_emb inside `kernels` modules that are
                # all named "Func"; torch's module tracker, meeting a Func inside a Func, warns that its module
                # hierarchy "may be messed up". The peaks it records are by tensor category, not by module.
                warnings.filterwarnings("ignore", "The module hierarchy tracking maybe be messed up", UserWarning)
                extra = run() or {}
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
            cats = {str(getattr(k, "value", k)): v for k, v in peak.items()}
            if name != "sft_step":  # an RL run's: the tracker follows `model` and `optimizer`, the reference is added
                cats["Reference Shards"] = frozen
            total = cats.pop("Total") + cats.get("Reference Shards", 0)
            results[name] = {"peak_gb": total / GB, "by_category": {k: v / GB for k, v in cats.items() if v}, **extra}

        def sft_step():
            labels = sft.ids.clone()
            labels[:, :sft.prompt_ids.shape[1]] = IGNORE  # the prompt carries no loss
            with autocast:
                logits = forward(model, batch_of(sft), sft.ids, torch.ones_like(sft.ids))[0].logits
            reply_nll(logits, labels, IGNORE, cfg.logprob_chunk).sum().backward()
            step(model, optimizer, cfg.grad_clip)

        def rl_rollout():
            N, mask = len(roll.ids) * G, torch.ones_like(roll.prompt_ids)
            model.eval()
            with gathered(model), autocast, torch.no_grad():
                out = forward(model, batch_of(roll), roll.prompt_ids, mask, logits_to_keep=1, use_cache=True)[0]
                out.cache.batch_repeat_interleave(G)
                logits = out.logits.repeat_interleave(G, 0)  # (N, 1, V)
                for layer in out.cache.layers:  # the cache as long as at the rollout's last steps
                    pad = (N, layer.keys.shape[1], C - DECODE_STEPS, layer.keys.shape[3])
                    layer.keys = torch.cat([layer.keys, layer.keys.new_empty(pad)], -2)
                    layer.values = torch.cat([layer.values, layer.values.new_empty(pad)], -2)
                work = torch.empty(N, logits.shape[-1])
                attention_mask = torch.ones(N, roll.prompt_ids.shape[1] + C - DECODE_STEPS, dtype=torch.long)
                for _ in range(DECODE_STEPS):
                    again()
                    scaled = logits[:, -1].float()  # (N, V)
                    log_partition_and_entropy(scaled, work)
                    token = scaled.argmax(-1)  # the draw reads values: a fixed token stands in
                    attention_mask = torch.cat([attention_mask, attention_mask[:, :1]], 1)
                    position = (attention_mask.shape[1] - 1 + torch.zeros(N, 1, dtype=torch.long)).expand(3, N, 1)
                    logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                                   cache=out.cache, use_cache=True).logits
            model.train()

        def rl_update():
            mask = torch.ones(upd.completion_ids.shape, dtype=torch.bool)
            pmask = torch.ones_like(upd.prompt_ids)

            def logprobs(policy, grad):
                again()
                with torch.set_grad_enabled(grad), autocast:
                    return sequence_logprobs(policy, batch_of(upd), upd.prompt_ids, pmask, upd.completion_ids,
                                             mask, repeats=G, chunk=cfg.logprob_chunk, trim=False)  # (rows, C):
                    # the longest prompt and reply of the preset, which the cut leaves whole (its widths read values)
            logprobs(model, False)  # log pi_old
            if reference is not None:
                logprobs(reference, False)
                reshard(reference)
            logp = logprobs(model, True)
            with unset_fake_temporarily():  # L_LA-GRPO on real (rows, C) tensors: its stats read values
                x = torch.zeros(logp.shape, requires_grad=True)
                real_mask = torch.ones(x.shape, dtype=torch.bool)
                loss, _ = grpo_loss(x, x.detach(), x.detach(), torch.linspace(-1, 1, len(x)), real_mask, real_mask,
                                    clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, anchor_coef=cfg.anchor_coef)
                (grad,) = torch.autograd.grad(loss * world, x)
            logp.backward(grad)
            step(model, optimizer, cfg.grad_clip)

        def save():
            state = get_model_state_dict(model)  # sharded DTensors: rank 0's fp32 shards, no copy
            weights = {k: v.to(getattr(torch, cfg.final_dtype)) for k, v in state.items()}  # noqa: F841 (held)
            get_optimizer_state_dict(model, optimizer)  # sharded: rank 0's slice of m and v, no copy
            shards = sum(v.to_local().nbytes for v in state.values())
            largest = 4 * max(v.numel() for v in state.values())
            return {"host_gb": 3 * shards / GB, "stitch_gb": (largest + 2 * largest / world) / GB}

        with value_oracles([m for m in (model, reference) if m is not None], [sft, roll, upd]):
            for name, run in zip(PHASES, (sft_step, rl_rollout, rl_update, save)):
                phase(name, run)
    dist.destroy_process_group()
    return {"parameters": P, "world_size": world, "seconds": round(time.time() - t0, 1), "phases": results}
