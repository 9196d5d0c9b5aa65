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
