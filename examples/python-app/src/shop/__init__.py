"""Prices and discounts of a small shop: the sample service in cib's python-app example.

Amounts are in cents (integers), so that no float rounding ever reaches a customer's bill.
"""

from dataclasses import dataclass

__all__ = ["Line", "apply_discount", "total"]


@dataclass(frozen=True)
class Line:
    """One line of an order: `quantity` items at `unit_price` cents each."""

    sku: str
    unit_price: int
    quantity: int = 1

    def __post_init__(self) -> None:
        if self.unit_price < 0:
            raise ValueError(f"{self.sku}: negative price {self.unit_price}")
        if self.quantity < 1:
            raise ValueError(f"{self.sku}: quantity {self.quantity} is less than 1")

    @property
    def amount(self) -> int:
        return self.unit_price * self.quantity


def apply_discount(amount: int, percent: float) -> int:
    """`amount` cents less `percent` per cent, rounded half up to a whole cent."""
    if not 0 <= percent <= 100:
        raise ValueError(f"discount {percent}% is not between 0 and 100")
    discounted = amount * (100 - percent) / 100
    return int(discounted + 0.5)


def total(lines: list[Line], discount_percent: float = 0, free_shipping_from: int = 5000,
          shipping: int = 495) -> int:
    """What the customer pays, in cents: lines, then the discount, then shipping if due."""
    subtotal = apply_discount(sum(line.amount for line in lines), discount_percent)
    if lines and subtotal < free_shipping_from:
        subtotal += shipping
    return subtotal
