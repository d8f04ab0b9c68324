"""The CPU thread count follows the work's size and the cores free now; a setting wins."""

from __future__ import annotations

import pytest

from lora_lightning import threads


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_an_explicit_count_wins_then_the_environment(monkeypatch):
    assert threads.choose_threads(10**9, explicit=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.choose_threads(10**9) == 5
    assert threads.choose_threads(10**9, explicit=2) == 2
    with pytest.raises(ValueError, match="at least 1"):
        threads.choose_threads(10, explicit=0)


def test_a_small_model_gets_one_thread_whatever_is_free(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    monkeypatch.setattr(threads, "busy_cores", lambda window=0.2: 0.0)
    assert threads.choose_threads(threads.SMALL_MODEL - 1) == 1


@pytest.mark.parametrize(("cores", "busy", "expected"), [(2, 0.1, 2), (2, 1.2, 1), (2, 3.0, 1),
                                                         (16, 4.4, 12)])
def test_a_large_model_gets_the_cores_not_busy_elsewhere(monkeypatch, cores, busy, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda window=0.2: busy)
    assert threads.choose_threads(threads.SMALL_MODEL) == expected


def test_busy_cores_is_a_share_of_the_machine():
    import os

    busy = threads.busy_cores(window=0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1)
