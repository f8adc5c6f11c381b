// Adding verified NARs to the store: `nix-store --serve --write`, fed from its own thread. On the
// agent's main thread, the socket bringing the push in would starve the pipe to Nix (one pipe's
// worth per turn of the event loop), and Nix would get most of the closure only at the end.

import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { open } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import { SnapbackError } from '../shared/errors.ts';
import type { ManifestEntry } from '../shared/protocol.ts';

/**
 * The NARs of a push go into the store through one `nix-store --serve --write` (Nix's own protocol
 * for `nix copy --to ssh://`, here on a local pipe): each verified NAR is streamed into it with its
 * signed hash, size and references; Nix restores it into the store path, checks the hash once more,
 * registers it and answers. One process for the whole push (no start-up per path), no NAR in memory
 * (Nix 2.8's `nix-store --import` would hold a whole one), and its temporary roots hold every path
 * it added until the push's permanent roots are made.
 */
export class StoreWriter {
  private readonly child: ChildProcess;
  private out: Buffer[] = [];
  private outBytes = 0;
  private wanted: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private stderr = '';
  private gone: Error | undefined;
  private readonly buffers = [Buffer.allocUnsafe(READ_CHUNK), Buffer.allocUnsafe(READ_CHUNK)];

  constructor() {
    this.child = spawn('nix-store', ['--serve', '--write'], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stdin!.on('error', () => {});
    this.child.stdout!.on('data', (d: Buffer) => {
      this.out.push(d);
      this.outBytes += d.length;
      this.deliver();
    });
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => (this.stderr = (this.stderr + d).slice(-4096)));
    this.child.on('error', (err) => this.end(new SnapbackError('push-failed', `cannot run nix-store --serve: ${err.message}`)));
    this.child.on('close', (code, signal) => {
      const why = this.stderr.trim().split('\n').filter((l) => l && !l.startsWith('warning:')).slice(-3).join(' | ');
      this.end(new SnapbackError('push-failed', `nix-store --serve ${signal ? `was stopped (${signal})` : `exited ${code}`}${why ? `: ${why}` : ''}`));
    });
    // The greeting; the version only tells Nix which optional fields we understand (none needed).
    this.child.stdin!.write(Buffer.concat([u64(SERVE_MAGIC_1), u64(0x205)]));
  }

  /** Waits for Nix's greeting. */
  async open(): Promise<void> {
    const hello = await this.read(16);
    if (hello.readBigUInt64LE(0) !== BigInt(SERVE_MAGIC_2)) throw new SnapbackError('push-failed', 'nix-store --serve does not speak its protocol');
  }

  /** Streams the NAR of `entry` from `file` into the store; resolves once Nix registered it. */
  async add(entry: ManifestEntry, hexHash: string, file: string): Promise<void> {
    const header = Buffer.concat([
      u64(CMD_ADD_TO_STORE_NAR),
      str(entry.path),
      str(entry.deriver ?? ''),
      str(`sha256:${hexHash}`),
      u64(entry.references.length),
      ...entry.references.map(str),
      u64(0), // registration time: now
      u64(entry.narSize),
      u64(0), // not built here
      u64(0), // no signatures: the operator's signature covered the manifest
      str(''), // not content-addressed
    ]);
    await this.write(header);
    // Two buffers, each refilled once the pipe took it: no new memory per chunk for V8 to collect.
    const fh = await open(file, 'r');
    try {
      const writing: Promise<void>[] = [Promise.resolve(), Promise.resolve()];
      for (let i = 0; ; i ^= 1) {
        await writing[i];
        const { bytesRead } = await fh.read(this.buffers[i]!, 0, READ_CHUNK, null);
        if (bytesRead === 0) break;
        const w = this.write(this.buffers[i]!.subarray(0, bytesRead), true);
        w.catch(() => {}); // awaited in turn; a failure meanwhile must not count as unhandled
        writing[i] = w;
      }
      await Promise.all(writing);
    } finally {
      await fh.close();
    }
    const ok = await this.read(8);
    if (ok.readBigUInt64LE(0) !== 1n) throw new SnapbackError('push-failed', `nix-store --serve did not add ${entry.path}`);
  }

