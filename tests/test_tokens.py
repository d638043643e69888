import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from atlas_min.tokens import FUNCTIONAL_TOKENS, add_functional_tokens, functional_mask


def _fresh(micro_cfg, tied=True, spare_rows=0):
    """A micro model + tokenizer *without* functional tokens, optionally untied or with spare rows."""
    from atlas_min.model import build_model, build_tokenizer
    from atlas_min.toy import corpus
    tokenizer = build_tokenizer(corpus(micro_cfg), micro_cfg.tokenizer_vocab)
    model = build_model(micro_cfg, tokenizer)
    if not tied:
        config = model.config
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
        model = Qwen2_5_VLForConditionalGeneration(config)
        torch.nn.init.normal_(model.lm_head.weight)  # distinct from the input embedding
    if spare_rows:
        model.resize_token_embeddings(len(tokenizer) + spare_rows, mean_resizing=False)
    return model, tokenizer


def test_functional_tokens_are_the_five_of_the_paper_in_order():
    assert FUNCTIONAL_TOKENS == ["<|Zoom|>", "<|Line|>", "<|Shape|>", "<|Arrow|>", "<|Text|>"]


def test_every_functional_token_is_one_token_and_survives_save_and_load(micro_cfg, tmp_path):
    model, tokenizer = _fresh(micro_cfg)
    ids = add_functional_tokens(model, tokenizer)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Look. <|Zoom|><|Line|> then <|Shape|> <|Arrow|><|Text|> <answer>3</answer>"
    for tok, i in zip(FUNCTIONAL_TOKENS, ids):
        assert reloaded.encode(tok, add_special_tokens=False) == [i]
    encoded = reloaded.encode(text, add_special_tokens=False)
    assert encoded == tokenizer.encode(text, add_special_tokens=False)
    assert [t for t in encoded if t in ids] == ids  # each appears once, as its single id
    assert reloaded.decode(encoded, skip_special_tokens=True) == text  # visible even when specials are skipped


def test_adding_twice_changes_nothing(micro_cfg):
    model, tokenizer = _fresh(micro_cfg)
    first = add_functional_tokens(model, tokenizer)
    embed = model.get_input_embeddings().weight.detach().clone()
    n = len(tokenizer)
    assert add_functional_tokens(model, tokenizer) == first
    assert len(tokenizer) == n
    assert torch.equal(model.get_input_embeddings().weight, embed)


def test_new_rows_are_the_mean_of_old_rows_with_tied_embeddings(micro_cfg):
    model, tokenizer = _fresh(micro_cfg)
    n_old = model.get_input_embeddings().weight.shape[0]
    mean = model.get_input_embeddings().weight.detach()[:n_old].mean(0)
    ids = add_functional_tokens(model, tokenizer)
    embed = model.get_input_embeddings().weight
    assert embed.shape[0] == n_old + 5 == model.config.text_config.vocab_size
    assert model.get_output_embeddings().weight is embed
    for i in ids:
        torch.testing.assert_close(embed[i], mean)


def test_untied_head_gets_its_own_mean_rows(micro_cfg):
    model, tokenizer = _fresh(micro_cfg, tied=False)
    n_old = model.get_input_embeddings().weight.shape[0]
    embed_mean = model.get_input_embeddings().weight.detach()[:n_old].mean(0)
    head_mean = model.lm_head.weight.detach()[:n_old].mean(0)
    ids = add_functional_tokens(model, tokenizer)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.lm_head.weight.shape[0] == n_old + 5
    for i in ids:
        torch.testing.assert_close(model.get_input_embeddings().weight[i], embed_mean)
        torch.testing.assert_close(model.lm_head.weight[i], head_mean)
    logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape[-1] == n_old + 5


def test_spare_rows_are_used_and_the_matrix_never_shrinks(micro_cfg):
    # Qwen2.5-VL-7B: 152,064 rows for ~151,665 tokens. Simulate with 16 spare rows.
    model, tokenizer = _fresh(micro_cfg, spare_rows=16)
    rows = model.get_input_embeddings().weight.shape[0]
    n_tokens = len(tokenizer)
    real_mean = model.get_input_embeddings().weight.detach()[:n_tokens].mean(0)
    ids = add_functional_tokens(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == rows == n_tokens + 16
    assert ids == list(range(n_tokens, n_tokens + 5))
    for i in ids:  # spare rows are untrained: only real tokens' rows enter the mean
        torch.testing.assert_close(model.get_input_embeddings().weight[i], real_mean)


def test_functional_mask_marks_exactly_the_functional_positions():
    ids = torch.tensor([[5, 100, 7, 101], [101, 101, 3, 0]])
    expected = torch.tensor([[False, True, False, True], [True, True, False, False]])
    assert torch.equal(functional_mask(ids, [100, 101]), expected)
