"""Data: the JSONL schema, where examples come from, Qwen's chat format, image-pad expansion, collation.

One example per line: {"id", "images": [paths relative to the file's folder], "question", "answer",
"response" (SFT only, functional tokens inline), "task"}, and optionally "token": the functional token
the example calls for (the toy knows it; logged as the right-token rate) (docs/method.md, "Data").
Toy data and real data use the same loader; a config with no data path draws on the toy world (`atlas_min.toy`).

A sequence is `prompt + reply`, tokenised separately and concatenated, so what SFT trains on is
token-for-token what the sampler will later produce after the same prompt:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|image_pad|>×k<|vision_end|>
    {question}<|im_end|>\\n<|im_start|>assistant\\n      ← prompt (no loss)
    {response}<|im_end|>                                ← reply (loss), the stop token included
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image

from atlas_min.dist import from_rank0
from atlas_min.tokens import FUNCTIONAL_TOKENS

IGNORE = -100  # label of positions without loss (torch's cross_entropy default ignore_index)
FIELDS = {"id": str, "question": str, "answer": str, "task": str, "images": list}


class DataError(ValueError):
    """A bad data line or image; the message names the file, the line and the field."""


def load_jsonl(path, need_response=False):
    """Validated examples of a JSONL file; image paths resolved (and kept) inside its folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    root = path.parent.resolve()
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(ex, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(ex).__name__}")
        for field, kind in dict(FIELDS, response=str).items():  # a response: required for SFT, else optional
            if field not in ex and (field != "response" or need_response):
                raise DataError(f"{where}: missing field '{field}'")
            if field in ex and not isinstance(ex[field], kind):
                raise DataError(f"{where}: field '{field}' must be {kind.__name__}, got {type(ex[field]).__name__}")
        if "token" in ex and ex["token"] not in FUNCTIONAL_TOKENS:
            raise DataError(f"{where}: field 'token' must be one of {', '.join(FUNCTIONAL_TOKENS)}, "
                            f"got {ex['token']!r}")
        paths = []
        for k, rel in enumerate(ex["images"]):
            if not isinstance(rel, str):
                raise DataError(f"{where}: field 'images[{k}]' must be str, got {type(rel).__name__}")
            full = Path(os.path.realpath(root / rel))  # a symlink loop stays a path, which is no file (below)
            if not full.is_relative_to(root):
                raise DataError(f"{where}: field 'images[{k}]' = {rel!r} leaves the data folder {root}")
            if not full.is_file():
                raise DataError(f"{where}: field 'images[{k}]': image {full} not found")
            paths.append(full)
        examples.append(dict(ex, images=paths, where=where))
    return examples


def data_file(cfg, split):
    """The JSONL file of `split` ("train" or "eval"): the config's, or the toy world's. The toy's files are
    written atomically (`toy.write_toy_data`), so ranks may all ask at once."""
    path = cfg.train_data if split == "train" else cfg.eval_data
    if not path:
        from atlas_min.toy import ensure_toy_data  # only when no data is given: real data never loads the toy
        path = ensure_toy_data(cfg)[0 if split == "train" else 1]
    return Path(path)


