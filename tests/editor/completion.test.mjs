// Proves that an editor using the real yaml-language-server gets completion,
// hover and validation for .cib.yml files from docs/cib.schema.json, picked up
// only through the `# yaml-language-server: $schema=...` modeline.
//
// The server is driven over stdio exactly as an editor would: initialize,
// configuration, didOpen, completion/hover requests, publishDiagnostics.
// Nothing is mocked, and no network is used (schemaStore is disabled).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

import { LspClient } from './lsp-client.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const repoRoot = resolve(here, '..', '..');
const schemaPath = join(repoRoot, 'docs', 'cib.schema.json');
const schema = JSON.parse(readFileSync(schemaPath, 'utf8'));
const schemaUri = pathToFileURL(schemaPath).href;
const serverBin = join(here, 'node_modules', 'yaml-language-server', 'bin', 'yaml-language-server');

// The document under test is a real file in the repository, so the modeline's
// relative path resolves exactly as it does for the committed example. The
// server never reads it from disk: its text is whatever we send in didOpen.
const docPath = join(repoRoot, 'examples', 'shell', '.cib.yml');
const docUri = pathToFileURL(docPath).href;
const MODELINE = '# yaml-language-server: $schema=../../docs/cib.schema.json';

// Editor settings: the schema can only come from the modeline.
const yamlSettings = {
  validate: true,
  completion: true,
  hover: true,
  schemas: {},
  schemaStore: { enable: false },
};

const CURSOR = '‸';

/** Removes the cursor marker from `text` and returns the text and LSP position. */
function withCursor(textWithCursor) {
  const offset = textWithCursor.indexOf(CURSOR);
  assert.notEqual(offset, -1, 'test document has no cursor marker');
  const before = textWithCursor.slice(0, offset);
  const lines = before.split('\n');
  return {
    text: before + textWithCursor.slice(offset + CURSOR.length),
    position: { line: lines.length - 1, character: lines.at(-1).length },
  };
}

function lineOf(text, needle) {
  const line = text.split('\n').findIndex((l) => l.includes(needle));
  assert.notEqual(line, -1, `test document has no line containing ${needle}`);
  return line;
}

/** Markdown hover text with escapes removed, for comparing with schema descriptions. */
function hoverText(hover) {
  assert.ok(hover && hover.contents, `expected a hover, got ${JSON.stringify(hover)}`);
  const c = hover.contents;
  const raw = typeof c === 'string' ? c : Array.isArray(c) ? c.map((x) => x.value ?? x).join('\n') : c.value;
  return raw.replace(/\\(.)/g, '$1');
}

