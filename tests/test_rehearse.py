"""`plan --rehearse` runs the four phases of a preset on fake tensors, and its peaks agree with `plan`'s arithmetic.

One rehearsal (~8 s on 2 cores) of the 7B's widths and vocabulary with one decoder layer, one vision block, a
256-token image and 128 new tokens, on 8 fake ranks: small enough for the suite, with the 152,064-row logits and
the 1.09 B-parameter root that shape the 7B's budget.
"""
import math

import pytest
import torch

from atlas_min.config import get_config
from atlas_min.model import build_model
from atlas_min.plan import GB, plan, qwen_vocab_standin
from atlas_min.rehearse import PHASES, PLANNED, rehearse
from atlas_min.tokens import add_functional_tokens

SMALL_7B = ["text_layers=1", "vision_depth=1", "vision_fullatt_every=1", "min_pixels=50176", "max_pixels=50176",
            "max_new_tokens=128", "prompts_per_step=16"]
WORLD = 8


@pytest.fixture(scope="module")
def small():
    cfg = get_config("qwen2_5_vl_7b", SMALL_7B)
    return cfg, rehearse(cfg, WORLD), plan(cfg, WORLD)


def by_hand(cfg):
    """The parameters' shapes, from the model built on meta (the rehearsal's own count is not used)."""
    with torch.device("meta"):
        model = build_model(cfg, qwen_vocab_standin())
    add_functional_tokens(model, qwen_vocab_standin())
    return [p.shape for p in model.parameters()]


def test_rehearsal_runs_all_four_phases_with_positive_peaks(small):
    _, r, _ = small
    assert list(r["phases"]) == list(PHASES) and r["world_size"] == WORLD
    for name, phase in r["phases"].items():
        assert phase["peak_gb"] > 0 and phase["by_category"], name


def test_rank_0_holds_its_fp32_shard_of_every_parameter_and_twice_that_in_adamw_moments(small):
    cfg, r, _ = small
    shapes = by_hand(cfg)
    # FSDP2 splits dim 0 into WORLD pieces of ceil(rows / WORLD) rows: rank 0 holds the first, 4 bytes each
    shard = sum(math.ceil(s[0] / WORLD) * math.prod(s[1:]) * 4 for s in shapes)
    assert r["parameters"] == sum(math.prod(s) for s in shapes)
    for phase in r["phases"].values():
        assert phase["by_category"]["Sharded Param"] * GB == pytest.approx(shard, rel=1e-9)
        assert phase["by_category"]["OptState"] * GB == pytest.approx(2 * shard, rel=1e-3)  # AdamW's m and v


def test_a_save_gathers_nothing_rank_0_stages_its_own_fp32_weight_shards_and_stitches_one_tensor(small):
    cfg, r, _ = small
    shapes = by_hand(cfg)
    shard = sum(math.ceil(s[0] / WORLD) * math.prod(s[1:]) * 4 for s in shapes)  # rank 0's fp32 weight shards
    largest = 4 * max(math.prod(s) for s in shapes)  # the 152,064-row embedding in fp32
    save = r["phases"]["save"]
    assert save["host_gb"] * GB == pytest.approx(3 * shard, rel=1e-6)  # + safetensors' buffer and bytes
    assert save["stitch_gb"] * GB == pytest.approx(largest * (1 + 2 / WORLD), rel=1e-6)
    # on the GPU: the shards and the bf16 final model's copy of the weight shards, nothing gathered
    assert save["by_category"]["Activation"] * GB == pytest.approx(shard / 2, rel=1e-6)


def test_each_rehearsed_peak_is_within_15_percent_of_the_plans_arithmetic(small):
    _, r, p = small
    for name, column in PLANNED.items():
        assert r["phases"][name]["peak_gb"] == pytest.approx(p["total"][column] / GB, rel=0.15), name
