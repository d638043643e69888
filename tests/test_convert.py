"""atlas_min.convert: public layouts (LLaVA/ms-swift conversations, multiple-choice benchmarks) → our JSONL."""
import csv
import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from atlas_min.config import get_config
from atlas_min.convert import ConvertError, convert_file, final_answer, main
from atlas_min.data import load_jsonl
from atlas_min.rewards import compute_reward


@pytest.fixture
def folder(tmp_path):
    """tmp/data with two tiny images img/a.png and img/b.png."""
    (tmp_path / "data" / "img").mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (123, 117, 104)).save(tmp_path / "data" / "img" / f"{name}.png")
    return tmp_path / "data"


def write(path, records):
    """records as .jsonl (one a line) or .json (a list), by the file's suffix."""
    text = json.dumps(records) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def convert_error(folder, kind, records, **kwargs):
    with pytest.raises(ConvertError) as err:
        convert_file(kind, write(folder / "raw.jsonl", records), folder / "out.jsonl", **kwargs)
    assert not (folder / "out.jsonl").exists(), "nothing is written when a record fails"
    return str(err.value)


LLAVA = {"id": "llava-1", "image": "img/a.png", "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "<image>\nHow many circles?"},
    {"from": "gpt", "value": "Let me mark them. <|Shape|> I count 3. <answer>3</answer>"}]}
MESSAGES = {"images": ["img/a.png", "img/b.png"], "category": "lines", "messages": [
    {"role": "user", "content": "<image><image>Which line is longer?"},
    {"role": "assistant", "content": "<|Line|> The left one reaches further: \\boxed{\\text{left}}"}]}


@pytest.mark.parametrize("record, expected", [
    (LLAVA, {"id": "llava-1", "images": ["img/a.png"], "question": "How many circles?", "answer": "3",
             "response": "Let me mark them. <|Shape|> I count 3. <answer>3</answer>", "task": "raw"}),
    (MESSAGES, {"id": "raw-0", "images": ["img/a.png", "img/b.png"], "question": "Which line is longer?",
                "answer": "\\text{left}", "response": MESSAGES["messages"][1]["content"], "task": "lines"}),
], ids=["conversations-from-value", "messages-role-content"])
def test_conversation_records_map_exactly_and_load_as_sft_data(folder, record, expected):
    out = folder / "out.jsonl"
    assert convert_file("conversations", write(folder / "raw.jsonl", [record]), out) == [expected]
    assert read(out) == [expected]
    loaded = load_jsonl(out, need_response=True)[0]
    assert loaded["images"] == [(folder / p).resolve() for p in expected["images"]]


def test_json_list_input_and_task_option(folder):
    out = folder / "out.jsonl"
    convert_file("conversations", write(folder / "raw.json", [LLAVA]), out, task="count")
    assert read(out)[0]["task"] == "count"


@pytest.mark.parametrize("text, answer", [
    ("<answer>1</answer> no, wait: <answer> 2 </answer>", "2"),
    ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{{2}}", "{2}"),
    ("<answer>\\boxed{B}</answer>", "B"),
    ("the answer is 4", None),
    ("\\boxed{never closed", None),
])
def test_answer_is_the_last_answer_tag_or_balanced_boxed(text, answer):
    assert final_answer(text) == answer


def test_explicit_answer_field_wins_and_rescues_a_response_without_one(folder):
    bare = dict(LLAVA, answer=3, conversations=LLAVA["conversations"][:2] + [{"from": "gpt", "value": "3 circles."}])
    boxed = dict(LLAVA, id="b", answer="\\boxed{three}")
    null = dict(LLAVA, id="c", answer=None)  # as good as absent: the response's <answer> is used
    convert_file("conversations", write(folder / "raw.jsonl", [bare, boxed, null]), folder / "out.jsonl")
    assert [ex["answer"] for ex in read(folder / "out.jsonl")] == ["3", "three", "3"]


def test_response_without_answer_is_rejected(folder):
    record = dict(LLAVA, conversations=LLAVA["conversations"][:2] + [{"from": "gpt", "value": "3 circles."}])
    message = convert_error(folder, "conversations", [LLAVA, record])
    assert message.startswith(f"{folder / 'raw.jsonl'}:2: field 'conversations[2]': no <answer>")


