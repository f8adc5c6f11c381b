// A closure pushed by a controller into this host's store. Every NAR is written to a temporary file
// while its SHA-256 is taken, checked against the operator-signed manifest, and only then given to
// Nix; what a push added is held by GC roots until the deployment ends.

import { createHash, type Hash } from 'node:crypto';
import { closeSync, lstatSync, mkdirSync, openSync, readdirSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { run } from '../shared/exec.ts';
import { SnapbackError } from '../shared/errors.ts';
import type { ManifestEntry } from '../shared/protocol.ts';
import type { Logger } from './log.ts';
import type { StoreWriterThread } from './store-writer.ts';

/** shared/memory.ts, loaded with the first push. */
let pushMemory: typeof import('../shared/memory.ts') | undefined;

/** Bytes a controller may send ahead of an acknowledgement: what either side holds in memory. */
export const PUSH_WINDOW = 4 * 1024 * 1024;
/** Acknowledge at least this often (bytes written). */
export const PUSH_ACK_EVERY = 1024 * 1024;
/** Free space kept beyond what a push needs. */
const SPACE_MARGIN = 16 * 1024 * 1024;
/**
 * Disk a path takes for each byte of its NAR, at most: its files take whole blocks (measured: 1.14×
 * on tmpfs for paths of 96 KiB in small files), so the space check counts 1.25×.
 */
const DISK_PER_NAR_BYTE = 1.25;
/** Verified NARs waiting for Nix may take this much of the temporary directory (or the largest one). */
const WAITING_BUDGET = 32 * 1024 * 1024;

/**
 * The most the temporary NAR files of a push take at once: the NARs verified and waiting for Nix
 * (acknowledgements are held back beyond the budget, so the controller waits for Nix), the one
 * arriving, and the window in flight.
 */
export function temporaryBytes(need: ManifestEntry[]): number {
  const total = need.reduce((n, e) => n + e.narSize, 0);
  const largest = Math.max(0, ...need.map((e) => e.narSize));
  return Math.min(total, Math.max(WAITING_BUDGET, largest) + largest + PUSH_WINDOW);
}
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

/**
 * Which of `paths` the store lacks: a path with nothing on disk certainly; one on disk only if Nix's
 * database says so (it may be the remains of an interrupted write). Nix is asked only about those.
 */
export async function invalidPaths(paths: string[]): Promise<string[]> {
  const present = paths.filter((p) => lstatSync(p, { throwIfNoEntry: false }) !== undefined);
  if (present.length === 0) return paths;
  const r = await run('nix-store', ['--check-validity', '--print-invalid', '--', ...present]);
  if (r.exitCode !== 0) throw new SnapbackError('push-failed', `nix-store --check-validity failed: ${String(r.stderr).trim().split('\n').pop()}`);
  const invalid = new Set(String(r.stdout).split('\n').filter(Boolean));
  const onDisk = new Set(present);
  return paths.filter((p) => invalid.has(p) || !onDisk.has(p));
}

/** Removes the roots of one transfer's pushed paths (the agent's sweep removes the others). */
export function releaseTransferRoots(gcRootDir: string, transfer: string): void {
  for (const name of readdirSync(gcRootDir)) if (name.startsWith(`push-${transfer}-`)) rmSync(join(gcRootDir, name), { force: true });
}

/**
 * Undoes a refused transfer: its roots go, and the paths it added (`added`, dependencies first) are
 * deleted again, so the store is as it was.
 */
export async function undoTransfer(places: PushPlaces, transfer: string, added: string[]): Promise<void> {
  releaseTransferRoots(places.gcRootDir, transfer);
  if (!added.length) return;
  const r = await run('nix-store', ['--delete', '--', ...[...added].reverse()]);
  if (r.exitCode !== 0) places.log.warn({ err: String(r.stderr).trim() }, 'could not delete the paths of a refused push');
}

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
  private writer: StoreWriterThread | undefined;
  private failed: Error | undefined;
  private rooted = 0;
  /** bytes of NARs verified and not yet added by Nix (their temporary files) */
  private waiting = 0;
  private readonly budget: number;
  /** told whenever Nix added a path (the connection may then acknowledge more) */
  onAdded: (() => void) | undefined;

  private constructor(id: string, need: ManifestEntry[], places: PushPlaces) {
    this.id = id;
    this.need = need;
    this.total = need.reduce((n, e) => n + e.narSize, 0);
    this.places = places;
    this.dir = join(places.tmpDir, id);
    this.budget = Math.max(WAITING_BUDGET, Math.max(0, ...need.map((e) => e.narSize)));
  }

  /**
   * Whether acknowledgements wait: the NARs waiting for Nix are over their budget, and the
   * controller must wait for Nix rather than fill the disk with them (`onAdded` says when to go on).
   */
  get holdAcks(): boolean {
    return this.waiting > this.budget;
  }

  /**
   * Checks the manifest against the store: substitutes from the host's caches first when asked,
   * then keeps what is still missing, and refuses (`no-space`) when it would not fit.
   */
  static async prepare(id: string, manifest: ManifestEntry[], substitute: boolean, remainingBytes: number, places: PushPlaces): Promise<Push> {
    // Nix starts while the store is asked what it lacks. What only a push needs (the writer's
    // thread, the collections) is loaded at the first one: an idle agent does without it.
    const [{ StoreWriterThread }, memory] = await Promise.all([import('./store-writer.ts'), import('../shared/memory.ts')]);
    pushMemory = memory;
    const writer = new StoreWriterThread();
    try {
      let missing = new Set(await invalidPaths(manifest.map((e) => e.path)));
      if (substitute && missing.size) {
        // --keep-going: what no cache has is simply left for the push.
        await run('nix-store', ['--realise', '--keep-going', ...places.trustOptions, '--', ...missing]);
        missing = new Set(await invalidPaths([...missing]));
      }
      const need = manifest.filter((e) => missing.has(e.path));
      const push = new Push(id, need, places);
      if (!need.length) {
        await writer.close();
        return push;
      }
      // What is still to come in this transfer (this batch and the later ones) as it will lie on
      // disk, the temporary NARs beside it, and a margin: checked at every batch, as the free space
      // may shrink (a later batch refused undoes the earlier ones: agent/server.ts).
      const coming = Math.max(remainingBytes - (manifest.reduce((n, e) => n + e.narSize, 0) - push.total), push.total);
      const onDisk = Math.ceil(coming * DISK_PER_NAR_BYTE);
      const required = onDisk + temporaryBytes(need) + SPACE_MARGIN;
      const free = Math.min(freeBytes(STORE), freeBytes(places.tmpDir.replace(/\/push$/, '')));
      if (free < required) {
        throw new SnapbackError(
          'no-space',
          `the ${remainingBytes > push.total ? 'rest of the ' : ''}closure needs about ${mib(onDisk)} in the store (${mib(coming)} of NARs, ${DISK_PER_NAR_BYTE}×) and ${mib(required - onDisk)} more while it arrives, but the store's file system has ${mib(free)} free; nothing of this transfer was kept. Free space on the host (nix-collect-garbage -d) or deploy a smaller closure`,
        );
      }
      mkdirSync(push.dir, { recursive: true, mode: 0o700 });
      // The NARs start arriving meanwhile: Nix's greeting is awaited before the first is added.
      push.writer = writer;
      push.importing = writer.open().catch((err: Error) => {
        push.failed ??= err;
      });
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
      if (pushMemory && Math.floor((this.received + take) / pushMemory.COLLECT_EVERY) > Math.floor(this.received / pushMemory.COLLECT_EVERY)) pushMemory.collectGarbage();
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
    this.waiting += entry.narSize;
    this.importing = this.importing.then(async () => {
      if (this.failed) return;
      try {
        await this.writer!.add(entry, digest.toString('hex'), file);
        this.imported.push(entry.path);
      } catch (err) {
        this.failed ??= err instanceof SnapbackError ? err : new SnapbackError('push-failed', (err as Error).message);
      } finally {
        rmSync(file, { force: true });
        this.waiting -= entry.narSize;
        this.onAdded?.();
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
    const r = await run('nix-store', ['--realise', '--add-root', join(this.places.gcRootDir, `push-${this.id}-${this.rooted}`), '--', ...tops]);
    if (r.exitCode !== 0) throw new SnapbackError('push-failed', `nix-store --add-root failed: ${String(r.stderr).trim().split('\n').pop()}`);
  }

  /**
   * All paths received: waits for Nix to add them. Their permanent roots are made after the answer,
   * while Nix's temporary roots still hold them (the writer ends only then); a refusal of a later
   * batch of the transfer waits for them (`abort`).
   */
  async finish(): Promise<number> {
    await this.importing;
    if (this.failed) throw this.failed;
    const writer = this.writer;
    if (writer) {
      const transfer = this.transfer;
      const rooting = this.root()
        .catch((err: Error) => this.places.log.warn({ err: err.message }, 'could not root the paths of a push; the deployment will'))
        .finally(() => writer.close())
        .finally(() => {
          if (Push.rooting.get(transfer) === rooting) Push.rooting.delete(transfer);
        });
      Push.rooting.set(transfer, Promise.all([Push.rooting.get(transfer), rooting]).then(() => {}));
    }
    this.cleanup();
    return this.imported.length;
  }

  /** Permanent roots still being made, by transfer. */
  private static readonly rooting = new Map<string, Promise<void>>();

  /** The transfer this batch belongs to (its id is `TRANSFER-N`). */
  private get transfer(): string {
    return this.id.slice(0, this.id.lastIndexOf('-'));
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
    // Earlier batches' roots are made before they are released, or one would be left behind.
    await Push.rooting.get(transfer ?? this.transfer);
    const landed = await invalidPaths(this.verified)
      .then((invalid) => this.verified.filter((p) => !invalid.includes(p)))
      .catch(() => this.verified);
    await undoTransfer(this.places, transfer ?? this.id, [...earlier, ...landed]);
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
