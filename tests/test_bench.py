"""atlas_min.bench: the bounds' arithmetic by hand, the 7B decode bytes on meta, the micro run end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlas_min.bench import (ForcedLengths, decode_bound, decode_weight_bytes, hardware_peaks, kv_cache_bytes,
                             logit_fall, reply_lengths, share, update_flops)
from atlas_min.config import get_config
from atlas_min.model import build_model

ROOT = Path(__file__).resolve().parents[1]
NA = "n/a (pass --peak-tflops / --bandwidth-gbs)"


def bench(tmp_path, *args, config=("--config", "micro", "--rows", "8", "max_new_tokens=12")):
    """Run `python -m atlas_min.bench` on one thread (micro, no memory section unless `args` ask); (process,
    JSON or None)."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    skip = () if "--skip" in args else ("--skip", "memory")
    proc = subprocess.run([sys.executable, "-m", "atlas_min.bench", *config, "--repeats", "1", "--json", str(out),
                           *skip, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else None


@pytest.fixture(scope="module")
def with_peaks(tmp_path_factory):
    return bench(tmp_path_factory.mktemp("bench"), "--peak-tflops", "1", "--bandwidth-gbs", "10")


def test_the_bound_is_bandwidth_over_the_weight_and_kv_bytes_of_a_step():
    # 7B widths, 4 layers, bf16: K and V of 4 heads × 128 dims = 2 × 1024 bytes per token and layer
    kv = kv_cache_bytes(rows=64, context=2000, layers=4, kv_width=4 * 128, value_bytes=2)
    assert kv == 64 * 2000 * 4 * 2048 == 1_048_576_000
    # 3 GB of weights + 1 GB of cache per step at 4 TB/s: 1000 steps per second
    assert decode_bound(weight_bytes=3e9, kv_bytes=1e9, bandwidth=4e12) == pytest.approx(1000.0)


def test_model_flops_are_six_per_parameter_and_token_summed_over_parts():
    assert update_flops([(1e9, 1000), (2e6, 500)]) == pytest.approx(6e12 + 6e9)


def test_mfu_is_flops_over_seconds_over_the_peak():
    assert share(6e12 / 2.0, 1e13) == pytest.approx(0.3)  # 6 TFLOP in 2 s on a 10 TFLOP/s peak


def test_a_share_without_a_peak_is_none():
    assert share(123.0, None) is None


@pytest.mark.parametrize("name, flops, bandwidth", [("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),
                                                    ("NVIDIA H200", 989e12, 4.8e12),
                                                    ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
                                                    ("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12)])
def test_known_gpus_get_their_datasheet_peaks(name, flops, bandwidth):
    assert hardware_peaks(name)[:2] == (flops, bandwidth)


def test_flags_win_over_the_table():
    assert hardware_peaks("NVIDIA H100 80GB HBM3", peak_tflops=500)[:2] == (500e12, 3.35e12)
    assert hardware_peaks("NVIDIA H100 80GB HBM3", bandwidth_gbs=2000)[:2] == (989e12, 2e12)


def test_an_unknown_device_has_no_peaks():
    assert hardware_peaks("cpu") == (None, None, "none")
    assert hardware_peaks("NVIDIA H100 PCIe")[:2] == (None, None)  # another H100, other figures


def test_a_7b_decode_step_reads_its_decoder_layers_and_head_in_bf16():
    cfg = get_config("qwen2_5_vl_7b", ["text_layers=4", "vision_depth=4"])
    with torch.device("meta"):
        model = build_model(cfg).to(torch.bfloat16)
    h, kv, f, vocab = 3584, 512, 18944, 152064  # Qwen2.5-VL-7B: hidden, k/v width, MLP, lm_head rows
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h  # q, k, v (biased), o, MLP, 2 norms
    assert layer == 233_057_792
    assert decode_weight_bytes(model) == 2 * (4 * layer + h + vocab * h)  # + final norm + untied lm_head


def test_the_bench_json_holds_every_figure_with_the_device_command_and_config(with_peaks):
    proc, r = with_peaks
    assert proc.returncode == 0, proc.stderr
    for key in ("command", "device_name", "config", "rows", "sampler_tokens_per_s", "generate_tokens_per_s",
                "greedy_match", "decode_weight_bytes", "kv_bytes_per_step", "bound_tokens_per_s",
                "sampler_share_of_bound", "generate_share_of_bound", "update", "rl_step_seconds", "varied", "memory"):
        assert key in r, key
    assert {"sampler_tokens_per_s", "generate_tokens_per_s", "greedy_match", "lengths"} <= set(r["varied"])
    assert r["config"]["name"] == "micro" and r["device_name"] == "cpu" and "--peak-tflops 1" in r["command"]
    assert {"seconds", "flops", "mfu"} <= set(r["update"]) and "update" in r["rl_step_seconds"]


def test_shares_are_positive_and_finite_when_peaks_are_given(with_peaks):
    r = with_peaks[1]
    for x in (r["sampler_share_of_bound"], r["generate_share_of_bound"], r["update"]["mfu"]):
        assert 0 < x < math.inf


def test_the_decode_shares_divide_tokens_per_s_by_rows_times_the_bound(with_peaks):
    r = with_peaks[1]
    bound = 8 * 10e9 / (r["decode_weight_bytes"] + r["kv_bytes_per_step"])  # 8 rows, 10 GB/s
    assert r["sampler_share_of_bound"] == pytest.approx(r["sampler_tokens_per_s"] / bound)
    assert r["generate_share_of_bound"] == pytest.approx(r["generate_tokens_per_s"] / bound)


def test_the_mfu_divides_the_update_flops_by_its_seconds_and_the_peak(with_peaks):
    u = with_peaks[1]["update"]
    assert u["flops"] == 6 * sum(p * t for p, t in u["parts"].values())
    assert u["mfu"] == pytest.approx(u["flops"] / u["seconds"] / 1e12)


def test_the_bench_prints_no_warnings(with_peaks):
    assert with_peaks[0].stderr == ""


def test_without_peaks_the_shares_print_na_and_are_null(tmp_path):
    proc, r = bench(tmp_path, "--no-rl-step")
    assert proc.returncode == 0, proc.stderr
    assert r["bound_tokens_per_s"] is None and r["sampler_share_of_bound"] is None
    assert r["generate_share_of_bound"] is None and r["update"]["mfu"] is None
    assert proc.stdout.count(NA) == 4  # the bound, two decoders, the update


def test_rows_that_are_not_whole_groups_exit_2_with_one_error_line(tmp_path):
    proc, r = bench(tmp_path, "--update-rows", "6")  # micro's G is 4
    assert proc.returncode == 2 and r is None
    assert proc.stderr.startswith("error: --update-rows 6") and proc.stderr.count("\n") == 1


def test_the_varied_workload_decodes_the_drawn_lengths_identically_in_both_decoders(with_peaks):
    v = with_peaks[1]["varied"]
    assert v["greedy_match"] and v["lengths_as_drawn"] and v["rows"] == 8
    assert v["tokens"] == sum(v["lengths"]["drawn"]) and v["lengths"]["max_new_tokens"] == 12


def test_reply_lengths_have_the_stated_log_normal_mean_and_stay_within_2_and_max_new_tokens():
    lengths = reply_lengths(20_000, 1000, seed=0).double()
    assert lengths.min() >= 2 and lengths.max() <= 1000 and lengths.max() == 1000  # a few clipped
    # mean 0.2 × 1000 (less the clipped tail's excess, ~1%); median e^μ = 200 · e^{-σ²/2} = 145.2
    assert abs(lengths.mean().item() - 200) < 6 and abs(lengths.median().item() - 145.2) < 4


def test_forced_lengths_make_each_sampled_row_exactly_its_length(micro, toy_files):
    from atlas_min.data import collate_prompts, encode, load_jsonl
    from atlas_min.sampler import STOP_TOKENS, sample
    model, tokenizer, image_processor = micro
    batch = collate_prompts([encode(ex, tokenizer, image_processor, "sys") for ex in load_jsonl(toy_files[0])[:2]],
                            tokenizer.pad_token_id)
    lengths = torch.tensor([3, 2, 7, 10, 2, 10, 5, 4])  # a reply is an answer token and the stop, at least
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.register_forward_hook(ForcedLengths(lengths, tokenizer.convert_tokens_to_ids(STOP_TOKENS), eos),
                                with_kwargs=True)
    out = sample(model, batch, tokenizer, group_size=4, max_new_tokens=10, temperature=1.0, row_seeds=range(8))
    assert out["completion_mask"].sum(1).tolist() == lengths.tolist()
    ends = out["completion_ids"].gather(1, (lengths - 1)[:, None])[:, 0]
    assert (ends == eos).all() and not out["truncated"].any()  # a length of max_new_tokens ends in a stop too


def test_the_predicted_memory_fall_is_the_bytes_the_plain_path_holds_beyond_the_chunked_one():
    # 2 rows × 3 positions × 10 logits = 60 entries; a piece of min(2, 3) = 2 positions = 20 entries
    assert logit_fall(2, 3, 10, chunk=2, value_bytes=4) == {"update": 4 * 60 - 4 * 20, "logprobs": 8 * 60 - 4 * 20}
    assert logit_fall(2, 3, 10, chunk=2, value_bytes=2) == {"update": 10 * 60 - 8 * 20, "logprobs": 8 * 60 - 8 * 20}
    assert logit_fall(2, 3, 10, chunk=8, value_bytes=4)["update"] == 4 * 60 - 4 * 30  # a piece is at most a row


def test_chunked_log_probs_lower_the_measured_peaks_by_the_predicted_bytes_within_20_percent(tmp_path):
    # Qwen's 152,064-row vocabulary at micro widths: 8 rows × 64 completion tokens of logits = 311 MB in float32
    proc, r = bench(tmp_path, "--skip", "decode", "varied", "--no-rl-step", "--update-rows", "8",
                    "--completion-tokens", "64", "--prompt-tokens", "0",
                    config=("--config", "micro", "--rows", "4", "vocab_rows=152064"))
    assert proc.returncode == 0, proc.stderr
    m = r["memory"]
    assert set(m["plain"]) == set(m["chunked"]) == {"update", "logprobs"}
    for kind in ("update", "logprobs"):
        assert m["predicted_fall"][kind] > 250e6
        assert abs(m["fall"][kind] / m["predicted_fall"][kind] - 1) < 0.2, (kind, m)


def test_the_update_cut_to_micro_batches_of_similar_length_computes_only_the_positions_they_need(micro, toy_files):
    from atlas_min.bench import compare_cut
    from atlas_min.data import encode, load_jsonl
    model, tokenizer, image_processor = micro
    cfg = get_config("micro")  # G = 4, micro-batches of 4 rows
    examples = load_jsonl(toy_files[0])[:2]
    examples[1] = examples[1] | {"question": examples[0]["question"]}  # prompts as long: the replies decide
    encoded = [encode(ex, tokenizer, image_processor, cfg.system_prompt) for ex in examples]
    P = [len(e["prompt_ids"]) for e in encoded]  # each prompt's own tokens
    C = 40  # a rollout 40 tokens wide
    completions = torch.randint(7, len(tokenizer) - 5, (8, C), generator=torch.Generator().manual_seed(0))
    lengths = reply_lengths(8, C, cfg.seed).tolist()  # the rows' replies, drawn as compare_cut draws them
    out = compare_cut(model, encoded, completions, cfg, 1, torch.device("cpu"), tokenizer.pad_token_id)
    prompt = [P[r // 4] for r in range(8)]
    real = sum(prompt) + sum(lengths)  # by hand: each row's prompt and its own reply
    assert out["uncut"]["padded_share"] == pytest.approx(1 - real / (8 * (max(P) + C)))
    groups = [range(0, 4), range(4, 8)]
    by_length = [sorted(range(8), key=lambda r: (-prompt[r] - lengths[r], r))[k:k + 4] for k in (0, 4)]  # longest first
    for name, micros in (("group", groups), ("cut", by_length)):
        computed = sum(4 * (max(prompt[r] for r in m) + max(lengths[r] for r in m)) for m in micros)
        assert out[name]["padded_share"] == pytest.approx(1 - real / computed), name
    assert out["cut"]["padded_share"] < out["group"]["padded_share"] < out["uncut"]["padded_share"]
    expected = [out[name]["expected_padded_share"] for name in ("cut", "group", "uncut")]
    assert 0 < expected[0] < expected[1] < expected[2] < 1  # over many draws too
