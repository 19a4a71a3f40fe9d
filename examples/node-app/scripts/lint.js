'use strict';

// A dependency-free lint: every source file is strict and has no trailing whitespace.
const fs = require('node:fs');
const path = require('node:path');

let problems = 0;
for (const dir of ['src', 'test', 'scripts']) {
  for (const name of fs.readdirSync(dir)) {
    if (!name.endsWith('.js')) continue;
    const file = path.join(dir, name);
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    if (lines[0] !== "'use strict';") {
      console.log(`${file}:1: missing 'use strict'`);
      problems++;
    }
    lines.forEach((line, i) => {
      if (/\s+$/.test(line)) {
        console.log(`${file}:${i + 1}: trailing whitespace`);
        problems++;
      }
    });
  }
}
console.log(problems === 0 ? 'lint: clean' : `lint: ${problems} problem(s)`);
process.exit(problems === 0 ? 0 : 1);
