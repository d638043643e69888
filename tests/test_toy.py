"""The toy world (atlas_min/toy.py) as a specification: what a data set written by it guarantees."""
import collections
import hashlib
import json
import random

import numpy as np
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
