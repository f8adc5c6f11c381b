// A closure pushed by a controller into this host's store. Every NAR is written to a temporary file
// while its SHA-256 is taken, checked against the operator-signed manifest, and only then given to
// Nix; what a push added is held by GC roots until the deployment ends.

import { createHash, type Hash } from 'node:crypto';
import { closeSync, lstatSync, mkdirSync, openSync, readdirSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { open } from 'node:fs/promises';
import { execa } from 'execa';
import { SnapbackError } from '../shared/errors.ts';
import { COLLECT_EVERY, collectGarbage } from '../shared/memory.ts';
import type { ManifestEntry } from '../shared/protocol.ts';
import type { Logger } from './log.ts';

/** Bytes a controller may send ahead of an acknowledgement: what either side holds in memory. */
export const PUSH_WINDOW = 4 * 1024 * 1024;
/** Acknowledge at least this often (bytes written). */
export const PUSH_ACK_EVERY = 1024 * 1024;
/** Free space kept beyond the closure and its largest NAR in flight. */
const SPACE_MARGIN = 16 * 1024 * 1024;
const STORE = '/nix/store';

export interface PushPlaces {
  /** temporary NAR files: <stateDir>/push */
  tmpDir: string;
  /** where the roots of imported paths go: <stateDir>/gcroots */
  gcRootDir: string;
  /** `--option` flags naming the agent's caches, for `substitute` */
  trustOptions: string[];
  log: Logger;
}

/** Which of `paths` the store lacks. */
export async function invalidPaths(paths: string[]): Promise<string[]> {
  if (paths.length === 0) return [];
  const r = await execa('nix-store', ['--check-validity', '--print-invalid', '--', ...paths], { reject: false, stdin: 'ignore' });
  if (r.exitCode !== 0) throw new SnapbackError('push-failed', `nix-store --check-validity failed: ${String(r.stderr).trim().split('\n').pop()}`);
  return String(r.stdout).split('\n').filter(Boolean);
}

/** Removes the roots of pushed paths: at the end of a deployment, and stale ones at start. */
export function releasePushRoots(gcRootDir: string, olderThanMs = 0, id?: string): void {
  const now = Date.now();
  for (const name of readdirSync(gcRootDir)) {
    if (!name.startsWith(id ? `push-${id}-` : 'push-')) continue;
    const p = join(gcRootDir, name);
    if (olderThanMs && now - (lstatSync(p, { throwIfNoEntry: false })?.mtimeMs ?? 0) < olderThanMs) continue;
    rmSync(p, { force: true });
  }
}

/**
 * The NARs of a push go into the store through one `nix-store --serve --write` (Nix's own protocol
 * for `nix copy --to ssh://`, here on a local pipe): each verified NAR is streamed into it with its
 * signed hash, size and references; Nix restores it into the store path, checks the hash once more,
 * registers it and answers. One process for the whole push (no start-up per path), no NAR in memory
 * (Nix 2.8's `nix-store --import` would hold a whole one), and its temporary roots hold every path
 * it added until the push's permanent roots are made.
 */
class StoreWriter {
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

  /** Resolves when Nix may be sent more; `flushed`: only once `b` itself was handed to the pipe. */
  private write(b: Buffer, flushed = false): Promise<void> {
    if (this.gone) return Promise.reject(this.gone);
    return new Promise((resolve, reject) => {
      const stdin = this.child.stdin!;
      const more = stdin.write(b, flushed ? (err) => (err ? reject(this.gone ?? err) : resolve()) : undefined);
      if (flushed) return;
      if (more) resolve();
      else stdin.once('drain', resolve);
    });
  }

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
  }
}

const READ_CHUNK = 512 * 1024;
const SERVE_MAGIC_1 = 0x390c9deb;
const SERVE_MAGIC_2 = 0x5452eecb;
const CMD_ADD_TO_STORE_NAR = 9;

/**
 * A push: NARs arrive in manifest order (dependencies first); each is written to a temporary file
 * while it is hashed, and only one that matches its signed hash is handed to Nix, while the next
 * one arrives.
 */
