"""atlas_min.convert vinteraction: V-Interaction-400K / V-Perception-40K parquet -> functional-token SFT data."""
import ast
import builtins
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

from atlas_min import convert  # noqa: E402
from atlas_min.convert import (ConvertError, OPENERS, OPERATIONS, PHRASES, block_tokens, convert_vinteraction,  # noqa: E402
                               main, polish, trajectory, with_answer_format)
from atlas_min.data import check_images, load_jsonl  # noqa: E402
from vinteraction_synth import interaction_rows, perception_rows, png, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Z, L, S, A, T = "<|Zoom|>", "<|Line|>", "<|Shape|>", "<|Arrow|>", "<|Text|>"
FUNCTIONAL = re.compile(r"<\|(?:Zoom|Line|Shape|Arrow|Text)\|>")
# The tokens each kept row of the synthetic set must get, read off its code by hand.
EXPECTED_TOKENS = {"vi-0": [L, T], "vi-1": [Z, A, T], "vi-2": [L, S, A, T], "vi-3": [Z], "vi-4": [L, T],
                   "vi-8": [L]}


@pytest.fixture
def synth(tmp_path):
    """(v_interaction.parquet, v_perception.parquet, the folder)."""
    vi, vp = write(tmp_path / "raw")
    return vi, vp, tmp_path


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --- the table: which drawing call is which token ----------------------------------------------------------

