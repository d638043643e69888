# %% [markdown]
# # 02 — Data, the chat format, image tokens and collation (docs/method.md, "Data" and "Stage 1: SFT")
#
# One JSONL schema serves SFT, RL and eval, one example a line:
#
#     {"id", "images": [paths relative to the file's folder], "question", "answer",
#      "response" (SFT only, functional tokens inline), "task"}
#
# This tutorial follows one example from its JSONL line to the tensors a training step sees:
# `load_examples` / `load_jsonl` (where the examples come from, validation), `prompt_text` (Qwen's
# chat template), `encode` (token ids, image pixels, the `<|image_pad|>` expansion), `collate_sft`
# (labels for stage 1) and `collate_prompts` (left-padded prompts for the sampler of stage 2). All
# of it lives in `atlas_min/data.py`.

# %%
import json
import shutil
import tempfile
from pathlib import Path

import torch

from atlas_min.config import get_config
from atlas_min.data import (IGNORE, DataError, collate_prompts, collate_sft, encode, load_examples, load_jsonl,
                            prompt_text)
from atlas_min.model import init_model
from atlas_min.tokens import FUNCTIONAL_TOKENS
from atlas_min.toy import ensure_toy_data

torch.set_printoptions(linewidth=120)

# %% [markdown]
# ## The toy data set
# A config names its data files (`train_data=…`, `eval_data=…`); when it names none, as the presets
# do, the toy world supplies them. `ensure_toy_data` draws the toy images and writes `train.jsonl` /
# `eval.jsonl` in this same schema, once: the folder name is a hash of everything the data depends
# on (seed, image size, sizes, tasks), so a second call is a no-op. It lives under $ATLAS_MIN_CACHE
# (default ~/.cache/atlas_min).

# %%
cfg = get_config("micro")
train_path, eval_path = ensure_toy_data(cfg)
print("train:", train_path)
print("first line of the file, as written:\n ", train_path.read_text().splitlines()[0])

# %% [markdown]
# ## Loading: validated, image paths resolved
# `load_examples(cfg, split)` is what the scripts call: it picks the config's file for the split (or
# the toy's) and reads it with `load_jsonl`. That checks every field's presence and type (with
# `need_response=True` for SFT), resolves each image path inside the file's folder, and records
# `where` (file:line) for later error messages.

# %%
examples = load_examples(cfg, "train", need_response=True)  # here: load_jsonl(train_path, need_response=True)
print(len(examples), "examples; the second one:")
for key, value in examples[1].items():
    print(f"  {key:9s}: {value!r}")
print("tasks of the first 10:", [ex["task"] for ex in examples[:10]])
print("a reply without a functional token (perception data):", repr(examples[5]["response"]))
assert examples[1]["where"] == f"{train_path}:2"  # the second line of the file
assert not any(t in examples[5]["response"] for t in FUNCTIONAL_TOKENS)

# %% [markdown]
# ## The chat prompt
# Qwen's chat format: a system turn, a user turn holding the image placeholder and the question,
# and the opening of the assistant turn. The model's reply continues right after
# "<|im_start|>assistant\n" and ends with `<|im_end|>`.

# %%
print(prompt_text(examples[1]["question"], n_images=1, system_prompt=cfg.system_prompt))

# %% [markdown]
# ## Encoding: one `<|image_pad|>` becomes one token per merged patch
# The image processor cuts the image into 14x14 patches, (t, h, w) = `image_grid_thw`. The vision
# tower then merges each 2x2 block of patches into one vector (merge_size = 2), and each vector
# replaces one `<|image_pad|>` in the text. So the prompt must hold grid.prod() // 4 copies of the
# placeholder. `encode` expands it itself, with the PIL image processor: the stock
# `Qwen2_5_VLProcessor` would do it too, but it carries a video processor that needs torchvision.
# The micro preset's 56x56 images give a 4x4 patch grid (56 / 14 = 4), hence 16 // 4 = 4 image tokens.
#
# The tokenizer and image processor are the micro preset's, functional tokens included
# (tutorial 01); `init_model` builds them together with the (random-init) model.

# %%
_, tokenizer, image_processor = init_model(cfg)
functional_ids = tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS)

enc = encode(examples[1], tokenizer, image_processor, cfg.system_prompt, with_reply=True)
grid = enc["image_grid_thw"][0]
pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
print("image size       :", cfg.image_size, "x", cfg.image_size)
print("image_grid_thw   :", grid.tolist(), f"-> {int(grid.prod())} patches of 14x14")
print("pixel_values     :", tuple(enc["pixel_values"].shape),
      "(one row per patch: 3 colours x 2 frames x 14 x 14 = 1176; a still image is doubled into 2 frames)")