  /** Ends the protocol and waits for Nix to exit (its temporary roots go with it). */
  async close(): Promise<void> {
    if (this.gone) return;
    const closed = once(this.child, 'close');
    this.child.stdin!.end();
    await closed;
  }

  kill(): void {
    this.child.kill('SIGKILL');
  }

  /**
   * Resolves when Nix may be sent more; `flushed`: only once `b` itself was handed to the pipe.
   * Rejects when Nix is gone meanwhile (a pipe it no longer reads never drains).
   */
  private write(b: Buffer, flushed = false): Promise<void> {
    if (this.gone) return Promise.reject(this.gone);
    return new Promise((resolve, reject) => {
      const stdin = this.child.stdin!;
      const more = stdin.write(b, flushed ? (err) => (err ? reject(this.gone ?? err) : resolve()) : undefined);
      if (flushed || more) return flushed ? undefined : resolve();
      const done = (err?: Error) => {
        stdin.off('drain', done);
        this.ended.delete(done);
        if (err) reject(err);
        else resolve();
      };
      stdin.once('drain', done);
      this.ended.add(done);
    });
  }

  /** Writers waiting for the pipe to drain, told when Nix is gone. */
  private readonly ended = new Set<(err: Error) => void>();

  private read(n: number): Promise<Buffer> {
    if (this.gone) return Promise.reject(this.gone);
    return new Promise((resolve, reject) => {
      this.wanted = { n, resolve, reject };
      this.deliver();
    });
  }

  private deliver(): void {
    const w = this.wanted;
    if (!w || this.outBytes < w.n) return;
    const all = Buffer.concat(this.out, this.outBytes);
    this.out = [all.subarray(w.n)];
    this.outBytes -= w.n;
    this.wanted = undefined;
    w.resolve(all.subarray(0, w.n));
  }

  private end(err: Error): void {
    this.gone ??= err;
    this.wanted?.reject(this.gone);
    this.wanted = undefined;
    for (const waiter of [...this.ended]) waiter(this.gone);
  }
}

const READ_CHUNK = 512 * 1024;
const SERVE_MAGIC_1 = 0x390c9deb;
const SERVE_MAGIC_2 = 0x5452eecb;
const CMD_ADD_TO_STORE_NAR = 9;

/** A StoreWriter on a worker thread (agent/store-writer-worker.ts), with the same methods. */
export class StoreWriterThread {
  private readonly worker: Worker;
  private readonly waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private seq = 0;
  private gone: Error | undefined;

  constructor() {
    const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
    this.worker = new Worker(new URL(`./store-writer-worker${ext}`, import.meta.url));
    this.worker.on('message', (m: { id: number; ok: boolean; message?: string }) => {
      const w = this.waiting.get(m.id);
      this.waiting.delete(m.id);
      if (m.ok) w?.resolve();
      else w?.reject(new SnapbackError('push-failed', m.message ?? 'nix-store --serve failed'));
    });
    const end = (err: Error) => {
      this.gone ??= err;
      for (const w of this.waiting.values()) w.reject(this.gone);
      this.waiting.clear();
    };
    this.worker.on('error', (err) => end(new SnapbackError('push-failed', `the store writer failed: ${err.message}`)));
    this.worker.on('exit', () => end(new SnapbackError('push-failed', 'the store writer has ended')));
  }

  open(): Promise<void> {
    return this.call({ op: 'open' });
  }

  add(entry: ManifestEntry, hexHash: string, file: string): Promise<void> {
    return this.call({ op: 'add', entry, hexHash, file });
  }

  /** Ends Nix's protocol, waits for it to exit, and ends the thread. */
  async close(): Promise<void> {
    await this.call({ op: 'close' }).catch(() => {});
    await this.worker.terminate();
  }

  kill(): void {
    if (!this.gone) this.worker.postMessage({ op: 'kill' });
  }

  private call(m: Record<string, unknown>): Promise<void> {
    if (this.gone) return Promise.reject(this.gone);
    const id = ++this.seq;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker.postMessage({ ...m, id });
    });
  }
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
}

/** A string in Nix's serialisation: length, bytes, zero padding to 8. */
function str(s: string): Buffer {
  const data = Buffer.from(s);
  return Buffer.concat([u64(data.length), data, Buffer.alloc((8 - (data.length % 8)) % 8)]);
}