def test_image_placeholder_count_must_match_the_images(folder):
    record = dict(MESSAGES, images=["img/a.png"])
    message = convert_error(folder, "conversations", [record])
    assert message == f"{folder / 'raw.jsonl'}:1: field 'messages[0]': 2 <image> placeholders for 1 images"


def test_no_placeholder_at_all_means_images_first(folder):
    record = dict(LLAVA, conversations=[{"from": "human", "value": "How many circles?"}, LLAVA["conversations"][2]])
    convert_file("conversations", write(folder / "raw.jsonl", [record]), folder / "out.jsonl")
    assert read(folder / "out.jsonl")[0]["images"] == ["img/a.png"]


def test_multi_turn_keeps_the_first_exchange(folder):
    record = dict(LLAVA, conversations=LLAVA["conversations"] + [{"from": "human", "value": "And squares?"},
                                                                 {"from": "gpt", "value": "<answer>0</answer>"}])
    convert_file("conversations", write(folder / "raw.jsonl", [record]), folder / "out.jsonl")
    assert read(folder / "out.jsonl")[0]["answer"] == "3"


@pytest.mark.parametrize("change, message", [
    ({"conversations": LLAVA["conversations"][:2]}, "field 'conversations': no assistant turn"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "field 'conversations[0]': expected {\"role\""),
    ({"conversations": "human: hi"}, "expected a list of turns in field 'messages' or 'conversations'"),
    ({"image": 7}, "field 'image': expected an image path (str), got int"),
    ({"image": "img/missing.png"}, "field 'image': image "),
])
def test_bad_conversation_records_name_file_line_and_field(folder, change, message):
    error = convert_error(folder, "conversations", [LLAVA, dict(LLAVA, **change)])
    assert error.startswith(f"{folder / 'raw.jsonl'}:2: ") and message in error
    if "missing" in message:
        assert "missing.png not found" in error


OPTIONS = ["red", "(B) green", "blue"]
CHOICE_EXPECTED = {"id": "v1", "images": ["img/a.png"], "answer": "B", "task": "color",
                   "question": "What colour is the cup?\n(A) red\n(B) green\n(C) blue"}


@pytest.mark.parametrize("layout", [
    {"options": OPTIONS},
    {"choices": {"A": "red", "(B)": "green", "C": "blue"}},
    {"A": "red", "B": "B. green", "C": "blue", "D": None},
], ids=["list", "dict", "letter-fields"])
@pytest.mark.parametrize("answer", ["B", "(B)", "green", "Green"])
def test_choice_records_map_exactly_and_load_as_rl_data(folder, layout, answer):
    record = {"id": "v1", "question": "What colour is the cup?", "image_path": "img/a.png", "category": "color",
              "answer": answer, **layout}
    out = folder / "out.jsonl"
    convert_file("choice", write(folder / "raw.jsonl", [record]), out)
    assert read(out) == [CHOICE_EXPECTED]
    assert load_jsonl(out)[0]["answer"] == "B"


def test_choice_task_defaults_to_the_file_stem_and_numbered_images_are_read(folder):
    record = {"question": "Same cup?", "choices": ["yes", "no"], "answer": "(A)", "image_1": "img/a.png",
              "image_2": "img/b.png", "image_3": None}
    convert_file("choice", write(folder / "blink.json", [record]), folder / "out.jsonl")
    assert read(folder / "out.jsonl") == [{"id": "blink-0", "images": ["img/a.png", "img/b.png"],
                                          "question": "Same cup?\n(A) yes\n(B) no", "answer": "A", "task": "blink"}]


@pytest.mark.parametrize("change, message", [
    ({"answer": "E"}, "field 'answer': 'E' is neither an option letter (A, B, C) nor the text of exactly one option"),
    ({"answer": "purple"}, "field 'answer': 'purple' is neither"),
    ({"options": ["red", "red", "blue"], "answer": "red"}, "field 'answer': 'red' is neither"),
    ({"options": ["red"]}, "field 'options': expected 2 to 26 options"),
    ({"options": {"A": "red", "AB": "blue"}}, "field 'options': option key 'AB' is not a letter"),
    ({"image_path": "img/missing.png"}, "field 'image_path': image "),
    ({"image_path": None}, "no image (fields 'images', 'image', 'image_path' or 'image_1', ...)"),
    ({"question": ""}, "field 'question': expected a non-empty string or number"),
])
def test_bad_choice_records_are_rejected_naming_file_line_and_field(folder, change, message):
    record = {"question": "What colour is the cup?", "options": OPTIONS, "answer": "B", "image_path": "img/a.png"}
    error = convert_error(folder, "choice", [record, dict(record, **change)])
    assert error.startswith(f"{folder / 'raw.jsonl'}:2: ") and message in error