export class Push {
  readonly id: string;
  /** the manifest's entries still to be received, in order */
  readonly need: ManifestEntry[];
  readonly total: number;
  private readonly places: PushPlaces;
  private readonly dir: string;
  private index = 0;
  private hash: Hash | undefined;
  private fd: number | undefined;
  private got = 0;
  /** bytes received over all paths */
  received = 0;
  /** paths verified (and so on their way into the store) */
  verified: string[] = [];
  /** paths Nix has added */
  imported: string[] = [];
  private importing: Promise<void> = Promise.resolve();
  private writer: StoreWriter | undefined;
  private failed: Error | undefined;
  private rooted = 0;

  private constructor(id: string, need: ManifestEntry[], places: PushPlaces) {
    this.id = id;
    this.need = need;
    this.total = need.reduce((n, e) => n + e.narSize, 0);
    this.places = places;
    this.dir = join(places.tmpDir, id);
  }

  /**
   * Checks the manifest against the store: substitutes from the host's caches first when asked,
   * then keeps what is still missing, and refuses (`no-space`) when it would not fit.
   */
  static async prepare(id: string, manifest: ManifestEntry[], substitute: boolean, remainingBytes: number, places: PushPlaces): Promise<Push> {
    // Nix starts while the store is asked what it lacks.
    const writer = new StoreWriter();
    try {
      let missing = new Set(await invalidPaths(manifest.map((e) => e.path)));
      if (substitute && missing.size) {
        // --keep-going: what no cache has is simply left for the push.
        await execa('nix-store', ['--realise', '--keep-going', ...places.trustOptions, '--', ...missing], { reject: false, stdin: 'ignore' });
        missing = new Set(await invalidPaths([...missing]));
      }
      const need = manifest.filter((e) => missing.has(e.path));
      const push = new Push(id, need, places);
      if (!need.length) {
        await writer.close();
        return push;
      }
      // What is still to come in this transfer (this batch and the later ones), the NARs waiting
      // for Nix beside it, and a margin: checked at every batch, as the free space may shrink.
      const coming = Math.max(remainingBytes - (manifest.reduce((n, e) => n + e.narSize, 0) - push.total), push.total);
      const largest = Math.max(...need.map((e) => e.narSize));
      const required = coming + Math.min(push.total, largest + PUSH_WINDOW) + SPACE_MARGIN;
      const free = Math.min(freeBytes(STORE), freeBytes(places.tmpDir.replace(/\/push$/, '')));
      if (free < required) {
        throw new SnapbackError(
          'no-space',
          `the closure needs ${mib(coming)} and ${mib(required - coming)} to spare, but the store's file system has ${mib(free)} free; nothing more was sent`,
        );
      }
      mkdirSync(push.dir, { recursive: true, mode: 0o700 });
      await writer.open();
      push.writer = writer;
      return push;
    } catch (err) {
      writer.kill();
      await writer.close();
      throw err;
    }
  }

  get complete(): boolean {
    return this.index >= this.need.length;
  }

  /**
   * Takes the next bytes of the NAR stream. Each path's bytes go to disk as they come; when a path is
   * complete its hash is compared with the manifest, and only a match is ever offered to Nix. Throws
   * `bad-nar` (the push must then be aborted) on a mismatch or on bytes beyond the manifest.
   */
  receive(chunk: Buffer): void {
    if (this.failed) throw this.failed;
    let off = 0;
    while (off < chunk.length) {
      const entry = this.need[this.index];
      if (!entry) throw new SnapbackError('bad-nar', `${chunk.length - off} bytes more than the manifest announced`);
      if (this.fd === undefined) {
        this.fd = openSync(this.narFile(this.index), 'w', 0o600);
        this.hash = createHash('sha256');
        this.got = 0;
      }
      const take = Math.min(chunk.length - off, entry.narSize - this.got);
      const part = chunk.subarray(off, off + take);
      writeSync(this.fd, part);
      this.hash!.update(part);
      this.got += take;
      if (Math.floor((this.received + take) / COLLECT_EVERY) > Math.floor(this.received / COLLECT_EVERY)) collectGarbage();
      this.received += take;
      off += take;
      if (this.got === entry.narSize) this.completePath(entry);
    }
  }

