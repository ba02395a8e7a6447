"""The chunked LM-head path of token_logprobs equals the plain one, values and gradients."""

import pytest
import torch

from alignkit.models.tiny import tiny_causal_lm
from alignkit.ops.logprobs import chunked_head_logprobs, gather_logprobs, token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed=0, B=3, T=9, vocab=100):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize("temperature,first", [(1.0, 1), (0.7, 4)])
def test_chunked_token_logprobs_match_plain_values_and_gradients(temperature, first):
    model, _ = tiny_causal_lm(seed=1)
    ids, mask = _batch()
    plain = token_logprobs(model, ids, mask, temperature, first_index=first, logits_budget_bytes=1 << 40)
    (plain * torch.arange(plain.numel()).reshape(plain.shape).float()).sum().backward()
    grads_plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # a budget of 3 tokens' logits: many chunks, one of them partial
    vocab = model.get_output_embeddings().out_features
    chunked = token_logprobs(model, ids, mask, temperature, first_index=first, logits_budget_bytes=3 * 4 * vocab)
    (chunked * torch.arange(chunked.numel()).reshape(chunked.shape).float()).sum().backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    assert chunked.grad_fn is not None and plain[:, :first].abs().max() == 0 and chunked[:, :first].abs().max() == 0
    for name, p in model.named_parameters():  # tied embedding/head weight included
        scale = grads_plain[name].abs().max().item()
        torch.testing.assert_close(p.grad, grads_plain[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_chunked_entropy_matches_plain():
    model, _ = tiny_causal_lm(seed=2)
    ids, mask = _batch(seed=3)
    with torch.no_grad():
        lp1, ent1 = token_logprobs(model, ids, mask, 0.9, return_entropy=True, logits_budget_bytes=1 << 40)
        lp2, ent2 = token_logprobs(model, ids, mask, 0.9, return_entropy=True, logits_budget_bytes=1)
    torch.testing.assert_close(lp2, lp1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent2, ent1, rtol=1e-5, atol=1e-5)


def test_chunked_head_with_bias_and_frozen_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    upstream = torch.randn(2, 5)
    ref = gather_logprobs(head(hidden), labels, temperature=1.3)
    (ref * upstream).sum().backward()
    ref_grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    out = chunked_head_logprobs(hidden, head, labels, temperature=1.3, budget_bytes=4 * 11 * 3)  # 3 tokens / chunk
    (out * upstream).sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip((hidden.grad, head.weight.grad, head.bias.grad), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a frozen head (LoRA): only the hidden states get a gradient, and it is the same
    head.requires_grad_(False)
    hidden.grad = None
    (chunked_head_logprobs(hidden, head, labels, 1.3, budget_bytes=1) * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("budget", [1 << 40, 1])  # plain head, chunked head
def test_padding_free_matches_padded_values_gradients_and_entropy(side, budget):
    from alignkit.data.collate import pad_sequences
    from alignkit.ops.logprobs import sequence_logprobs

    model, _ = tiny_causal_lm(seed=4)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (4, 9, 6)]
    ids = pad_sequences(seqs, 0, side)  # [3, 9]
    mask = pad_sequences([[1] * len(s) for s in seqs], 0, side)
    response = pad_sequences([[0] * 2 + [1] * (len(s) - 2) for s in seqs], 0, side)
    results = []
    for padding_free in (False, True):
        model.zero_grad()
        lp, ent = token_logprobs(model, ids, mask, 0.8, return_entropy=True, logits_budget_bytes=budget,
                                 padding_free=padding_free)
        seq = sequence_logprobs(model, ids, mask, response, padding_free=padding_free)
        (seq * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
        predicted = mask * (mask.cumsum(-1) > 1)  # a row's first real token has no prediction in either path
        results.append((lp * predicted, ent * predicted, seq, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, ent0, seq0, g0), (lp1, ent1, seq1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq1, seq0, rtol=1e-5, atol=1e-5)
    for name in g0:
        scale = g0[name].abs().max().item()
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
