"""Programmatic dependent launch: which mode each kernel launch gets (``l2pd_kernels.device.pdl``), and which
forwards ask for early launches. The kernels' PDL instructions compile for sm_90 in test_kernels_compile.py; the
GPU tests (graphed against eager decodes) run with them."""

import threading

import pytest
import torch
from conftest import tiny_model
from test_llada2 import tiny_llada2

from l2pd.models import adapter_for
from l2pd_kernels import device


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(device, "_pdl_capable", lambda d: True)
    monkeypatch.setattr(device, "PDL", 2)
    monkeypatch.setattr(device, "EARLY", None)
    monkeypatch.setattr(device, "LATE", set())


def test_off_on_the_cpu_and_before_hopper():
    assert device.pdl(torch.device("cpu"), "skinny") == {"PDL": 0}


def test_wait_by_default_early_launch_where_asked(hopper, monkeypatch):
    dev = torch.device("cuda")
    assert device.pdl(dev, "skinny") == {"PDL": 1, "launch_pdl": True}
    with device.early_launch(True):
        assert device.pdl(dev, "skinny") == {"PDL": 2, "launch_pdl": True}
        with device.early_launch(False):
            assert device.pdl(dev, "skinny")["PDL"] == 1
        assert device.pdl(dev, "skinny")["PDL"] == 2
        seen = []  # another thread (an engine on another GPU) does not inherit it
        t = threading.Thread(target=lambda: seen.append(device.pdl(dev, "skinny")["PDL"]))
        t.start()
        t.join()
        assert seen == [1]
        monkeypatch.setattr(device, "LATE", {"skinny"})
        assert device.pdl(dev, "skinny")["PDL"] == 1 and device.pdl(dev, "rms_norm")["PDL"] == 2
    assert device.pdl(dev, "rms_norm")["PDL"] == 1


def test_settings_override(hopper, monkeypatch):
    dev = torch.device("cuda")
    monkeypatch.setattr(device, "EARLY", True)
    assert device.pdl(dev, "skinny")["PDL"] == 2
    monkeypatch.setattr(device, "EARLY", False)
    with device.early_launch(True):
        assert device.pdl(dev, "skinny")["PDL"] == 1
    monkeypatch.setattr(device, "PDL", 1)
    monkeypatch.setattr(device, "EARLY", True)
    assert device.pdl(dev, "skinny")["PDL"] == 1
    monkeypatch.setattr(device, "PDL", 0)
    assert device.pdl(dev, "skinny") == {"PDL": 0}


def test_which_forwards_ask_for_early_launches(monkeypatch):
    """Every forward (dense, mixture-of-experts, e4m3 weights) but a dense one with the products' TMA tiles off
    (the pointer path's lighter tiles, measured slower launched early)."""
    import l2pd
    import l2pd.models.decoder as decoder
    from l2pd_kernels import skinny

    asked = []
    real = decoder.early_launch

    def spy(on):
        asked.append(on)
        return real(on)

    monkeypatch.setattr(decoder, "early_launch", spy)
    ids = torch.randint(0, 50, (1, 6))
    dense, fp8 = tiny_model(0), tiny_model(0)
    l2pd.quantize(fp8, "fp8")
    with torch.no_grad():
        adapter_for(dense).forward(ids)
        adapter_for(tiny_llada2(0)).forward(ids)
        adapter_for(fp8).forward(ids)
        monkeypatch.setattr(skinny, "TMA", "0")
        adapter_for(dense).forward(ids)
        adapter_for(tiny_llada2(0)).forward(ids)
    assert asked == [True, True, True, False, True]
