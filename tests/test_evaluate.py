"""The eval's own rules (atlas_min.evaluate): chance from the data, each task's usual token, and the
token intervention probe (docs/method.md, "Token interventions")."""
import pytest
import torch

import atlas_min.evaluate as evaluate_module
from atlas_min.data import load_jsonl
from atlas_min.evaluate import chance_by_task, intervene, token_gap, trained_swaps, usual_tokens
from atlas_min.tokens import FUNCTIONAL_TOKENS


def test_chance_is_the_share_of_each_tasks_most_frequent_answer():
    data = [{"task": "a", "answer": x} for x in "xxxy"] + [{"task": "b", "answer": x} for x in "pq"]
    assert chance_by_task(data) == {"a": 3 / 4, "b": 1 / 2}


def test_a_tasks_usual_token_is_the_one_its_reference_replies_use_most():
    data = [{"task": "a", "response": "look <|Line|> <answer>A</answer>"},
            {"task": "a", "response": "look <|Line|> then <|Zoom|> <answer>B</answer>"},
            {"task": "a", "response": "look <|Zoom|> <answer>B</answer>"},
            {"task": "a", "response": "look <|Line|> <answer>A</answer>"},
            {"task": "b", "response": "no token <answer>1</answer>"},
            {"task": "c"}]
    assert usual_tokens(data) == {"a": "<|Line|>"}


def fake_sampler(tokenizer, greedy_text, answer_after):
    """A `sample` whose continuation after a forced functional token is `answer_after[token]`; without one
    (the first, greedy pass) it writes `greedy_text`. Stands in for a model whose answer depends on the token."""
    functional = dict(zip(tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS), FUNCTIONAL_TOKENS))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def sample(model, batch, tok, *, max_new_tokens, temperature, **_):
        rows = []
        for ids in batch["input_ids"].tolist():
            forced = functional.get(ids[-1])
            text = greedy_text if forced is None else answer_after[forced]
            rows.append(tokenizer.encode(text, add_special_tokens=False)[:max_new_tokens - 1] + [eos])
        width = max(map(len, rows))
        return {"completion_ids": torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]),
                "completion_mask": torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])}
    return sample


@pytest.fixture
def shape_examples(micro_cfg, toy_files):
    data = [ex for ex in load_jsonl(toy_files[1]) if ex["task"] == "shape"][:3]
    return [dict(ex, answer="2", response="Let me mark the red shapes. <|Shape|> <answer>2</answer>") for ex in data]


def test_forcing_each_token_scores_the_continuation_it_leads_to(micro, micro_cfg, shape_examples, monkeypatch):
    model, tokenizer, image_processor = micro
    answers = {tok: "<answer>3</answer>" for tok in FUNCTIONAL_TOKENS} | {"<|Shape|>": "<answer>2</answer>"}
    monkeypatch.setattr(evaluate_module, "sample",
                        fake_sampler(tokenizer, "Let me look. <|Zoom|> <answer>3</answer>", answers))
    result = intervene(model, tokenizer, image_processor, shape_examples, micro_cfg, torch.device("cpu"))
    # the model's own output used <|Zoom|> (wrong); forcing <|Shape|> gives "2" (right), any other "3"
    assert result["intervention"] == {"shape": {tok: 1.0 if tok == "<|Shape|>" else 0.0 for tok in FUNCTIONAL_TOKENS}}


def test_the_gap_is_the_usual_tokens_accuracy_minus_the_mean_of_the_other_four(micro, micro_cfg, shape_examples,
                                                                                monkeypatch):
    model, tokenizer, image_processor = micro
    # right after <|Shape|> and after <|Line|>; wrong after the other three: gap = 1 - (1 + 0 + 0 + 0) / 4
    answers = {tok: "<answer>2</answer>" if tok in ("<|Shape|>", "<|Line|>") else "<answer>3</answer>"
               for tok in FUNCTIONAL_TOKENS}
    monkeypatch.setattr(evaluate_module, "sample",
                        fake_sampler(tokenizer, "Let me look. <|Shape|> <answer>2</answer>", answers))
    result = intervene(model, tokenizer, image_processor, shape_examples, micro_cfg, torch.device("cpu"))
    assert result["intervention_gap"] == {"shape": pytest.approx(0.75)}


