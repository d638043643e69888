"""Build or load Qwen2.5-VL, its tokenizer and image processor; the forward passes the trainers share.

Random-init presets (`micro`, `toy`) build everything offline: a byte-level BPE trained on the toy
world's texts, and a small Qwen2.5-VL. A `model_path` loads all three from a local folder instead.
"""
import copy
from dataclasses import fields, replace
from pathlib import Path

import torch
from transformers import (AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil)

from atlas_min.checkpoint import CheckpointError, require_model
from atlas_min.dist import print0
from atlas_min.tokens import add_functional_tokens

# Qwen's special tokens, in Qwen's order (ids differ from Qwen's own: this vocabulary is tiny).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def build_tokenizer(texts, vocab_size):
    """A byte-level BPE trained on `texts`: deterministic, offline, loads back with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


# Qwen's own ids (Qwen2.5-VL-7B-Instruct's config.json): used when the model is built without a tokenizer.
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
            "<|image_pad|>": 151655, "<|video_pad|>": 151656}


def _mrope_section(cfg, head_dim):
    """How each head's rotary half-dimension is split between time, height and width ([16, 24, 24] at 7B)."""
    if cfg.mrope_section:
        return [int(x) for x in cfg.mrope_section.split(",")]
    half = head_dim // 2
    t = half // 2
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def model_config(cfg, tokenizer=None):
    """The Qwen2_5_VLConfig of the preset's sizes. Ids come from `tokenizer`, or are Qwen's own without one;
    the vocabulary has max(cfg.vocab_rows, len(tokenizer)) rows (Qwen pads its matrix beyond the tokenizer)."""
    if tokenizer is None:
        if not cfg.vocab_rows:
            raise ValueError(f"config {cfg.name!r} has vocab_rows=0: its size comes from a tokenizer; pass one")
        ids, rows = QWEN_IDS, cfg.vocab_rows
    else:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        rows = max(cfg.vocab_rows, len(tokenizer))
    head_dim = cfg.text_hidden // cfg.text_heads
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=rows, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
            intermediate_size=cfg.text_intermediate, max_position_embeddings=cfg.max_positions,
            rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                             "mrope_section": _mrope_section(cfg, head_dim)},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden, num_heads=cfg.vision_heads,
            intermediate_size=cfg.vision_intermediate, out_hidden_size=cfg.text_hidden,
            fullatt_block_indexes=_full_attention(cfg),
            window_size=112, tokens_per_second=cfg.vision_tokens_per_second),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=cfg.tie_embeddings)


def build_model(cfg, tokenizer=None):
    """A randomly initialised Qwen2.5-VL of the preset's sizes (see `model_config`).

    Under `with torch.device("meta"):` nothing is allocated: that is how `atlas_min.plan` sizes the 7B.
    """
    torch.manual_seed(sft_run_seed(cfg))
    return Qwen2_5_VLForConditionalGeneration(model_config(cfg, tokenizer))


def sft_run_seed(cfg):
    """The seed of an SFT run's own draws (a random init, the batch order): `seed`, moved by `sft_seed`."""
    return cfg.seed + cfg.sft_seed * cfg.epoch_seed_stride


def image_processor_for(cfg):
    return Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


def load_pretrained(path, cfg=None, on_meta=False):
    """(model, tokenizer, image_processor) from a Hugging Face folder; fp32 weights (FSDP casts for compute).

    `on_meta`: the model's structure only, on the meta device, with no weight read: the ranks that
    `dist.shard` hands their shards of rank 0's weights to.
    """
    path = Path(path)
    require_model(path, "model")  # the architecture, a tokenizer, whole weight files: named before any weight is read
    if on_meta:
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(path))
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    has_own = (path / "preprocessor_config.json").is_file()
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path) if has_own else image_processor_for(cfg)
    if cfg is not None and cfg.model_path:  # the preset's pixel bounds win over the folder's
        set_pixel_bounds(image_processor, cfg.min_pixels, cfg.max_pixels)
    return model, tokenizer, image_processor


# The Config's architecture fields and where a model folder's config holds them (`adopt_shape`)
SHAPE_FIELDS = {"text_hidden": ("text", "hidden_size"), "text_layers": ("text", "num_hidden_layers"),
                "text_heads": ("text", "num_attention_heads"), "text_kv_heads": ("text", "num_key_value_heads"),
                "text_intermediate": ("text", "intermediate_size"), "max_positions": ("text", "max_position_embeddings"),
                "rms_norm_eps": ("text", "rms_norm_eps"), "tie_embeddings": ("top", "tie_word_embeddings"),
                "vision_hidden": ("vision", "hidden_size"), "vision_depth": ("vision", "depth"),
                "vision_heads": ("vision", "num_heads"), "vision_intermediate": ("vision", "intermediate_size"),
                "vision_tokens_per_second": ("vision", "tokens_per_second")}


