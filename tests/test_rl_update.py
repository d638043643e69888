"""One GRPO update on a real (micro) Qwen2.5-VL moves probability the way the advantages say."""
import torch

from atlas_min.data import collate_prompts, encode, load_jsonl
from atlas_min.grpo import group_advantages, grpo_loss
from atlas_min.sampler import sample, sequence_logprobs
from atlas_min.tokens import FUNCTIONAL_TOKENS, functional_mask


def _setup(micro, toy_files, G=6):
    model, tokenizer, image_processor = micro
    torch.manual_seed(0)
    with torch.no_grad():  # a random-init model repeats one token: make its samples differ
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    examples = load_jsonl(toy_files[0])[:2]
    batch = collate_prompts([encode(ex, tokenizer, image_processor, "sys") for ex in examples], tokenizer.pad_token_id)
    out = sample(model, batch, tokenizer, group_size=G, max_new_tokens=6, temperature=1.0, row_seeds=range(2 * G))
    return model, tokenizer, batch, out


def _seq_logp(model, batch, out, G, grad=False):
    with torch.set_grad_enabled(grad):
        logp = sequence_logprobs(model, batch, out["prompt_ids"], out["prompt_mask"], out["completion_ids"],
                                 out["completion_mask"], repeats=G)
    return logp, (logp * out["completion_mask"]).sum(1)


def test_a_small_update_raises_the_advantage_weighted_log_likelihood(micro, toy_files):
    """Σ_i A_i · mean_t Δlog π(o_i,t) > 0 after a small step: the surrogate's first-order promise."""
    G = 6
    model, tokenizer, batch, out = _setup(micro, toy_files, G)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 1])  # an arbitrary verdict per completion
    advantages = group_advantages(rewards, G)
    old, before = _seq_logp(model, batch, out, G)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    logp, _ = _seq_logp(model, batch, out, G, grad=True)
    fmask = functional_mask(out["completion_ids"], tokenizer.convert_tokens_to_ids(FUNCTIONAL_TOKENS))
    loss, stats = grpo_loss(logp, old, None, advantages, out["completion_mask"], fmask,
                            clip_eps=0.2, kl_coef=0.0, anchor_coef=0.0)
    assert abs(stats["ratio_mean"] - 1.0) < 1e-6  # π_θ = π_old before the first update
    loss.backward()
    optimizer.step()
    _, after = _seq_logp(model, batch, out, G)
    lengths = out["completion_mask"].sum(1)
    gain = (advantages * (after - before) / lengths).sum()
    assert gain > 0
    assert (after - before).abs().max() > 1e-4  # the step did move the policy


def test_a_group_of_equal_rewards_moves_nothing_anchor_included(micro, toy_files):
    """A = 0 for every output: GRPO's gradient vanishes, and the anchor's too (it is A-weighted)."""
    G = 6
    model, tokenizer, batch, out = _setup(micro, toy_files, G)
    old, _ = _seq_logp(model, batch, out, G)
    logp, _ = _seq_logp(model, batch, out, G, grad=True)
    fmask = torch.zeros_like(out["completion_mask"])
    fmask[:, 0] = out["completion_mask"][:, 0]  # pretend the first token of every output is functional
    loss, stats = grpo_loss(logp, old, None, torch.zeros(2 * G), out["completion_mask"], fmask,
                            clip_eps=0.2, kl_coef=0.0, anchor_coef=1.0)
    loss.backward()
    assert stats["anchor"] == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