def test_a_tasks_trained_swaps_are_the_usual_tokens_of_the_tasks_asking_the_same_question():
    # two puzzles share a question (only the picture tells them apart); "c" asks its own, "d" names no token
    data = [{"task": "p_line", "question": "Solve it.", "token": "<|Line|>"},
            {"task": "p_shape", "question": "Solve it.", "token": "<|Shape|>"},
            {"task": "p_shape", "question": "Solve it.", "token": "<|Shape|>"},
            {"task": "c", "question": "Which way?", "token": "<|Arrow|>"},
            {"task": "d", "question": "Solve it."}]
    assert trained_swaps(data) == {"p_line": ["<|Shape|>"], "p_shape": ["<|Line|>"]}


def test_a_token_gap_is_the_usual_tokens_accuracy_minus_the_mean_over_the_tokens_it_is_set_against():
    accuracy = {"a": {"<|Shape|>": 0.9, "<|Line|>": 0.3, "<|Zoom|>": 0.0}, "b": {"<|Line|>": 1.0}}
    gaps = token_gap(accuracy, {"a": "<|Shape|>", "b": "<|Line|>"}, {"a": ["<|Line|>", "<|Zoom|>"]})
    assert gaps == {"a": pytest.approx(0.9 - (0.3 + 0.0) / 2)}  # "b" is set against nothing: no gap


def test_the_trained_gap_sets_each_puzzles_usual_token_against_the_other_puzzles_token_only(
        micro, micro_cfg, shape_examples, monkeypatch):
    model, tokenizer, image_processor = micro
    # two families asking one question: after <|Shape|> or <|Zoom|> the model answers "2", after the rest "3"
    data = [dict(ex, task=task, token=tok, question="Solve the puzzle.", answer="2") for ex, (task, tok) in
            zip(shape_examples, [("p_shape", "<|Shape|>"), ("p_line", "<|Line|>"), ("p_shape", "<|Shape|>")])]
    answers = {tok: "<answer>2</answer>" if tok in ("<|Shape|>", "<|Zoom|>") else "<answer>3</answer>"
               for tok in FUNCTIONAL_TOKENS}
    monkeypatch.setattr(evaluate_module, "sample",
                        fake_sampler(tokenizer, "Let me look. <|Shape|> <answer>2</answer>", answers))
    result = intervene(model, tokenizer, image_processor, data, micro_cfg, torch.device("cpu"))
    # p_shape: Shape 1 against Line 0 (trained) or the mean of Line, Zoom, Arrow, Text = 1/4 (all four)
    # p_line: Line 0 against Shape 1 (trained) or the mean of Shape, Zoom, Arrow, Text = 2/4 (all four)
    assert result["intervention_gap_trained"] == {"p_line": pytest.approx(-1.0), "p_shape": pytest.approx(1.0)}
    assert result["intervention_gap"] == {"p_line": pytest.approx(-0.5), "p_shape": pytest.approx(0.75)}


def test_outputs_without_a_functional_token_are_counted_and_left_out(micro, micro_cfg, shape_examples, monkeypatch):
    model, tokenizer, image_processor = micro
    monkeypatch.setattr(evaluate_module, "sample",
                        fake_sampler(tokenizer, "I can see it directly. <answer>2</answer>", {}))
    result = intervene(model, tokenizer, image_processor, shape_examples, micro_cfg, torch.device("cpu"))
    assert result["intervention"] == {} and result["intervention_gap"] == {}
    assert result["intervention_skipped"] == {"shape": 3}


def test_an_examples_named_token_decides_its_tasks_usual_token_over_its_reply():
    # the SFT teacher may slip (a wrong token in most replies of a family); the named token is the truth
    data = [{"task": "a", "token": "<|Line|>", "response": "x <|Shape|> <answer>1</answer>"}] * 3
    assert usual_tokens(data) == {"a": "<|Line|>"}


def test_functional_tokens_are_found_by_id_in_order_and_spelled_out_strings_are_not_tokens(micro):
    from atlas_min.sampler import decode_completion
    _, tokenizer, _ = micro
    ids = tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS)
    plain = tokenizer.encode(" a", add_special_tokens=False)
    spelled = [tokenizer.convert_tokens_to_ids(c) for c in "<|Zoom|>"]  # the same characters, one byte token each
    reply = torch.tensor(plain + [ids[4]] + spelled + [ids[0]] + plain + [ids[4]])
    text, length, functional = decode_completion(tokenizer, reply, torch.ones(len(reply), dtype=torch.bool))
    assert text == " a<|Text|><|Zoom|><|Zoom|> a<|Text|>" and length == len(reply)
    assert functional == ["<|Text|>", "<|Zoom|>", "<|Text|>"]  # the spelled-out one is not there
