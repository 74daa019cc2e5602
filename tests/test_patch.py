import pytest
import torch
from torch import nn

import l2pd
from l2pd.decode import generate
from tests.conftest import tiny_model


class ForeignLLaDA(nn.Module):
    """Stands for the official remote-code class: same module tree and config keys, other class, its own
    forward and generate (which l2pd must never call)."""

    def __init__(self, ours):
        super().__init__()
        self.config = type("RemoteConfig", (), dict(vars(ours.config)))()
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict()
        src = ours.model.transformer
        self.model.transformer["wte"] = src.wte
        self.model.transformer["blocks"] = nn.ModuleList()
        for blk in src.blocks:
            m = nn.Module()
            for name, child in blk.named_children():
                setattr(m, name, child)
            self.model.transformer["blocks"].append(m)
        self.model.transformer["ln_f"] = src.ln_f
        self.model.transformer["ff_out"] = src.ff_out

    def forward(self, *a, **k):
        raise AssertionError("l2pd called the foreign forward")

    def generate(self, *a, **k):
        return "own generate"


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_patch_foreign_class_and_unpatch(cache):
    ours = tiny_model(seed=4)
    foreign = ForeignLLaDA(ours)
    assert l2pd.patch(foreign) is foreign
    prompt = torch.randint(0, 58, (2, 5))
    kw = dict(max_new_tokens=8, block_length=4, strategy="threshold", cache=cache)
    assert torch.equal(foreign.generate(prompt, **kw), generate(ours, prompt, **kw))
    l2pd.unpatch(foreign)
    assert foreign.generate() == "own generate"


def test_patch_twice_then_unpatch_restores_original():
    m = ForeignLLaDA(tiny_model())
    l2pd.patch(m)
    l2pd.patch(m)
    l2pd.unpatch(m)
    assert m.generate() == "own generate"


def test_patch_rejects_non_llada():
    with pytest.raises(ValueError, match="config"):
        l2pd.patch(nn.Linear(2, 2))
    broken = ForeignLLaDA(tiny_model())
    del broken.model.transformer.blocks[0].q_proj
    with pytest.raises(ValueError, match="q_proj"):
        l2pd.patch(broken)
