import torch

from atlas_min.data import collate_prompts, encode, load_jsonl
from atlas_min.model import forward
from atlas_min.sampler import STOP_TOKENS, sample, sequence_logprobs
from atlas_min.tokens import VISION_TOKENS


def _lively(model, std=0.3):
    """A random-init model (std 0.02) emits one token forever; larger weights make its choices vary."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def _prompts(tokenizer, image_processor, toy_files, n=2, sizes=None):
    """Left-padded prompts of different lengths; with `sizes`, images of different sizes."""
    from PIL import Image
    examples = load_jsonl(toy_files[0])[:n]
    examples[0] = dict(examples[0], question=examples[0]["question"] + " Look closely at the picture.")
    encoded = []
    for ex, size in zip(examples, sizes or [None] * n):
        e = encode(ex, tokenizer, image_processor, "sys")
        if size:
            image = Image.open(ex["images"][0]).convert("RGB").resize(size)
            pixels = image_processor(images=[image], return_tensors="pt")
            e = encode(dict(ex, images=[]), tokenizer, image_processor, "sys")  # rebuilt below with the new grid
            from atlas_min.data import prompt_text
            ids = tokenizer.encode(prompt_text(ex["question"], 1, "sys"), add_special_tokens=False)
            pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
            k = int(pixels["image_grid_thw"].prod()) // 4
            e = {"prompt_ids": [t for i in ids for t in ([i] * k if i == pad else [i])], "n_images": 1,
                 "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        encoded.append(e)
    return collate_prompts(encoded, tokenizer.pad_token_id)


def _generate(model, tokenizer, batch, max_new_tokens):
    """`model.generate`'s greedy completions of `batch`, with the sampler's stops and banned tokens."""
    return model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).long(),
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.convert_tokens_to_ids(STOP_TOKENS),
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=tokenizer.convert_tokens_to_ids(VISION_TOKENS))[:, batch["input_ids"].shape[1]:]


def test_greedy_sampler_equals_generate_token_for_token(micro, toy_files):
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files, sizes=[(56, 56), (112, 84)])
    assert batch["image_grid_thw"][0].tolist() != batch["image_grid_thw"][1].tolist()
    assert batch["attention_mask"][1, 0] == 0  # left padding is exercised
    ours = sample(model, batch, tokenizer, max_new_tokens=16, temperature=0)
    theirs = _generate(model, tokenizer, batch, max_new_tokens=16)
    assert len(set(ours["completion_ids"].flatten().tolist())) > 3  # not a degenerate repetition
    C = theirs.shape[1]
    assert torch.equal(ours["completion_ids"][:, :C], theirs)


def test_sampler_logprobs_equal_the_training_forward(micro, toy_files):
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files, n=3)
    out = sample(model, batch, tokenizer, group_size=4, max_new_tokens=12, temperature=1.0, row_seeds=range(12))
    forward = sequence_logprobs(model, batch, out["prompt_ids"], out["prompt_mask"], out["completion_ids"],
                                out["completion_mask"], repeats=4)
    mask = out["completion_mask"]
    assert mask.sum() > 20
    torch.testing.assert_close(forward[mask], out["logprobs"][mask], atol=1e-4, rtol=0)


def test_each_prompt_is_repeated_group_size_times_in_order(micro, toy_files):
    model, tokenizer, image_processor = micro
    batch = _prompts(tokenizer, image_processor, toy_files, n=2)
    out = sample(model, batch, tokenizer, group_size=3, max_new_tokens=2, temperature=1.0, row_seeds=range(6))
    for r in range(6):
        assert torch.equal(out["prompt_ids"][r], batch["input_ids"][r // 3])


def test_the_sampler_never_emits_a_vision_placeholder(micro, toy_files):
    model, tokenizer, image_processor = micro
    vision = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    batch = _prompts(tokenizer, image_processor, toy_files)

    def favour_vision(module, inputs, logits):  # the placeholders become the model's favourites by far
        return logits.index_add(-1, torch.tensor(vision), torch.full((*logits.shape[:-1], 4), 50.0))

    model.lm_head.register_forward_hook(favour_vision)
    logits = forward(model, batch, batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[0].logits[:, -1]
    assert all(i in vision for i in logits.argmax(-1).tolist())
    for temperature in (0.0, 1.0):
        out = sample(model, batch, tokenizer, group_size=2, max_new_tokens=8, temperature=temperature, row_seeds=range(4))
        assert not torch.isin(out["completion_ids"], torch.tensor(vision)).any()


def test_a_row_stops_at_im_end_and_is_masked_after_it(micro, toy_files):
    model, tokenizer, image_processor = micro
    _lively(model)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = _prompts(tokenizer, image_processor, toy_files)

    def stop_sometimes(module, inputs, logits):  # p(<|im_end|>) ≈ 0.05 at every step
        stop = logits.logsumexp(-1, keepdim=True) - 3.0
        return logits.index_copy(-1, torch.tensor([eos]), stop)

    model.lm_head.register_forward_hook(stop_sometimes)
    out = sample(model, batch, tokenizer, group_size=8, max_new_tokens=10, temperature=1.0, row_seeds=range(16))
    ids, mask = out["completion_ids"], out["completion_mask"]
    stopped = 0
    for row, m in zip(ids, mask):
        hits = (row == eos).nonzero().flatten()
        if len(hits):
            stopped += 1
            end = hits[0].item()
            assert m[:end + 1].all() and not m[end + 1:].any()  # the stop token is part of the completion
            assert (row[end + 1:] == tokenizer.pad_token_id).all()
        else:
            assert m.all()
    assert 0 < stopped < 16


def test_top_p_near_zero_is_greedy(micro, toy_files):
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files)
    greedy = sample(model, batch, tokenizer, max_new_tokens=8, temperature=0)
    nucleus = sample(model, batch, tokenizer, max_new_tokens=8, temperature=1.0, top_p=1e-6, row_seeds=[1, 2])
    assert torch.equal(greedy["completion_ids"], nucleus["completion_ids"])


def test_a_rows_sample_depends_on_its_seed_not_its_batch_mates(micro, toy_files):
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files, n=2)
    together = sample(model, batch, tokenizer, group_size=2, max_new_tokens=8, temperature=1.0, row_seeds=[10, 11, 12, 13])
    first = {k: (v[:1] if torch.is_tensor(v) else v[:1]) for k, v in batch.items()}
    first["pixel_values"] = batch["pixel_values"][: int(batch["image_grid_thw"][0].prod())]
    first["input_ids"] = batch["input_ids"][:1, batch["attention_mask"][0].argmax():]  # without its padding
    first["attention_mask"] = batch["attention_mask"][:1, batch["attention_mask"][0].argmax():]
    alone = sample(model, first, tokenizer, group_size=2, max_new_tokens=8, temperature=1.0, row_seeds=[10, 11])
    assert torch.equal(alone["completion_ids"], together["completion_ids"][:2])


def _draw_logits(logits, top_p, u):
    """The sampler's step: exp(logits − max) (0 where banned), then the draw."""
    from atlas_min.sampler import _draw
    return _draw(torch.exp(logits - logits.amax(-1, keepdim=True)), top_p, u)


