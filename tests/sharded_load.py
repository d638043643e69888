"""Run under torchrun (2 processes) with a checkpoint folder: load and shard it as the trainers do, with
rank 1 barred from reading any weight. Rank 0 prints one JSON line: what rank 1 saw, and whether the
sharded model equals the checkpoint's tensors and a plain load's buffers."""
import json
import sys

import safetensors
import safetensors.torch
import torch
import transformers

from atlas_min.checkpoint import read_state
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from atlas_min.dist import all_gather_objects, cleanup, setup, shard
from atlas_min.model import load_pretrained

folder = sys.argv[1]
rank, world, device = setup()
reads = []
if rank == 1:  # any weight read on rank 1 is recorded (and refused)
    def refuse(*args, **kwargs):
        reads.append(str(args[:1]))
        raise RuntimeError("rank 1 read weights")
    safetensors.safe_open = safetensors.torch.safe_open = safetensors.torch.load_file = refuse
    transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained = refuse
cfg = read_state(folder)[1]
model = load_pretrained(folder, cfg, on_meta=rank > 0)[0]
on_meta = all(p.is_meta for p in model.parameters())
model = shard(model, cfg, device)
local_rows = {name: p.to_local().shape[0] for name, p in model.named_parameters() if p.dim() > 1}
full_rows = {name: p.shape[0] for name, p in model.named_parameters() if p.dim() > 1}
buffers = {name: b.clone() for name, b in model.named_buffers()}
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # on rank 0
seen = all_gather_objects({"reads": reads, "on_meta": on_meta,
                           "at_most_half": all(local_rows[n] <= (full_rows[n] + 1) // 2 for n in local_rows)})
if rank == 0:
    saved = safetensors.torch.load_file(f"{folder}/model.safetensors")
    plain = load_pretrained(folder, cfg)[0]
    print(json.dumps({"rank1": seen[1], "rank0_on_meta": seen[0]["on_meta"],
                      "weights_equal": all(torch.equal(saved[k], state[k]) for k in saved),
                      "buffers_equal": all(torch.equal(b, buffers[n]) for n, b in plain.named_buffers())}))
cleanup()