def adopt_shape(cfg, folder, what):
    """(cfg with the architecture of the model folder `folder`, {field: [was, now]} for each field that changed),
    each change said in one note naming `what` (the option or field that named the folder).

    One rule for every script that reads a model folder (model_path, --init, --ckpt): the folder's weights have
    the shape its config.json says, whatever the preset says, so the run takes that shape and its recorded config
    says the truth. The preset's sizes only shape a random-init model. Fields that only fix the vocabulary
    (`vocab_rows`, `tokenizer_vocab`) come with the folder's tokenizer and are left as they are."""
    hf = Qwen2_5_VLConfig.from_pretrained(folder)  # either layout: the download's flat one, or nested
    parts = {"top": hf, "text": hf.get_text_config(), "vision": hf.vision_config}
    new = replace(cfg, **{f: type(getattr(cfg, f))(getattr(parts[p], a)) for f, (p, a) in SHAPE_FIELDS.items()},
                  rope_theta=float(parts["text"].rope_parameters["rope_theta"]))
    section = list(parts["text"].rope_parameters.get("mrope_section") or [])
    if section and _mrope_section(new, new.text_hidden // new.text_heads) != section:
        new = replace(new, mrope_section=",".join(map(str, section)))
    full = list(hf.vision_config.fullatt_block_indexes)
    if _full_attention(new) != full:  # every k-th block, or only the last (0)
        new = replace(new, vision_fullatt_every=full[1] - full[0] if len(full) > 1 else full[0] + 1)
    if _full_attention(new) != full:
        raise CheckpointError(f"{folder}: vision fullatt_block_indexes {full} are not every k-th block")
    changed = {f.name: [getattr(cfg, f.name), getattr(new, f.name)] for f in fields(cfg)
               if getattr(cfg, f.name) != getattr(new, f.name)}
    if changed:
        print0(f"note: {what} {folder} has its own shape, which the run takes and records: "
               + ", ".join(f"{name} {was!r} -> {now!r}" for name, (was, now) in changed.items()))
    return new, changed


def _full_attention(cfg):
    every = cfg.vision_fullatt_every
    return list(range(every - 1, cfg.vision_depth, every)) if every else [cfg.vision_depth - 1]


def set_pixel_bounds(image_processor, min_pixels, max_pixels):
    """Images are resized to between min_pixels and max_pixels (aspect kept, sides multiples of 28).
    Only `size` is set: transformers 5 reads the bounds from it (and warns about `min_pixels` attributes)."""
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}


def eval_image_processor(image_processor, cfg):
    """The image processor under the eval protocol's bounds (eval_min_pixels..eval_max_pixels, ATLAS's harness
    at 7B): a copy, the training one untouched; itself when the config sets none. eval.py and RL validation."""
    if not cfg.eval_min_pixels:
        return image_processor
    image_processor = copy.deepcopy(image_processor)
    set_pixel_bounds(image_processor, cfg.eval_min_pixels, cfg.eval_max_pixels)
    return image_processor


def init_model(cfg, on_meta=False):
    """Stage-1 start: the base model of the preset (random or from model_path) + the functional tokens;
    `on_meta` as in `load_pretrained`."""
    if cfg.model_path:
        model, tokenizer, image_processor = load_pretrained(cfg.model_path, cfg, on_meta)
    else:
        from atlas_min.toy import corpus
        tokenizer = build_tokenizer(corpus(cfg), cfg.tokenizer_vocab)
        with torch.device("meta" if on_meta else "cpu"):
            model = build_model(cfg, tokenizer)
        image_processor = image_processor_for(cfg)
    add_functional_tokens(model, tokenizer)
    return model, tokenizer, image_processor


# ---------------------------------------------------------------------------------------------
# Forward passes. Positions are computed explicitly on every call: Qwen2.5-VL's 3-D (mrope)
# positions need `mm_token_type_ids`, and cached `rope_deltas` from an earlier call can be stale.

def mrope_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
    """(3, B, T) positions and (B, 1) rope deltas: text runs 1-D, image tokens get (t, h, w)."""
    return model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                      attention_mask=attention_mask)


def token_logprobs(logits, token_ids, chunk=0):
    """log softmax(logits)[token] for each position: (B, T, V), (B, T) -> (B, T) (docs/method.md, "Log-probabilities").

    `chunk` = 0: one log-softmax over all of `logits` in float32, kept for backward: with bf16 logits that is
    float32 copies of the whole (B, T, V) tensor (14 bytes per entry with backward's gradients, `plan`).
    `chunk` > 0: `chunk` positions of one row at a time (`ChunkedTokenLogprobs`): no (B, T, V) float32 tensor
    is made, backward keeps the logits themselves and writes their gradient in their own dtype.
    """
    if chunk:
        return ChunkedTokenLogprobs.apply(logits, token_ids, chunk)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def _pieces(shape, chunk):
    """(row, positions) index pairs that cover a (B, T) grid, `chunk` positions at a time."""
    return [(b, slice(t, t + chunk)) for b in range(shape[0]) for t in range(0, shape[1], chunk)]


