"""The 7B preset is Qwen2.5-VL-7B-Instruct's architecture, and `python -m atlas_min.plan` sizes it honestly.

Everything runs on the meta device: no download, no allocation. Qwen's tokenizer is stood in by a word-level
tokenizer of the same size with Qwen's special-token ids (atlas_min.plan.qwen_vocab_standin).
"""
import json
import subprocess
import sys

import pytest
import torch

from atlas_min.config import get_config
from atlas_min.model import build_model
from atlas_min.plan import plan, qwen_vocab_standin
from atlas_min.tokens import FUNCTIONAL_TOKENS, add_functional_tokens

N_7B, VISION_7B, ROWS_7B = 8_292_166_656, 676_550_144, 152_064  # Qwen2.5-VL-7B-Instruct's config.json, built on meta


@pytest.fixture(scope="module")
def cfg7b():
    return get_config("qwen2_5_vl_7b")


@pytest.fixture(scope="module")
def plan7b(cfg7b):
    return plan(cfg7b, gpus=8, gpu_mem_gb=80)


def test_7b_preset_builds_qwen2_5_vl_7b_on_meta_without_a_tokenizer(cfg7b):
    with torch.device("meta"):
        model = build_model(cfg7b)
    assert sum(p.numel() for p in model.parameters()) == N_7B
    assert sum(p.numel() for p in model.model.visual.parameters()) == VISION_7B
    assert model.lm_head.weight is not model.get_input_embeddings().weight  # untied
    c, t, v = model.config, model.config.text_config, model.config.vision_config
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size) == (ROWS_7B, 3584, 28, 28, 4, 18944)
    assert (t.rms_norm_eps, t.max_position_embeddings, t.use_sliding_window) == (1e-6, 128000, False)
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size, v.window_size) == (
        32, 1280, 16, 3420, 3584, 112)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.tokens_per_second) == (14, 2, 2, 2)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id,
            t.bos_token_id, t.eos_token_id) == (151655, 151656, 151652, 151653, 151643, 151645)


def test_functional_tokens_fit_in_the_7b_spare_rows_without_a_resize(cfg7b, monkeypatch):
    tokenizer = qwen_vocab_standin()
    assert len(tokenizer) == 151_665
    with torch.device("meta"):
        model = build_model(cfg7b, tokenizer)
    assert model.config.image_token_id == 151655 and model.get_input_embeddings().weight.shape[0] == ROWS_7B
    monkeypatch.setattr(model, "resize_token_embeddings", lambda *a, **k: pytest.fail("resized"))
    ids = add_functional_tokens(model, tokenizer)
    assert ids == list(range(151_665, 151_670))
    assert [tokenizer.encode(f"w7 {t}", add_special_tokens=False) for t in FUNCTIONAL_TOKENS] == [[7, i] for i in ids]
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == ROWS_7B
    assert model.config.text_config.vocab_size == ROWS_7B


def test_plan_counts_and_budget_for_7b_on_8_gpus(plan7b):
    assert plan7b["params"] == {"total": N_7B, "vision": VISION_7B, "embeddings": 2 * ROWS_7B * 3584,
                                "language": N_7B - VISION_7B - 2 * ROWS_7B * 3584}
    assert plan7b["vocab"]["rows"] == ROWS_7B and not plan7b["vocab"]["resized"]
    sft, rl = plan7b["budget"]["SFT"], plan7b["budget"]["RL update"]
    assert sft["AdamW m, v (fp32, sharded)"] == 8 * N_7B / 8  # two fp32 moments per parameter, over 8 GPUs
    assert sft["fp32 params (sharded)"] == 4 * N_7B / 8
    # one image at 1280·28² pixels = 1280 tokens, + 256 text, + 1024 completion
    assert plan7b["sequence"]["tokens"] == 1280 + 256 + 1024
    # SFT (1 row) peaks at backward's end: all fp32 grads, and the root's (embeddings + lm_head + norm) in bf16
    # and their fp32 copy for the reduce-scatter
    root = 2 * ROWS_7B * 3584 + 3584
    assert sft["fp32 grads (sharded)"] == 4 * N_7B / 8
    assert sft["root's grads (bf16, fp32 for reduce-scatter)"] == 6 * root
    # an RL micro-batch (one whole group, 8 rows) peaks at backward's start: chunked log-probs keep 6 bytes per logit
    # (bf16 logits, the grad of logits[:, :-1], its copy padded back by the slice) + one piece of 256 positions at 8
    assert rl["logits (or one layer recomputed, the larger)"] == 8 * 1025 * ROWS_7B * 6 + 256 * ROWS_7B * 8
    assert rl["reference (bf16 shards)"] == 2 * N_7B / 8 and "fp32 grads (sharded)" not in rl
    assert plan7b["fits"] and max(plan7b["total"].values()) < 0.9 * 80e9
    assert plan7b["total_checkpointing_flipped"]["RL update"] > 80e9  # checkpointing is what makes RL fit


def test_log_probs_all_at_once_book_14_bytes_per_logit_and_chunked_ones_10_gb_less_in_the_7b_update(plan7b):
    plain = plan(get_config("qwen2_5_vl_7b", ["logprob_chunk=0"]), gpus=8)
    assert plain["budget"]["RL update"]["logits (or one layer recomputed, the larger)"] == 8 * 1025 * ROWS_7B * 14
    fall = plain["total"]["RL update"] - plan7b["total"]["RL update"]
    assert fall == 8 * 1025 * ROWS_7B * (14 - 6) - 256 * ROWS_7B * 8  # 9.98 GB - one 0.31 GB piece
    assert round(fall / 1e9, 1) == 9.7


