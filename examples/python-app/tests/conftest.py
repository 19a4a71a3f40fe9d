import pytest

from shop import Line


@pytest.fixture
def basket() -> list[Line]:
    return [Line("mug", 1250, 2), Line("tea", 899)]
