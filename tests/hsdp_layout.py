"""Run under torchrun (4 processes): shard the micro model with fsdp_shard_size=2 as the trainers do; rank 0
prints one JSON line with a decoder weight's device mesh (shape, dimension names) and placements."""
import json

from atlas_min.config import get_config
from atlas_min.dist import cleanup, setup, shard
from atlas_min.model import init_model

rank, world, device = setup()
cfg = get_config("micro", ["fsdp_shard_size=2"])
model = shard(init_model(cfg, on_meta=rank > 0)[0], cfg, device)
weight = model.model.language_model.layers[0].mlp.up_proj.weight
if rank == 0:
    print(json.dumps({"mesh": list(weight.device_mesh.shape), "names": list(weight.device_mesh.mesh_dim_names),
                      "placements": [str(p) for p in weight.placements]}))
cleanup()
