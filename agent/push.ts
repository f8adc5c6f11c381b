// A closure pushed by a controller into this host's store. Every NAR is written to a temporary file
// while its SHA-256 is taken, checked against the operator-signed manifest, and only then given to
// `nix-store --import`; what a push imported is held by GC roots until the deployment ends.

import { createHash, type Hash } from 'node:crypto';
import { closeSync, lstatSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, statfsSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
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

/** Verified NARs are added to the store in groups of this much (or when the push ends). */
const GROUP_BYTES = 32 * 1024 * 1024;

/**
 * The push's directory is a `file://` binary cache that only ever lists verified paths: a NAR is
 * written under `nar/` while it is hashed, and its `.narinfo` (from the signed manifest) is written
 * only once the hash matched. Nix then substitutes from it, streaming each NAR into the store (Nix
 * 2.8's `nix-store --import` would hold a whole NAR in memory) and checking the hash once more.
 */
export class Push {
  readonly id: string;
  /** the manifest's entries still to be received, in order */
  readonly need: ManifestEntry[];
  readonly total: number;
  /** each path's place in `need`, which names its NAR file */
  private readonly at: Map<string, number>;
  private readonly places: PushPlaces;
  private readonly dir: string;
  private index = 0;
  private hash: Hash | undefined;
  private fd: number | undefined;
  private got = 0;
  /** verified, not yet handed to Nix */
  private group: ManifestEntry[] = [];
  private groupBytes = 0;
  /** bytes received over all paths */
  received = 0;
  /** paths verified (and so on their way into the store) */
  verified: string[] = [];
  /** paths Nix has added */
  imported: string[] = [];
  private importing: Promise<void> = Promise.resolve();
  private importer: ChildProcess | undefined;
  private failed: Error | undefined;

  private constructor(id: string, need: ManifestEntry[], places: PushPlaces) {
    this.id = id;
    this.need = need;
    this.total = need.reduce((n, e) => n + e.narSize, 0);
    this.at = new Map(need.map((e, i) => [e.path, i]));
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
      // What is still to come in this transfer (this batch and the later ones), the group in flight
      // beside it, and a margin: checked at every batch, as the free space may shrink.
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
      mkdirSync(join(push.dir, 'nar'), { recursive: true, mode: 0o700 });
      writeFileSync(join(push.dir, 'nix-cache-info'), `StoreDir: ${STORE}\nWantMassQuery: 0\nPriority: 0\n`);
    }
    return push;
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
    const base = (p: string) => p.slice(STORE.length + 1);
    writeFileSync(
      join(this.dir, `${base(entry.path).slice(0, 32)}.narinfo`),
      [
        `StorePath: ${entry.path}`,
        `URL: nar/${this.index}.nar`,
        'Compression: none',
        `NarHash: sha256:${digest.toString('hex')}`,
        `NarSize: ${entry.narSize}`,
        `References: ${entry.references.map(base).join(' ')}`,
        ...(entry.deriver ? [`Deriver: ${base(entry.deriver)}`] : []),
        '',
      ].join('\n'),
    );
    this.group.push(entry);
    this.groupBytes += entry.narSize;
    this.verified.push(entry.path);
    this.index++;
    if (this.groupBytes >= GROUP_BYTES || this.complete) this.importGroup();
  }

  /** Hands the verified paths so far to Nix, after the groups before them. */
  private importGroup(): void {
    const group = this.group;
    this.group = [];
    this.groupBytes = 0;
    if (!group.length) return;
    this.importing = this.importing.then(() => this.importRuns(group)).catch((err: Error) => {
      this.failed ??= err instanceof SnapbackError ? err : new SnapbackError('push-failed', err.message);
    });
  }

  /**
   * In manifest order (dependencies first): runs of ordinary paths are substituted from the push's
   * cache and rooted in one `nix-store --realise`; a `.drv` (which `--realise` would build) is
   * imported as it is. Both read the NAR files themselves; nothing passes through this process.
   */
  private async importRuns(group: ManifestEntry[]): Promise<void> {
    for (let i = 0; i < group.length; ) {
      const drv = group[i]!.path.endsWith('.drv');
      let j = i;
      while (j < group.length && group[j]!.path.endsWith('.drv') === drv) j++;
      const run = group.slice(i, j);
      if (this.failed) return;
      if (drv) await this.importDrvs(run);
      else await this.substitute(run);
      this.imported.push(...run.map((e) => e.path));
      for (const e of run) rmSync(this.narFile(this.at.get(e.path)!), { force: true });
      i = j;
    }
  }

  private async substitute(run: ManifestEntry[]): Promise<void> {
    const mine = new Set(run.map((e) => e.path));
    const referenced = new Set(run.flatMap((e) => e.references.filter((r) => r !== e.path && mine.has(r))));
    const tops = run.map((e) => e.path).filter((p) => !referenced.has(p));
    const args = [
      '--realise',
      // Only this push's cache, and no signature needed: each NAR matched the operator's signed manifest.
      '--option', 'substituters', `file://${this.dir}`,
      '--option', 'require-sigs', 'false',
      '--add-root', join(this.places.gcRootDir, `push-${this.id}-${this.imported.length}`),
      '--', ...tops,
    ];
    await this.run('nix-store', args, 'ignore');
  }

  private async importDrvs(run: ManifestEntry[]): Promise<void> {
    const stream = Buffer.concat([
      ...run.flatMap((e) => [
        u64(1),
        readFileSync(this.narFile(this.at.get(e.path)!)),
        u64(0x4558494e),
        str(e.path),
        u64(e.references.length),
        ...e.references.map(str),
        str(e.deriver ?? ''),
        u64(0),
      ]),
      u64(0),
    ]);
    await this.run('nix-store', ['--import'], stream);
  }

  private async run(cmd: string, args: string[], input: 'ignore' | Buffer): Promise<void> {
    const child = spawn(cmd, args, { stdio: [input === 'ignore' ? 'ignore' : 'pipe', 'ignore', 'pipe'] });
    this.importer = child;
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4096)));
    if (input !== 'ignore') child.stdin!.on('error', () => {}).end(input);
    const [code, signal] = (await once(child, 'close')) as [number | null, NodeJS.Signals | null];
    this.importer = undefined;
    if (signal) throw new SnapbackError('push-failed', `${cmd} ${args[0]} was stopped (${signal})`);
    if (code !== 0) throw new SnapbackError('push-failed', `${cmd} ${args[0]} failed: ${stderr.trim().split('\n').filter((l) => !l.startsWith('warning:')).slice(-3).join(' | ')}`);
  }

  /** All paths received: waits for Nix, which roots what it adds. */
  async finish(): Promise<number> {
    this.importGroup();
    await this.importing;
    if (this.failed) throw this.failed;
    this.cleanup();
    return this.imported.length;
  }

  /**
   * A connection lost half-way: what was verified is added and kept (a retry asks again what is
   * missing and sends only the rest); the path that was arriving is dropped.
   */
  async interrupt(): Promise<void> {
    this.closeFile();
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
    this.closeFile();
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
    return join(this.dir, 'nar', `${i}.nar`);
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