def test_small_presets_grow_by_five_rows():
    p = plan(get_config("micro"), gpus=1)
    assert p["vocab"]["resized"] and p["vocab"]["rows"] == p["vocab"]["rows_before"] + 5 == p["vocab"]["tokenizer"] + 5


def test_torchrun_shards_every_decoder_layer_and_vision_block_on_meta(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "atlas_min.plan", "--config", "qwen2_5_vl_7b", "--gpus", "2", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # --standalone: a free port
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "8,292,166,656 parameters" in run.stdout
    units = json.loads(out.read_text())["measured"]["units"]
    layers = [n for n in units if n.startswith("model.language_model.layers.")]
    blocks = [n for n in units if n.startswith("model.visual.blocks.")]
    assert len(layers) == 28 and len(blocks) == 32 and "model.visual" in units and "" in units
    for name, u in units.items():
        assert u["shard0"], name  # every parameter a DTensor with placement (Shard(0),)
        assert sum(u["local"]) == u["numel"] and max(u["local"]) - min(u["local"]) <= u["numel"] // 100, name
    assert units[""]["numel"] == N_7B


def test_the_rollout_holds_every_bf16_weight_gathered(plan7b):
    # dist.gathered keeps all units gathered while sampling: 2 bytes per parameter on every GPU
    sampling = plan7b["budget"]["RL sampling"]
    assert sampling["gathered bf16 params (all, for the rollout)"] == 2 * N_7B


def test_a_7b_save_gathers_nothing_it_stages_each_ranks_fp32_weight_shards_three_times_then_rank_0_stitches(plan7b):
    host, embedding = plan7b["host"], ROWS_7B * 3584  # the largest tensor: an embedding matrix
    assert host["rank_save_staged"] == 3 * 4 * N_7B / 8  # its fp32 shards, + safetensors' buffer and bytes
    assert host["node_save_staged"] == 3 * 4 * N_7B  # all 8 ranks of the node at once
    assert host["rank0_stitch"] == 4 * embedding + 2 * 4 * embedding / 8  # the full tensor, a shard read and sliced
    assert host["rank0_load"] == 4 * N_7B  # rank 0 reads the fp32 model; the other ranks receive shards
    assert host["resumable_checkpoint"] == (4 + 4 + 4) * N_7B  # weights, m, v in fp32
    # at 1 GB/s on one node: the 12P bytes of shards, then rank 0 reads the 4P of weight shards and writes them
    assert host["save_s"] == pytest.approx((12 + 4 + 4) * N_7B / 1e9)
    save = plan7b["budget"]["save"]  # on the GPU: the shards, and the bf16 copy that a bf16 final model writes
    assert save["bf16 copy of the shards (final model)"] == 2 * N_7B / 8
    assert plan7b["total"]["save"] == pytest.approx((4 + 8 + 2 + 2) * N_7B / 8)  # + the reference's bf16 shards


def test_the_7b_final_model_is_bf16_a_sixth_of_a_resumable_checkpoint(plan7b):
    assert plan7b["host"]["final_model"] == 2 * N_7B == plan7b["host"]["resumable_checkpoint"] / 6
    assert plan7b["host"]["final_save_s"] == pytest.approx((2 + 2 + 2) * N_7B / 1e9)  # shards, then read + write


@pytest.fixture(scope="module")
def two_nodes():
    return plan(get_config("qwen2_5_vl_7b", ["fsdp_shard_size=8"]), gpus=16, nodes=2, nic_gbps=400)


def test_across_two_nodes_plain_fsdp_sends_its_ring_share_per_nic_and_hsdp_only_the_gradient_all_reduce(two_nodes):
    rows, root, nic = two_nodes["network"]["rows"], 2 * ROWS_7B * 3584 + 3584, 400e9 / 8
    gathers = 2 * N_7B + 2 * (N_7B - root)  # bf16 forward, then backward without the root (kept gathered)
    for dtype, b in (("float32", 4), ("bfloat16", 2)):
        # 16 ranks in a ring send 15/16 of the bytes each; one ring per NIC: a NIC carries 1/8 of its GPU's
        plain = rows[f"plain FSDP, 16 ranks, {dtype} reduce"]
        assert plain["SFT"]["bytes"] == pytest.approx(15 / 16 * (gathers + b * N_7B) / 8)
        assert plain["RL update"]["bytes"] == pytest.approx(15 / 16 * (gathers + 4 * N_7B + b * N_7B) / 8)
        assert plain["SFT"]["s"] == pytest.approx(plain["SFT"]["bytes"] / nic)
        hsdp = rows[f"HSDP 8 x 2, {dtype} reduce"]  # all-reduce of the rank's shard with its one replica, once a
        assert hsdp["RL update"]["bytes"] == pytest.approx(b * N_7B / 8)  # step: RL's 1 micro-batch, SFT's 8
        assert hsdp["SFT"]["bytes"] == pytest.approx(b * N_7B / 8 / 8)
    saved = rows["plain FSDP, 16 ranks, float32 reduce"]["SFT"]["bytes"] - rows[
        "plain FSDP, 16 ranks, bfloat16 reduce"]["SFT"]["bytes"]
    assert saved == pytest.approx(15 / 16 * 2 * N_7B / 8)  # bf16 reduce: 2 bytes less per parameter
    assert two_nodes["network"]["micro_batches_per_step"] == {"SFT": 128 // 16, "RL update": 1}


def test_hsdp_shards_the_state_over_its_group_not_every_rank(two_nodes, plan7b):
    assert two_nodes["budget"]["SFT"]["fp32 params (sharded)"] == 4 * N_7B / 8  # 8 per group, 16 GPUs
    assert plan7b["network"] is None  # one node: nothing between nodes