def test_json_list_errors_name_the_index(folder):
    with pytest.raises(ConvertError, match=r"raw\.json\[1\]: field 'answer'"):
        record = {"question": "q?", "options": OPTIONS, "answer": "Z", "image": "img/a.png"}
        convert_file("choice", write(folder / "raw.json", [dict(record, answer="A"), record]), folder / "out.jsonl")


def test_image_paths_are_relative_to_out_and_may_not_leave_its_folder(folder, tmp_path):
    record = {"question": "q?", "options": OPTIONS, "answer": "A"}
    records = [dict(record, image="a.png"), dict(record, image=str(folder / "img" / "b.png"))]  # relative, absolute
    raw = write(tmp_path / "raw.jsonl", records)  # IN elsewhere: relative paths start at --image-root
    with pytest.raises(ConvertError, match="lies outside OUT's folder .* refuses image paths that leave the data"):
        convert_file("choice", raw, folder / "sets" / "out.jsonl", image_root=folder / "img")
    convert_file("choice", raw, folder / "out.jsonl", image_root=folder / "img")
    assert [ex["images"] for ex in read(folder / "out.jsonl")] == [["img/a.png"], ["img/b.png"]]
    assert load_jsonl(folder / "out.jsonl")[1]["images"] == [(folder / "img" / "b.png").resolve()]


@pytest.mark.parametrize("kind", ["conversations", "choice", "harness"])
def test_every_kind_refuses_an_out_that_is_its_input_by_resolved_path(folder, kind):
    raw = folder / "raw.jsonl"
    write(raw, [LLAVA])
    (folder / "alias.jsonl").symlink_to(raw)
    for out in (raw, folder / "img" / ".." / "raw.jsonl", folder / "alias.jsonl"):
        with pytest.raises(ConvertError, match=f"OUT {re.escape(str(out))} is the input file "):
            convert_file(kind, raw, out)
    assert read(raw) == [LLAVA]


def test_cli_prints_one_line_error_and_exits_2(folder):
    raw = folder / "raw.jsonl"
    raw.write_text(json.dumps(LLAVA) + "\n{not json\n")
    cmd = [sys.executable, "-m", "atlas_min.convert", "conversations", str(raw), str(folder / "out.jsonl")]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith(f"error: {raw}:2: not valid JSON") and bad.stderr.count("\n") == 1
    write(raw, [LLAVA])
    good = subprocess.run(cmd, capture_output=True, text=True)
    assert good.returncode == 0 and "wrote 1 examples" in good.stdout


# --- harness: the data layout of ATLAS's own eval harness (qid, question, image/image_path, gt_answer) ----

VSTAR = {"qid": "vstar_12", "image": "img/a.png", "gt_answer": "B",
         "question": "What is the color of the woman's bag?\n(A) black\n(B) white\n(C) red\n(D) blue"}
WEMATH = {"qid": 7, "image_path": ["img/b.png"], "gt_answer": "\\boxed{A}",
          "question": "<image>\nAs shown in the figure, the length of segment AB is ( ).\n"
                      "A. 5cm; B. 6cm; C. 7cm"}
BLINK = {"qid": "blink_art_3", "image": '["img/a.png", "img/b.png"]', "gt_answer": "(B)",
         "question": "Which image has the same art style as the reference?\n"
                     "(A) the right one\n(B) the left one"}


def write_csv(path, records):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_any(path, records):
    return write_csv(path, records) if path.suffix == ".csv" else write(path, records)


@pytest.mark.parametrize("name, record, expected", [
    ("vstar.jsonl", VSTAR, {"id": "vstar_12", "images": ["img/a.png"], "question": VSTAR["question"],
                            "answer": "B", "task": "vstar"}),
    ("wemath.json", WEMATH, {"id": "7", "images": ["img/b.png"], "answer": "A", "task": "wemath",
                             "question": "As shown in the figure, the length of segment AB is ( ).\n"
                                         "A. 5cm; B. 6cm; C. 7cm"}),
    ("blink.csv", BLINK, {"id": "blink_art_3", "images": ["img/a.png", "img/b.png"],
                          "question": BLINK["question"], "answer": "(B)", "task": "blink"}),
], ids=["vstar-jsonl", "wemath-json", "blink-csv-two-images"])
def test_harness_records_map_exactly_and_load_as_eval_data(folder, name, record, expected):
    out = folder / "out.jsonl"
    convert_file("harness", write_any(folder / name, [record]), out)
    assert read(out) == [expected]
    loaded = load_jsonl(out)[0]
    assert loaded["images"] == [(folder / p).resolve() for p in expected["images"]]


