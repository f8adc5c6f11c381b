// Sending a closure from the operator's store to a host over its authenticated session: which paths
// the host lacks, their manifest (signed like every command), and their NARs as binary frames,
// never more than the agent's window ahead of its acknowledgements. Nix 2.8 commands only.

import { execa } from 'execa';
import { SnapbackError } from '../shared/errors.ts';
import { MAX_PUSH_PATHS, PUSH_CHUNK, manifestEntrySchema, type ManifestEntry, type ServerMessage } from '../shared/protocol.ts';
import type { Session } from './session.ts';

const NIX = ['--extra-experimental-features', 'nix-command'];
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
  const r = await execa('nix-store', ['--query', '--requisites', '--', path], { reject: false, stdin: 'ignore' });
  if (r.exitCode !== 0) throw new SnapbackError('bad-target', `cannot read the closure of ${path}: ${lastLine(r.stderr)}`);
  return String(r.stdout).split('\n').filter(Boolean);
}

/** NAR hash, size, references and deriver of each path, as `nix path-info --json` reports them. */
export async function manifestOf(paths: string[]): Promise<ManifestEntry[]> {
  const out: ManifestEntry[] = [];
  for (let i = 0; i < paths.length; i += 500) {
    const r = await execa('nix', [...NIX, 'path-info', '--json', '--', ...paths.slice(i, i + 500)], { reject: false, stdin: 'ignore' });
    if (r.exitCode !== 0) throw new SnapbackError('bad-target', `nix path-info failed: ${lastLine(r.stderr)}`);
    for (const info of JSON.parse(String(r.stdout)) as Record<string, unknown>[]) {
      out.push(manifestEntrySchema.parse({ path: info.path, narHash: info.narHash, narSize: info.narSize, references: info.references, ...(info.deriver ? { deriver: info.deriver } : {}) }));
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
  const missing = await missingOn(session, await closureOf(toplevel));
  const manifest = missing.length ? await manifestOf(missing) : [];
  const progress: PushProgress = { paths: 0, totalPaths: manifest.length, bytes: 0, totalBytes: manifest.reduce((n, e) => n + e.narSize, 0) };
  opts.onProgress?.({ ...progress });
  for (const batch of batches(manifest)) {
    await pushBatch(session, batch, opts.substitute === true, progress, opts.onProgress);
  }
  return progress;
}

async function pushBatch(session: Session, batch: ManifestEntry[], substitute: boolean, progress: PushProgress, onProgress?: (p: PushProgress) => void): Promise<void> {
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
  const answer = await session.command({ type: 'push', paths: batch, ...(substitute ? { substitute: true } : {}) }, (m: ServerMessage) => {
    if (m.type === 'push-ready' && !stream) {
      window = m.window;
      const need = new Set(m.need);
      // What the host fetched from its own caches counts as done.
      const skipped = batch.filter((e) => !need.has(e.path));
      base.paths += skipped.length;
      progress.totalBytes -= skipped.reduce((n, e) => n + e.narSize, 0);
      stream = sendNars(
        session,
        batch.filter((e) => need.has(e.path)),
        () => acked,
        () => window,
        (w) => (wake = w),
        stopped,
      ).catch(() => undefined);
    } else if (m.type === 'push-ack') {
      acked = m.bytes;
      report(m.bytes, m.imported);
      wake?.();
    }
  });
  stopped.now = true;
  wake?.();
  await stream;
  if (answer.type === 'push-done') return report(answer.bytes, answer.imported);
  throw answerError(answer, 'push');
}

/** The NARs of `entries`, in order, as binary frames; waits whenever a window's worth is unacknowledged. */
async function sendNars(
  session: Session,
  entries: ManifestEntry[],
  acked: () => number,
  window: () => number,
  onWait: (wake: () => void) => void,
  stopped: { now: boolean },
): Promise<void> {
  let sent = 0;
  for (const e of entries) {
    if (stopped.now) return;
    const dump = execa('nix-store', ['--dump', '--', e.path], { stdin: 'ignore', stdout: 'pipe', stderr: 'ignore', buffer: false, reject: false });
    let bytes = 0;
    for await (const data of dump.stdout!) {
      const buf = data as Buffer;
      for (let off = 0; off < buf.length; off += PUSH_CHUNK) {
        const chunk = buf.subarray(off, off + PUSH_CHUNK);
        while (sent + chunk.length - acked() > window() && !stopped.now) await new Promise<void>((resolve) => onWait(resolve));
        // The agent answered (an error) or the connection is gone: not one byte more.
        if (stopped.now || !session.open) {
          dump.kill();
          return;
        }
        await session.sendBinary(chunk);
        sent += chunk.length;
        bytes += chunk.length;
      }
    }
    await dump;
    if (bytes !== e.narSize) throw new SnapbackError('push-failed', `nix-store --dump of ${e.path} gave ${bytes} bytes, not ${e.narSize}`);
  }
}

function answerError(m: ServerMessage, what: string): SnapbackError {
  if (m.type === 'error') return new SnapbackError(m.code as never, m.message);
  return new SnapbackError('unreachable', `unexpected "${m.type}" in answer to ${what}`);
}

function lastLine(text: unknown): string {
  return String(text).trim().split('\n').filter(Boolean).pop() ?? '';
}
