// A closure pushed by a controller into this host's store. Every NAR is written to a temporary file
// while its SHA-256 is taken, checked against the operator-signed manifest, and only then given to
// `nix-store --import`; what a push imported is held by GC roots until the deployment ends.

import { createHash, type Hash } from 'node:crypto';
import { closeSync, lstatSync, mkdirSync, openSync, readdirSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { execa } from 'execa';
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
export function releasePushRoots(gcRootDir: string, olderThanMs = 0, id?: string): void {
  const now = Date.now();
  for (const name of readdirSync(gcRootDir)) {
    if (!name.startsWith(id ? `push-${id}-` : 'push-')) continue;
    const p = join(gcRootDir, name);
    if (olderThanMs && now - (lstatSync(p, { throwIfNoEntry: false })?.mtimeMs ?? 0) < olderThanMs) continue;
    rmSync(p, { force: true });
  }
}

/** A group file is handed to `nix-store --import` once it holds this much (or the push ends). */
const GROUP_BYTES = 32 * 1024 * 1024;

/**
 * Verified NARs in `nix-store --export` framing, several paths to a file: Nix reads a file only once
 * every path in it matched its signed hash, straight from the file (no copy through this process),
 * while the next file fills.
 */
interface Group {
  file: string;
  fd: number;
  /** bytes up to the end of the last verified path */
  verifiedAt: number;
  size: number;
  paths: string[];
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
  private got = 0;
  private group: Group | undefined;
  private groups = 0;
  /** bytes received over all paths */
  received = 0;
  /** paths verified (and so on their way into the store) */
  verified: string[] = [];
  /** paths `nix-store --import` has added */
  imported: string[] = [];
  private importing: Promise<void> = Promise.resolve();
  private importer: ChildProcess | undefined;
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
  static async prepare(id: string, manifest: ManifestEntry[], substitute: boolean, remainingBytes: number, places: PushPlaces): Promise<Push> {
    let missing = new Set(await invalidPaths(manifest.map((e) => e.path)));
    if (substitute && missing.size) {
      // --keep-going: what no cache has is simply left for the push.
      await execa('nix-store', ['--realise', '--keep-going', ...places.trustOptions, '--', ...missing], { reject: false, stdin: 'ignore' });
      missing = new Set(await invalidPaths([...missing]));
    }
    const need = manifest.filter((e) => missing.has(e.path));
    const push = new Push(id, need, places);
    if (need.length) {
      // What is still to come in this transfer (this batch and the later ones), the group file in
      // flight beside it, and a margin: checked at every batch, as the free space may shrink.
      const coming = Math.max(remainingBytes - (manifest.reduce((n, e) => n + e.narSize, 0) - push.total), push.total);
      const largest = Math.max(...need.map((e) => e.narSize));
      const required = coming + Math.min(push.total, largest + GROUP_BYTES) + SPACE_MARGIN;
      const free = Math.min(freeBytes(STORE), freeBytes(places.tmpDir.replace(/\/push$/, '')));
      if (free < required) {
        throw new SnapbackError(
          'no-space',
          `the closure needs ${mib(coming)} and ${mib(required - coming)} to spare, but the store's file system has ${mib(free)} free; nothing more was sent`,
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
   * complete its hash is compared with the manifest, and only a match is ever read by Nix. Throws
   * `bad-nar` (the push must then be aborted) on a mismatch or on bytes beyond the manifest.
   */
  receive(chunk: Buffer): void {
    if (this.failed) throw this.failed;
    let off = 0;
    while (off < chunk.length) {
      const entry = this.need[this.index];
      if (!entry) throw new SnapbackError('bad-nar', `${chunk.length - off} bytes more than the manifest announced`);
      if (this.hash === undefined) {
        this.group ??= this.openGroup();
        this.append(u64(1));
        this.hash = createHash('sha256');
        this.got = 0;
      }
      const take = Math.min(chunk.length - off, entry.narSize - this.got);
      const part = chunk.subarray(off, off + take);
      this.append(part);
      this.hash.update(part);
      this.got += take;
      this.received += take;
      off += take;
      if (this.got === entry.narSize) this.completePath(entry);
    }
  }

  private completePath(entry: ManifestEntry): void {
    const got = `sha256-${this.hash!.digest('base64')}`;
    this.hash = undefined;
    if (got !== entry.narHash) {
      throw new SnapbackError('bad-nar', `the NAR of ${entry.path} does not match its signed hash (${got} instead of ${entry.narHash}): the transfer is refused and nothing of it is imported`);
    }
    this.append(Buffer.concat([u64(0x4558494e), str(entry.path), u64(entry.references.length), ...entry.references.map(str), str(entry.deriver ?? ''), u64(0)]));
    const group = this.group!;
    group.verifiedAt = group.size;
    group.paths.push(entry.path);
    this.verified.push(entry.path);
    this.index++;
    if (group.size >= GROUP_BYTES || this.complete) this.importGroup();
  }

  private openGroup(): Group {
    const file = join(this.dir, `${this.groups++}.export`);
    return { file, fd: openSync(file, 'w', 0o600), verifiedAt: 0, size: 0, paths: [] };
  }

  private append(data: Buffer): void {
    const g = this.group!;
    writeSync(g.fd, data, 0, data.length, g.size);
    g.size += data.length;
  }

  /** Ends the group at its last verified path and queues it for `nix-store --import`. */
  private importGroup(): void {
    const g = this.group;
    this.group = undefined;
    if (!g) return;
    if (!g.paths.length) {
      closeSync(g.fd);
      rmSync(g.file, { force: true });
      return;
    }
    writeSync(g.fd, u64(0), 0, 8, g.verifiedAt);
    closeSync(g.fd);
    this.importing = this.importing.then(() => this.importFile(g)).catch((err: Error) => {
      this.failed ??= err instanceof SnapbackError ? err : new SnapbackError('push-failed', err.message);
    });
  }

  private async importFile(g: Group): Promise<void> {
    if (this.failed) return;
    const fd = openSync(g.file, 'r');
    try {
      // The file itself is the importer's stdin: the kernel hands Nix the bytes, not this process.
      // The roots come in the same process (a spawn costs the agent's event loop tens of ms), right
      // after the import: what lands is held from then on.
      const roots = this.rootsOf(g.paths);
      const script = roots.length ? 'nix-store --import >/dev/null && exec nix-store --realise --add-root "$0" -- "$@" >/dev/null' : 'exec nix-store --import >/dev/null';
      const child = spawn('/bin/sh', ['-c', script, join(this.places.gcRootDir, `push-${this.id}-${this.imported.length}`), ...roots], { stdio: [fd, 'ignore', 'pipe'] });
      this.importer = child;
      let stderr = '';
      child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4096)));
      const [code, signal] = (await once(child, 'close')) as [number | null, NodeJS.Signals | null];
      this.importer = undefined;
      if (signal) throw new SnapbackError('push-failed', `nix-store --import was stopped (${signal})`);
      if (code !== 0) throw new SnapbackError('push-failed', `nix-store --import or its GC root failed: ${stderr.trim().split('\n').slice(-3).join(' | ')}`);
      this.imported.push(...g.paths);
    } finally {
      closeSync(fd);
      rmSync(g.file, { force: true });
    }
  }

  /** All paths received: waits for the imports, which root what they add. */
  async finish(): Promise<number> {
    this.importGroup();
    await this.importing;
    if (this.failed) throw this.failed;
    this.cleanup();
    return this.imported.length;
  }

  /**
   * A connection lost half-way: what was verified is imported and kept (a retry asks again what is
   * missing and sends only the rest); the path that was arriving is dropped.
   */
  async interrupt(): Promise<void> {
    this.hash = undefined;
    this.importGroup();
    await this.importing;
    this.cleanup();
  }

  /**
   * A bad NAR: nothing of this push stays in the store, nor of the `earlier` batches of its
   * `transfer`, whose roots go too.
   */
  async abort(earlier: string[] = [], transfer?: string): Promise<void> {
    this.failed ??= new SnapbackError('bad-nar', 'aborted');
    const g = this.group;
    this.group = undefined;
    if (g) closeSync(g.fd);
    this.importer?.kill('SIGKILL');
    await this.importing;
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

  /** Of `paths`, those no other of them refers to: their closures hold the rest. */
  private rootsOf(paths: string[]): string[] {
    const mine = new Set(paths);
    const referenced = new Set(this.need.filter((e) => mine.has(e.path)).flatMap((e) => e.references.filter((r) => r !== e.path)));
    // `nix-store --realise --add-root` would build a .drv's outputs: a .drv top is held by what
    // refers to it once that arrives (a derivation in a closure is referred to by something in it).
    return paths.filter((p) => !referenced.has(p) && !p.endsWith('.drv'));
  }

  private cleanup(): void {
    if (this.group) closeSync(this.group.fd);
    this.group = undefined;
    rmSync(this.dir, { recursive: true, force: true });
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