def file_record(path):
    """{"path", "bytes", "sha256"} of a data file: what a run or an eval read, recorded to compare and cite."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    data = path.read_bytes()  # JSONL only (images stay where they are): megabytes, read once
    return {"path": str(path.resolve()), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_examples(cfg, split, need_response=False, on_skip=None):
    """The examples of `split`'s `data_file`, every image checked (`check_images`; `on_skip` gets the
    dropped lines). A file with no example is a DataError: nothing could be trained or scored."""
    path = data_file(cfg, split)
    examples = load_jsonl(path, need_response=need_response)
    if not examples:
        raise DataError(f"{path}: holds no examples")
    return check_images(examples, skip=cfg.skip_bad_examples, on_skip=on_skip)


MAX_ASPECT = 200  # Qwen2-VL's image processor refuses images whose long side is ≥ 200× the short one


def inspect_image(path):
    """(why the image at `path` cannot be used, or None; its (width, height)). It must open, pass PIL's
    integrity check (for a PNG, every chunk's checksum; a truncated file fails) and have an aspect ratio
    Qwen can resize."""
    try:
        with Image.open(path) as im:
            im.verify()
            width, height = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"cannot be read ({type(e).__name__}: {e})", None
    if max(width, height) >= MAX_ASPECT * max(1, min(width, height)):
        return f"is {width}x{height}: aspect ratio beyond {MAX_ASPECT}", (width, height)
    return None, (width, height)


def check_images(examples, skip=False, on_skip=None):
    """Every image of every example checked once per job, before any work: a bad file found at step 10,000 of
    a deterministic data order would stop the run there again after every resume (`keep_good`). Under
    torchrun rank 0 opens the images and tells the other ranks what it found (`dist.from_rank0`), so the
    I/O is once per job, not once per rank. Each example comes back with its `image_sizes` [(width, height)],
    which `check_lengths` counts from."""
    def inspect_all():
        bad, sizes = [], []
        for ex in examples:
            sizes.append([])
            for k, path in enumerate(ex["images"]):
                problem, size = inspect_image(path)
                if problem:
                    bad.append(f"{ex['where']}: field 'images[{k}]': image {path} {problem}")
                    break
                sizes[-1].append(size)
        return bad, sizes

    bad, sizes = from_rank0(inspect_all)
    checked = [dict(ex, image_sizes=s) for ex, s in zip(examples, sizes)]
    return keep_good(checked, bad, "with a bad image", skip, on_skip)


def keep_good(examples, bad, what, skip, on_skip):
    """`examples` when `bad` (lines "file:line: reason") is empty. Else raises DataError listing the bad
    lines (the first 20 and their count), or with `skip` calls `on_skip(bad, what)` and drops them."""
    if bad and not skip:
        shown = "\n  ".join(bad[:20])
        raise DataError(f"{len(bad)} example(s) {what} (skip_bad_examples=true drops them):\n  {shown}"
                        + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))
    if bad and on_skip is not None:
        on_skip(bad, what)
    dropped = {line.split(": field", 1)[0] for line in bad}
    kept = [ex for ex in examples if ex["where"] not in dropped]
    if not kept:
        raise DataError(f"all {len(examples)} example(s) {what}: skip_bad_examples=true dropped them all")
    return kept


def check_lengths(examples, tokenizer, image_processor, cfg, *, context, generate=0, with_reply=False, on_skip=None):
    """Every example's prompt plus its reply (`with_reply`, SFT) or plus the `generate` tokens the sampler
    may add fits in the model's `context` positions, checked before any work (`keep_good`): beyond them
    the model has no trained positions, and the run would fail, or truncate silently, on that batch.
    Image tokens are counted from each image's size (`check_images`) as the image processor will resize it."""
    texts = [prompt_text(ex["question"] + cfg.question_suffix, len(ex["images"]), cfg.system_prompt,
                         cfg.image_separator) for ex in examples]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    replies = tokenizer([ex["response"] + "<|im_end|>" for ex in examples],
                        add_special_tokens=False)["input_ids"] if with_reply else [[]] * len(examples)
    merge = image_processor.merge_size ** 2
    bad = []
    for ex, prompt, reply in zip(examples, prompts, replies):
        sizes = ex["image_sizes"]  # from check_images: no image is opened twice
        n_prompt = len(prompt) - len(sizes) + sum(image_processor.get_number_of_image_patches(h, w) // merge
                                                  for w, h in sizes)
        n_more, more = (len(reply), "reply tokens") if with_reply else (generate, "tokens to generate")
        if n_prompt + n_more > context:
            bad.append(f"{ex['where']}: field 'question': the prompt ({n_prompt} tokens with its images) + "
                       f"{n_more} {more} exceed the model's {context} positions")
    return keep_good(examples, bad, "longer than the model's context", cfg.skip_bad_examples, on_skip)


def stream_indices(step, per_step, n, *, seed, epoch_seed_stride):
    """Indices of `step`'s global batch: an endless stream of per-epoch shuffles of range(n).

    Derived from (seed, step) alone, so a resumed run and any number of processes see the same batches.
    """
    def shuffle(epoch):
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * epoch_seed_stride + epoch))

    # k: a position in the stream, item k % n of the shuffle of epoch k // n
    return [shuffle(k // n)[k % n].item() for k in range(step * per_step, (step + 1) * per_step)]


def rank_share(n, per_update, rank, world):
    """Positions in a step's global list of `n` items that `rank` of `world` takes, when every `per_update`
    consecutive items make one update: its slice of each update's items, the updates in order.

    Update m holds items m·per_update .. (m+1)·per_update − 1 on any number of processes, so which items
    share an update never depends on the process count. A contiguous split (rank r takes the r-th n/world items)
    would not: with 16 items and 8 per update, 1 process updates on items 0-7 first, 2 processes on 0-3 and 8-11.
    """
    share = per_update // world
    return [m + rank * share + k for m in range(0, n, per_update) for k in range(share)]


def micro_batches(lengths, per_update, size):
    """[(update's rows, [micro-batch's rows, ...]), ...]: a rank's rows, `per_update` consecutive ones per update
    (its slice of a mini-batch), each update's rows cut into micro-batches of `size` rows of similar length.

    `lengths` (N,): each row's prompt + completion tokens. A forward pads its rows to their longest prompt and
    longest completion; sorted by length, rows of one micro-batch need about the same width, and a long reply
    costs padding to its own micro-batch only. Rows of one prompt may so land in two micro-batches (each then
    encodes that prompt's images). Within a micro-batch rows keep their order (a prompt's rows stay together),
    so an update that fits in one micro-batch runs as its rows are. The longest micro-batch comes first: its memory
    peak is met at once (and on a CPU, with other jobs running, short-first updates were the slower ones in a few
    timings of bench's update). Gradients do not depend on the cut: every micro-batch divides by its update's
    counts (`grpo.grpo_loss`).
    """
    def cut(update):  # one update's rows, longest first, `size` at a time, each piece in its rows' order
        rows = update + torch.argsort(-lengths[update:update + per_update], stable=True)
        return slice(update, update + len(rows)), [rows[k:k + size].sort().values for k in range(0, len(rows), size)]
    return [cut(update) for update in range(0, len(lengths), per_update)]


def open_image(path, where=""):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: image {path} cannot be read ({e})") from None


def prompt_text(question, n_images, system_prompt, image_separator=""):
    image = "<|vision_start|><|image_pad|><|vision_end|>" * n_images + (image_separator if n_images else "")
    return (f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
            f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n")


def encode(ex, tokenizer, image_processor, system_prompt, with_reply=False, images=None, question_suffix="",
           image_separator=""):
    """Token ids of one example (each <|image_pad|> expanded to its image's merged patches) + pixels.

    `images` (PIL) replaces the example's own images when given (the blind eval passes blank ones);
    `question_suffix` is appended to the question and `image_separator` put between the images and the
    question (ATLAS's eval harness: its boxed instruction, and a newline).
    """
    if images is None:
        images = [open_image(p, ex.get("where", "")) for p in ex["images"]]
    pixels = (image_processor(images=images, return_tensors="pt") if images else
              {"pixel_values": torch.zeros(0, 0), "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)})
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    text = prompt_text(ex["question"] + question_suffix, len(images), system_prompt, image_separator)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if images:
        counts = iter((pixels["image_grid_thw"].prod(-1) // image_processor.merge_size ** 2).tolist())
        ids = [t for i in ids for t in ([i] * next(counts) if i == pad_id else [i])]
    out = {"prompt_ids": ids, "n_images": len(images), "pixel_values": pixels["pixel_values"],
           "image_grid_thw": pixels["image_grid_thw"]}
    if with_reply:
        out["reply_ids"] = tokenizer.encode(ex["response"] + "<|im_end|>", add_special_tokens=False)
    return out


def encode_example(ex, tokenizer, image_processor, cfg, with_reply=False, images=None):
    """`encode` with the config's prompt: its system prompt, question suffix and image separator."""
    return encode(ex, tokenizer, image_processor, cfg.system_prompt, with_reply=with_reply, images=images,
                  question_suffix=cfg.question_suffix, image_separator=cfg.image_separator)


def _images(encoded):
    pixels = [e["pixel_values"] for e in encoded if e["n_images"]]
    return {"pixel_values": torch.cat(pixels) if pixels else None,
            "image_grid_thw": torch.cat([e["image_grid_thw"] for e in encoded]),
            "images_per_row": [e["n_images"] for e in encoded]}


def _pad(rows, value, side="right"):
    """(B, T) tensor of the id lists `rows`, padded with `value` on `side` to the longest."""
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=value,
                                           padding_side=side)


def collate_sft(encoded, pad_id):
    """Right-padded prompt+reply rows; labels are IGNORE everywhere but the reply (stop token included)."""
    rows = [e["prompt_ids"] + e["reply_ids"] for e in encoded]
    labels = [[IGNORE] * len(e["prompt_ids"]) + e["reply_ids"] for e in encoded]
    return dict(_images(encoded), input_ids=_pad(rows, pad_id), attention_mask=_pad([[1] * len(r) for r in rows], 0),
                labels=_pad(labels, IGNORE))


def collate_prompts(encoded, pad_id):
    """Left-padded prompts, so every row's next token is generated at the same column."""
    rows = [e["prompt_ids"] for e in encoded]
    return dict(_images(encoded), input_ids=_pad(rows, pad_id, "left"),
                attention_mask=_pad([[1] * len(r) for r in rows], 0, "left"))


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
