"""atlas_min.judge: the prompt, the verdict parser and the judge loop, on a tiny causal LM built offline."""
import shutil
import time

import pytest
import torch

from atlas_min import judge as judge_module
from atlas_min.judge import DEFAULT_TEMPLATE, JudgeError, judge, judge_prompt, parse_verdict, probe_url

QUESTION = "What is the color of the woman's bag?\n(A) black\n(B) white"
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _save_tiny_model(folder, chat_template):
    """A 1-layer Qwen2 causal LM (hidden size 16) and a word-level tokenizer, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    special = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "assistant", "Correct", "Incorrect", "Question", "answer", "white", "black", "B", ":"]
    vocab = {token: i for i, token in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("judge") / "chat", CHAT)


@pytest.fixture(scope="module")
def tiny_plain(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("judge") / "plain", None)


ITEMS = [
    {"question": QUESTION, "gold": "B", "answer": "white"},
    {"question": QUESTION, "gold": "B", "answer": "black"},
    {"question": QUESTION, "gold": "B", "answer": None},  # no box in the reply
    {"question": QUESTION, "gold": "B", "answer": "(B) white"},
]


def canned(replies, calls):
    """A stand-in for the model's generation: the next replies in order; records the texts it was given."""
    replies = iter(replies)

    def generate(model, tokenizer, texts, max_new_tokens, device):
        calls.append(list(texts))
        return [next(replies) for _ in texts]
    return generate


# --- judge_prompt ----------------------------------------------------------------------------------------

def test_the_default_prompt_holds_the_question_then_the_gold_then_the_answer():
    prompt = judge_prompt(QUESTION, "B", "the white one")
    assert QUESTION in prompt
    where = [prompt.index(part) for part in (QUESTION, "Reference answer: B", "answer: the white one")]
    assert where == sorted(where)


def test_the_default_template_states_the_three_rules_and_the_verdict_words():
    assert "option" in DEFAULT_TEMPLATE and "value" in DEFAULT_TEMPLATE and "means" in DEFAULT_TEMPLATE
    assert DEFAULT_TEMPLATE.rstrip().endswith("Correct or Incorrect.")


def test_braces_in_the_question_or_answer_are_kept_as_text():
    assert "\\frac{1}{2}" in judge_prompt("Simplify {x}", "0.5", "\\frac{1}{2}")


def test_a_custom_template_is_used_verbatim():
    template = "Q: {question}\nGold: {gold}\nPred: {answer}\nReply {{\"ok\": 1}} or {{\"ok\": 0}}."
    assert judge_prompt("q?", "B", "A", template) == 'Q: q?\nGold: B\nPred: A\nReply {"ok": 1} or {"ok": 0}.'


def test_the_authors_placeholder_names_gt_and_pred_are_accepted():
    assert judge_prompt("q?", "B", "A", "[{question}] [{gt}] [{pred}]") == "[q?] [B] [A]"


def test_a_template_missing_a_placeholder_is_an_error_naming_it():
    with pytest.raises(JudgeError, match=r"template: no \{answer\} placeholder"):
        judge_prompt("q?", "B", "A", "{question} {gold}")


def test_a_template_with_an_unknown_placeholder_is_an_error_naming_it():
    with pytest.raises(JudgeError, match=r"template: unknown placeholder \{reference\}"):
        judge_prompt("q?", "B", "A", "{question} {reference} {answer} {gold}")


# --- parse_verdict ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, verdict", [
    ("Correct", True),
    ("correct.", True),
    ("  **Correct**", True),
    ("\nCORRECT!", True),
    ("Verdict: Correct", True),
    ("Incorrect", False),  # holds "correct", but is the other verdict
    ("incorrect.", False),
    ("  Incorrect\n", False),
    ("The answer is not correct.", False),
    ('{"Correctness": 1}', True),  # the authors' JSON form
    ('{"Correctness": 0}', False),
    ("Correctness", None),
    ("", None),
    ("I cannot tell.", None),
])
def test_parse_verdict_reads_canned_replies(text, verdict):
    assert parse_verdict(text) is verdict


# --- judge -----------------------------------------------------------------------------------------------

