import os
import pathlib

import pytest
import torch

DATA = pathlib.Path(__file__).parent / "data"

# Deterministic, quiet CPU runs; the suite is sized for 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_dir():
    return DATA


@pytest.fixture
def one_thread(monkeypatch):
    """One compute thread for in-process training runs: on 2 shared cores OpenMP oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(n)
