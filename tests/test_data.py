import json

import pytest

from atlas_min.data import IGNORE, DataError, check_images, collate_prompts, collate_sft, encode, load_jsonl


def _write(folder, lines, image=True):
    if image:
        from PIL import Image
        (folder / "img").mkdir(exist_ok=True)
        Image.new("RGB", (56, 56), (123, 117, 104)).save(folder / "img" / "a.png")
    path = folder / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"id": "x", "images": ["img/a.png"], "question": "q?", "answer": "1", "response": "r <answer>1</answer>", "task": "t"}


def _line(**change):
    ex = dict(GOOD, **change)
    return json.dumps({k: v for k, v in ex.items() if v is not ...})


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (_line(question=...), "missing field 'question'"),
    (_line(answer=3), "field 'answer' must be str, got int"),
    (_line(images="img/a.png"), "field 'images' must be list, got str"),
    (_line(images=[7]), "field 'images[0]' must be str, got int"),
    (_line(images=["../outside.png"]), "field 'images[0]' = '../outside.png' leaves the data folder"),
    (_line(images=["/etc/passwd"]), "leaves the data folder"),
    (_line(images=["img/missing.png"]), "field 'images[0]': image"),
    (_line(response=...), "missing field 'response'"),
])
def test_every_malformed_line_names_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, [_line(), line])
    with pytest.raises(DataError) as err:
        load_jsonl(path, need_response=True)
    assert str(err.value).startswith(f"{path}:2: ")
    assert message in str(err.value)


def test_response_is_optional_for_rl_and_eval_data(tmp_path):
    path = _write(tmp_path, [_line(response=...)])
    assert load_jsonl(path)[0]["question"] == "q?"


def test_a_corrupt_image_is_named_when_it_is_read(tmp_path, micro):
    _, tokenizer, image_processor = micro
    path = _write(tmp_path, [_line()])
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG not really")
    ex = load_jsonl(path)[0]
    with pytest.raises(DataError, match=r"d.jsonl:1: image .*a.png cannot be read"):
        encode(ex, tokenizer, image_processor, "sys")


