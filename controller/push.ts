// Sending a closure from the operator's store to a host over its authenticated session: which paths
// the host lacks, their manifest (signed like every command), and their NARs as binary frames,
// never more than the agent's window ahead of its acknowledgements. Nix 2.8 commands only.

import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { run } from '../shared/exec.ts';
import { SnapbackError } from '../shared/errors.ts';
import { COLLECT_EVERY, collectGarbage } from '../shared/memory.ts';
import { MAX_PUSH_PATHS, PUSH_CHUNK, manifestEntrySchema, type ManifestEntry, type ServerMessage } from '../shared/protocol.ts';
import type { Session } from './session.ts';

/** A manifest batch stays well below the agent's frame limit. */
const MAX_MANIFEST_BYTES = 160 * 1024;
/** Paths per `missing` question. */
const ASK = MAX_PUSH_PATHS * 5;

export interface PushProgress {
  paths: number;
  totalPaths: number;
  bytes: number;
  totalBytes: number;
}

/** The closure of `path` in the operator's store. */
export async function closureOf(path: string): Promise<string[]> {
  const r = await run('nix-store', ['--query', '--requisites', '--', path]);
  if (r.exitCode !== 0) throw new SnapbackError('bad-target', `cannot read the closure of ${path}: ${lastLine(r.stderr)}`);
  return String(r.stdout).split('\n').filter(Boolean);
}

/**
 * NAR hash, size, references and deriver of each path, from Nix's own database
 * (`nix-store --dump-db`): unlike `nix path-info`, it takes a `.drv` as itself, not as its outputs.
 */
export async function manifestOf(paths: string[]): Promise<ManifestEntry[]> {
  const out: ManifestEntry[] = [];
  for (let i = 0; i < paths.length; i += 500) {
    const r = await run('nix-store', ['--dump-db', '--', ...paths.slice(i, i + 500)]);
    if (r.exitCode !== 0) throw new SnapbackError('bad-target', `nix-store --dump-db failed: ${lastLine(r.stderr)}`);
    const lines = String(r.stdout).split('\n');
    for (let at = 0; at < lines.length && lines[at]; ) {
      const [path, hex, size, deriver, n] = lines.slice(at, at + 5);
      const count = Number(n);
      const references = lines.slice(at + 5, at + 5 + count);
      at += 5 + count;
      out.push(
        manifestEntrySchema.parse({
          path,
          narHash: `sha256-${Buffer.from(hex ?? '', 'hex').toString('base64')}`,
          narSize: Number(size),
          references,
          ...(deriver ? { deriver } : {}),
        }),
      );
    }
  }
  return topological(out);
}

/** Dependencies before the paths that refer to them: the order `nix-store --import` needs. */
export function topological(entries: ManifestEntry[]): ManifestEntry[] {
  const byPath = new Map(entries.map((e) => [e.path, e]));
  const done = new Set<string>();
  const out: ManifestEntry[] = [];
  const visit = (e: ManifestEntry) => {
    if (done.has(e.path)) return;
    done.add(e.path);
    for (const r of e.references) {
      const dep = byPath.get(r);
      if (dep && r !== e.path) visit(dep);
    }
    out.push(e);
  };
  for (const e of entries) visit(e);
  return out;
}

/** Consecutive slices of the manifest, each small enough for one `push` message. */
function batches(entries: ManifestEntry[]): ManifestEntry[][] {
  const out: ManifestEntry[][] = [];
  let cur: ManifestEntry[] = [];
  let size = 0;
  for (const e of entries) {
    const n = JSON.stringify(e).length + 1;
    if (cur.length && (cur.length >= MAX_PUSH_PATHS || size + n > MAX_MANIFEST_BYTES)) {
      out.push(cur);
      cur = [];
      size = 0;
    }
    cur.push(e);
    size += n;
  }
  if (cur.length) out.push(cur);
  return out;
}

const closures = new Map<string, Promise<{ closure: string[]; manifest: ManifestEntry[] }>>();

/**
 * The closure of `toplevel` and its manifest (dependencies first), read from this machine's store
 * once per run: started while the host is dialled, and shared by every host deployed the same system.
 */