test('yaml-language-server uses docs/cib.schema.json for .cib.yml', { timeout: 180_000 }, async (t) => {
  assert.ok(existsSync(serverBin), `yaml-language-server is not installed at ${serverBin}; run \`npm ci\` in tests/editor`);

  const client = new LspClient(process.execPath, [serverBin, '--stdio'], {
    cwd: repoRoot,
    configuration: (section) => (section === 'yaml' ? yamlSettings : {}),
  });
  let version = 0;

  async function open(text, uri = docUri) {
    client.notify('textDocument/didOpen', {
      textDocument: { uri, languageId: 'yaml', version: ++version, text },
    });
  }

  // Waits for the server to clear the document's diagnostics, which it does
  // on close; afterwards no stale publishDiagnostics for it can arrive.
  async function close(uri = docUri) {
    const cleared = client.waitForNotification(
      'textDocument/publishDiagnostics',
      (p) => p.uri === uri && p.diagnostics.length === 0,
      undefined,
      `diagnostics of ${uri} to be cleared on close`,
    );
    client.notify('textDocument/didClose', { textDocument: { uri } });
    await cleared;
  }

  async function completionLabels(textWithCursor) {
    const { text, position } = withCursor(textWithCursor);
    await open(text);
    try {
      const result = await client.request('textDocument/completion', {
        textDocument: { uri: docUri },
        position,
      });
      const items = Array.isArray(result) ? result : (result?.items ?? []);
      return items.map((i) => i.label);
    } finally {
      await close();
    }
  }

  try {
    const init = await client.request('initialize', {
      processId: process.pid,
      clientInfo: { name: 'cib-editor-test' },
      rootUri: pathToFileURL(repoRoot).href,
      workspaceFolders: [{ uri: pathToFileURL(repoRoot).href, name: 'cib' }],
      capabilities: {
        workspace: { configuration: true, didChangeConfiguration: { dynamicRegistration: false } },
        textDocument: {
          synchronization: { didSave: false },
          completion: {
            completionItem: { snippetSupport: true, documentationFormat: ['markdown', 'plaintext'] },
          },
          hover: { contentFormat: ['markdown', 'plaintext'] },
          publishDiagnostics: { relatedInformation: false },
        },
      },
    });
    assert.equal(init.serverInfo?.name, 'yaml-language-server');
    assert.ok(init.capabilities.completionProvider, 'server does not offer completion');
    assert.ok(init.capabilities.hoverProvider, 'server does not offer hover');
    client.notify('initialized', {});

    // This server version answers didChangeConfiguration by pulling the
    // settings back with workspace/configuration; wait until it has them.
    const configured = client.waitForNotification(
      'client-answered/workspace/configuration',
      (p) => p.items.some((i) => i.section === 'yaml'),
      undefined,
      'the server to pull the yaml settings',
    );
    client.notify('workspace/didChangeConfiguration', { settings: { yaml: yamlSettings } });
    await configured;

    await t.test('step keys are completed at a new key in a step', async () => {
      const labels = await completionLabels(
        [
          MODELINE,
          'version: 1',
          'pipelines:',
          '  test:',
          '    steps:',
          '      - name: check',
          `        ${CURSOR}`,
          '      - name: second',
          '        image: busybox',
          '',
        ].join('\n'),
      );
      for (const key of ['image', 'commands', 'depends_on', 'timeout', 'network', 'retry', 'gate', 'allow_failure']) {
        assert.ok(labels.includes(key), `step key ${key} missing from completion: ${labels.join(', ')}`);
      }
      // Exactly the step's keys (as generated into the schema), minus the
      // `name` already present: nothing from the root or pipeline objects.
      const expected = Object.keys(schema.definitions.Step.properties).filter((k) => k !== 'name');
      assert.deepEqual([...labels].sort(), [...expected].sort());
      for (const foreign of ['pipelines', 'version', 'steps', 'on', 'name']) {
        assert.ok(!labels.includes(foreign), `${foreign} should not be offered in a step: ${labels.join(', ')}`);
      }
    });

    await t.test('network values are completed from the enum', async () => {
      const labels = await completionLabels(
        [
          MODELINE,
          'pipelines:',
          '  test:',
          '    steps:',
          '      - name: check',
          '        image: busybox',
          `        network: ${CURSOR}`,
          '',
        ].join('\n'),
      );
      assert.ok(labels.includes('bridge'), `bridge missing: ${labels.join(', ')}`);
      assert.ok(labels.includes('none'), `none missing: ${labels.join(', ')}`);
      for (const v of schema.definitions.Network.oneOf.map((s) => s.const)) {
        assert.ok(labels.includes(v), `schema value ${v} missing: ${labels.join(', ')}`);
      }
      for (const foreign of ['approval', 'hold', 'image', 'commands']) {
        assert.ok(!labels.includes(foreign), `${foreign} should not be offered for network: ${labels.join(', ')}`);
      }
    });

    await t.test('gate kind values are completed', async () => {
      const labels = await completionLabels(
        [
          MODELINE,
          'pipelines:',
          '  test:',
          '    steps:',
          '      - name: sign-off',
          '        gate:',
          `          kind: ${CURSOR}`,
          '',
        ].join('\n'),
      );
      assert.ok(labels.includes('approval'), `approval missing: ${labels.join(', ')}`);
      assert.ok(labels.includes('hold'), `hold missing: ${labels.join(', ')}`);
      for (const foreign of ['bridge', 'none']) {
        assert.ok(!labels.includes(foreign), `${foreign} should not be offered for gate kind: ${labels.join(', ')}`);
      }
    });

    await t.test('hover shows the schema description of a step key', async () => {
      const text = [
        MODELINE,
        'pipelines:',
        '  test:',
        '    steps:',
        '      - name: check',
        '        image: busybox',
        '',
      ].join('\n');
      // A key whose value is a plain string: for keys whose value matches a
      // subschema (network: none, timeout: 5m) the server shows that
      // subschema's description instead of the property's.
      await open(text);
      try {
        const hover = await client.request('textDocument/hover', {
          textDocument: { uri: docUri },
          position: { line: lineOf(text, 'image:'), character: 10 },
        });
        const shown = hoverText(hover);
        assert.ok(
          shown.includes(schema.definitions.Step.properties.image.description),
          `hover lacks the image description: ${JSON.stringify(shown)}`,
        );
        assert.ok(shown.includes(schemaUri), `hover does not name ${schemaUri} as its source: ${JSON.stringify(shown)}`);
      } finally {
        await close();
      }
    });

    await t.test('an unknown step key is reported at its line', async () => {
      const text = [
        MODELINE,
        'version: 1',
        'pipelines:',
        '  test:',
        '    steps:',
        '      - name: check',
        '        image: busybox',
        '        comands: [ls]',
        '',
      ].join('\n');
      const published = client.waitForNotification(
        'textDocument/publishDiagnostics',
        (p) => p.uri === docUri,
        undefined,
        'diagnostics for the document with comands:',
      );
      await open(text);
      try {
        const { diagnostics } = await published;
        const line = lineOf(text, 'comands:');
        const hit = diagnostics.find((d) => /comands/.test(d.message) && /not allowed/i.test(d.message));
        assert.ok(hit, `no "comands not allowed" diagnostic in ${JSON.stringify(diagnostics, null, 2)}`);
        assert.equal(hit.range.start.line, line);
        assert.equal(hit.range.start.character, 8);
        assert.equal(hit.severity, 1, 'expected an error');
        // The typo is the only problem in this document.
        assert.equal(diagnostics.length, 1, JSON.stringify(diagnostics, null, 2));
      } finally {
        await close();
      }
    });

    await t.test('without the modeline there is no cib completion', async () => {
      // Control: proves the completions above come from the modeline's schema.
      const labels = await completionLabels(
        ['version: 1', 'pipelines:', '  test:', '    steps:', '      - name: check', `        ${CURSOR}`, ''].join('\n'),
      );
      for (const key of ['image', 'commands', 'depends_on']) {
        assert.ok(!labels.includes(key), `${key} offered without a schema: ${labels.join(', ')}`);
      }
    });

    await t.test('committed examples load the schema from their modeline and validate cleanly', async () => {
      const examples = readdirSync(join(repoRoot, 'examples'), { withFileTypes: true })
        .filter((e) => e.isDirectory() && existsSync(join(repoRoot, 'examples', e.name, '.cib.yml')))
        .map((e) => join(repoRoot, 'examples', e.name, '.cib.yml'));
      assert.ok(examples.length > 0, 'no examples/*/.cib.yml found');
      for (const file of examples) {
        const uri = pathToFileURL(file).href;
        const text = readFileSync(file, 'utf8');
        assert.equal(text.split('\n')[0], MODELINE, `${file} does not start with the modeline`);
        const published = client.waitForNotification(
          'textDocument/publishDiagnostics',
          (p) => p.uri === uri,
          undefined,
          `diagnostics for ${file}`,
        );
        await open(text, uri);
        try {
          // Hover on `pipelines` proves the schema was found via the
          // committed relative modeline (the source is our schema file).
          const hover = await client.request('textDocument/hover', {
            textDocument: { uri },
            position: { line: lineOf(text, 'pipelines:'), character: 2 },
          });
          const shown = hoverText(hover);
          assert.ok(shown.includes(schemaUri), `${file}: hover not sourced from ${schemaUri}: ${JSON.stringify(shown)}`);
          const { diagnostics } = await published;
          assert.deepEqual(
            diagnostics.map((d) => `${d.range.start.line + 1}:${d.range.start.character + 1} ${d.message}`),
            [],
            `${file} has diagnostics`,
          );
        } finally {
          await close(uri);
        }
      }
    });

    const exit = await client.shutdown();
    assert.deepEqual(exit, { code: 0, signal: null }, 'server did not exit cleanly after shutdown/exit');
  } finally {
    client.kill();
  }
});
