"""A folder laid out like the Qwen/Qwen2.5-VL-7B-Instruct download, at tiny sizes, built offline.

    build_qwen_folder(folder, texts)   # -> folder

What matches the download (file names, JSON fields, ids, key names, dtype):
- config.json in the download's flat layout (transformers 4.41 style: text fields at the top, "rope_scaling"
  {"type": "mrope", ...}, "vision_config" nested), vocab_size 152,064, tie_word_embeddings false; the sizes
  are tiny (hidden 32, 2 layers, vision depth 2) and mrope_section is [2, 1, 1] (it must sum to head_dim / 2).
- model-0000k-of-0000n.safetensors shards (bf16) + model.safetensors.index.json, with the download's key
  names: `model.embed_tokens.weight`, `model.layers.N...`, `model.norm.weight`, `visual.blocks.N...`,
  `visual.merger...`, `visual.patch_embed...`, `lm_head.weight`. transformers 5 writes other names
  (`model.language_model.*`, `model.visual.*`) and renames the download's keys when it loads them.
- A byte-level BPE with Qwen2's pre-tokenizer (its split regex, then ByteLevel without regex), NFC normaliser
  and ByteLevel decoder; 151,643 ordinary entries (256 byte symbols + merges trained on `texts` + unused
  fillers), then Qwen2.5's 22 added tokens at ids 151,643..151,664, the first 14 special. tokenizer.json,
  vocab.json, merges.txt and tokenizer_config.json as the download has them.
- preprocessor_config.json, chat_template.json and generation_config.json with the download's values.
"""
import json
from pathlib import Path

import torch

N_ORDINARY = 151_643  # Qwen2.5's BPE entries; the added tokens follow
VOCAB_ROWS = 152_064  # embedding rows of Qwen2.5-VL-7B (the matrix is padded beyond the tokenizer)

# Qwen2.5-VL-7B-Instruct's tokenizer_config.json "added_tokens_decoder", ids 151643..151664 in this order; the first
# 14 are special, the last 8 not. Seen in published copies of that file (e.g. the `find_string "151664": {` hits:
# a dump of Qwen2.5-VL's tokenizer_config.json, and Qwen2-VL-2B-Instruct-AWQ/tokenizer_config.json for the first 14);
# atlas_min/plan.py's QWEN_SPECIAL lists the same 22.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
ADDITIONAL_SPECIAL = [t for t, special in ADDED_TOKENS[1:14]]  # the download's "additional_special_tokens"

# The exact Jinja of Qwen2.5-VL-7B-Instruct's chat_template.json (the same string as Qwen2-VL's). Found with the
# search tools: quoted as "the current chat template" of the Qwen2.5-VL release (line-broken for reading) in
# huggingface.co/Qwen/Qwen2.5-VL-32B-Instruct/discussions/18, and verbatim, one line, in the
# `processor_config.chat_template` of a qwen2_5_vl model's hub config, in huggingface/transformers'
# Qwen2-VL processor test (`prepare_processor_dict`) and in shell-nlp/gpt_server tests/test_chat_template.py.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (values as in the download; CLIP's mean and std).
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}

GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
              "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
              "transformers_version": "4.37.0"}

# Qwen2.5-VL-7B-Instruct's config.json, field for field, with tiny sizes where it names sizes.
TEXT_HIDDEN, TEXT_LAYERS, VISION_DEPTH = 32, 2, 2
CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": TEXT_HIDDEN, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128000,
    "max_window_layers": TEXT_LAYERS, "model_type": "qwen2_5_vl", "num_attention_heads": 4,
    "num_hidden_layers": TEXT_LAYERS, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": VISION_DEPTH, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
                      "num_heads": 2, "in_chans": 3, "out_hidden_size": TEXT_HIDDEN, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [VISION_DEPTH - 1], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    "vocab_size": VOCAB_ROWS,
}

# Qwen2's pre-tokenizer split (transformers' models/qwen2/tokenization_qwen2.py, and the download's tokenizer.json)
SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _pipeline(tok):
    """Qwen2's normaliser, pre-tokenizer, post-processor and decoder on a tokenizers.Tokenizer."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def qwen_tokenizer(texts, trained_vocab=1000):
    """(tokenizers.Tokenizer, vocab dict, merges list) with Qwen2.5's size and added-token ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    small = _pipeline(Tokenizer(models.BPE()))
    small.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=trained_vocab, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = json.loads(small.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    k = 0
    while len(vocab) < N_ORDINARY:  # unused entries: no merge produces them (ASCII, so they decode)
        vocab.setdefault(f"zzfiller{k}", len(vocab))
        k += 1
    tok = _pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                         byte_fallback=False)))
    for content, special in ADDED_TOKENS:  # one at a time: each takes the next id
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    assert tok.get_vocab_size(with_added_tokens=True) == N_ORDINARY + len(ADDED_TOKENS)
    assert tok.token_to_id("<|endoftext|>") == N_ORDINARY and tok.token_to_id("<|file_sep|>") == 151_664
    return tok, vocab, merges


def _tokenizer_config():
    decoder = {str(N_ORDINARY + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": special}
               for i, (t, special) in enumerate(ADDED_TOKENS)}
    return {"add_prefix_space": False, "added_tokens_decoder": decoder, "additional_special_tokens": ADDITIONAL_SPECIAL,
            "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


def download_key(key):
    """transformers 5's state-dict name -> the name the download stores."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def _weights(seed):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**CONFIG))
    return {download_key(k): v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def _write_shards(folder, state, max_bytes):
    """model-0000k-of-0000n.safetensors of at most `max_bytes` each (a larger tensor alone), + the index."""
    from safetensors.torch import save_file
    shards, size = [[]], 0
    for key in state:
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for k, keys in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({key: state[key] for key in keys}, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def _dump(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def build_qwen_folder(folder, texts, seed=0, max_shard_bytes=8 * 2**20):
    """Write the download-shaped folder (see the module docstring) to `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, vocab, merges = qwen_tokenizer(texts)
    tok.save(str(folder / "tokenizer.json"))
    _dump(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _dump(folder / "tokenizer_config.json", _tokenizer_config())
    _dump(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    _dump(folder / "preprocessor_config.json", PREPROCESSOR)
    _dump(folder / "generation_config.json", GENERATION)
    _dump(folder / "config.json", CONFIG)
    _write_shards(folder, _weights(seed), max_shard_bytes)
    return folder
