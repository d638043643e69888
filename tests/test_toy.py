"""The toy world (atlas_min/toy.py) as a specification: what a data set written by it guarantees."""
import collections
import hashlib
import json
import random

import numpy as np
import torch
import pytest
from PIL import Image

from atlas_min import toy
from atlas_min.config import get_config


def micro(*overrides):
    return get_config("micro", ["toy_train_size=40", "toy_eval_size=20", *overrides])


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def png_digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "images").iterdir())}


def test_the_toy_generator_is_deterministic_by_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    toy.write_toy_data(a, micro())
    toy.write_toy_data(b, micro())
    toy.write_toy_data(c, micro("seed=1"))
    for name in ("train.jsonl", "eval.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    same, other = png_digests(a), png_digests(c)
    assert same == png_digests(b)  # byte-identical images
    assert sum(same[k] != other.get(k) for k in same) > 0.9 * len(same)  # another seed, other images


def test_draw_example_takes_all_its_randomness_from_the_rng_it_is_given():
    random.seed(123)  # the global RNG must not matter
    one = toy.draw_example("shape", random.Random(5), 56)
    random.seed(456)
    two = toy.draw_example("shape", random.Random(5), 56)
    assert one[0].tobytes() == two[0].tobytes() and one[1:] == two[1:]


def test_train_and_eval_splits_never_share_an_example(tmp_path):
    cfg = micro("toy_train_size=300", "toy_eval_size=100")
    train, evals = toy.write_toy_data(tmp_path, cfg)
    digests = png_digests(tmp_path)
    train_images = {digests[r["id"] + ".png"] for r in rows(train)}
    eval_images = {digests[r["id"] + ".png"] for r in rows(evals)}
    assert len(eval_images) == 100 and not train_images & eval_images
    assert not {r["id"] for r in rows(train)} & {r["id"] for r in rows(evals)}


@pytest.mark.parametrize("task", list(toy.TASK_TOKENS))
def test_every_familys_answers_are_balanced_so_a_blind_guess_is_at_chance(task):
    rng, n = random.Random(0), 400
    draws = [toy.draw_example(task, rng, 56) for _ in range(n)]
    assert {q for _, q, _, _ in draws} == {toy.QUESTIONS[task]}  # the question gives nothing away
    counts = collections.Counter(a for _, _, a, _ in draws)
    assert set(counts) == set(toy.ANSWERS[task])
    for answer in counts:  # every answer within 0.07 of uniform, so the best blind guess ~ CHANCE
        assert abs(counts[answer] / n - toy.CHANCE[task]) < 0.07, counts
    assert toy.CHANCE[task] == 1 / len(toy.ANSWERS[task])


def test_written_splits_are_round_robin_over_families_and_exactly_balanced_within_each(tmp_path):
    train, evals = toy.write_toy_data(tmp_path, micro("toy_train_size=120", "toy_eval_size=60"))
    for path, size in ((train, 120), (evals, 60)):
        data = rows(path)
        assert [r["task"] for r in data[:5]] == list(toy.TASK_TOKENS)
        assert collections.Counter(r["task"] for r in data) == {t: size // 5 for t in toy.TASK_TOKENS}
        for task in toy.TASK_TOKENS:
            counts = collections.Counter(r["answer"] for r in data if r["task"] == task)
            assert set(counts) == set(toy.ANSWERS[task]) and max(counts.values()) - min(counts.values()) <= 1


def test_toy_tasks_selects_a_subset_of_families_and_rejects_unknown_ones(tmp_path):
    train, _ = toy.write_toy_data(tmp_path / "two", micro("toy_tasks=line,arrow"))
    assert {r["task"] for r in rows(train)} == {"line", "arrow"}
    with pytest.raises(ValueError, match="circle"):
        toy.write_toy_data(tmp_path / "bad", micro("toy_tasks=line,circle"))


def test_each_familys_sft_response_uses_its_own_functional_token(tmp_path):
    from atlas_min.tokens import FUNCTIONAL_TOKENS

    assert sorted(toy.TASK_TOKENS.values()) == sorted(FUNCTIONAL_TOKENS)  # one family per token
    train, _ = toy.write_toy_data(tmp_path, micro("toy_train_size=200", "toy_no_token_share=0.3"))
    data = rows(train)
    for r in data:
        used = [t for t in FUNCTIONAL_TOKENS if t in r["response"]]
        assert used in ([], [toy.TASK_TOKENS[r["task"]]]), r
        assert r["response"].count(used[0]) == 1 if used else True
        assert r["response"].endswith(f"<answer>{r['answer']}</answer>")
        assert len(r["response"].split()) <= 8  # short: RL samples these on CPU
    plain = sum(not any(t in r["response"] for t in FUNCTIONAL_TOKENS) for r in data) / len(data)
    assert 0.2 < plain < 0.4  # ~ toy_no_token_share
    train0, _ = toy.write_toy_data(tmp_path / "all", micro("toy_no_token_share=0"))
    assert all(toy.TASK_TOKENS[r["task"]] in r["response"] for r in rows(train0))


def test_toy_images_are_not_drawn_on_white_and_are_not_blank(tmp_path):
    cfg = micro("toy_train_size=25", "toy_eval_size=5")
    train, evals = toy.write_toy_data(tmp_path, cfg)
    for r in rows(train) + rows(evals):
        image = Image.open(tmp_path / r["images"][0])
        assert image.size == (cfg.image_size, cfg.image_size) and image.mode == "RGB"
        pixels = np.asarray(image).reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == toy.BACKGROUND == (123, 117, 104)  # the processor mean
        assert 0.01 < (pixels != toy.BACKGROUND).any(1).mean() < 0.8, r["id"]  # something is drawn


def test_rows_follow_the_shared_jsonl_schema_with_relative_image_paths(tmp_path):
    train, evals = toy.write_toy_data(tmp_path, micro())
    for r in rows(train) + rows(evals):
        assert set(r) == {"id", "images", "question", "answer", "response", "task"}
        assert r["images"] == [f"images/{r['id']}.png"] and (tmp_path / r["images"][0]).is_file()


def test_write_toy_data_is_idempotent_and_atomic(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    paths = toy.write_toy_data(folder, micro())
    assert paths == (folder / "train.jsonl", folder / "eval.jsonl")
    stamp_mtime = (folder / "stamp.json").stat().st_mtime_ns
    before = png_digests(folder)
    assert toy.write_toy_data(folder, micro()) == paths  # same cfg: nothing rewritten
    assert (folder / "stamp.json").stat().st_mtime_ns == stamp_mtime

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "_write_split", killed)  # a run killed mid-way, with other parameters
    with pytest.raises(KeyboardInterrupt):
        toy.write_toy_data(folder, micro("seed=7"))
    with pytest.raises(KeyboardInterrupt):
        toy.write_toy_data(tmp_path / "fresh", micro())
    monkeypatch.undo()
    assert not (tmp_path / "fresh").exists()  # no half data set ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # ... and no temporary folders left
    assert png_digests(folder) == before and json.loads((folder / "stamp.json").read_text())["seed"] == 0

    toy.write_toy_data(folder, micro("seed=7"))  # other parameters: regenerated in place
    assert json.loads((folder / "stamp.json").read_text())["seed"] == 7 and png_digests(folder) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_write_toy_data_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        toy.write_toy_data(tmp_path, micro())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_cache_folder_follows_the_environment_and_the_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_MIN_CACHE", str(tmp_path))
    folder = toy.toy_data_dir(micro())
    assert folder.parent == tmp_path and folder.name.startswith("toy-")
    assert toy.toy_data_dir(micro()) == folder != toy.toy_data_dir(micro("seed=1"))
    assert toy.toy_data_dir(micro("max_steps=9")) == folder  # fields the data do not depend on
    assert toy.ensure_toy_data(micro()) == (folder / "train.jsonl", folder / "eval.jsonl")


def test_the_corpus_holds_every_text_the_toy_world_writes(tmp_path):
    cfg = micro("toy_no_token_share=0.5")
    texts = set(toy.corpus(cfg))
    assert cfg.system_prompt in texts
    train, evals = toy.write_toy_data(tmp_path, cfg)
    for r in rows(train) + rows(evals):
        assert {r["question"], r["answer"], r["response"]} <= texts


def test_teacher_slips_change_only_train_replies_of_their_class_never_the_answer(tmp_path):
    cfg = get_config("micro", ["toy_train_size=400", "toy_eval_size=100", "toy_teacher_slip=0.6", "toy_no_token_share=0"])
    train, evals = toy.write_toy_data(tmp_path, cfg)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    slipped = collections.Counter()
    for r in rows:
        said = r["response"].split("<answer>")[1].split("</answer>")[0]
        if said != r["answer"]:
            assert (r["answer"], said) == toy.TEACHER_SLIPS[r["task"]]  # only the listed misreading happens
            slipped[r["task"]] += 1
    for task, (true, _) in toy.TEACHER_SLIPS.items():
        n_true = sum(r["task"] == task and r["answer"] == true for r in rows)
        assert 0.4 < slipped[task] / n_true < 0.8  # about toy_teacher_slip of that class
    for r in (json.loads(line) for line in evals.read_text().splitlines()):
        assert r["response"].endswith(f"<answer>{r['answer']}</answer>")  # eval replies stay true


# --- the decisive puzzles -----------------------------------------------------------------------------

PUZZLES = ["puzzle_shape", "puzzle_line"]
FIVE = ["<|Zoom|>", "<|Line|>", "<|Shape|>", "<|Arrow|>", "<|Text|>"]


def puzzles(*overrides):
    return micro("toy_tasks=puzzle_shape,puzzle_line", *overrides)


def said(response):
    """(the functional tokens in a reply, in order; what its <answer> holds)."""
    tokens = [t for i in range(len(response)) for t in FIVE if response.startswith(t, i)]
    return tokens, response.split("<answer>")[-1].split("</answer>")[0]


def red_count(params):
    return str(sum(1 for item in params["items"] if item[2] == "red"))


def longer_line(params):
    (_, _, a), (_, _, b) = params["lines"]  # A is the first (yellow, top) line
    return "A" if a > b else "B"


def read_picture(path):
    """What a puzzle picture shows, read from its pixels alone: (frame colour, red shapes, longer line)."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    s, cell = a.shape[0], a.shape[0] // 4  # a 4x4 grid: lines in the top and bottom rows, shapes between
    red = (a == (230, 40, 40)).all(-1)
    red_cells = sum(red[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].any()
                    for r in (1, 2) for c in range(4))
    yellow, cyan = (a == (240, 210, 40)).all(-1).sum(), (a == (40, 220, 240)).all(-1).sum()  # same thickness
    return tuple(a[0, s // 2]), str(red_cells), "A" if yellow > cyan else "B"


def test_every_puzzle_family_asks_the_same_question_that_names_no_operation():
    rng = random.Random(0)
    questions = {toy.draw_example(task, rng, 112)[1] for task in PUZZLES for _ in range(20)}
    assert questions == {"Solve the puzzle in the picture."}
    assert not any(word in "solve the puzzle in the picture." for word in ("red", "shape", "line", "count"))


def test_every_puzzle_picture_holds_both_operands_and_the_unasked_one_is_uniform_and_independent():
    rng, n = random.Random(1), 600
    for task in PUZZLES:
        pairs = collections.Counter()
        for _ in range(n):
            _, _, answer, params = toy.draw_example(task, rng, 112)
            reds = [item for item in params["items"] if item[2] == "red"]
            assert 1 <= len(reds) <= 3 and len(params["items"]) - len(reds) <= 3
            (_, _, a), (_, _, b) = params["lines"]
            assert max(a, b) >= 1.5 * min(a, b)  # clearly different lengths
            pairs[red_count(params), longer_line(params)] += 1
        assert len(pairs) == 6  # every (count, longer line) pair occurs ...
        for share in pairs.values():  # ... about equally often: the other operand says nothing
            assert abs(share / n - 1 / 6) < 0.05, pairs


def test_a_puzzles_answer_is_the_result_of_the_operation_its_family_asks_for_and_is_balanced():
    rng, n = random.Random(2), 400
    for task, operation, chance in (("puzzle_shape", red_count, 1 / 3), ("puzzle_line", longer_line, 1 / 2)):
        answers = collections.Counter()
        for _ in range(n):
            _, _, answer, params = toy.draw_example(task, rng, 112)
            assert answer == operation(params)
            answers[answer] += 1
        assert all(abs(c / n - chance) < 0.07 for c in answers.values()) and len(answers) == round(1 / chance)
        assert toy.CHANCE[task] == chance


def test_the_frame_colour_alone_tells_the_puzzle_family(tmp_path):
    train, evals = toy.write_toy_data(tmp_path, puzzles("toy_train_size=60", "toy_eval_size=20"))
    families_of = collections.defaultdict(set)
    for r in rows(train) + rows(evals):
        families_of[read_picture(tmp_path / r["images"][0])[0]].add(r["task"])
    assert len(families_of) == 2 and all(len(f) == 1 for f in families_of.values())  # one colour, one family
    assert toy.BACKGROUND not in families_of


@pytest.mark.parametrize("size", [56, 84, 112])
def test_the_pictures_pixels_show_what_the_scene_params_say(tmp_path, size):
    for task in PUZZLES:
        rng = random.Random(3)
        for _ in range(30):
            image, _, _, params = toy.draw_example(task, rng, size)
            image.save(tmp_path / "puzzle.png")
            _, reds, longer = read_picture(tmp_path / "puzzle.png")
            assert (reds, longer) == (red_count(params), longer_line(params))


def test_each_puzzle_reply_holds_its_familys_token_but_for_the_teachers_slips_in_train_line_puzzles(tmp_path):
    cfg = puzzles("toy_train_size=400", "toy_eval_size=100", "toy_token_slip=0.6", "toy_no_token_share=0.5")
    train, evals = toy.write_toy_data(tmp_path, cfg)
    usual = {"puzzle_shape": "<|Shape|>", "puzzle_line": "<|Line|>"}
    slipped = collections.Counter()
    for split, data in (("train", rows(train)), ("eval", rows(evals))):
        for r in data:
            tokens, _ = said(r["response"])
            assert len(tokens) == 1, r  # always exactly one token, whatever toy_no_token_share
            if tokens[0] != usual[r["task"]]:
                assert (split, r["task"], tokens[0]) == ("train", "puzzle_line", "<|Shape|>"), r
                slipped[r["task"]] += 1
    n_line = sum(r["task"] == "puzzle_line" for r in rows(train))
    assert 0.5 < slipped["puzzle_line"] / n_line < 0.7  # about toy_token_slip
    none, _ = toy.write_toy_data(tmp_path / "none", puzzles("toy_token_slip=0"))
    assert all(said(r["response"])[0] == [usual[r["task"]]] for r in rows(none))


def test_after_any_token_a_written_reply_answers_with_that_tokens_operation_on_the_picture(tmp_path):
    cfg = puzzles("toy_train_size=200", "toy_eval_size=40", "toy_token_slip=0.6", "toy_reply=long")
    train, evals = toy.write_toy_data(tmp_path, cfg)
    n_slipped = 0
    for r in rows(train) + rows(evals):
        (token,), answer = said(r["response"])
        _, reds, longer = read_picture(tmp_path / r["images"][0])
        assert answer == {"<|Shape|>": reds, "<|Line|>": longer}[token], r
        assert r["answer"] == {"puzzle_shape": reds, "puzzle_line": longer}[r["task"]]  # the truth
        n_slipped += answer != r["answer"]
    assert n_slipped > 20  # the slips are there, and every one of them is wrong


@pytest.mark.parametrize("length", ["short", "long"])
def test_reply_after_each_of_the_five_tokens_gives_that_tokens_operation_and_the_same_lead_in(length):
    for task in PUZZLES:
        rng = random.Random(4)
        for i in range(20):
            _, _, _, params = toy.draw_example(task, rng, 112)
            expected = {"<|Shape|>": red_count(params), "<|Line|>": longer_line(params),
                        "<|Zoom|>": "none", "<|Arrow|>": "none", "<|Text|>": "none"}  # no box, arrow, numbers
            leads = set()
            for token in FIVE:
                text = toy.reply(params, token, random.Random(i), length)
                tokens, answer = said(text)
                assert tokens == [token] and answer == expected[token] and text.endswith("</answer>")
                lead = text.split(token)[0]
                assert "<answer>" not in lead
                leads.add(lead)
            assert len(leads) == 1  # the text before the token is the same for every token: decides nothing


def puzzle_tokenizer():
    from atlas_min.model import init_model

    return init_model(get_config("toy_decisive"))[1]  # the tokenizer training uses, functional tokens added


def generated_tokens(tokenizer, text):
    return len(tokenizer.encode(text + "<|im_end|>", add_special_tokens=False))  # the stop token is generated


def test_long_replies_keep_the_token_at_most_3_percent_of_generated_tokens_and_short_ones_1_in_12():
    tokenizer, rng = puzzle_tokenizer(), random.Random(5)
    shares = {"short": [], "long": []}
    for _ in range(100):
        _, _, _, params = toy.draw_example(rng.choice(PUZZLES), rng, 112)
        for length in shares:
            text = toy.reply(params, rng.choice(FIVE), rng, length)
            shares[length].append(1 / generated_tokens(tokenizer, text))
    assert max(shares["long"]) <= 0.03  # every long reply: >= 34 tokens around its one functional token
    assert 0.02 < sum(shares["long"]) / 100 < 0.03  # ATLAS's replies: 4.8 of 203.7 tokens, 2.4%
    assert set(shares["short"]) == {1 / 12}  # every short reply: 12 generated tokens, one of them functional


def test_long_replies_vary_their_phrasing_short_ones_do_not():
    _, _, _, params = toy.draw_example("puzzle_line", random.Random(6), 84)
    for token in ("<|Line|>", "<|Shape|>"):
        long_ = {toy.reply(params, token, random.Random(i), "long") for i in range(300)}
        short = {toy.reply(params, token, random.Random(i), "short") for i in range(300)}
        assert len(long_) > 100 and len(short) == 1


def test_puzzle_data_is_deterministic_by_seed(tmp_path):
    a, b, c = (tmp_path / x for x in "abc")
    for folder, seed in ((a, 0), (b, 0), (c, 1)):
        toy.write_toy_data(folder, puzzles(f"seed={seed}", "toy_reply=long", "toy_token_slip=0.6"))
    train = [(folder / "train.jsonl").read_bytes() for folder in (a, b, c)]
    assert train[0] == train[1] != train[2]
    assert png_digests(a) == png_digests(b) != png_digests(c)
    params = toy.draw_example("puzzle_shape", random.Random(7), 84)[3]
    assert params == toy.draw_example("puzzle_shape", random.Random(7), 84)[3]
    twice = {toy.reply(params, "<|Shape|>", random.Random(8), "long") for _ in range(2)}
    assert len(twice) == 1


def test_the_corpus_holds_every_text_the_puzzles_can_write(tmp_path):
    texts = set(toy.corpus(puzzles()))
    for length in ("short", "long"):
        cfg = puzzles("toy_token_slip=0.6", f"toy_reply={length}")
        train, evals = toy.write_toy_data(tmp_path / length, cfg)
        for r in rows(train) + rows(evals):
            assert {r["question"], r["answer"], r["response"]} <= texts
    rng = random.Random(9)
    for _ in range(50):
        _, _, _, params = toy.draw_example(rng.choice(PUZZLES), rng, 112)
        for token in FIVE:
            assert toy.reply(params, token, rng, rng.choice(["short", "long"])) in texts


def test_classic_configs_keep_their_corpus_so_their_tokenizer_does_not_change():
    classic, with_puzzles = toy.corpus(micro()), toy.corpus(puzzles())
    assert not any("puzzle" in t or "none" in t for t in classic)
    assert with_puzzles[:len(classic)] == classic  # the puzzles' texts come after, only when selected


def test_toy_reply_must_be_short_or_long(tmp_path):
    with pytest.raises(ValueError, match="medium"):
        toy.write_toy_data(tmp_path, puzzles("toy_reply=medium"))
    with pytest.raises(ValueError, match="medium"):
        params = toy.draw_example("puzzle_line", random.Random(0), 84)[3]
        toy.reply(params, "<|Line|>", random.Random(0), "medium")


def test_a_puzzle_row_names_the_token_its_frame_calls_for_even_where_the_teacher_slipped(tmp_path):
    train, _ = toy.write_toy_data(tmp_path, puzzles("toy_train_size=40", "toy_token_slip=1.0"))
    usual = {"puzzle_shape": "<|Shape|>", "puzzle_line": "<|Line|>"}
    data = rows(train)
    assert all(r["token"] == usual[r["task"]] for r in data)
    assert any(said(r["response"])[0] != [r["token"]] for r in data)  # the replies do slip


def test_sft_seed_draws_another_init_on_the_same_toy_data(tmp_path):
    # anchor_study's second SFT checkpoint: its own init and batch order, the data of `seed`
    from atlas_min.model import init_model, sft_run_seed
    a, b = tmp_path / "a", tmp_path / "b"
    toy.write_toy_data(a, micro())
    toy.write_toy_data(b, micro("sft_seed=1"))
    for name in ("train.jsonl", "eval.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert png_digests(a) == png_digests(b)
    cfg, moved = micro(), micro("sft_seed=1")
    assert sft_run_seed(cfg) == cfg.seed and sft_run_seed(moved) == cfg.seed + cfg.epoch_seed_stride  # by hand
    first, again, second = (init_model(c)[0].state_dict() for c in (cfg, cfg, moved))
    assert all(torch.equal(first[k], again[k]) for k in first)  # one seed, one init
    assert any(not torch.equal(first[k], second[k]) for k in first)
