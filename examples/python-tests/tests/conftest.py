import pytest


@pytest.fixture
def paragraph() -> str:
    return "Don't panic. The answer is 42, and the question is still unknown."