def test_draws_follow_softmax_and_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    probs = torch.softmax(logits, -1)  # [0.533, 0.196, 0.072, 0.027, 0.119] (by hand: e^x / Σ e^x)
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    full = _draw_logits(logits.expand(40_000, 5), 1.0, u)
    freq = torch.bincount(full, minlength=5).float() / 40_000
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    nucleus = _draw_logits(logits.expand(40_000, 5), 0.7, u)  # 0.533 < 0.7 <= 0.533 + 0.196: tokens 0 and 1 only
    freq = torch.bincount(nucleus, minlength=5).float() / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.731, 0.269, 0, 0, 0]), atol=0.01, rtol=0)


def test_a_uniform_of_0_or_just_below_1_never_draws_a_token_of_probability_0():
    inf = float("-inf")
    # token 0 banned (-inf), token 4 banned; tokens 1-3 possible; the last row has only token 3 left
    logits = torch.tensor([[inf, 0.0, 1.0, 2.0, inf]] * 2 + [[inf, inf, inf, 5.0, inf]] * 2)
    below_1 = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()  # the largest float32 < 1
    u = torch.tensor([0.0, below_1, 0.0, below_1])
    for top_p in (1.0, 0.5):
        picked = _draw_logits(logits, top_p, u).tolist()
        assert all(torch.isfinite(logits[row, tok]) for row, tok in enumerate(picked)), picked
    assert _draw_logits(logits, 1.0, u).tolist() == [1, 3, 3, 3]  # u = 0: the first possible token; u -> 1: the last