class ChunkedTokenLogprobs(torch.autograd.Function):
    """`token_logprobs` piece by piece. Forward: each piece's float32 log-softmax, of which only the tokens'
    entries are kept. Backward recomputes it: ∂ log p_o / ∂x_v = 1[v = o] − softmax(x)_v, so a piece's
    gradient is g·(onehot − exp(log-softmax)), written into one buffer of the logits' shape and dtype.
    Same operations as the plain formula on each piece, so the same values up to summation order."""

    @staticmethod
    def forward(ctx, logits, token_ids, chunk):
        out = torch.empty(token_ids.shape, dtype=torch.float32, device=logits.device)  # (B, T)
        for b, t in _pieces(token_ids.shape, chunk):
            logp = torch.log_softmax(logits[b, t].float(), dim=-1)  # (chunk, V), freed with the loop
            out[b, t] = logp.gather(-1, token_ids[b, t, None])[:, 0]
        ctx.save_for_backward(logits, token_ids)  # the model's own tensor: no copy
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):  # grad: (B, T), ∂L/∂ log p
        logits, token_ids = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # (B, T, V)
        for b, t in _pieces(token_ids.shape, ctx.chunk):
            g = grad[b, t, None].float()  # (chunk, 1)
            piece = torch.log_softmax(logits[b, t].float(), dim=-1).exp_().mul_(-g)  # −g·softmax
            grad_logits[b, t] = piece.scatter_add_(-1, token_ids[b, t, None], g)  # + g at the token
        return grad_logits, None, None


def log_partition_and_entropy(logits, work):
    """(log Z, H) of p = softmax(logits), each (N,), from one exp pass written into `work` (N, V), which is left
    holding exp(logits − max), the unnormalised p. log Z = logsumexp(logits) (so log p_k = logits_k − log Z) and
    H = −Σ p log p = log Z − Σ p·logits: finite where p underflows to 0. The decode step calls this on every
    step, so nothing of size (N, V) is allocated: on CPU a fresh (N, V) tensor costs more than the pass itself."""
    top = logits.amax(-1, keepdim=True)  # (N, 1)
    torch.sub(logits, top, out=work).exp_()  # (N, V)
    total = work.sum(-1)  # (N,)
    log_z = top[:, 0] + total.log()
    with torch.autocast(logits.device.type, enabled=False):  # bf16 autocast would round Σ p·x to ~0.4%
        return log_z, log_z - torch.bmm(work[:, None], logits[:, :, None])[:, 0, 0] / total


def reply_nll(logits, labels, ignore_index=-100, chunk=0):
    """Stage-1 per-token loss (B, T-1): −log p(token t+1 | ≤ t) where it has a label, 0 elsewhere.
    `chunk`: as in `token_logprobs`."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != ignore_index
    return -token_logprobs(logits[:, :-1], targets.clamp(min=0), chunk) * keep


def image_order(images_per_row, repeats):
    """Image indices in the order the repeated rows hold them: prompt p's images, `repeats` times (a number for
    every prompt, or a list with one per prompt)."""
    counts = repeats if isinstance(repeats, list) else [repeats] * len(images_per_row)
    order, start = [], 0
    for n, times in zip(images_per_row, counts, strict=True):
        order += list(range(start, start + n)) * times
        start += n
    return order


class EncodedImages:
    """Image features handed to the model as `mm_encoder_outputs["image"]` (it reads `.pooler_output`).

    Not a ModelOutput on purpose. The model returns the features it was given among its outputs, and
    FSDP2 replaces the grad-requiring tensors it finds in a root module's inputs (inside dicts, tuples,
    dataclasses) by views for its post-backward hook, then warns on meeting those views among the
    outputs. A plain object is not searched, so nothing is replaced; the root's gradients are then
    reduced in FSDP's end-of-backward callback, as for any root whose inputs need no gradient.
    """

    def __init__(self, pooler_output):
        self.pooler_output = pooler_output

    def to_tuple(self):  # the model's output calls it when indexed (`outputs[0]`)
        return (self.pooler_output,)


def forward(model, batch, input_ids, attention_mask, repeats=1, logits_to_keep=0, position_ids=None,
            use_cache=False, **kwargs):
    """Full forward over rows that repeat each prompt of `batch` `repeats` times (its images encoded once;
    `repeats` a number, or a list with each prompt's number of rows).

    `batch` holds the prompts' `pixel_values`, `image_grid_thw` and `images_per_row`; `input_ids` may
    extend the prompts with completions; `position_ids` (3, B, T), when given, spares their computation.
    `use_cache` is off unless asked for: a training or log-prob forward has no next step to cache for.
    Returns (model output, rope deltas (B, 1), or None when `position_ids` was given).
    """
    order = image_order(batch["images_per_row"], repeats)
    features = {}
    if order:
        pooled = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True).pooler_output
        features["image"] = EncodedImages(tuple(pooled[i] for i in order))
    deltas = None
    if position_ids is None:
        mm_token_type_ids = (input_ids == model.config.image_token_id).long()  # from the same padded ids: same side
        position_ids, deltas = mrope_positions(model, input_ids, attention_mask, mm_token_type_ids, batch["image_grid_thw"][order])
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                mm_encoder_outputs=features, logits_to_keep=logits_to_keep, use_cache=use_cache, **kwargs)
    return out, deltas
