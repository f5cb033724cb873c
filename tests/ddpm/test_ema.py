"""EMA with warm-up: closed-form values after a few updates, state round trip."""

from __future__ import annotations

import torch
from torch import nn

from ddpm.ema import EMA


def _model(value: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    m.register_buffer("counter", torch.zeros(()))
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def _set(m: nn.Module, value: float) -> None:
    with torch.no_grad():
        m.weight.fill_(value)


def test_warmup_decay_closed_form():
    model = _model(0.0)
    ema = EMA(model, decay=0.9999, warmup=True)
    # d_n = (1 + n) / (10 + n): 0.1, 2/11, 3/12. Params 1, 2, 3 after each step.
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0]):
        _set(model, value)
        model.counter += 1
        ema.update(model)
        d = (1 + n) / (10 + n)
        expected = d * expected + (1 - d) * value
        assert abs(ema.module.weight.item() - expected) < 1e-6
    # 0.9, then 2/11*0.9 + 9/11*2 = 19.8/11 = 1.8, then 0.25*1.8 + 0.75*3 = 2.7
    assert abs(ema.module.weight.item() - 2.7) < 1e-6
    assert ema.num_updates == 3
    assert ema.module.counter.item() == 3  # buffers are copied, not averaged


def test_decay_caps_warmup_and_no_warmup_is_constant():
    ema = EMA(_model(0.0), decay=0.5, warmup=True)
    assert [ema.decay_at(n) for n in (0, 8, 10, 1000)] == [0.1, 0.5, 0.5, 0.5]
    model = _model(0.0)
    plain = EMA(model, decay=0.5, warmup=False)
    for _ in range(2):
        _set(model, 4.0)
        plain.update(model)
    assert abs(plain.module.weight.item() - 3.0) < 1e-6  # 0 -> 2 -> 3


def test_averaged_module_is_separate_and_frozen():
    model = _model(1.0)
    ema = EMA(model)
    _set(model, 5.0)
    assert ema.module.weight.item() == 1.0
    assert not ema.module.weight.requires_grad


def test_state_dict_round_trip_continues_the_schedule():
    model = _model(0.0)
    ema = EMA(model, decay=0.9999)
    for v in (1.0, 2.0):
        _set(model, v)
        ema.update(model)
    state = ema.state_dict()
    restored = EMA(_model(7.0), decay=0.9999)
    restored.load_state_dict(state)
    assert restored.num_updates == 2
    assert abs(restored.module.weight.item() - 1.8) < 1e-6
    _set(model, 3.0)
    restored.update(model)
    assert abs(restored.module.weight.item() - 2.7) < 1e-6