@pytest.mark.parametrize("code, tokens", [
    ("draw.line([(0, 0), (5, 5)], fill='red')", [L]),
    ("draw.rectangle([2, 2, 9, 9], outline='red')", [Z]),
    ("draw.ellipse([2, 2, 9, 9])", [S]),
    ("draw.polygon([(0, 0), (5, 0), (0, 5)])", [S]),
    ("draw.text((3, 3), 'A')", [T]),
    ("cv2.line(img, (0, 0), (5, 5), (255, 0, 0), 2)", [L]),
    ("cv2.rectangle(img, (0, 0), (5, 5), (0, 255, 0), 2)", [Z]),
    ("cv2.circle(img, (5, 5), 3, (0, 0, 255), -1)", [S]),
    ("cv2.arrowedLine(img, (0, 0), (5, 5), (0, 0, 0))", [A]),
    ("cv2.putText(img, 'A', (1, 1), cv2.FONT_HERSHEY_SIMPLEX, 1, (0, 0, 0))", [T]),
    ("plt.plot([0, 1], [0, 1])", [L]),
    ("ax.axhline(y=3)\nplt.axvline(x=2)", [L]),
    ("ax.add_patch(patches.Rectangle((0, 0), 4, 4))", [Z]),
    ("ax.add_patch(Circle((0, 0), 4))", [S]),
    ("ax.add_patch(patches.Polygon([[0, 0], [1, 0], [0, 1]]))", [S]),
    ("ax.arrow(0, 0, 1, 1)", [A]),
    ("ax.annotate('A', xy=(1, 1))", [T]),
    ("ax.annotate('A', xy=(1, 1), xytext=(5, 5), arrowprops=dict(arrowstyle='->'))", [A, T]),
    ("ax.annotate('', xy=(1, 1), xytext=(5, 5), arrowprops=dict(arrowstyle='->'))", [A]),  # no label: no text
    ("plt.annotate(text=' ', xy=(1, 1), arrowprops={})", [A]),
    ("ax.annotate(name, xy=(1, 1), arrowprops={})", [A, T]),  # a label held in a variable is text
    ("plt.text(1, 1, 'A')", [T]),
    ("img.crop((0, 0, 9, 9))", [Z]),
    ("roi = arr[10:30, 5:25]", [Z]),
    ("ax.set_xlim(0, 9)", [Z]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_library_call_maps_to_its_token(code, tokens):
    assert block_tokens(code) == tokens


@pytest.mark.parametrize("code, tokens", [
    ("img = Image.open(p).resize((99, 99))", []),                    # the whole image: no region
    ("big = img.crop((0, 0, 9, 9)).resize((99, 99))", [Z]),
    ("roi = arr[1:5, 2:6]\nbig = cv2.resize(roi, None, fx=4, fy=4)", [Z]),
    ("big = cv2.resize(arr[1:5, 2:6], (40, 40))", [Z]),
    ("rgb = arr[:, :, ::-1]", []),                                   # channel order, not a region
    ("xy = pts[:, :2]", []),                                         # coordinates, not a region
    ("arr[1:5, 2:6] = 0", []),                                       # painting a region is no zoom
], ids=["whole-image-resize", "crop-then-resize", "resize-of-a-sliced-name", "resize-of-a-slice",
        "channel-flip", "coordinate-slice", "slice-assignment"])
def test_zoom_is_a_crop_a_two_axis_slice_or_a_resize_of_a_region(code, tokens):
    assert block_tokens(code) == tokens


def test_tokens_come_in_code_order_each_once_per_block():
    code = "draw.text((0, 0), 'a')\nfor p in ps:\n    draw.line(p)\ndraw.text((1, 1), 'b')\ndraw.line(q)"
    assert block_tokens(code) == [T, L]


def test_nested_calls_count_in_source_order():
    code = ("ax.add_patch(patches.Circle((0, 0), 2))\n"
            "draw.text((0, 0), str(round(f(x))), font=ImageFont.truetype('a.ttf', 12))")
    assert block_tokens(code) == [S, T]


def test_indented_code_parses():
    assert block_tokens("    draw.line(p)\n    draw.text(q, 'a')") == [L, T]


def test_an_invalid_escape_in_the_data_code_parses_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert block_tokens('pattern = re.compile("\\d+")\ndraw.line(p)') == [L]


def test_code_that_does_not_parse_raises_syntax_error():
    with pytest.raises(SyntaxError):
        block_tokens("draw.line([(0, 0), (5, 5)]")


def test_every_rule_names_one_of_the_five_tokens_and_a_name_maps_to_one_token_but_annotate():
    owners = {}
    for token, condition, names, _ in OPERATIONS:
        assert token in (Z, L, S, A, T) and condition in (None, "region", "arrowprops", "label")
        for name in names:
            owners.setdefault(name, set()).add(token)
    assert {name for name, tokens in owners.items() if len(tokens) > 1} == {"annotate"}


# --- a trajectory: blocks replaced by a transition sentence and their tokens ------------------------------

def block(code, output="<image>"):
    return f"<code>\n```python\n{code}\n```\n</code>\n<sandbox_output>{output}</sandbox_output>\n"


def sentences(tokens):
    """Every transition sentence the templates can write for `tokens`, enumerated."""
    import itertools
    out = set()
    for said in itertools.product(*(PHRASES[t] for t in tokens)):
        joined = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
        out |= {opener.format(joined) for opener in OPENERS}
    return out


def test_each_block_and_its_output_become_one_sentence_then_the_blocks_tokens():
    two_ops = block("draw.text(q, 1)\ncv2.circle(i, c, 2, k)")
    cot = f"<think>First.\n{block('draw.line(p)')}Then.\n{two_ops}So 2."
    response, reason = trajectory(cot + "</think>\n<answer>2</answer>", "r1", seed=0)
    m = re.fullmatch(r"<think>First\.\n(.+?) <\|Line\|>\nThen\.\n(.+?) <\|Text\|> <\|Shape\|>\n"
                     r"So 2\.</think>\n<answer>2</answer>", response)
    assert reason is None and m, response
    assert m[1] in sentences([L]) and m[2] in sentences([T, S])


def test_a_block_written_inside_a_sentence_keeps_the_spaces_around_it():
    response, _ = trajectory("I will draw<code>draw.line(p)</code><sandbox_output>ok</sandbox_output>then see.",
                             "r", seed=0)
    assert re.fullmatch(r"I will draw .+ <\|Line\|> then see\.", response)


def test_phrasing_is_fixed_by_seed_and_row_id_and_varies_across_rows():
    cot = block("draw.line(p)")
    once = [trajectory(cot, f"row-{i}", seed=0)[0] for i in range(40)]
    assert once == [trajectory(cot, f"row-{i}", seed=0)[0] for i in range(40)]
    assert len(set(once)) > 3
    assert once != [trajectory(cot, f"row-{i}", seed=1)[0] for i in range(40)]


@pytest.mark.parametrize("cot, reason", [
    ("<think>It is white.</think><answer>white</answer>", "no code block"),
    (block("draw.line((0, 0), (1, 1)"), "unparsable code"),
    ("<code>draw.line(p)\n<sandbox_output>ok</sandbox_output> <answer>1</answer>", "unparsable code"),
    (block("print(3 ** 2)", "9"), "code with no drawing operation"),
    (block("draw.line(p)", "Sandbox for r: Code execution failed due to ImportError."),
     "code failed in the sandbox"),
    (block("draw.line(p)") + block("print(1)", "1"), "code with no drawing operation"),
], ids=["no-code", "syntax-error", "unclosed-block", "no-drawing", "sandbox-error", "one-bad-block-of-two"])
def test_a_row_whose_code_cannot_become_tokens_is_dropped_with_its_reason(cot, reason):
    assert trajectory(cot, "r", seed=0) == (None, reason)


@pytest.mark.parametrize("text, fmt, expected", [
    ("so <answer>4</answer>", "boxed", "so \\boxed{4}"),
    ("so <answer>\\boxed{4}</answer>", "tag", "so <answer>4</answer>"),
    ("so <answer> 4 </answer>", "tag", "so <answer>4</answer>"),
    ("so \\boxed{4}", "boxed", "so \\boxed{4}"),
    ("so \\boxed{4}", "tag", None),
    ("so 4", "boxed", None),
    ("so <answer></answer>", "boxed", None),
])
def test_the_final_answer_is_written_in_the_asked_format(text, fmt, expected):
    assert with_answer_format(text, fmt) == expected


# --- the file: parquet in, JSONL + images + summary out -------------------------------------------------

def test_each_synthetic_row_is_kept_or_dropped_as_labelled_with_its_tokens(synth):
    vi, _, tmp = synth
    summary = convert_vinteraction([vi], tmp / "out.jsonl")
    labels = [(row["id"], label) for row, label in interaction_rows(tmp / "raw")]
    out = {ex["id"]: ex for ex in read(tmp / "out.jsonl")}
    assert set(out) == {rid for rid, label in labels if label == "kept"}
    assert {rid: FUNCTIONAL.findall(ex["response"]) for rid, ex in out.items()} == EXPECTED_TOKENS
    dropped = {reason: sum(label == reason for _, label in labels) for reason in convert.DROPS}
    assert summary["dropped"] == dropped and summary["rows_read"] == len(labels)


def test_reasoning_and_answer_stay_and_no_code_or_output_is_left(synth):
    vi, _, tmp = synth
    convert_vinteraction([vi], tmp / "out.jsonl", answer_format="tag")
    ex = {e["id"]: e for e in read(tmp / "out.jsonl")}["vi-0"]
    assert ex["question"] == "How long is segment AB?" and ex["answer"] == "4"  # <image> placeholder removed
    assert ex["response"].startswith("<think>AB looks horizontal. Mark its height.\n")
    assert ex["response"].endswith("<|Line|> <|Text|>\nThe line shows AB = 4.</think>\n<answer>4</answer>")
    for ex in read(tmp / "out.jsonl"):
        assert not re.search(r"code>|sandbox_output|```|import |draw\.", ex["response"])


def test_the_answer_field_comes_from_answer_with_a_box_unwrapped(synth):
    vi, _, tmp = synth
    convert_vinteraction([vi], tmp / "out.jsonl")
    assert {e["id"]: e["answer"] for e in read(tmp / "out.jsonl")}["vi-3"] == "7"  # the row's answer: \boxed{7}


def test_images_are_written_beside_out_byte_for_byte_and_load_as_sft_data(synth):
    vi, vp, tmp = synth
    convert_vinteraction([vi, vp], tmp / "data" / "out.jsonl")
    loaded = check_images(load_jsonl(tmp / "data" / "out.jsonl", need_response=True))
    assert len(loaded) == 9
    embedded = {r["id"]: r["image"]["bytes"] for r, _ in interaction_rows(tmp / "raw")}
    embedded |= {r["id"]: r["image"]["bytes"] for r in perception_rows()}
    for ex in loaded:
        (path,) = ex["images"]
        assert path.parent == (tmp / "data" / "out_images").resolve()
        assert path.read_bytes() == embedded[ex["id"]]
        assert path.stem == hashlib.sha256(path.read_bytes()).hexdigest()[:24]
    assert {ex["id"]: ex["images"][0].suffix for ex in loaded}["vi-1"] == ".jpg"  # JPEG bytes, .jpg name


def test_an_image_folder_can_be_named_but_not_outside_outs_folder(synth):
    vi, _, tmp = synth
    convert_vinteraction([vi], tmp / "out.jsonl", image_dir=tmp / "pics")
    assert all(ex["images"][0].startswith("pics/") for ex in read(tmp / "out.jsonl"))
    with pytest.raises(ConvertError, match="lies outside OUT's folder"):
        convert_vinteraction([vi], tmp / "sub" / "out.jsonl", image_dir=tmp / "pics")


def test_no_data_code_is_run_imported_or_executed(synth, monkeypatch):
    vi, _, tmp = synth
    real_compile = builtins.compile

    def only_ast(source, filename, mode, flags=0, *args, **kwargs):  # ast.parse compiles to a tree only
        if not str(filename).endswith(".py"):  # a module imported for the first time is compiled in full
            assert flags & ast.PyCF_ONLY_AST, "data code was compiled to bytecode"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("data code was run")

    monkeypatch.setattr(builtins, "compile", only_ast)
    for module, name in [(builtins, "exec"), (builtins, "eval"), (os, "system"), (subprocess, "Popen")]:
        monkeypatch.setattr(module, name, refuse)
    convert_vinteraction([vi], tmp / "out.jsonl")
    monkeypatch.undo()
    assert not list((tmp / "raw").glob("PWNED*")) and not list(tmp.rglob("PWNED*"))
    kept = {e["id"]: e for e in read(tmp / "out.jsonl")}
    assert FUNCTIONAL.findall(kept["vi-8"]["response"]) == [L]  # the row was read, its line found


def test_rows_are_streamed_in_batches_never_read_whole(synth, monkeypatch):
    vi, _, tmp = synth
    assert pq.ParquetFile(vi).num_row_groups == 3  # 11 rows in groups of 4

    def whole(*args, **kwargs):
        raise AssertionError("a whole file or row group was read at once")

    for name in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    sizes = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, **kw: (sizes.append(b.num_rows) or b for b in real(self, **kw)))
    convert_vinteraction([vi], tmp / "out.jsonl", batch_rows=2)
    assert sum(sizes) == 11 and max(sizes) <= 2


def test_the_summary_counts_rows_drops_tokens_and_their_share(synth, capsys):
    vi, vp, tmp = synth
    assert main(["vinteraction", str(vi), str(vp), str(tmp / "out.jsonl")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp / "out.summary.json").read_text())
    assert json.loads(printed[:printed.rindex("}") + 1]) == summary
    assert (summary["rows_read"], summary["kept"], summary["kept_by_kind"]) == (14, 9, {"v_interaction": 6,
                                                                                       "v_perception": 3})
    assert summary["functional_tokens"] == {Z: 2, L: 4, S: 1, A: 2, T: 4}  # EXPECTED_TOKENS, counted by hand
    trajectories = [ex["response"] for ex in read(tmp / "out.jsonl") if ex["task"] == "v_interaction"]
    words = sum(len(t.replace("|><|", "|> <|").split()) for t in trajectories)
    assert summary["functional_per_trajectory"] == round(13 / 6, 2)
    assert summary["length_per_trajectory"] == round(words / 6, 1) and summary["length_unit"] == "words"
    assert summary["functional_token_share"] == round(13 / words, 4)
    assert summary["paper"]["functional_token_share"] == 0.0236  # 4.8 / 203.7 = 0.02356...


def test_lengths_can_be_counted_in_a_tokenizers_tokens_with_each_functional_token_one(tmp_path):
    from test_judge import CHAT, _save_tiny_model
    count, unit = convert._length_counter(_save_tiny_model(tmp_path / "tok", CHAT))
    assert count(["<|Line|><|Text|>", "B <|Zoom|> B"]) == [2, 3] and unit.startswith("tokens of ")


def test_perception_rows_answer_alone_in_the_asked_format(synth):
    _, vp, tmp = synth
    convert_vinteraction([vp], tmp / "out.jsonl", answer_format="tag")
    got = sorted((ex["id"], ex["response"], ex["task"]) for ex in read(tmp / "out.jsonl"))
    assert got == [(f"vp-{i}", f"<answer>{i + 2}</answer>", "v_perception") for i in range(3)]


def test_the_mix_is_every_row_of_both_in_an_order_fixed_by_the_seed(synth):
    vi, vp, tmp = synth
    convert_vinteraction([tmp / "raw"], tmp / "a.jsonl", seed=0)  # a folder: both files
    convert_vinteraction([vi, vp], tmp / "b.jsonl", seed=0)
    convert_vinteraction([vi, vp], tmp / "c.jsonl", seed=3)
    a, b, c = ([(ex["id"], ex["response"]) for ex in read(tmp / f"{name}.jsonl")] for name in "abc")
    assert a == b
    concatenated = [f"vi-{i}" for i in (0, 1, 2, 3, 4, 8)] + [f"vp-{i}" for i in range(3)]  # the kept rows
    for rows, seed in ((a, 0), (c, 3)):
        expected = list(concatenated)
        random.Random(seed).shuffle(expected)
        assert [rid for rid, _ in rows] == expected


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------

def bad_file(tmp, change):
    rows = [dict(r) for r, _ in interaction_rows(tmp)]
    rows[1].update(change)
    path = tmp / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("change, message", [
    ({"question": None}, "field 'question': expected a non-empty string or number, got None"),
    ({"answer": ""}, "field 'answer': expected a non-empty string or number"),
    ({"image": {"bytes": b"not an image", "path": "x.png"}}, "field 'image': embedded image cannot be read"),
    ({"image": {"bytes": png((1, 2, 3), size=(400, 1)), "path": "x.png"}}, "field 'image': embedded image is 400x1"),
    ({"image": None}, "field 'image': expected embedded image bytes"),
    ({"question": "<image><image>Which?"}, "field 'question': 2 <image> placeholders for 1 images"),
], ids=["no-question", "empty-answer", "not-an-image", "aspect-ratio", "no-image", "placeholders"])
def test_a_bad_row_is_one_line_naming_file_row_and_field_exit_2_and_nothing_written(tmp_path, capsys, change,
                                                                                    message):
    path = bad_file(tmp_path, change)
    assert main(["vinteraction", str(path), str(tmp_path / "out" / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}[1]: {message}") and err.count("\n") == 1
    assert not [p for p in (tmp_path / "out").rglob("*")]  # no OUT, no images, no summary, no temp files


def test_the_cli_exits_2_with_one_line_on_a_missing_column(tmp_path):
    path = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "1", "question": "q", "image": None}]), path)
    cmd = [sys.executable, "-m", "atlas_min.convert", "vinteraction", str(path), str(tmp_path / "out.jsonl")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"error: {path}: no column 'answer'")