  private completePath(entry: ManifestEntry): void {
    closeSync(this.fd!);
    this.fd = undefined;
    const digest = this.hash!.digest();
    this.hash = undefined;
    const got = `sha256-${digest.toString('base64')}`;
    if (got !== entry.narHash) {
      throw new SnapbackError('bad-nar', `the NAR of ${entry.path} does not match its signed hash (${got} instead of ${entry.narHash}): the transfer is refused and nothing of it is imported`);
    }
    const file = this.narFile(this.index);
    this.verified.push(entry.path);
    this.index++;
    this.importing = this.importing.then(async () => {
      if (this.failed) return;
      try {
        await this.writer!.add(entry, digest.toString('hex'), file);
        this.imported.push(entry.path);
      } catch (err) {
        this.failed ??= err instanceof SnapbackError ? err : new SnapbackError('push-failed', (err as Error).message);
      } finally {
        rmSync(file, { force: true });
      }
    });
  }

  /**
   * Roots what Nix added, in one `nix-store --realise --add-root` of the paths nothing else in it
   * refers to (valid already, so nothing is fetched or built; a `.drv` would be built, so it is held
   * through the paths that refer to it), before the writer's temporary roots go.
   */
  private async root(): Promise<void> {
    const added = new Set(this.imported.slice(this.rooted));
    this.rooted = this.imported.length;
    const entries = this.need.filter((e) => added.has(e.path));
    const referenced = new Set(entries.flatMap((e) => e.references.filter((r) => r !== e.path)));
    const tops = entries.map((e) => e.path).filter((p) => !referenced.has(p) && !p.endsWith('.drv'));
    if (!tops.length) return;
    const r = await execa('nix-store', ['--realise', '--add-root', join(this.places.gcRootDir, `push-${this.id}-${this.rooted}`), '--', ...tops], { reject: false, stdin: 'ignore' });
    if (r.exitCode !== 0) throw new SnapbackError('push-failed', `nix-store --add-root failed: ${String(r.stderr).trim().split('\n').pop()}`);
  }

  /** All paths received: waits for Nix, then roots what it added. */
  async finish(): Promise<number> {
    await this.importing;
    if (this.failed) throw this.failed;
    if (this.writer) {
      await this.root();
      await this.writer.close();
    }
    this.cleanup();
    return this.imported.length;
  }

  /**
   * A connection lost half-way: what was verified is added and kept (a retry asks again what is
   * missing and sends only the rest); the path that was arriving is dropped.
   */
  async interrupt(): Promise<void> {
    this.closeFile();
    await this.importing;
    if (this.writer) {
      await this.root().catch((err: Error) => this.places.log.warn({ err: err.message }, 'could not root the paths of an interrupted push'));
      await this.writer.close();
    }
    this.cleanup();
  }

  /**
   * A bad NAR: nothing of this push stays in the store, nor of the `earlier` batches of its
   * `transfer`, whose roots go too.
   */
  async abort(earlier: string[] = [], transfer?: string): Promise<void> {
    this.failed ??= new SnapbackError('bad-nar', 'aborted');
    this.closeFile();
    this.writer?.kill();
    await this.importing;
    await this.writer?.close();
    const landed = await invalidPaths(this.verified)
      .then((invalid) => this.verified.filter((p) => !invalid.includes(p)))
      .catch(() => this.verified);
    releasePushRoots(this.places.gcRootDir, 0, transfer ?? this.id);
    const gone = [...earlier, ...landed];
    if (gone.length) {
      const r = await execa('nix-store', ['--delete', '--', ...gone.reverse()], { reject: false, stdin: 'ignore' });
      if (r.exitCode !== 0) this.places.log.warn({ err: String(r.stderr).trim() }, 'could not delete the paths of a refused push');
    }
    this.cleanup();
  }

  private closeFile(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
    this.hash = undefined;
  }

  private cleanup(): void {
    this.closeFile();
    rmSync(this.dir, { recursive: true, force: true });
  }

  private narFile(i: number): string {
    return join(this.dir, `${i}.nar`);
  }
}

function freeBytes(path: string): number {
  const s = statfsSync(path);
  return s.bavail * s.bsize;
}

function mib(n: number): string {
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
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