export function localClosure(toplevel: string): Promise<{ closure: string[]; manifest: ManifestEntry[] }> {
  let c = closures.get(toplevel);
  if (!c) {
    c = closureOf(toplevel).then(async (closure) => ({ closure, manifest: await manifestOf(closure) }));
    c.catch(() => {}); // awaited by the push; an error is reported there, not as unhandled
    closures.set(toplevel, c);
  }
  return c;
}

/** The paths of `closure` the host lacks. */
export async function missingOn(session: Session, closure: string[]): Promise<string[]> {
  const missing: string[] = [];
  for (let i = 0; i < closure.length; i += ASK) {
    const r = await session.request({ type: 'missing', paths: closure.slice(i, i + ASK) });
    if (r.type !== 'missing') throw answerError(r, 'missing');
    missing.push(...r.paths);
  }
  return missing;
}

/**
 * Makes `toplevel`'s closure valid in the host's store: asks what it lacks, and sends only that.
 * `substitute`: the host fetches what its own caches have first. Throws the agent's error
 * (`bad-nar`, `no-space`, `push-failed`, or `unreachable` when the connection is lost).
 */
export async function pushClosure(session: Session, toplevel: string, opts: { substitute?: boolean; onProgress?: (p: PushProgress) => void } = {}): Promise<PushProgress> {
  const local = localClosure(toplevel);
  const missing = new Set(await missingOn(session, (await local).closure));
  const manifest = (await local).manifest.filter((e) => missing.has(e.path));
  const progress: PushProgress = { paths: 0, totalPaths: manifest.length, bytes: 0, totalBytes: manifest.reduce((n, e) => n + e.narSize, 0) };
  opts.onProgress?.({ ...progress });
  // One transfer: a refusal of any batch undoes the earlier ones too.
  const transfer = randomBytes(9).toString('base64url');
  const all = batches(manifest);
  let remainingBytes = progress.totalBytes;
  for (const batch of all) {
    await pushBatch(session, batch, { transfer, remainingBytes, substitute: opts.substitute === true }, progress, opts.onProgress);
    remainingBytes -= batch.reduce((n, e) => n + e.narSize, 0);
  }
  return progress;
}

/** The agent acknowledged nothing for this long while we waited: the transfer is given up. */
const STALL_MS = 60_000;

async function pushBatch(
  session: Session,
  batch: ManifestEntry[],
  how: { transfer: string; remainingBytes: number; substitute: boolean },
  progress: PushProgress,
  onProgress?: (p: PushProgress) => void,
): Promise<void> {
  let acked = 0;
  let window = 0;
  let wake: (() => void) | undefined;
  let stream: Promise<void> | undefined;
  const stopped = { now: false };
  const base = { paths: progress.paths, bytes: progress.bytes };
  const report = (bytes: number, imported: number) => {
    progress.bytes = base.bytes + bytes;
    progress.paths = base.paths + imported;
    onProgress?.({ ...progress });
  };
  let streamError: Error | undefined;
  // Without substitution the host will want the whole batch (bar what it gained meanwhile): Nix
  // starts reading it while the agent gets ready.
  let exported = how.substitute ? undefined : startExport(batch);
  let answer: ServerMessage;
  try {
    answer = await session.command({ type: 'push', paths: batch, transfer: how.transfer, remainingBytes: how.remainingBytes, ...(how.substitute ? { substitute: true } : {}) }, (m: ServerMessage) => {
      if (m.type === 'push-ready' && !stream) {
        window = m.window;
        const need = new Set(m.need);
        // What the host fetched from its own caches counts as done.
        const skipped = batch.filter((e) => !need.has(e.path));
        base.paths += skipped.length;
        progress.totalBytes -= skipped.reduce((n, e) => n + e.narSize, 0);
        exported ??= startExport(batch.filter((e) => need.has(e.path)));
        const send = (e: Export) => sendNars(session, e, need, () => acked, () => window, (w) => (wake = w), stopped);
        stream = send(exported)
          .catch(async (err: Error) => {
            // An export whose stream brought nothing at all though Nix exited 0 (seen rarely under
            // load, cause unknown): nothing was sent, so a new export starts the batch over, once.
            const first = exported!;
            if (stopped.now || first.input.bytesRead !== 0 || !first.input.ended || (await first.exited).exitCode !== 0) throw err;
            exported = startExport(first.entries);
            return send(exported);
          })
          .catch((err: Error) => {
            // A NAR this machine cannot produce (collected meanwhile), or an agent that stopped
            // acknowledging: the agent would wait for bytes that never come. Ending the connection
            // ends its half of the push, and the error says why.
            streamError = err;
            session.close();
          });
      } else if (m.type === 'push-ack') {
        acked = m.bytes;
        report(m.bytes, m.imported);
        wake?.();
      }
    });
  } finally {
    stopped.now = true;
    wake?.();
    await stream;
    if (exported) stopExport(exported);
  }
  if (streamError) throw streamError;
  if (answer.type === 'push-done') return report(answer.bytes, answer.imported);
  throw answerError(answer, 'push');
}

