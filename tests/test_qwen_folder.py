"""A download-shaped folder, end to end: SFT, RL on 2 processes and eval from a tiny Qwen2.5-VL-7B-Instruct look-alike.

The folder (tests/qwen_folder.py) has the download's files, JSON fields, shards, key names, vocabulary size and
special-token ids, 152,064 untied embedding rows, and its chat template; only the hidden sizes are tiny.

The runs use `--config micro model_path=FOLDER`: with a model_path the folder's own config.json gives every size
(vocab_size 152,064, tie_word_embeddings false), so the preset's `vocab_rows` and `tie_embeddings`, which only
shape a random-init model (and `atlas_min.plan`), need no override; the preset's pixel bounds do apply.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qwen_folder import ADDED_TOKENS, CHAT_TEMPLATE, N_ORDINARY, VOCAB_ROWS, build_qwen_folder, download_key

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONAL_IDS = list(range(151_665, 151_670))  # right after Qwen2.5's 151,665 tokens, inside the 152,064 rows


def _run(*args, procs=1):
    """A script as a user runs it (transformers' logger at its default level); the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] \
        if procs > 1 else [sys.executable]
    out = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise AssertionError(f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from atlas_min.config import get_config
    from atlas_min.toy import corpus
    q7b = get_config("qwen2_5_vl_7b")
    texts = corpus(get_config("micro")) + [q7b.system_prompt, q7b.question_suffix]  # merges for the prompts' text
    return build_qwen_folder(tmp_path_factory.mktemp("qwen") / "Qwen2.5-VL-7B-Instruct", texts)


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    """SFT (1 process) -> RL (2 processes) -> eval of the RL model: {"sft", "rl", "eval": folder or file, "logs"}."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--config", "micro", f"model_path={folder}"]
    sft = _run("train_sft.py", *common, "--out", root / "sft", "max_steps=2", "batch_size=4")
    rl = _run("train_rl.py", *common, "--init", root / "sft", "--out", root / "rl", "max_steps=1", procs=2)
    ev = _run("eval.py", "--ckpt", root / "rl", "--out", root / "eval.json", "eval_max_new_tokens=4")
    return {"sft": root / "sft", "rl": root / "rl", "eval": root / "eval.json",
            "logs": {"sft": sft, "rl": rl, "eval": ev}}


def _stored(folder):
    """{name: tensor} over the download's shards, read through its index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / shard))
    assert set(state) == set(index["weight_map"])
    return state


# ----------------------------------------------------------------------------- the folder itself

def test_the_folder_has_the_downloads_files_shards_and_key_names(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "preprocessor_config.json",
            "chat_template.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    keys = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "visual.patch_embed.proj.weight",
            "model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight"} <= keys
    assert not any("language_model" in k or k.startswith("model.visual") for k in keys)  # transformers 5's names
    with safe_open(folder / shards[0], "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # as the download


def test_the_folders_tokenizer_has_qwens_151665_tokens_at_qwens_ids(folder):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == N_ORDINARY + 22 == 151_665
    assert tokenizer.convert_tokens_to_ids([t for t, _ in ADDED_TOKENS]) == list(range(151_643, 151_665))
    assert (tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                             "<|image_pad|>", "<|video_pad|>"])
            == [151644, 151645, 151652, 151653, 151655, 151656])
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    text = "What shape is in the image?"
    assert tokenizer.decode(tokenizer.encode(text)) == text and len(tokenizer.encode(text)) < len(text) / 2


# ----------------------------------------------------------------------------- loading it, adding the tokens

def test_load_pretrained_maps_the_downloads_keys_onto_the_model_in_float32(folder):
    from atlas_min.model import load_pretrained
    model, _, _ = load_pretrained(folder)
    stored = _stored(folder)
    loaded = model.state_dict()
    assert {download_key(k) for k in loaded} == set(stored)
    assert all(v.dtype == torch.float32 and torch.equal(v, stored[download_key(k)].float()) for k, v in loaded.items())
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 1, 1]  # from "rope_scaling" type mrope


def test_functional_tokens_take_ids_151665_to_151669_in_the_spare_rows_without_a_resize(folder, monkeypatch):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from atlas_min.config import get_config
    from atlas_min.model import init_model
    from atlas_min.tokens import FUNCTIONAL_TOKENS
    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "resize_token_embeddings",
                        lambda *a, **k: pytest.fail("the embedding matrix was resized"))
    model, tokenizer, _ = init_model(get_config("micro", [f"model_path={folder}"]))
    assert tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS) == FUNCTIONAL_IDS and len(tokenizer) == 151_670
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape[0] == head.shape[0] == model.config.text_config.vocab_size == VOCAB_ROWS
    assert head is not embed
    for w in (embed, head):  # each matrix: its mean over Qwen's 151,665 tokens' rows
        torch.testing.assert_close(w[FUNCTIONAL_IDS].detach(), w[:151_665].detach().mean(0).expand(5, -1))


