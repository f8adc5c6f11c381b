// A closure pushed by a controller into this host's store. Every NAR is written to a temporary file
// while its SHA-256 is taken, checked against the operator-signed manifest, and only then given to
// `nix-store --import`; what a push imported is held by GC roots until the deployment ends.

import { createHash, type Hash } from 'node:crypto';
import { closeSync, createReadStream, lstatSync, mkdirSync, openSync, readdirSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { once } from 'node:events';
import { execa, type ResultPromise } from 'execa';
import { SnapbackError } from '../shared/errors.ts';
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
export function releasePushRoots(gcRootDir: string, olderThanMs = 0): void {
  const now = Date.now();
  for (const name of readdirSync(gcRootDir)) {
    if (!name.startsWith('push-')) continue;
    const p = join(gcRootDir, name);
    if (olderThanMs && now - (lstatSync(p, { throwIfNoEntry: false })?.mtimeMs ?? 0) < olderThanMs) continue;
    rmSync(p, { force: true });
  }
}

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
  /** paths verified and handed to the import */
  verified: string[] = [];
  private importer: ResultPromise | undefined;
  private feeding: Promise<void> = Promise.resolve();
  private failed: Error | undefined;

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
  static async prepare(id: string, manifest: ManifestEntry[], substitute: boolean, places: PushPlaces): Promise<Push> {
    let missing = new Set(await invalidPaths(manifest.map((e) => e.path)));
    if (substitute && missing.size) {
      // --keep-going: what no cache has is simply left for the push.
      await execa('nix-store', ['--realise', '--keep-going', ...places.trustOptions, '--', ...missing], { reject: false, stdin: 'ignore' });
      missing = new Set(await invalidPaths([...missing]));
    }
    const need = manifest.filter((e) => missing.has(e.path));
    const push = new Push(id, need, places);
    if (need.length) {
      const largest = Math.max(...need.map((e) => e.narSize));
      const required = push.total + largest + SPACE_MARGIN;
      const free = freeBytes(STORE);
      if (free < required) {
        throw new SnapbackError(
          'no-space',
          `the closure needs ${mib(push.total)} (${need.length} paths) and ${mib(largest + SPACE_MARGIN)} to spare, but the store's file system has ${mib(free)} free; nothing was sent`,
        );
      }
      mkdirSync(push.dir, { recursive: true, mode: 0o700 });
    }
    return push;
  }

  get complete(): boolean {
    return this.index >= this.need.length;
  }

  /**
   * Takes the next bytes of the NAR stream. Each path's bytes go to disk as they come; when a path is
   * complete its hash is compared with the manifest, and only a match is imported. Throws `bad-nar`
   * (the push must then be aborted) on a mismatch or on bytes beyond the manifest.
   */
  receive(chunk: Buffer): void {
    if (this.failed) throw this.failed;
    let off = 0;
    while (off < chunk.length) {
      const entry = this.need[this.index];
      if (!entry) throw new SnapbackError('bad-nar', `${chunk.length - off} bytes more than the manifest announced`);
      if (this.fd === undefined) {
        this.fd = openSync(this.file(this.index), 'w', 0o600);
        this.hash = createHash('sha256');
        this.got = 0;
      }
      const take = Math.min(chunk.length - off, entry.narSize - this.got);
      const part = chunk.subarray(off, off + take);
      writeSync(this.fd, part);
      this.hash!.update(part);
      this.got += take;
      this.received += take;
      off += take;
      if (this.got === entry.narSize) this.completePath(entry);
    }
  }

  private completePath(entry: ManifestEntry): void {
    closeSync(this.fd!);
    this.fd = undefined;
    const got = `sha256-${this.hash!.digest('base64')}`;
    if (got !== entry.narHash) {
      throw new SnapbackError('bad-nar', `the NAR of ${entry.path} does not match its signed hash (${got} instead of ${entry.narHash}): the transfer is refused and nothing of it is imported`);
    }
    const file = this.file(this.index);
    this.index++;
    this.verified.push(entry.path);
    this.feeding = this.feeding.then(() => this.feed(entry, file)).catch((err: Error) => {
      this.failed ??= new SnapbackError('push-failed', `importing ${entry.path} failed: ${err.message}`);
    });
  }

  /** One path in `nix-store --export` framing into the importer, then its file is gone. */
  private async feed(entry: ManifestEntry, file: string): Promise<void> {
    if (this.failed) return;
    const importer = (this.importer ??= this.startImporter());
    const stdin = importer.stdin!;
    await write(stdin, u64(1));
    const nar = createReadStream(file);
    for await (const chunk of nar) await write(stdin, chunk as Buffer);
    await write(stdin, Buffer.concat([u64(0x4558494e), str(entry.path), u64(entry.references.length), ...entry.references.map(str), str(entry.deriver ?? ''), u64(0)]));
    rmSync(file, { force: true });
  }

  private startImporter(): ResultPromise {
    const child = execa('nix-store', ['--import'], { reject: false, stdin: 'pipe', stdout: 'ignore', stderr: 'pipe' });
    child.stdin!.on('error', () => {});
    return child;
  }

  /** All paths received: ends the import, roots what it imported. */
  async finish(): Promise<number> {
    await this.feeding;
    if (this.failed) throw this.failed;
    const imported = await this.closeImport();
    await this.root(this.verified);
    this.cleanup();
    return imported;
  }

  /**
   * A connection lost half-way: what was verified is imported and kept (a retry asks again what is
   * missing and sends only the rest); the path that was arriving is dropped.
   */
  async interrupt(): Promise<void> {
    this.closeFile();
    await this.feeding;
    if (!this.failed) await this.closeImport().catch(() => 0);
    await this.root(this.verified).catch(() => undefined);
    this.cleanup();
  }

  /** A bad NAR: nothing of this push stays in the store. */
  async abort(): Promise<void> {
    this.closeFile();
    this.failed ??= new SnapbackError('bad-nar', 'aborted');
    this.importer?.kill('SIGKILL');
    await this.importer?.catch(() => undefined);
    await this.feeding;
    const imported = await invalidPaths(this.verified)
      .then((invalid) => this.verified.filter((p) => !invalid.includes(p)))
      .catch(() => this.verified);
    if (imported.length) {
      const r = await execa('nix-store', ['--delete', '--', ...imported.reverse()], { reject: false, stdin: 'ignore' });
      if (r.exitCode !== 0) this.places.log.warn({ err: String(r.stderr).trim() }, 'could not delete the paths of a refused push');
    }
    this.cleanup();
  }

  private async closeImport(): Promise<number> {
    const importer = this.importer;
    if (!importer) return 0;
    await write(importer.stdin!, u64(0));
    importer.stdin!.end();
    const r = await importer;
    if (r.exitCode !== 0) throw new SnapbackError('push-failed', `nix-store --import failed: ${String(r.stderr).trim().split('\n').slice(-3).join(' | ')}`);
    return this.verified.length;
  }

  /** The paths no other pushed path refers to: their closures hold the rest. */
  private async root(paths: string[]): Promise<void> {
    if (!paths.length) return;
    const pushed = new Set(paths);
    const referenced = new Set(this.need.filter((e) => pushed.has(e.path)).flatMap((e) => e.references.filter((r) => r !== e.path)));
    const tops = paths.filter((p) => !referenced.has(p));
    const valid = new Set(tops);
    for (const p of await invalidPaths(tops)) valid.delete(p);
    if (!valid.size) return;
    const r = await execa('nix-store', ['--realise', '--add-root', join(this.places.gcRootDir, `push-${this.id}`), '--', ...valid], { reject: false, stdin: 'ignore' });
    if (r.exitCode !== 0) throw new SnapbackError('push-failed', `could not hold the pushed paths with a GC root: ${String(r.stderr).trim()}`);
  }

  private closeFile(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }

  private cleanup(): void {
    this.closeFile();
    rmSync(this.dir, { recursive: true, force: true });
  }

  private file(i: number): string {
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

/** Writes with back-pressure; an importer that died ends the wait instead of hanging it. */
async function write(stream: NodeJS.WritableStream & { destroyed?: boolean }, data: Buffer): Promise<void> {
  if (stream.destroyed) throw new Error('nix-store --import has exited');
  if (!stream.write(data)) await Promise.race([once(stream, 'drain'), once(stream, 'close').then(() => Promise.reject(new Error('nix-store --import has exited')))]);
}