interface Export {
  entries: ManifestEntry[];
  process: ChildProcess;
  /** its exit status, and the end of what it said on stderr */
  exited: Promise<{ exitCode: number | undefined; signal: NodeJS.Signals | undefined; stderr: string }>;
  input: ExportReader;
}

/** Ends an export early: the process, and its stream. */
function stopExport(e: Export): void {
  e.process.kill();
  e.input.close();
}

/** One `nix-store --export` of `entries`: one process, not one per path. */
function startExport(entries: ManifestEntry[]): Export {
  const child = spawn('nix-store', ['--export', '--', ...entries.map((e) => e.path)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4096)));
  child.on('error', (err) => (stderr += `${err.message}\n`));
  const exited = once(child, 'close').then(([code, signal]) => ({ exitCode: (code as number | null) ?? undefined, signal: (signal as NodeJS.Signals | null) ?? undefined, stderr }));
  return { entries, process: child, exited, input: new ExportReader(child.stdout!) };
}

/**
 * The NARs of the exported entries the host needs, in order, as binary frames (the others are read
 * past); waits whenever a window's worth is unacknowledged. Each NAR's framing in the export stream
 * is checked and dropped here.
 */
async function sendNars(
  session: Session,
  exported: Export,
  need: Set<string>,
  acked: () => number,
  window: () => number,
  onWait: (wake: () => void) => void,
  stopped: { now: boolean },
): Promise<void> {
  const { input } = exported;
  let sent = 0;
  try {
    for (const e of exported.entries) {
      if ((await input.u64()) !== 1n) throw input.malformed(`before ${e.path}`);
      for await (const chunk of input.frames(e.narSize)) {
        if (!need.has(e.path)) continue;
        while (sent + chunk.length - acked() > Math.max(window(), PUSH_CHUNK) && !stopped.now) {
          const before = acked();
          const timer = new AbortController();
          const woke = await Promise.race([
            new Promise<boolean>((resolve) => onWait(() => resolve(true))),
            sleep(STALL_MS, false, { signal: timer.signal, ref: false }).catch(() => true),
          ]);
          timer.abort();
          if (!woke && acked() === before && !stopped.now) throw new SnapbackError('unreachable', `the host acknowledged nothing for ${STALL_MS / 1000}s during the push`);
        }
        // The agent answered (an error) or the connection is gone: not one byte more.
        if (stopped.now || !session.open) return;
        await session.sendBinary(chunk);
        if (Math.floor((sent + chunk.length) / COLLECT_EVERY) > Math.floor(sent / COLLECT_EVERY)) collectGarbage();
        sent += chunk.length;
      }
      // What follows each NAR: a marker, the path, its references, its deriver, no signature.
      if ((await input.u64()) !== EXPORT_MAGIC) throw input.malformed(`after the NAR of ${e.path}`);
      if ((await input.string()) !== e.path) throw input.malformed(`after the NAR of ${e.path}: another path`);
      for (let n = Number(await input.u64()); n > 0; n--) await input.string();
      await input.string();
      await input.u64();
    }
    // The end of the stream: a zero, then nothing (read to its end, or Nix's exit is never seen).
    if ((await input.u64()) !== 0n || !(await input.atEnd())) throw input.malformed('at its end');
  } catch (err) {
    // A stream cut short: nix-store is ending, and says why; anything else: it is stopped.
    if (!input.ended) stopExport(exported);
    if (!input.ended) throw err;
    const r = await exported.exited;
    const failure = exportFailure(r, '; collected meanwhile?');
    if (failure) throw failure;
    // It ended well, yet its stream did not: say what it said.
    throw err instanceof SnapbackError && r.stderr.trim() ? new SnapbackError(err.code, `${err.message}; it exited 0 and said: ${lastLine(r.stderr)}`) : err;
  } finally {
    if (stopped.now || !session.open) stopExport(exported);
  }
  const failure = exportFailure(await exported.exited);
  if (failure) throw failure;
}

