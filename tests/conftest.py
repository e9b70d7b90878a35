"""Shared fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' spinning
    makes many small forward passes (AutoAttack's) an order of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    # The CLIs called in-process set threads themselves (auto reads OMP_NUM_THREADS).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)