def test_rl_seed_moves_an_rl_runs_draws_and_0_leaves_them_as_seed_alone_gives():
    from atlas_min.config import get_config
    from atlas_min.sampler import rl_row_seeds
    cfg = get_config("micro", ["seed=2"])
    by_hand = [(2 * cfg.step_seed_stride + 5) * cfg.row_seed_stride + 8 + r for r in range(3)]
    assert rl_row_seeds(cfg, 5, 8, 3) == by_hand
    moved = rl_row_seeds(get_config("micro", ["seed=2", "rl_seed=1"]), 5, 8, 3)
    assert not set(moved) & set(by_hand)


def test_the_sampler_never_emits_a_spare_row_of_the_embedding_matrix(toy_files):
    from atlas_min.config import get_config
    from atlas_min.model import init_model
    cfg = get_config("micro", ["vocab_rows=700"])  # rows past the tokenizer, as Qwen's 152,064 for 151,670 tokens
    model, tokenizer, image_processor = init_model(cfg)
    n_rows, n_tokens = model.lm_head.weight.shape[0], len(tokenizer)
    assert n_rows > n_tokens
    batch = _prompts(tokenizer, image_processor, toy_files)

    def favour_spare_rows(module, inputs, logits):  # the rows that are no token become the favourites by far
        boost = torch.zeros(n_rows)
        boost[n_tokens:] = 50.0
        return logits + boost

    model.eval().lm_head.register_forward_hook(favour_spare_rows)
    logits = forward(model, batch, batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[0].logits[:, -1]
    assert (logits.argmax(-1) >= n_tokens).all()
    for temperature in (0.0, 1.0):
        out = sample(model, batch, tokenizer, group_size=2, max_new_tokens=8, temperature=temperature,
                     row_seeds=range(4))
        assert (out["completion_ids"] < n_tokens).all()


def _stop_when_the_favourite_is(model, tokenizer, residue, modulus=5):
    """A hook: <|im_end|> becomes the favourite wherever the model's own favourite id ≡ residue (mod modulus),
    so greedy rows stop at steps that depend on their text alone."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def hook(module, inputs, logits):
        hit = logits.argmax(-1, keepdim=True) % modulus == residue  # (n, T, 1)
        return logits.index_copy(-1, torch.tensor([eos]), torch.where(hit, logits.amax(-1, keepdim=True) + 5,
                                                                       logits[..., eos:eos + 1]))
    return model.lm_head.register_forward_hook(hook)


def _stop_sometimes(model, tokenizer, shift=2.0):
    """A hook: p(<|im_end|>) ≈ e^-shift at every step, so sampled rows stop at varied steps."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model.lm_head.register_forward_hook(
        lambda module, inputs, logits: logits.index_copy(-1, torch.tensor([eos]),
                                                         logits.logsumexp(-1, keepdim=True) - shift))


def _lengths(out):
    return out["completion_mask"].sum(1).tolist()


def test_greedy_tokens_equal_generate_when_rows_stop_at_different_steps(micro, toy_files):
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files, n=4)
    _stop_when_the_favourite_is(model, tokenizer, residue=0)
    ours = sample(model, batch, tokenizer, max_new_tokens=16, temperature=0)
    lengths = _lengths(ours)
    assert len(set(lengths)) >= 3 and min(lengths) < 16  # rows left the batch at different steps
    theirs = _generate(model, tokenizer, batch, max_new_tokens=16)
    assert torch.equal(ours["completion_ids"], theirs[:, :ours["completion_ids"].shape[1]])


