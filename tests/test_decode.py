import pytest
import torch

import l2pd
from l2pd.decode import block_schedule, generate
from tests.conftest import EOS, MASK, tiny_model


def reference_llada_generate(model, prompt, gen_length, block_length, steps):
    """LLaDA's reference loop (low-confidence remasking, even schedule), written plainly for batch 1."""
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    P = prompt.shape[1]
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        n = (x[:, s:e] == MASK).sum().item()
        counts = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        for k in counts:
            logits = model(x).logits
            logits[..., MASK] = float("-inf")
            p = torch.softmax(logits.double(), -1)
            x0 = logits.argmax(-1)
            conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            conf[:, :s] = -1
            conf[:, e:] = -1
            conf = torch.where(x == MASK, conf, torch.full_like(conf, -1))
            idx = torch.topk(conf[0], k).indices
            x[0, idx] = x0[0, idx]
    return x


@pytest.mark.parametrize("steps", [16, 32])
def test_steps_matches_reference_loop(steps):
    model = tiny_model(seed=1)
    prompt = torch.randint(0, 58, (1, 6))
    ours = generate(model, prompt, max_new_tokens=16, block_length=8, strategy="steps", steps=steps)
    ref = reference_llada_generate(model, prompt, 16, 8, steps)
    assert torch.equal(ours, ref)


def test_greedy_is_deterministic(model):
    prompt = torch.randint(0, 58, (2, 5))
    a = generate(model, prompt, max_new_tokens=12, block_length=4, strategy="threshold", cache="dual")
    b = generate(model, prompt, max_new_tokens=12, block_length=4, strategy="threshold", cache="dual")
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["steps", "threshold"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_left_padded_batch_equals_rows_alone(strategy, cache):
    model = tiny_model(seed=2)
    lengths = [7, 3, 5]
    prompts = [torch.randint(0, 58, (n,)) for n in lengths]
    P = max(lengths)
    ids = torch.full((3, P), EOS)
    mask = torch.zeros(3, P, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, P - len(p) :] = p
        mask[r, P - len(p) :] = 1
    kw = dict(max_new_tokens=10, block_length=4, strategy=strategy, cache=cache, threshold=0.05)
    out = generate(model, ids, mask, return_dict_in_generate=True, **kw)
    for r, p in enumerate(prompts):
        alone = generate(model, p[None], return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences[r, P:], alone.sequences[0, len(p) :]), (r, strategy, cache)
        assert out.nfe[r] == alone.nfe[0]


def test_odd_length_gives_a_short_last_block(model):
    out = generate(model, torch.randint(0, 58, (1, 4)), max_new_tokens=11, block_length=4, strategy="steps",
                   return_dict_in_generate=True)
    assert out.sequences.shape == (1, 15)
    assert not (out.sequences == MASK).any()
    assert out.forwards == 11 and out.nfe.tolist() == [11]  # one token per step by default


def _scaled_head(model, scale):
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(scale)
    return model


def test_threshold_progress_and_fewer_forwards_when_confident():
    prompt = torch.randint(0, 58, (1, 5))
    flat = _scaled_head(tiny_model(seed=3), 0.0)  # uniform probabilities: the threshold never fires
    out = generate(flat, prompt, max_new_tokens=12, block_length=4, strategy="threshold",
                   return_dict_in_generate=True)
    assert out.forwards == 12  # exactly one token per step: never fewer
    assert not (out.sequences == MASK).any()
    sharp = _scaled_head(tiny_model(seed=3), 200.0)  # near one-hot probabilities
    steps = generate(sharp, prompt, max_new_tokens=12, block_length=4, strategy="steps",
                     return_dict_in_generate=True)
    thr = generate(sharp, prompt, max_new_tokens=12, block_length=4, strategy="threshold",
                   return_dict_in_generate=True)
    assert steps.forwards == 12
    assert thr.forwards < steps.forwards
    assert not (thr.sequences == MASK).any()


def test_sampling_is_reproducible_with_a_seed(model):
    prompt = torch.randint(0, 58, (1, 5))
    kw = dict(max_new_tokens=8, block_length=4, strategy="steps", temperature=1.0)
    a = generate(model, prompt, seed=7, **kw)
    b = generate(model, prompt, seed=7, **kw)
    c = generate(model, prompt, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_schedule():
    assert block_schedule(32, 32) == [1] * 32
    assert block_schedule(10, 4) == [3, 3, 2, 2]
    assert block_schedule(3, 8) == [1, 1, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=300), "max_sequence_length"),
        (dict(block_length=0), "block_length"),
        (dict(strategy="greedy"), "strategy"),
        (dict(cache="full"), "cache"),
        (dict(eotp="sometimes"), "eotp"),
        (dict(pad_token_id=MASK), "pad_token_id"),
        (dict(strategy="learn2pd"), "filter"),
        (dict(temperature=-1.0), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_input_raises(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, torch.randint(0, 58, (1, 5)), **kwargs)


def test_prompt_with_mask_and_right_padding_raise(model):
    with pytest.raises(ValueError, match="mask token"):
        generate(model, torch.tensor([[1, 2, MASK]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.tensor([[1, 2, EOS]]), torch.tensor([[1, 1, 0]]), max_new_tokens=4)


def test_patch_generate_is_the_decoder(model):
    l2pd.patch(model)
    prompt = torch.randint(0, 58, (1, 5))
    assert torch.equal(model.generate(prompt, max_new_tokens=8, block_length=4, strategy="steps"),
                       generate(model, prompt, max_new_tokens=8, block_length=4, strategy="steps"))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(model, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA device or TRITON_INTERPRET"):
        generate(model, torch.randint(0, 58, (1, 5)), max_new_tokens=4, block_length=4, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        generate(model, torch.randint(0, 58, (1, 5)), max_new_tokens=4, block_length=4, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.parametrize("strategy", ["steps", "threshold"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_cuda_graph_decision_matches_eager(monkeypatch, strategy, cache):
    """At small batch the decision replays a CUDA graph; tokens and NFE equal launching the kernels."""
    model = tiny_model(seed=3).cuda()
    ids = torch.randint(0, 50, (2, 9), device="cuda")
    kw = dict(max_new_tokens=40, block_length=8, strategy=strategy, cache=cache, eotp=True,
              return_dict_in_generate=True)
    graphed = generate(model, ids, **kw)
    monkeypatch.setenv("L2PD_CUDA_GRAPH", "0")
    eager = generate(model, ids, **kw)
    assert torch.equal(graphed.sequences, eager.sequences) and torch.equal(graphed.nfe, eager.nfe)
