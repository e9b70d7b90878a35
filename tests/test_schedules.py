"""Eps schedules: exact ends, monotone ramps, stateless resume."""
import pytest
from hypothesis import given, strategies as st

from advvit.schedules import EpsSchedule, SHAPES, create_eps_schedule

EPS = 4 / 255


@pytest.mark.parametrize("shape", ["linear", "cosine", "sine"])
def test_warmup_is_exact_at_both_ends_and_monotone(shape):
    s = create_eps_schedule(shape, eps=EPS, warmup_steps=100, zero_steps=10)
    values = [s(i) for i in range(200)]
    assert values[:11] == [0.0] * 11
    assert all(v == EPS for v in values[110:])
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert 0 < values[60] < EPS


def test_linear_warmup_values():
    s = create_eps_schedule("linear", eps=1.0, warmup_steps=4)
    assert [s(i) for i in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_constant_and_zero_start():
    s = create_eps_schedule("constant", eps=EPS, warmup_steps=50, zero_steps=3)
    assert [s(i) for i in range(5)] == [0.0, 0.0, 0.0, EPS, EPS]


@given(step=st.integers(0, 10_000), shape=st.sampled_from(sorted(SHAPES)))
def test_stateless_so_resume_gives_the_same_eps(step, shape):
    a = create_eps_schedule(shape, eps=EPS, warmup_steps=1000, zero_steps=7)
    b = create_eps_schedule(shape, eps=EPS, warmup_steps=1000, zero_steps=7)
    assert a(step) == b(step) and 0.0 <= a(step) <= EPS


@pytest.mark.parametrize("kwargs, name", [(dict(shape="step"), "shape"), (dict(eps=-1.0), "eps"),
                                          (dict(warmup_steps=-1), "warmup_steps")])
def test_bad_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EpsSchedule(**{"eps": EPS, **kwargs})