def test_the_prefill_runs_each_prompt_once_and_the_decode_batch_exactly_the_rows_still_running(micro, toy_files):
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files, n=1)
    _stop_sometimes(model, tokenizer)
    sizes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape), with_kwargs=True)
    out = sample(model, batch, tokenizer, group_size=8, max_new_tokens=12, temperature=1.0, row_seeds=range(8))
    mask, stopped = out["completion_mask"], ~out["truncated"]
    assert sizes[0][0] == 1 and all(s[1] == 1 for s in sizes[1:])  # one prompt's prefill, then a token per step
    # the forward of step t+1 runs the rows that neither stopped nor ended by step t: those with a token at t+1
    assert [s[0] for s in sizes[1:]] == mask[:, 1:].sum(0).tolist()
    assert len(set(_lengths(out))) >= 3 and stopped.sum() >= 4


def test_a_seeded_sample_is_each_rows_sample_alone_while_finished_rows_leave_the_batch(micro, toy_files):
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files, n=1)
    _stop_sometimes(model, tokenizer)
    together = sample(model, batch, tokenizer, group_size=8, max_new_tokens=12, temperature=1.0,
                      row_seeds=range(20, 28))
    assert len(set(_lengths(together))) >= 3
    for r in range(8):  # alone: a batch of one row, nothing to leave it
        alone = sample(model, batch, tokenizer, group_size=1, max_new_tokens=12, temperature=1.0, row_seeds=[20 + r])
        C = alone["completion_ids"].shape[1]
        for key in ("completion_ids", "completion_mask"):
            assert torch.equal(together[key][r, :C], alone[key][0]), (r, key)
        assert not together["completion_mask"][r, C:].any()
        assert (together["completion_ids"][r, C:] == tokenizer.pad_token_id).all()
        torch.testing.assert_close(together["logprobs"][r, :C], alone["logprobs"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together["entropy"][r, :C], alone["entropy"][0], atol=1e-5, rtol=0)


def test_in_lockstep_a_rank_whose_rows_are_done_steps_one_stand_in_row_until_all_ranks_are(micro, toy_files,
                                                                                          monkeypatch):
    import atlas_min.sampler as sampler
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files, n=1)
    _stop_when_the_favourite_is(model, tokenizer, residue=0, modulus=1)  # every row stops at its first token
    calls = []
    monkeypatch.setattr(sampler, "_all_done", lambda done: calls.append(bool(done.all())) or len(calls) == 5)
    sizes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    out = sample(model, batch, tokenizer, group_size=4, max_new_tokens=12, temperature=1.0, row_seeds=range(4))
    assert calls == [True] * 5  # "another rank" was done only at the 5th check
    assert sizes == [1, 1, 1, 1, 1]  # the one prompt's prefill, then one stand-in row per step
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (out["completion_ids"][:, 0] == eos).all() and out["completion_mask"].sum(1).tolist() == [1] * 4
    assert (out["completion_ids"][:, 1:] == tokenizer.pad_token_id).all() and not out["truncated"].any()
    assert out["completion_ids"].shape == (4, 5)


def test_a_banned_token_far_above_every_other_never_starves_the_draw(micro, toy_files):
    # exp(x − max) over all tokens would underflow every allowed one to 0 when a never-drawn token leads by
    # more than ~104: the draw then works from the largest allowed logit, as softmax over the allowed ones does
    model, tokenizer, image_processor = micro
    _lively(model)
    batch = _prompts(tokenizer, image_processor, toy_files, n=1)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    hook = model.lm_head.register_forward_hook(
        lambda module, inputs, logits: logits.index_copy(-1, torch.tensor([image_pad]),
                                                         logits.amax(-1, keepdim=True) + 200))
    try:
        out = sample(model, batch, tokenizer, group_size=4, max_new_tokens=6, temperature=1.0, row_seeds=range(4))
    finally:
        hook.remove()
    drawn = out["completion_ids"][out["completion_mask"]]
    assert (drawn < len(tokenizer)).all() and not (drawn == image_pad).any()
    assert len(set(drawn.tolist())) > 1  # drawn from the allowed tokens' own distribution, not one fallback id
