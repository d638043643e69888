"""Ranks, devices and FSDP2 in one place. Without torchrun everything here is a no-op on one process.

    rank, world, device = setup()     # torchrun: gloo on CPU, NCCL on CUDA
    model = shard(model, cfg, device) # FSDP2: each vision block, the vision tower, each decoder layer, the root
"""
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def setup(timeout_s=None):
    """(rank, world_size, device); initialises the process group under torchrun, its collectives failing after
    `timeout_s` seconds of waiting (None: torch's default)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # CUDA: NCCL for tensors on the GPU, gloo for the small CPU tensors and objects (counts, metrics)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None)
    return rank, world, device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def autocast(device):
    """bf16 autocast on CUDA (FSDP's bf16 parameters, or a single GPU's fp32 ones); fp32 on CPU."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def clip_grad_norm(model, max_norm):
    """Clip the global gradient norm (across FSDP shards) and return it as a float."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def all_sum(x):
    """Sum of a number (or a float tensor) over ranks."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (a list with one item on one process)."""
    out = [obj] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


def from_rank0(compute):
    """`compute()` run on rank 0 only, its result (any picklable object) handed to every rank."""
    out = [compute() if is_main() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(out, src=0)
    return out[0]


def fsdp_units(model):
    """The modules `shard` wraps before the root, bottom-up: each vision block, the vision tower, each decoder layer."""
    return [*model.model.visual.blocks, model.model.visual, *model.model.language_model.layers]


def shard(model, cfg, device):
    """FSDP2 on every decoder layer, every vision block, the vision tower, then the root (torchrun only).

    Under torchrun only rank 0 holds weights (on the CPU; the others' model is on the meta device, see
    `model.load_pretrained(on_meta=)`): every rank shards the empty structure on `device`, and rank 0's
    weights are broadcast one tensor at a time, each rank keeping its shard. So the checkpoint is read
    once per job, by rank 0 alone (on several nodes the other nodes receive it over the network, not
    from their own disks), and no GPU ever holds the whole model. The vision tower is a unit of its own because
    the sampler calls it directly to encode each image once per group. On CUDA, parameters are gathered
    in bf16 and gradients reduced in `grad_reduce_dtype` (fp32 by default). `fsdp_shard_size` = K < world: HSDP
    on a (world/K, K) mesh, each unit sharded within its group of K ranks and replicated across the groups.
    """
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if world_size() == 1:
        return model.to(device)
    weights = model.state_dict() if is_main() else {}  # rank 0's tensors: they outlive the move to meta
    # the rotary frequencies are buffers outside the state dict: rank 0 sends those too
    buffers = [buffer.to(device) if is_main() else None for _, buffer in model.named_buffers()]
    model.to("meta")
    model.tie_weights()  # the move to meta made lm_head a parameter of its own again (a tied model's)
    K, mesh = cfg.fsdp_shard_size, None  # plain FSDP over every rank
    if 0 < K < world_size() and world_size() % K == 0:  # HSDP: shard within groups of K, replicate across them
        mesh = init_device_mesh(device.type, (world_size() // K, K), mesh_dim_names=("replicate", "shard"))
    wrap(model, bf16=device.type == "cuda", mesh=mesh, reduce_dtype=getattr(torch, cfg.grad_reduce_dtype))
    model.to_empty(device=device)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for (_, buffer), value in zip(model.named_buffers(), buffers):
        if value is not None:
            buffer.copy_(value)
        dist.broadcast(buffer, src=0)
    del weights
    with torch.no_grad():  # FSDP2 makes the first module to run forward the root: let it be the root
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    model.reshard()  # the root keeps its parameters gathered after forward; the optimizer needs the shards
    return model


def sync_replicas(model, last):
    """HSDP: all-reduce gradients across the replica groups only after the last micro-batch of an optimizer step
    (`last`); the earlier ones' reduce-scatters add up within each group. FSDP2 would all-reduce after every
    backward: across nodes, micro-batches × the gradient shard's bytes instead of once. Plain FSDP, one process:
    nothing to do."""
    if isinstance(model, FSDPModule):
        model.set_requires_all_reduce(last)


def wrap(model, bf16, mesh=None, reduce_dtype=torch.float32):
    """fully_shard on `fsdp_units`, then the root (embeddings, lm_head, final norm); `bf16`: parameters gathered
    in bf16, gradients reduced in `reduce_dtype` (CUDA's policy). `mesh`: all ranks unless given (a 2-D one: HSDP;
    `atlas_min.rehearse` passes its fake one)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype) if bf16 else MixedPrecisionPolicy()
    for unit in [*fsdp_units(model), model]:
        fully_shard(unit, mp_policy=mp, mesh=mesh)


@contextlib.contextmanager
def gathered(model):
    """Inside: every FSDP unit stays gathered from its first forward on; after: all resharded again.

    A decode loop runs the whole model once per generated token. With FSDP2's default (each unit
    reshards after its forward), every token re-gathers every unit: at 7B about 13 GB of all-gather
    traffic per token. Kept gathered, a rollout gathers each unit once (the first forward), costs the
    bf16 weights in memory while it runs (`plan`'s sampling column), and needs no collective per step.
    """
    if world_size() == 1:
        yield model
        return
    model.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)  # FSDP2's defaults: every unit reshards after forward ...
        model.set_reshard_after_forward(False, recurse=False)  # ... but the root, which backward needs next
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def reshard(model):
    """Free gathered parameters: FSDP2 keeps the root's after a forward (it expects a backward next)."""
    if world_size() > 1:
        model.reshard()


def cleanup(exit_code=0, together=True):
    """End a run: under torchrun, leave the process group (`together`: after a barrier; else at once, as a rank
    whose collectives are all done and that must not wait for the others) and exit with `exit_code` at once;
    on one process, return.

    Skipping the interpreter's teardown is the point. gloo's worker threads (and FSDP's state) still hold
    work objects whose tensors carry Python references; destroying them while the interpreter finalises
    takes the GIL of a dying interpreter and aborts the process ("terminate called without an active
    exception", exit -6), now and then, after the run's work was all done (PyTorch PR #179291). Call it
    last: files are closed by then, and stdout/stderr are flushed here.
    """
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