def test_harness_task_option_names_the_benchmark(folder):
    convert_file("harness", write(folder / "test-00000.jsonl", [VSTAR]), folder / "out.jsonl", task="vstar")
    assert read(folder / "out.jsonl")[0]["task"] == "vstar"


def test_harness_answer_field_is_read_when_there_is_no_gt_answer(folder):
    record = {k: v for k, v in VSTAR.items() if k != "gt_answer"} | {"answer": "B"}  # the parquet layout
    convert_file("harness", write(folder / "vstar.jsonl", [record]), folder / "out.jsonl")
    assert read(folder / "out.jsonl")[0]["answer"] == "B"


def test_harness_record_without_an_image_is_text_only(folder):
    record = {k: v for k, v in VSTAR.items() if k != "image"}
    convert_file("harness", write(folder / "vstar.jsonl", [record]), folder / "out.jsonl")
    assert read(folder / "out.jsonl")[0]["images"] == []


@pytest.mark.parametrize("change, message", [
    ({"gt_answer": None}, "field 'gt_answer': expected a non-empty string or number, got None"),
    ({"question": ""}, "field 'question': expected a non-empty string or number"),
    ({"image": "img/missing.png"}, "field 'image': image "),
    ({"image": 3}, "field 'image': expected an image path (str), got int"),
    ({"image": '["img/a.png"'}, "field 'image': not valid JSON"),
    ({"question": "<image><image>Which is red?"}, "field 'question': 2 <image> placeholders for 1 images"),
], ids=["no-answer", "no-question", "missing-image", "image-not-a-path", "bad-list", "placeholders"])
def test_a_bad_harness_record_is_a_one_record_error(folder, change, message):
    error = convert_error(folder, "harness", [VSTAR, dict(VSTAR, **change)])
    assert error.startswith(f"{folder / 'raw.jsonl'}:2: ") and message in error


def test_a_csv_error_names_the_line_the_record_starts_on(folder):
    raw = write_csv(folder / "blink.csv", [BLINK, dict(BLINK, gt_answer="")])  # each question spans 3 lines
    with pytest.raises(ConvertError, match=r"blink\.csv:5: field 'gt_answer'"):
        convert_file("harness", raw, folder / "out.jsonl")


def test_parquet_without_pandas_is_an_error_saying_what_to_install(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail, installed or not
    (folder / "vstar.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConvertError, match="pip install pandas pyarrow"):
        convert_file("harness", folder / "vstar.parquet", folder / "out.jsonl")


def test_harness_cli_converts_a_file(folder, capsys):
    raw = write(folder / "vstar.jsonl", [VSTAR])
    assert main(["harness", str(raw), str(folder / "out.jsonl")]) == 0
    assert "wrote 1 examples" in capsys.readouterr().out


BOXED = get_config("micro", ["answer_format=boxed"])


def test_the_reward_scores_a_letter_and_text_reply_to_the_converted_blink_item_correct(folder):
    convert_file("harness", write_csv(folder / "blink.csv", [BLINK]), folder / "out.jsonl")
    ex = load_jsonl(folder / "out.jsonl")[0]
    reply = "The brushwork of the left painting matches. \\boxed{(B) the left one}"
    assert compute_reward(reply, ex["answer"], BOXED, question=ex["question"])["accuracy"] == 1.0


def test_the_reward_maps_an_option_text_reply_to_its_letter_with_the_converted_question(folder):
    convert_file("harness", write_csv(folder / "blink.csv", [BLINK]), folder / "out.jsonl")
    ex = load_jsonl(folder / "out.jsonl")[0]
    left = compute_reward("\\boxed{the left one}", ex["answer"], BOXED, question=ex["question"])
    right = compute_reward("\\boxed{the right one}", ex["answer"], BOXED, question=ex["question"])
    assert (left["accuracy"], right["accuracy"]) == (1.0, 0.0)
