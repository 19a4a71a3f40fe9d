import pytest

from shop import Line, apply_discount, total


def test_line_amount():
    assert Line("mug", 1250, 3).amount == 3750


@pytest.mark.parametrize(("price", "quantity"), [(-1, 1), (100, 0)])
def test_line_refuses_nonsense(price, quantity):
    with pytest.raises(ValueError):
        Line("bad", price, quantity)


@pytest.mark.parametrize(
    ("amount", "percent", "expected"),
    [(1000, 0, 1000), (1000, 10, 900), (999, 15, 849), (1, 50, 1), (1000, 100, 0)],
)
def test_apply_discount(amount, percent, expected):
    assert apply_discount(amount, percent) == expected


def test_apply_discount_refuses_out_of_range():
    with pytest.raises(ValueError, match="between 0 and 100"):
        apply_discount(1000, 120)


def test_total_adds_shipping_below_threshold(basket):
    assert total(basket) == 1250 * 2 + 899 + 495


def test_total_ships_free_from_threshold(basket):
    assert total(basket + [Line("teapot", 2000)]) == 5399


def test_discount_applies_before_shipping_threshold(basket):
    big = basket + [Line("teapot", 2000)]
    assert total(big, discount_percent=10) == apply_discount(5399, 10) + 495


def test_empty_order_costs_nothing():
    assert total([]) == 0