print("merge_size       :", image_processor.merge_size, f"-> grid.prod() // {image_processor.merge_size ** 2} =",
      int(grid.prod()) // image_processor.merge_size ** 2, "image tokens")
text = prompt_text(examples[1]["question"], 1, cfg.system_prompt)
print("<|image_pad|> in the prompt text:", text.count("<|image_pad|>"),
      "| in prompt_ids:", enc["prompt_ids"].count(pad_id))
print("prompt_ids       :", len(enc["prompt_ids"]), "tokens")
print("reply_ids        :", tokenizer.convert_ids_to_tokens(enc["reply_ids"]))
assert cfg.image_size == 56 and image_processor.patch_size == 14 and image_processor.merge_size == 2
assert grid.tolist() == [1, 4, 4] and int(grid.prod()) // 4 == 4 == enc["prompt_ids"].count(pad_id)
assert image_processor.temporal_patch_size == 2 and enc["pixel_values"].shape == (16, 3 * 2 * 14 * 14) == (16, 1176)

# %% [markdown]
# The prompt and the reply are tokenised *separately* and concatenated. That way the SFT sequence
# is token-for-token what the sampler will produce after the same prompt in stage 2 (a joint
# tokenisation could merge a token across the prompt/reply boundary). The reply ends in
# `<|im_end|>`: the model must learn to stop.

# %%
assert tokenizer.convert_ids_to_tokens(enc["reply_ids"][-1]) == "<|im_end|>"

# %% [markdown]
# ## `collate_sft`: a right-padded batch with labels on the reply only
# Two examples of different lengths: a "line" question with `<|Line|>` in its reply, and a
# "shape" question whose reply has no functional token. Labels are `IGNORE` (-100) at every
# prompt, image and padding position and equal the token id on the reply.

# %%
pair = [encode(examples[i], tokenizer, image_processor, cfg.system_prompt, with_reply=True) for i in (1, 5)]
batch = collate_sft(pair, tokenizer.pad_token_id)
for key, value in batch.items():
    print(f"{key:15s}", tuple(value.shape) if torch.is_tensor(value) else value)
print("prompt + reply lengths:", [(len(e["prompt_ids"]), len(e["reply_ids"])) for e in pair])
assert IGNORE == -100 and [examples[i]["task"] for i in (1, 5)] == ["line", "shape"]
assert "<|Line|>" in examples[1]["response"] and not any(t in examples[5]["response"] for t in FUNCTIONAL_TOKENS)

# %% [markdown]
# Row 0 as a table. Two stretches of the prompt are elided (their labels are all "-"). Every
# prompt position — system turn, image tokens, question, the "<|im_start|>assistant\n" header —
# carries no loss; every reply token does, the functional token and the closing `<|im_end|>`
# included, with no special weight. ("Ċ" is byte-level BPE's newline. This tiny BPE was trained on
# the toy texts only, so it spells "system" or "assistant" letter by letter; Qwen's own tokenizer
# has them as single tokens.)

# %%


def table(b):
    ids, labels = batch["input_ids"][b].tolist(), batch["labels"][b].tolist()
    mask = batch["attention_mask"][b].tolist()
    ends = [t for t, i in enumerate(ids) if i == tokenizer.convert_tokens_to_ids("<|im_end|>")]
    vision_end = ids.index(tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    skips = {2: ends[0] - 1, vision_end + 4: ends[1] - 2}  # system prompt text; the question's middle
    print(f"{'pos':>4}  {'token':<18} {'id':>4}  {'label':>5}  {'attn':>4}")
    t = 0
    while t < len(ids):
        if t in skips:
            print(f"{'':>4}  ... {skips[t] - t} prompt tokens elided, label - ...")
            t = skips[t]
            continue
        name = repr(tokenizer.convert_ids_to_tokens(ids[t]))[1:-1]
        flag = "  <- functional" if ids[t] in functional_ids else ""
        print(f"{t:>4}  {name:<18} {ids[t]:>4}  {'-' if labels[t] == IGNORE else labels[t]:>5}  {mask[t]:>4}{flag}")
        t += 1


table(0)
n_loss = (batch["labels"] != IGNORE).sum(1)
print("positions with a label per row:", n_loss.tolist(), "= reply lengths",
      [len(e["reply_ids"]) for e in pair])
assert n_loss.tolist() == [len(e["reply_ids"]) for e in pair]
n_prompt = len(pair[0]["prompt_ids"])  # row 0: no label on its prompt, label = token on its reply
assert (batch["labels"][0, :n_prompt] == IGNORE).all()
assert torch.equal(batch["labels"][0, n_prompt:], batch["input_ids"][0, n_prompt:])

# %% [markdown]
# Labels sit at the same position as the token they name; the shift "position t predicts token
# t+1" is done by the loss (`reply_nll`, tutorial 04). Row 1 is shorter, so it ends in padding:
# `<|endoftext|>` ids with attention 0 and no label.

# %%
last = batch["input_ids"].shape[1]
print("row 1, last 8 positions:")
print("  tokens:", tokenizer.convert_ids_to_tokens(batch["input_ids"][1, last - 8:].tolist()))
print("  labels:", batch["labels"][1, last - 8:].tolist())
print("  attn  :", batch["attention_mask"][1, last - 8:].tolist())
n1 = len(pair[1]["prompt_ids"]) + len(pair[1]["reply_ids"])  # row 1's real length
assert (batch["input_ids"][1, n1:] == tokenizer.convert_tokens_to_ids("<|endoftext|>")).all()
assert (batch["attention_mask"][1, n1:] == 0).all() and (batch["labels"][1, n1:] == IGNORE).all()

# %% [markdown]
# `pixel_values` holds both images' patches stacked (16 + 16 rows), `image_grid_thw` one row per
# image, and `images_per_row` says which images belong to which row; `atlas_min.model.forward`
# uses them to put each image's features on its row's `<|image_pad|>` positions.

# %%
assert batch["pixel_values"].shape[0] == 16 + 16 and batch["image_grid_thw"].shape[0] == 2
assert batch["images_per_row"] == [1, 1]

# %% [markdown]
# ## `collate_prompts`: left padding for generation
# For stage 2 the batch holds prompts only. They are padded on the *left*, so every row's last
# prompt token sits in the last column and every row's next token is generated at the same
# column. The "line" question is longer than the "shape" one, so the shape row gets padding.

# %%
prompts = collate_prompts(pair, tokenizer.pad_token_id)
print("input_ids", tuple(prompts["input_ids"].shape), "| real tokens per row:", prompts["attention_mask"].sum(1).tolist())
for b in range(2):
    print(f"row {b}: attn first 10 {prompts['attention_mask'][b, :10].tolist()}  "
          f"first 4 tokens {tokenizer.convert_ids_to_tokens(prompts['input_ids'][b, :4].tolist())}  "
          f"last 3 tokens {tokenizer.convert_ids_to_tokens(prompts['input_ids'][b, -3:].tolist())}")
n_pad = prompts["input_ids"].shape[1] - len(pair[1]["prompt_ids"])  # the shape row's left padding
assert n_pad > 0 and (prompts["attention_mask"][0] == 1).all() and (prompts["attention_mask"][1, :n_pad] == 0).all()
assert prompts["input_ids"][1, n_pad:].tolist() == pair[1]["prompt_ids"]  # real tokens end in the last column

# %% [markdown]
# ## A bad line names its file, line and field
# A data error never surfaces as a bare traceback deep inside a training step, and no row is
# silently skipped: `load_jsonl` raises `DataError` naming the file, the line and the field.
# We write a small data folder with one good line followed by one bad line, a few times over.

# %%
folder = Path(tempfile.mkdtemp(prefix="atlas_min_tutorial_"))
(folder / "images").mkdir()
shutil.copy(examples[1]["images"][0], folder / "images" / "a.png")
good = {"id": "ok", "images": ["images/a.png"], "question": "Which line is longer?", "answer": "A",
        "response": "Let me compare the lines. <|Line|> <answer>A</answer>", "task": "line"}
bad_lines = {
    "missing answer": {k: v for k, v in good.items() if k != "answer"},
    "answer is a number": dict(good, answer=3),
    "image leaves the folder": dict(good, images=["../../etc/passwd"]),
    "image not there": dict(good, images=["images/b.png"]),
    "not JSON": "{'id': 'single quotes'}",
}
for what, bad in bad_lines.items():
    path = folder / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    try:
        load_jsonl(path, need_response=True)
        raise AssertionError(f"{what}: the bad line was accepted")
    except DataError as e:
        print(f"{what:24s} -> DataError: {e}")
        assert str(e).startswith(f"{path}:2:")  # the file and line 2, the bad one
shutil.rmtree(folder)

# %% [markdown]
# ## Where this is used
# → `train_sft.py`: part 1 (`load_examples(cfg, "train", need_response=True)`) and part 3, the loop,
# where each step's examples go through `encode_example(…, with_reply=True)` (`encode` with the
# config's prompt pieces: `system_prompt`, `question_suffix`, `image_separator`) and `sft_step`
# collates them with `collate_sft`. `train_rl.py`'s `sample_groups` encodes prompts without replies and collates them
# with `collate_prompts` for the sampler (tutorial 03); `eval.py` does the same for greedy decoding.
