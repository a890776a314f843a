import pytest
import torch

from bench.zoo import load_model
from bench.zoo.digits import load_classifier


@pytest.fixture(scope="session")
def digits_model():
    return load_model("digits")


@pytest.fixture(scope="session")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's duration: its many small ops run as fast, and do not stall
    (minutes instead of seconds) when another process shares a 2-core machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
