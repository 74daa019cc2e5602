import os

import pytest
import torch

from l2pd import LLaDAConfig, LLaDAModelLM

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one torch thread per worker, or N workers fight for cores
    torch.set_num_threads(1)

MASK, EOS = 61, 60

# tests of the Triton kernels: on a GPU, or on the CPU under the interpreter (the README's test command sets it)
needs_kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                   reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (the README's test "
                                          "command sets it)")


# the block-32, confidence-only filter shipped with the bundled LLaDA model before its block-128 shared filter:
# tests that decode at block 32 with a real filter use it
FILTER32 = os.path.join(os.path.dirname(__file__), "data", "filter32")


def tiny_config(**kw) -> LLaDAConfig:
    base = dict(
        d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=96, vocab_size=64, embedding_size=64,
        max_sequence_length=256, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, rope_theta=10000.0,
    )
    base.update(kw)
    return LLaDAConfig(**base)


def tiny_model(seed: int | None = None, **kw) -> LLaDAModelLM:
    if seed is not None:
        torch.manual_seed(seed)
    model = LLaDAModelLM(tiny_config(**kw))
    with torch.no_grad():  # non-trivial norm weights so that the norm code path is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def model():
    return tiny_model()
