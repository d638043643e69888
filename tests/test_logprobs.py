"""Log-probs of given tokens (docs/method.md, "Log-probabilities"): the chunked path gives the plain formula's
values and gradients without a float32 copy of all the logits."""
import torch

from atlas_min.model import log_partition_and_entropy, reply_nll, token_logprobs


def _logits(dtype=torch.float32):
    """(3, 9, 50) logits of scale ~4; their first 8 positions are a non-contiguous view, as in sequence_logprobs."""
    g = torch.Generator().manual_seed(0)
    return (4 * torch.randn(3, 9, 50, generator=g)).to(dtype)[:, :-1], torch.randint(0, 50, (3, 8), generator=g)


def _by_hand(logits, ids, weights):
    """Float64: log p_o = x_o − log Σ_v e^{x_v}, and ∂(Σ w·log p)/∂x = w·(onehot(o) − softmax(x))."""
    x = logits.double()
    p = x.exp() / x.exp().sum(-1, keepdim=True)
    logp = x.gather(-1, ids[..., None])[..., 0] - x.exp().sum(-1).log()
    grad = weights.double()[..., None] * (torch.nn.functional.one_hot(ids, 50).double() - p)
    return logp, grad


def test_chunked_log_probs_equal_the_plain_ones_within_1e_6_and_their_gradients_the_formula_within_1e_5():
    logits, ids = _logits()
    weights = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    want_logp, want_grad = _by_hand(logits, ids, weights)
    plain = token_logprobs(logits, ids)
    torch.testing.assert_close(plain.double(), want_logp, atol=1e-6, rtol=1e-6)  # float32 rounding of values ~10
    for chunk in (3, 8, 100):  # 3 leaves a short last piece; 100 > the row's positions
        x = logits.detach().requires_grad_()
        logp = token_logprobs(x, ids, chunk)
        (logp * weights).sum().backward()
        torch.testing.assert_close(logp, plain, atol=1e-6, rtol=0)
        torch.testing.assert_close(x.grad.double(), want_grad, atol=1e-5, rtol=0)


def test_chunked_log_probs_of_bf16_logits_equal_the_plain_path_and_keep_a_bf16_gradient():
    logits, ids = _logits(torch.bfloat16)
    plain, chunked = logits.detach().requires_grad_(), logits.detach().requires_grad_()
    weights = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    a, b = token_logprobs(plain, ids), token_logprobs(chunked, ids, chunk=3)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    assert chunked.grad.dtype == torch.bfloat16
    torch.testing.assert_close(chunked.grad.float(), plain.grad.float(), atol=1e-5, rtol=0)


def test_reply_nll_chunked_equals_plain_with_ignored_labels():
    logits, ids = _logits()
    labels = torch.cat([torch.zeros(3, 1, dtype=torch.long), ids], 1)[:, :8]  # (3, 8): token t+1 at position t
    labels[:, :3] = -100  # a prompt
    torch.testing.assert_close(reply_nll(logits, labels, chunk=2), reply_nll(logits, labels), atol=1e-6, rtol=0)
    assert (reply_nll(logits, labels, chunk=2)[:, :2] == 0).all()


def test_sequence_logprobs_chunked_give_the_micro_models_gradients_of_the_plain_path(micro, toy_files):
    from atlas_min.data import collate_prompts, encode, load_jsonl
    from atlas_min.sampler import sequence_logprobs
    model, tokenizer, image_processor = micro
    batch = collate_prompts([encode(ex, tokenizer, image_processor, "sys") for ex in load_jsonl(toy_files[0])[:2]],
                            tokenizer.pad_token_id)
    # no special token (ids 0-6) and no functional one (the last five)
    completion = torch.randint(7, len(tokenizer) - 5, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 6, dtype=torch.bool)
    prompt_ids = batch["input_ids"].repeat_interleave(2, 0)
    prompt_mask = batch["attention_mask"].repeat_interleave(2, 0)
    grads, values = [], []
    for chunk in (0, 4):
        model.zero_grad()
        logp = sequence_logprobs(model, batch, prompt_ids, prompt_mask, completion, mask, repeats=2, chunk=chunk)
        logp.sum().backward()
        values.append(logp.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[1], values[0], atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=0, msg=name)


def test_entropy_is_minus_the_sum_of_p_log_p_and_stays_finite_where_p_underflows():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.0], [200.0, 0.0, -200.0, 0.0]])
    p = torch.softmax(logits.double(), -1)
    by_hand = -(p * p.clamp_min(1e-300).log()).sum(-1)  # the third row: p ≈ (1, e^-200, 0, e^-200)
    log_z, entropy = log_partition_and_entropy(logits, torch.empty_like(logits))
    torch.testing.assert_close(entropy.double(), by_hand, atol=1e-6, rtol=0)
    assert abs(entropy[1].item() - torch.log(torch.tensor(4.0)).item()) < 1e-6  # uniform: log 4
    torch.testing.assert_close(log_z.double(), torch.logsumexp(logits.double(), -1), atol=1e-5, rtol=0)