# ----------------------------------------------------------------------------- the prompt is the folder's chat template

def _images(n):
    from PIL import Image
    return [Image.new("RGB", size, colour) for size, colour in zip([(84, 56), (56, 112)], ["red", "blue"])][:n]


@pytest.mark.parametrize("preset", ["micro", "qwen2_5_vl_7b"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_encode_builds_the_prompt_the_folders_chat_template_renders(folder, preset, n_images):
    # Qwen's template writes the image blocks, then the text item verbatim: nothing in between. The 7B preset's
    # image_separator "\n" (ATLAS's harness) is therefore the start of the user's text item, and its question
    # suffix the end; its system prompt is a system message (without one, the template writes its own).
    from atlas_min.config import get_config
    from atlas_min.data import encode_example, prompt_text
    from atlas_min.model import load_pretrained
    cfg = get_config(preset)
    _, tokenizer, image_processor = load_pretrained(folder)
    question = "Which shape is red?"
    messages = [{"role": "system", "content": cfg.system_prompt},
                {"role": "user", "content": [{"type": "image"}] * n_images
                 + [{"type": "text", "text": cfg.image_separator + question + cfg.question_suffix}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt_text(question + cfg.question_suffix, n_images, cfg.system_prompt, cfg.image_separator) == rendered

    images = _images(n_images)
    encoded = encode_example({"question": question, "images": []}, tokenizer, image_processor, cfg, images=images)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids, runs = [], []
    for t in encoded["prompt_ids"]:  # collapse each run of <|image_pad|> to one, counting its length
        if t == pad and ids and ids[-1] == pad:
            runs[-1] += 1
        else:
            ids.append(t)
            runs += [1] if t == pad else []
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert tokenizer.decode(ids) == rendered
    assert runs == (encoded["image_grid_thw"].prod(-1) // 4).tolist()  # one pad per merged 2x2 patch


# ----------------------------------------------------------------------------- SFT, RL, eval from the folder

@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_the_results_keep_152064_untied_rows_and_the_functional_ids(runs, stage):
    from atlas_min.tokens import FUNCTIONAL_TOKENS
    from transformers import AutoTokenizer
    config = json.loads((runs[stage] / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == VOCAB_ROWS and config["tie_word_embeddings"] is False
    with safe_open(runs[stage] / "model.safetensors", "pt") as f:
        assert f.get_slice("model.language_model.embed_tokens.weight").get_shape()[0] == VOCAB_ROWS
        assert f.get_slice("lm_head.weight").get_shape()[0] == VOCAB_ROWS
    tokenizer = AutoTokenizer.from_pretrained(runs[stage])
    assert tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS) == FUNCTIONAL_IDS
    assert tokenizer.convert_tokens_to_ids([t for t, _ in ADDED_TOKENS]) == list(range(151_643, 151_665))


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_stock_transformers_loads_the_results_with_the_downloads_chat_template(runs, stage):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(runs[stage])
    saved = load_file(runs[stage] / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert AutoTokenizer.from_pretrained(runs[stage]).chat_template == CHAT_TEMPLATE
    image_processor = AutoImageProcessor.from_pretrained(runs[stage])
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (14, 2, 2)
    assert list(image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_stock_autoprocessor_loads_the_results(runs, stage):
    # Qwen2_5_VLProcessor holds a video processor, which needs torchvision (not installed on the 2-core CI)
    pytest.importorskip("torchvision", reason="Qwen2.5-VL's processor needs torchvision")
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(runs[stage])
    assert processor.tokenizer.convert_tokens_to_ids("<|Zoom|>") == FUNCTIONAL_IDS[0]
    assert processor.chat_template == CHAT_TEMPLATE


def test_rl_and_eval_run_from_the_sft_result_of_the_folder(runs):
    state = json.loads((runs["rl"] / "trainer_state.json").read_text())
    assert state["step"] == 1 and Path(state["init"]) == runs["sft"]
    result = json.loads(runs["eval"].read_text())
    assert result["n"] == 20 and set(result["per_task"]) == {"shape", "line", "arrow", "zoom", "text"}
    assert "RL micro" in runs["logs"]["rl"].stdout and "2 process(es)" in runs["logs"]["rl"].stdout


def test_a_users_runs_from_a_download_folder_print_no_warning(runs):
    for stage, out in runs["logs"].items():
        lines = [line for line in (out.stdout + out.stderr).splitlines() if "Warning" in line]
        assert not lines, f"{stage}: {lines}"
