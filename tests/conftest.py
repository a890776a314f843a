import pytest

from bench.zoo import load_model
from bench.zoo.digits import load_classifier


@pytest.fixture(scope="session")
def digits_model():
    return load_model("digits")


@pytest.fixture(scope="session")
def classifier():
    return load_classifier()
