"""Oversubscription is detected from the load average and the cores this process may use."""

from __future__ import annotations

import torch

from secateurs.threads import available_cores, limited_threads, oversubscription


def test_an_idle_machine_gets_no_note():
    assert oversubscription(2, load=0.1, cores=2) is None


def test_a_busy_machine_gets_a_note_with_fewer_threads_to_try():
    note = oversubscription(2, load=1.6, cores=2)
    assert "load average 1.6 on 2 cores" in note and "--threads 1" in note


def test_one_thread_is_never_told_to_use_fewer():
    assert oversubscription(1, load=7.0, cores=2) is None


def test_more_threads_than_allowed_cores_is_named_whatever_the_load():
    note = oversubscription(8, load=0.0, cores=2)
    assert "only 2 core(s)" in note and "--threads 2" in note


def test_available_cores_is_positive_and_at_most_the_cpu_count():
    import os

    assert 0 < available_cores() <= (os.cpu_count() or 1)


def test_limited_threads_restores_the_previous_count():
    before = torch.get_num_threads()
    with limited_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