def test_judge_parses_each_reply_into_one_bool_per_item(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(judge_module, "generate", canned(["Correct.", "Incorrect", "maybe"], calls))
    verdicts = judge(tiny, ITEMS)
    assert verdicts == [True, False, False, False]
    assert verdicts.unparsed == 1  # "maybe"
    assert verdicts.replies == ["Correct.", "Incorrect", None, "maybe"]


def test_judge_wraps_the_prompt_in_the_tokenizers_chat_template(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(judge_module, "generate", canned(["Correct"], calls))
    judge(tiny, ITEMS[:1])
    prompt = judge_prompt(QUESTION, "B", "white")
    assert calls == [[f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"]]


def test_judge_sends_the_bare_prompt_when_the_tokenizer_has_no_chat_template(tiny_plain, monkeypatch):
    calls = []
    monkeypatch.setattr(judge_module, "generate", canned(["Correct"], calls))
    judge(tiny_plain, ITEMS[:1])
    assert calls == [[judge_prompt(QUESTION, "B", "white")]]


def test_judge_asks_in_batches_of_batch_size(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(judge_module, "generate", canned(["Correct"] * 5, calls))
    judge(tiny, [ITEMS[0]] * 5, batch_size=2)
    assert [len(texts) for texts in calls] == [2, 2, 1]


def test_an_item_without_an_answer_is_false_without_loading_or_asking_the_model(tiny, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was used")
    monkeypatch.setattr(judge_module, "load_judge", fail)
    monkeypatch.setattr(judge_module, "generate", fail)
    verdicts = judge(tiny, [ITEMS[2], dict(ITEMS[2], answer="  ")])
    assert verdicts == [False, False] and verdicts.unparsed == 0


def test_judge_runs_end_to_end_on_a_real_tiny_model(tiny):
    verdicts = judge(tiny, ITEMS, max_new_tokens=4, batch_size=2)
    assert len(verdicts) == 4 and all(isinstance(v, bool) for v in verdicts)
    assert verdicts[2] is False and verdicts.replies[2] is None
    assert all(isinstance(verdicts.replies[k], str) for k in (0, 1, 3))


def test_a_folder_without_a_model_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(JudgeError, match=f"judge model {tmp_path / 'empty'}: not a model folder"):
        judge(tmp_path / "empty", ITEMS)
    with pytest.raises(JudgeError, match=f"judge model {tmp_path / 'missing'}: no such folder"):
        judge(tmp_path / "missing", ITEMS)


def test_a_folder_whose_model_cannot_load_is_an_error_naming_it(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(JudgeError, match=f"judge model {broken}: cannot load"):
        judge(broken, ITEMS)


def test_an_item_without_a_field_is_an_error_naming_it(tiny):
    with pytest.raises(JudgeError, match=r"items\[1\]: no field 'gold'"):
        judge(tiny, [ITEMS[0], {"question": QUESTION, "answer": "B"}])


def serve_judge(replies, delay_s=0.0, fail_first=0):
    """A served judge on 127.0.0.1 (an OpenAI-compatible /v1/chat/completions of canned `replies`, in turn),
    in a thread: (its URL, the request bodies it received). It sleeps `delay_s` before its first reply and answers
    the first `fail_first` requests with HTTP 500. The port is the one the system picked as free."""
    import http.server
    import json
    import threading
    import time
    bodies = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(dict(body, path=self.path))
            time.sleep(delay_s if len(bodies) == 1 else 0)
            failed = len(bodies) <= fail_first
            reply = b"{}" if failed else json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": replies[(len(bodies) - 1) % len(replies)]}}]}).encode()
            self.send_response(500 if failed else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", bodies


def test_a_served_judge_is_asked_the_local_judges_prompt_at_temperature_0_and_50_tokens():
    url, bodies = serve_judge(["Correct"])
    verdicts = judge(url, ITEMS, url_model="judge-235b")
    asked = [item for item in ITEMS if item["answer"] and item["answer"].strip()]
    assert sorted(b["messages"][0]["content"] for b in bodies) == sorted(
        judge_prompt(i["question"], i["gold"], i["answer"]) for i in asked)
    assert all(b["path"] == "/v1/chat/completions" and b["temperature"] == 0 and b["max_tokens"] == 50
               and b["model"] == "judge-235b" and len(b["messages"]) == 1 for b in bodies)
    assert list(verdicts) == [bool(i["answer"] and i["answer"].strip()) for i in ITEMS]


def test_a_served_judge_that_fails_is_asked_again(monkeypatch):
    monkeypatch.setattr(judge_module.time, "sleep", lambda s: None)  # the back-off between tries
    url, bodies = serve_judge(["Incorrect"], fail_first=2)
    verdicts = judge(url, ITEMS[:1])
    assert len(bodies) == 3 and list(verdicts) == [False] and verdicts.replies == ["Incorrect"]


def test_a_served_judge_that_never_answers_is_an_error_naming_it(monkeypatch):
    monkeypatch.setattr(judge_module.time, "sleep", lambda s: None)
    url, bodies = serve_judge(["Correct"], fail_first=10)
    with pytest.raises(JudgeError, match=f"judge {url}/v1/chat/completions: no reply after 4 tries"):
        judge(url, ITEMS[:1])


def serve_models(models=None, delay_s=0.0):
    """A server whose GET /v1/models lists `models` (None: no such route, 404) after `delay_s`; its URL."""
    import http.server
    import json
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(delay_s)
            body = json.dumps({"object": "list", "data": [{"id": m} for m in models or []]}).encode()
            self.send_response(404 if models is None else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_a_judge_that_accepts_and_never_answers_is_named_within_the_probes_timeout():
    url = serve_models(["judge"], delay_s=5)
    t0 = time.time()
    with pytest.raises(JudgeError, match=f"judge {url}: no answer to GET {url}/v1/models within 0.5 s .*timed out"):
        probe_url(url, timeout_s=0.5)
    assert time.time() - t0 < 3


def test_a_dead_judge_url_is_named_by_the_probe():
    with pytest.raises(JudgeError, match="judge http://127.0.0.1:9: no answer to GET"):
        probe_url("http://127.0.0.1:9", timeout_s=5)


def test_the_probe_accepts_any_answering_server_and_names_a_model_it_does_not_serve():
    probe_url(serve_models(None))  # no model list (404): a server is there
    probe_url(serve_models(["judge-235b"]), "judge-235b")
    url = serve_models(["judge-235b"])
    with pytest.raises(JudgeError, match=f"judge {url} serves judge-235b, not --judge-model judge-7b"):
        probe_url(url, "judge-7b")
