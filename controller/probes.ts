// Probes: does the host still work from where the operator sits? `tcp`, `http` and `command`, each
// retried until its own timeout, which never reaches past the confirm window.

import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadExeca } from '../shared/exec.ts';
import type { Probe } from '../shared/fleet.ts';

export interface ProbeResult {
  name: string;
  ok: boolean;
  attempts: number;
  /** when not ok: the most informative failure (an answer beats a refused connection beats a timeout) */
  detail?: string;
}

/** A failed attempt that will be retried: its number and what went wrong. */
export type OnAttempt = (name: string, attempt: number, error: string) => void;

/**
 * How much a failure says about the host. The last attempt of a probe is often cut short by the end
 * of its budget ("timed out", "aborted"): reporting that instead of the HTTP 503 seen before would
 * hide the one useful fact.
 */
const Says = {
  /** stopped by us: the budget ran out, or the deploy was interrupted */
  nothing: 0,
  /** no answer in time */
  timeout: 1,
  /** the network answered: refused, unreachable, reset, no such name */
  network: 2,
  /** the service answered, wrongly: an HTTP status, a command's exit status */
  answer: 3,
} as const;
type Says = (typeof Says)[keyof typeof Says];

class ProbeError extends Error {
  readonly says: Says;
  constructor(message: string, says: Says) {
    super(message);
    this.says = says;
  }
}

const RETRY_MS = 1000;

export function probeName(p: Probe): string {
  if (p.name) return p.name;
  if ('tcp' in p) return `tcp ${p.tcp}`;
  if ('http' in p) return `http ${p.http}`;
  return `command ${Array.isArray(p.command) ? p.command.join(' ') : p.command}`;
}

/**
 * Runs one probe until it passes or `budgetMs` is spent. The failure reported is the most
 * informative one seen (the latest among equals), with the last attempt's error beside it when
 * that differs.
 */
export async function runProbe(p: Probe, budgetMs: number, signal?: AbortSignal, onAttempt?: OnAttempt): Promise<ProbeResult> {
  const name = probeName(p);
  const until = Date.now() + Math.max(0, budgetMs);
  let attempts = 0;
  let best: ProbeError | undefined;
  let last: ProbeError | undefined;
  while (Date.now() < until && !signal?.aborted) {
    attempts++;
    const left = until - Date.now();
    try {
      await once(p, Math.min(left, 'command' in p ? left : 5000), signal);
      return { name, ok: true, attempts };
    } catch (err) {
      last = err instanceof ProbeError ? err : new ProbeError((err as Error).message, Says.timeout);
      // A timeout cut short by the budget's end says nothing the earlier attempts did not.
      if (Date.now() >= until - 50 && last.says === Says.timeout) last = new ProbeError(last.message, Says.nothing);
      if (signal?.aborted) last = new ProbeError('stopped (interrupted)', Says.nothing);
      if (!best || last.says >= best.says) best = last;
    }
    const wait = Math.min(RETRY_MS, until - Date.now());
    if (wait > 0 && !signal?.aborted) onAttempt?.(name, attempts, last.message);
    if (wait > 0) await sleep(wait, undefined, signal ? { signal } : {}).catch(() => {});
  }
  if (!best || !last) return { name, ok: false, attempts, detail: signal?.aborted ? 'stopped (interrupted)' : 'no attempt fitted in the confirm window' };
  const detail = best === last ? best.message : `${best.message} (last attempt: ${last.message})`;
  return { name, ok: false, attempts, detail };
}

async function once(p: Probe, timeoutMs: number, signal?: AbortSignal): Promise<void> {
  if ('tcp' in p) {
    const i = p.tcp.lastIndexOf(':');
    const host = p.tcp.slice(0, i).replace(/^\[|\]$/g, '');
    const port = Number(p.tcp.slice(i + 1));
    await new Promise<void>((resolve, reject) => {
      const sock = connect({ host, port, timeout: timeoutMs });
      const stop = () => {
        sock.destroy();
        reject(new ProbeError('stopped (interrupted)', Says.nothing));
      };
      signal?.addEventListener('abort', stop, { once: true });
      const end = () => signal?.removeEventListener('abort', stop);
      sock.once('connect', () => {
        end();
        sock.destroy();
        resolve();
      });
      sock.once('timeout', () => {
        end();
        sock.destroy();
        reject(new ProbeError(`no TCP connection to ${p.tcp} within ${Math.round(timeoutMs / 1000)}s`, Says.timeout));
      });
      sock.once('error', (err: NodeJS.ErrnoException) => {
        end();
        reject(new ProbeError(`${p.tcp}: ${err.code ?? err.message}`, err.code === 'ETIMEDOUT' ? Says.timeout : Says.network));
      });
    });
    return;
  }
  if ('http' in p) {
    let res: Response;
    try {
      const timeout = AbortSignal.timeout(timeoutMs);
      res = await fetch(p.http, { signal: signal ? AbortSignal.any([timeout, signal]) : timeout, redirect: 'manual' });
    } catch (err) {
      if (signal?.aborted) throw new ProbeError('stopped (interrupted)', Says.nothing);
      const cause = (err as { cause?: { code?: string } }).cause?.code;
      const name = (err as Error).name;
      if (name === 'TimeoutError' || name === 'AbortError') throw new ProbeError(`${p.http}: no answer within ${Math.round(timeoutMs / 1000)}s`, Says.timeout);
      throw new ProbeError(`${p.http}: ${cause ?? (err as Error).message}`, cause === 'UND_ERR_CONNECT_TIMEOUT' ? Says.timeout : Says.network);
    }
    await res.body?.cancel();
    if (res.status !== p.expectStatus) throw new ProbeError(`${p.http} answered ${res.status}, expected ${p.expectStatus}`, Says.answer);
    return;
  }
  const [file, args] = Array.isArray(p.command) ? [p.command[0]!, p.command.slice(1)] : ['/bin/sh', ['-c', p.command]];
  const execa = await loadExeca();
  const r = await execa(file, args, { reject: false, timeout: timeoutMs, stdin: 'ignore', ...(signal ? { cancelSignal: signal } : {}) });
  if (signal?.aborted) throw new ProbeError('stopped (interrupted)', Says.nothing);
  if (r.timedOut) throw new ProbeError(`timed out after ${Math.round(timeoutMs / 1000)}s`, Says.timeout);
  if (r.exitCode !== 0) {
    const why = String(r.stderr || r.stdout).trim().split('\n').slice(-1)[0];
    throw new ProbeError(`exited ${r.exitCode ?? r.signal}${why ? `: ${why}` : ''}`, r.exitCode === undefined ? Says.nothing : Says.answer);
  }
}

/** All probes in parallel; each gets its own timeout, capped by the budget left in the window. */
export async function runProbes(
  probes: Probe[],
  defaultTimeoutSec: number,
  budgetMs: number,
  onResult?: (r: ProbeResult) => void,
  more: { signal?: AbortSignal; onAttempt?: OnAttempt } = {},
): Promise<ProbeResult[]> {
  return Promise.all(
    probes.map(async (p) => {
      const r = await runProbe(p, Math.min((p.timeoutSec ?? defaultTimeoutSec) * 1000, budgetMs), more.signal, more.onAttempt);
      onResult?.(r);
      return r;
    }),
  );
}