def test_each_image_pad_becomes_one_token_per_merged_patch(micro, toy_files):
    _, tokenizer, image_processor = micro
    ex = load_jsonl(toy_files[0])[0]
    e = encode(ex, tokenizer, image_processor, "sys")
    t, h, w = e["image_grid_thw"][0].tolist()
    n_pad = e["prompt_ids"].count(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert n_pad == t * h * w // 4  # merge_size 2: each 2x2 block of patches is one token
    assert e["pixel_values"].shape[0] == t * h * w


def test_sft_labels_keep_exactly_the_reply_tokens(micro, toy_files):
    _, tokenizer, image_processor = micro
    examples = load_jsonl(toy_files[0], need_response=True)[:3]
    examples[1] = dict(examples[1], response="A much longer reply <|Line|> <|Zoom|> with two tokens <answer>B</answer>")
    encoded = [encode(ex, tokenizer, image_processor, "sys", with_reply=True) for ex in examples]
    batch = collate_sft(encoded, tokenizer.pad_token_id)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for b, ex in enumerate(examples):
        reply = tokenizer.encode(ex["response"] + "<|im_end|>", add_special_tokens=False)
        kept = batch["labels"][b][batch["labels"][b] != IGNORE].tolist()
        assert kept == reply  # every reply token, functional ones and the stop token included
        assert tokenizer.decode(kept) == ex["response"] + "<|im_end|>"
        is_image = batch["input_ids"][b] == image_pad
        assert is_image.any() and (batch["labels"][b][is_image] == IGNORE).all()
        assert (batch["labels"][b][batch["attention_mask"][b] == 0] == IGNORE).all()
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padding: every row starts at column 0


def test_prompt_batches_are_left_padded(micro, toy_files):
    _, tokenizer, image_processor = micro
    examples = load_jsonl(toy_files[0])[:2]
    examples[1] = dict(examples[1], question=examples[1]["question"] + " Think about it carefully first.")
    encoded = [encode(ex, tokenizer, image_processor, "sys") for ex in examples]
    batch = collate_prompts(encoded, tokenizer.pad_token_id)
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert batch["attention_mask"][0, 0] == 0
    assert batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist() == encoded[0]["prompt_ids"]


def test_the_question_suffix_follows_the_question_inside_the_user_turn(micro, toy_files):
    _, tokenizer, image_processor = micro
    ex = load_jsonl(toy_files[0])[0]
    suffix = "\n\nPlease think step by step, and put your final answer within \\boxed{}."
    text = tokenizer.decode(encode(ex, tokenizer, image_processor, "sys", question_suffix=suffix)["prompt_ids"])
    assert text.endswith(ex["question"] + suffix + "<|im_end|>\n<|im_start|>assistant\n")


def test_each_epoch_of_the_data_stream_is_a_permutation_of_the_examples():
    from atlas_min.data import stream_indices
    n, per_step = 10, 4  # steps 0-4 cover 20 draws: epochs 0 and 1 exactly
    drawn = [i for step in range(5) for i in stream_indices(step, per_step, n, seed=3, epoch_seed_stride=100_003)]
    assert sorted(drawn[:n]) == list(range(n)) and sorted(drawn[n:]) == list(range(n))
    assert drawn[:n] != drawn[n:]  # each epoch is shuffled anew


def test_the_data_stream_depends_on_the_seed_and_step_alone():
    from atlas_min.data import stream_indices
    def epoch(seed):
        return [i for step in range(5) for i in stream_indices(step, 2, 10, seed=seed, epoch_seed_stride=100_003)]
    assert epoch(0) == epoch(0)
    assert epoch(0) != epoch(1)
    assert stream_indices(3, 2, 10, seed=0, epoch_seed_stride=100_003) == epoch(0)[6:8]  # resuming at step 3


def test_the_image_separator_stands_between_the_image_block_and_the_question(micro, toy_files):
    _, tokenizer, image_processor = micro
    ex = load_jsonl(toy_files[0])[0]
    text = tokenizer.decode(encode(ex, tokenizer, image_processor, "sys", image_separator="\n")["prompt_ids"])
    assert "<|vision_end|>\n" + ex["question"] + "<|im_end|>" in text


def test_the_7b_prompt_is_laid_out_as_atlas_harness_renders_it():
    # docs/eval_protocol.md, "The prompt": system message, image block, newline, question, two newlines, instruction
    from atlas_min.config import get_config
    from atlas_min.data import prompt_text
    cfg = get_config("qwen2_5_vl_7b")
    instruction = "Please think step by step, and put your final answer within \\boxed{}."
    want = (f"<|im_start|>system\nYou are a helpful assistant. {instruction}<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>\nWhat is x?\n\n{instruction}<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert prompt_text("What is x?" + cfg.question_suffix, 1, cfg.system_prompt, cfg.image_separator) == want


def test_a_named_token_must_be_one_of_the_five(tmp_path):
    import json
    from atlas_min.data import DataError
    (tmp_path / "a.png").write_bytes(b"")
    line = {"id": "1", "images": [], "question": "q", "answer": "a", "task": "t", "token": "<|Circle|>"}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'token' must be one of"):
        load_jsonl(tmp_path / "d.jsonl")


def _wide_image_example(tmp_path):
    from PIL import Image
    (tmp_path / "img").mkdir()
    Image.new("RGB", (300, 100), (10, 200, 30)).save(tmp_path / "img" / "a.png")  # resized: not square
    path = tmp_path / "d.jsonl"
    path.write_text(_line(images=["img/a.png", "img/a.png"], question="how many? " * 7) + "\n")
    return check_images(load_jsonl(path, need_response=True))  # as load_examples: sizes recorded


@pytest.mark.parametrize("with_reply", [True, False])
def test_the_context_check_counts_exactly_the_tokens_the_encoder_builds(tmp_path, micro, micro_cfg, with_reply):
    from atlas_min.data import check_lengths, encode_example
    _, tokenizer, image_processor = micro
    examples = _wide_image_example(tmp_path)
    e = encode_example(examples[0], tokenizer, image_processor, micro_cfg, with_reply=True)
    more = len(e["reply_ids"]) if with_reply else 9  # the reply, or 9 tokens to generate
    need = len(e["prompt_ids"]) + more
    kwargs = dict(with_reply=True) if with_reply else dict(generate=9)
    assert check_lengths(examples, tokenizer, image_processor, micro_cfg, context=need, **kwargs) == examples
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'question'.* exceed the model's"):
        check_lengths(examples, tokenizer, image_processor, micro_cfg, context=need - 1, **kwargs)