def test_without_pyarrow_one_line_says_what_to_install_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail, installed or not
    assert main(["vinteraction", str(tmp_path / "in.parquet"), str(tmp_path / "out" / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == "error: vinteraction reads parquet with pyarrow, which is not installed: " \
                  "pip install -e '.[parquet]'\n"
    assert not (tmp_path / "out").exists()


def test_pyarrow_is_an_optional_extra_and_in_the_test_extra_not_a_core_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any("pyarrow" in d for d in project["dependencies"])
    assert any(d.startswith("pyarrow") for d in project["optional-dependencies"]["parquet"])
    assert any(d.startswith("pyarrow") for d in project["optional-dependencies"]["test"])


# --- polishing: a rewrite must keep the functional tokens, their order and the answer ---------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from test_judge import CHAT, _save_tiny_model
    return _save_tiny_model(tmp_path_factory.mktemp("polish") / "lm", CHAT)


TEMPLATE = "<think>Let me draw an auxiliary line. <|Line|>\nLabel it. <|Text|></think>\n\\boxed{4}"


@pytest.mark.parametrize("reply, accepted", [
    ("<think>I sketch a helper line <|Line|> and then label the point <|Text|>.</think> \\boxed{4}", True),
    ("<think>A helper line <|Line|> and that is all.</think> \\boxed{4}", False),
    ("<think>Label first <|Text|>, then a line <|Line|>.</think> \\boxed{4}", False),
    ("<think>A line <|Line|>, a label <|Text|>, an arrow <|Arrow|>.</think> \\boxed{4}", False),
    ("<think>A line <|Line|>, a label <|Text|>.</think> \\boxed{5}", False),
    ("", False),
], ids=["keeps-all", "loses-one", "reorders", "adds-one", "changes-the-answer", "empty"])
def test_a_polished_reply_is_taken_only_if_it_keeps_tokens_order_and_answer(tiny_lm, monkeypatch, reply, accepted):
    from transformers import AutoTokenizer
    monkeypatch.setattr(convert, "generate", lambda *args: [reply])
    texts, rejected = polish(None, AutoTokenizer.from_pretrained(tiny_lm), [TEMPLATE], "boxed")
    assert texts == [reply if accepted else TEMPLATE] and rejected == (0 if accepted else 1)


def test_a_random_init_model_polishes_junk_which_is_rejected_and_the_templates_kept(synth, tiny_lm):
    vi, _, tmp = synth
    plain = convert_vinteraction([vi], tmp / "plain.jsonl")
    polished = convert_vinteraction([vi], tmp / "polished.jsonl", polish_model=tiny_lm, polish_batch=4)
    assert (polished["polished"], polished["polish_rejected"]) == (0, plain["kept"])
    responses = [[ex["response"] for ex in read(tmp / f"{name}.jsonl")] for name in ("polished", "plain")]
    assert responses[0] == responses[1]


def test_a_polish_model_that_is_not_a_model_folder_is_an_error_before_any_work(synth, capsys):
    vi, _, tmp = synth
    assert main(["vinteraction", str(vi), str(tmp / "out" / "o.jsonl"), "--polish", str(tmp / "none")]) == 2
    assert capsys.readouterr().err.startswith(f"error: judge model {tmp / 'none'}: no such folder")
    assert not (tmp / "out").exists()


# --- the conversion trains: a micro SFT run on it, then its greedy outputs hold functional tokens ----------

def test_micro_sft_on_the_conversion_learns_to_emit_functional_tokens(synth):
    vi, vp, tmp = synth
    data = tmp / "sft.jsonl"
    convert_vinteraction([vi, vp], data, answer_format="tag")  # the micro preset reads <answer> tags
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")

    def run(*args):
        out = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Warning" not in out.stdout + out.stderr, out.stderr[-3000:]

    run("train_sft.py", "--config", "micro", "--out", tmp / "run", f"train_data={data}", "max_steps=150",
        "sft_lr=1e-2", "sft_warmup=5", "micro_batch_size=8", "log_every=50")
    run("eval.py", "--ckpt", tmp / "run", "--data", data, "--out", tmp / "eval.json", "eval_max_new_tokens=64")
    result = json.loads((tmp / "eval.json").read_text())
    assert result["n"] == 9 and result["mean_functional_tokens"] > 0


@pytest.mark.parametrize("where", ["an-input-file", "inside-an-input-folder", "a-link-to-an-input"])
def test_an_out_that_is_an_input_or_lies_in_an_input_folder_is_refused_and_nothing_changes(synth, capsys, where):
    vi, vp, folder = synth
    before = {p: p.read_bytes() for p in (vi, vp)}
    if where == "a-link-to-an-input":
        (folder / "link.parquet").symlink_to(vp)
    out = {"an-input-file": vp, "inside-an-input-folder": vi.parent / "new" / "out.jsonl",
           "a-link-to-an-input": folder / "link.parquet"}[where]
    inputs = [str(vi.parent)] if where == "inside-an-input-folder" else [str(vi), str(vp)]
    assert main(["vinteraction", *inputs, str(out)]) == 2
    err = capsys.readouterr().err
    said = "lies inside the input folder" if where == "inside-an-input-folder" else "is the input file"
    assert err.startswith(f"error: OUT {out} {said} ") and err.count("\n") == 1
    assert {p: p.read_bytes() for p in (vi, vp)} == before and not (vi.parent / "new").exists()
