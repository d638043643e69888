"""Run under torchrun (2 processes): how many all-gathers `sample()` makes for 1 and for 9 new tokens,
with the weights kept gathered for the rollout (`dist.gathered`) and without. Prints one JSON line (rank 0)."""
import json

import torch
import torch.distributed as dist

from atlas_min.config import get_config
from atlas_min.data import collate_prompts, encode_example, load_examples
from atlas_min.dist import cleanup, gathered, setup, shard
from atlas_min.model import init_model
from atlas_min.sampler import sample

calls = []
real_all_gather = dist.all_gather_single


def counting_all_gather(*args, **kwargs):
    calls.append(1)
    return real_all_gather(*args, **kwargs)


dist.all_gather_single = counting_all_gather  # FSDP2 gathers every unit's shards with this call
rank, world, device = setup()
torch.manual_seed(0)
cfg = get_config("micro")
model, tokenizer, image_processor = init_model(cfg)
model = shard(model, cfg, device).eval()
prompts = load_examples(cfg, "train")[rank * 2:rank * 2 + 2]
batch = collate_prompts([encode_example(ex, tokenizer, image_processor, cfg) for ex in prompts], tokenizer.pad_token_id)
counts = {}
for kept in (False, True):
    for new_tokens in (1, 9):
        calls.clear()
        if kept:
            with gathered(model):
                sample(model, batch, tokenizer, max_new_tokens=new_tokens, temperature=0, lockstep=False)
        else:
            sample(model, batch, tokenizer, max_new_tokens=new_tokens, temperature=0)
            model.reshard()
        counts[f"{'gathered' if kept else 'sharded'}_{new_tokens}"] = len(calls)
if rank == 0:
    print(json.dumps(counts), flush=True)
cleanup()
