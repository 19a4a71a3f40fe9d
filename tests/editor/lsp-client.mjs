// A minimal Language Server Protocol client over stdio: just enough JSON-RPC
// framing (Content-Length headers) to drive a real language server the way an
// editor does. No dependencies beyond Node itself.

import { spawn } from 'node:child_process';

export const REQUEST_TIMEOUT_MS = 30_000;

export class LspClient {
  /**
   * @param {string} command executable (usually process.execPath)
   * @param {string[]} args
   * @param {object} opts
   * @param {string} opts.cwd
   * @param {(section: string|undefined) => unknown} opts.configuration answers
   *   `workspace/configuration` requests, one item at a time
   */
  constructor(command, args, { cwd, configuration }) {
    this.configuration = configuration;
    this.nextId = 1;
    this.pending = new Map(); // id -> { resolve, reject, timer, method }
    this.notificationWaiters = []; // { method, predicate, resolve, reject, timer }
    this.notifications = []; // every notification received, in order
    this.serverRequests = []; // methods of requests the server sent us
    this.stderr = '';
    this.exited = null; // { code, signal } once the process is gone
    this.buffer = Buffer.alloc(0);

    this.proc = spawn(command, args, { cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    this.proc.stdout.on('data', (chunk) => this.onData(chunk));
    this.proc.stderr.on('data', (chunk) => {
      // Keep only the tail: enough to explain a failure.
      this.stderr = (this.stderr + chunk.toString('utf8')).slice(-20_000);
    });
    this.proc.stdin.on('error', () => {}); // reported through 'exit' instead
    this.proc.on('error', (err) => this.failAll(new Error(`language server failed to start: ${err.message}`)));
    this.proc.on('exit', (code, signal) => {
      this.exited = { code, signal };
      this.failAll(new Error(`language server exited (code ${code}, signal ${signal})${this.stderrTail()}`));
    });
  }

  stderrTail() {
    const tail = this.stderr.trim();
    return tail ? `\n--- server stderr ---\n${tail.slice(-4000)}` : '';
  }

  failAll(err) {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    for (const w of this.notificationWaiters) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    this.notificationWaiters = [];
  }

  write(message) {
    if (this.exited) throw new Error('language server is not running');
    const body = Buffer.from(JSON.stringify({ jsonrpc: '2.0', ...message }), 'utf8');
    this.proc.stdin.write(`Content-Length: ${body.length}\r\n\r\n`);
    this.proc.stdin.write(body);
  }

  onData(chunk) {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    for (;;) {
      const headerEnd = this.buffer.indexOf('\r\n\r\n');
      if (headerEnd < 0) return;
      const header = this.buffer.subarray(0, headerEnd).toString('ascii');
      const match = /Content-Length: *(\d+)/i.exec(header);
      if (!match) {
        this.failAll(new Error(`malformed LSP header from server: ${JSON.stringify(header)}`));
        this.buffer = Buffer.alloc(0);
        return;
      }
      const length = Number(match[1]);
      const start = headerEnd + 4;
      if (this.buffer.length < start + length) return;
      const body = this.buffer.subarray(start, start + length).toString('utf8');
      this.buffer = this.buffer.subarray(start + length);
      this.dispatch(JSON.parse(body));
    }
  }

  dispatch(msg) {
    if (msg.id !== undefined && msg.method === undefined) {
      // A response to one of our requests.
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.error) {
        p.reject(new Error(`${p.method} failed: ${JSON.stringify(msg.error)}`));
      } else {
        p.resolve(msg.result);
      }
    } else if (msg.id !== undefined) {
      // A request from the server to us (the "editor").
      this.serverRequests.push(msg.method);
      let result = null;
      if (msg.method === 'workspace/configuration') {
        result = msg.params.items.map((item) => this.configuration(item.section));
      }
      this.write({ id: msg.id, result });
      this.emit({ method: `client-answered/${msg.method}`, params: msg.params });
    } else {
      this.emit(msg);
    }
  }

  emit(notification) {
    this.notifications.push(notification);
    this.notificationWaiters = this.notificationWaiters.filter((w) => {
      if (w.method !== notification.method || !w.predicate(notification.params)) return true;
      clearTimeout(w.timer);
      w.resolve(notification.params);
      return false;
    });
  }

  request(method, params, timeoutMs = REQUEST_TIMEOUT_MS) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (this.exited) {
        reject(new Error(`cannot send ${method}: language server exited${this.stderrTail()}`));
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${method} timed out after ${timeoutMs} ms${this.stderrTail()}`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, method });
      this.write({ id, method, params });
    });
  }

  notify(method, params) {
    this.write({ method, params });
  }

  /**
   * Resolves with the params of the first notification (received from now on)
   * with this method that satisfies the predicate.
   */
  waitForNotification(method, predicate = () => true, timeoutMs = REQUEST_TIMEOUT_MS, describe = method) {
    return new Promise((resolve, reject) => {
      if (this.exited) {
        reject(new Error(`language server exited before ${describe}${this.stderrTail()}`));
        return;
      }
      const waiter = { method, predicate, resolve, reject };
      waiter.timer = setTimeout(() => {
        this.notificationWaiters = this.notificationWaiters.filter((w) => w !== waiter);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${describe}${this.stderrTail()}`));
      }, timeoutMs);
      this.notificationWaiters.push(waiter);
    });
  }

  /** LSP shutdown + exit; kills the process if it does not go away by itself. */
  async shutdown() {
    if (this.exited) return this.exited;
    const gone = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
    try {
      await this.request('shutdown', null, 10_000);
      this.notify('exit', null);
      const timeout = new Promise((resolve) => setTimeout(() => resolve(null), 10_000).unref());
      const result = await Promise.race([gone, timeout]);
      if (result) return result;
      throw new Error('language server did not exit after shutdown/exit');
    } finally {
      this.kill();
    }
  }

  kill() {
    if (!this.exited) this.proc.kill('SIGKILL');
  }
}
