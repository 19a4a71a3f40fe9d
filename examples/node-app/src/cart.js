'use strict';

// A cart holds line items in cents, so that sums are exact.
class Cart {
  constructor() {
    this.items = new Map();
  }

  add(sku, priceCents, quantity = 1) {
    if (!Number.isInteger(priceCents) || priceCents < 0) {
      throw new RangeError(`price of ${sku} must be a whole number of cents, got ${priceCents}`);
    }
    if (!Number.isInteger(quantity) || quantity < 1) {
      throw new RangeError(`quantity of ${sku} must be at least 1, got ${quantity}`);
    }
    const line = this.items.get(sku) || { priceCents, quantity: 0 };
    line.quantity += quantity;
    this.items.set(sku, line);
    return this;
  }

  totalCents() {
    let total = 0;
    for (const { priceCents, quantity } of this.items.values()) total += priceCents * quantity;
    return total;
  }
}

module.exports = { Cart };