/** Why `nix-store --export` did not end well (killed, or a non-zero exit), if it did not. */
function exportFailure(r: Awaited<Export['exited']>, hint = ''): SnapbackError | undefined {
  if (r.signal) return new SnapbackError('push-failed', `nix-store --export on this machine was killed (${r.signal}) ${lastLine(r.stderr)}`.trim());
  if (r.exitCode !== 0) return new SnapbackError('push-failed', `nix-store --export on this machine failed (exit ${r.exitCode}${hint}): ${lastLine(r.stderr)}`);
  return undefined;
}

/** After each NAR in `nix-store --export`'s stream. */
const EXPORT_MAGIC = 0x4558494en;

/**
 * Reads `nix-store --export`'s stream: its small fields, and each NAR as frames of PUSH_CHUNK
 * (pipe reads come in 64 KiB: fewer, larger frames cost the agent less).
 */
class ExportReader {
  private readonly it: AsyncIterator<Buffer>;
  private pending: Buffer[] = [];
  private size = 0;
  /** bytes read from the stream so far */
  private read = 0;
  get bytesRead(): number {
    return this.read;
  }
  /** the stream has ended */
  ended = false;

  constructor(stream: AsyncIterable<unknown>) {
    this.it = (stream as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  }

  malformed(where: string): SnapbackError {
    return new SnapbackError('push-failed', `nix-store --export on this machine gave a stream this controller cannot read (${where}, after ${this.read} bytes)`);
  }

  /** At least `n` bytes buffered (false at the end of the stream). */
  private async fill(n: number): Promise<boolean> {
    while (this.size < n) {
      const r = await this.it.next();
      if (r.done) {
        this.ended = true;
        return false;
      }
      this.pending.push(r.value);
      this.size += r.value.length;
      this.read += r.value.length;
    }
    return true;
  }

  /** Exactly `n` bytes. */
  private async take(n: number): Promise<Buffer> {
    if (!(await this.fill(n))) throw this.malformed('cut short');
    const all = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending, this.size);
    this.pending = all.length > n ? [all.subarray(n)] : [];
    this.size -= n;
    return all.subarray(0, n);
  }

  /** Whether the stream ends here. */
  async atEnd(): Promise<boolean> {
    return !(await this.fill(1));
  }

  /** Stops reading: the stream is destroyed. */
  close(): void {
    this.it.return?.().catch(() => {});
  }

  async u64(): Promise<bigint> {
    return (await this.take(8)).readBigUInt64LE(0);
  }

  async string(): Promise<string> {
    const n = Number(await this.u64());
    if (n > 64 * 1024) throw this.malformed('a field too long');
    return (await this.take(n + ((8 - (n % 8)) % 8))).subarray(0, n).toString();
  }

  async *frames(n: number): AsyncGenerator<Buffer> {
    while (n > 0) {
      const want = Math.min(n, PUSH_CHUNK);
      // Whatever is buffered, up to a frame, once the pipe has no more at hand than that.
      await this.fill(want);
      const take = Math.min(want, this.size);
      if (take === 0) throw this.malformed('cut short in a NAR');
      yield await this.take(take);
      n -= take;
    }
  }
}

function answerError(m: ServerMessage, what: string): SnapbackError {
  if (m.type === 'error') return new SnapbackError(m.code as never, m.message);
  return new SnapbackError('unreachable', `unexpected "${m.type}" in answer to ${what}`);
}

function lastLine(text: unknown): string {
  return String(text).trim().split('\n').filter(Boolean).pop() ?? '';
}