def test_entropy_stays_float32_under_bfloat16_autocast():
    # the sampler runs under autocast; a bf16 Σ p·x of logits near 30 is off by hundredths of a nat
    logits = 30 + torch.randn(4, 32_000, generator=torch.Generator().manual_seed(0))  # bf16 steps there: 0.125
    logits[:, 0] += 28.0  # one confident token: H is ~1e-4 nats
    p = torch.softmax(logits.double(), -1)
    by_hand = -(p * p.log()).sum(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, entropy = log_partition_and_entropy(logits, torch.empty_like(logits))
    torch.testing.assert_close(entropy.double(), by_hand, atol=1e-5, rtol=0)


def test_a_micro_batch_cut_to_its_own_longest_prompt_and_completion_gives_the_uncut_values_and_gradients(micro,
                                                                                                          toy_files):
    from atlas_min.data import collate_prompts, encode, load_jsonl
    from atlas_min.sampler import sequence_logprobs
    model, tokenizer, image_processor = micro
    examples = load_jsonl(toy_files[0])[:2]
    examples[1] = examples[1] | {"question": examples[1]["question"] + " Look closely at the picture." * 3}
    encoded = [encode(ex, tokenizer, image_processor, "sys") for ex in examples]
    wide = collate_prompts(encoded, tokenizer.pad_token_id)  # a rank's rollout: padded to its longest prompt
    pad = int((wide["attention_mask"][0] == 0).sum())
    assert pad >= 10  # prompt 0's rows carry 10+ columns of left padding that the cut drops
    G = 4
    prompt_ids = wide["input_ids"][:1].repeat_interleave(G, 0)  # the micro-batch: prompt 0's group
    prompt_mask = wide["attention_mask"][:1].repeat_interleave(G, 0)
    completion = torch.randint(7, len(tokenizer) - 5, (G, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(12) < torch.tensor([[3], [7], [2], [5]])  # (G, 12): its longest reply is 7 of 12
    images = collate_prompts(encoded[:1], tokenizer.pad_token_id)
    weights = torch.randn(G, 12, generator=torch.Generator().manual_seed(1)) * mask  # a loss on reply tokens only
    values, grads, widths = [], [], []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    for trim in (False, True):
        model.zero_grad()
        logp = sequence_logprobs(model, images, prompt_ids, prompt_mask, completion, mask, repeats=G, trim=trim)
        (logp * weights).sum().backward()
        values.append(logp.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    hook.remove()
    P = wide["input_ids"].shape[1]
    assert widths == [P + 12, P - pad + 7]  # the positions computed: uncut, then cut
    assert values[1].shape == (G, 12) and (values[1][:, 7:] == 0).all()  # cut off: 0, masked out of every sum
    torch.testing.assert_close(values[1][mask], values[0][mask], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=0, msg=name)


def test_rows_of_two_prompts_in_one_forward_give_what_each_prompts_own_forward_gives(micro, toy_files):
    # a micro-batch of rows sorted by length holds some rows of one prompt and some of another
    from atlas_min.data import collate_prompts, encode, load_jsonl
    from atlas_min.sampler import sequence_logprobs
    model, tokenizer, image_processor = micro
    examples = load_jsonl(toy_files[0])[:2]
    examples[1] = examples[1] | {"question": examples[1]["question"] + " Look closely." * 2}
    encoded = [encode(ex, tokenizer, image_processor, "sys") for ex in examples]
    wide = collate_prompts(encoded, tokenizer.pad_token_id)
    counts = [1, 3]  # prompt 0's row, then prompt 1's three
    prompt_ids = torch.cat([wide["input_ids"][p:p + 1].expand(n, -1) for p, n in enumerate(counts)])  # (4, P)
    prompt_mask = torch.cat([wide["attention_mask"][p:p + 1].expand(n, -1) for p, n in enumerate(counts)])
    completion = torch.randint(7, len(tokenizer) - 5, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(9) < torch.tensor([[9], [2], [6], [4]])
    weights = torch.randn(4, 9, generator=torch.Generator().manual_seed(1)) * mask

    def run(rows, batch, repeats):
        model.zero_grad()
        logp = sequence_logprobs(model, batch, prompt_ids[rows], prompt_mask[rows], completion[rows], mask[rows],
                                 repeats=repeats)
        (logp * weights[rows]).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    together, grads = run(slice(0, 4), wide, counts)
    alone = [run(slice(0, 1), collate_prompts(encoded[:1], tokenizer.pad_token_id), 1),
             run(slice(1, 4), collate_prompts(encoded[1:], tokenizer.pad_token_id), 3)]
    torch.testing.assert_close(together[:1][mask[:1]], alone[0][0][mask[:1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1:][mask[1:]], alone[1][0][mask[1:]], atol=1e-5, rtol=0)
    assert any(n.startswith("model.visual") for n in grads)  # the images' features carry gradients too
    for name in grads:  # one loss over both prompts' rows = the sum of each prompt's own
        torch.testing.assert_close(grads[name], alone[0][1][name] + alone[1][1][name], atol=1e-5, rtol=0, msg=name)
