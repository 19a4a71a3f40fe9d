'use strict';

const test = require('node:test');
const assert = require('node:assert');
const { Cart } = require('../src/cart');

test('sums line items exactly', () => {
  const cart = new Cart().add('apple', 35, 3).add('pear', 120).add('apple', 35);
  assert.strictEqual(cart.totalCents(), 35 * 4 + 120);
});

test('refuses a negative price', () => {
  assert.throws(() => new Cart().add('apple', -1), /whole number of cents/);
});

// Deliberately slow, so that `cib run` shows a step in progress.
test('a slow checkout', async () => {
  for (let i = 1; i <= 3; i++) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    console.log(`checkout step ${i} of 3`);
  }
  assert.strictEqual(new Cart().add('plum', 99, 2).totalCents(), 198);
});
