// Probes: does the host still work from where the operator sits? `tcp`, `http` and `command`, each
// retried until its own timeout, which never reaches past the confirm window.

import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import type { Probe } from '../shared/fleet.ts';

export interface ProbeResult {
  name: string;
  ok: boolean;
  attempts: number;
  /** the last failure, when not ok */
  detail?: string;
}

const RETRY_MS = 1000;

export function probeName(p: Probe): string {
  if (p.name) return p.name;
  if ('tcp' in p) return `tcp ${p.tcp}`;
  if ('http' in p) return `http ${p.http}`;
  return `command ${Array.isArray(p.command) ? p.command.join(' ') : p.command}`;
}

/** Runs one probe until it passes or `budgetMs` is spent. */
export async function runProbe(p: Probe, budgetMs: number, signal?: AbortSignal): Promise<ProbeResult> {
  const name = probeName(p);
  const until = Date.now() + Math.max(0, budgetMs);
  let attempts = 0;
  let detail = 'no attempt fitted in the confirm window';
  while (Date.now() < until && !signal?.aborted) {
    attempts++;
    const left = until - Date.now();
    try {
      await once(p, Math.min(left, 'command' in p ? left : 5000));
      return { name, ok: true, attempts };
    } catch (err) {
      detail = (err as Error).message;
    }
    const wait = Math.min(RETRY_MS, until - Date.now());
    if (wait > 0) await sleep(wait, undefined, signal ? { signal } : {}).catch(() => {});
  }
  return { name, ok: false, attempts, detail };
}

async function once(p: Probe, timeoutMs: number): Promise<void> {
  if ('tcp' in p) {
    const i = p.tcp.lastIndexOf(':');
    const host = p.tcp.slice(0, i).replace(/^\[|\]$/g, '');
    const port = Number(p.tcp.slice(i + 1));
    await new Promise<void>((resolve, reject) => {
      const sock = connect({ host, port, timeout: timeoutMs });
      sock.once('connect', () => {
        sock.destroy();
        resolve();
      });
      sock.once('timeout', () => {
        sock.destroy();
        reject(new Error(`no TCP connection to ${p.tcp} within ${Math.round(timeoutMs / 1000)}s`));
      });
      sock.once('error', (err: NodeJS.ErrnoException) => reject(new Error(`${p.tcp}: ${err.code ?? err.message}`)));
    });
    return;
  }
  if ('http' in p) {
    let res: Response;
    try {
      res = await fetch(p.http, { signal: AbortSignal.timeout(timeoutMs), redirect: 'manual' });
    } catch (err) {
      const cause = (err as { cause?: { code?: string } }).cause?.code;
      throw new Error(`${p.http}: ${cause ?? (err as Error).message}`);
    }
    await res.body?.cancel();
    if (res.status !== p.expectStatus) throw new Error(`${p.http} answered ${res.status}, expected ${p.expectStatus}`);
    return;
  }
  const [file, args] = Array.isArray(p.command) ? [p.command[0]!, p.command.slice(1)] : ['/bin/sh', ['-c', p.command]];
  const r = await execa(file, args, { reject: false, timeout: timeoutMs, stdin: 'ignore' });
  if (r.timedOut) throw new Error(`timed out after ${Math.round(timeoutMs / 1000)}s`);
  if (r.exitCode !== 0) {
    const why = String(r.stderr || r.stdout).trim().split('\n').slice(-1)[0];
    throw new Error(`exited ${r.exitCode ?? r.signal}${why ? `: ${why}` : ''}`);
  }
}

/** All probes in parallel; each gets its own timeout, capped by the budget left in the window. */
export async function runProbes(probes: Probe[], defaultTimeoutSec: number, budgetMs: number, onResult?: (r: ProbeResult) => void): Promise<ProbeResult[]> {
  return Promise.all(
    probes.map(async (p) => {
      const r = await runProbe(p, Math.min((p.timeoutSec ?? defaultTimeoutSec) * 1000, budgetMs));
      onResult?.(r);
      return r;
    }),
  );
}
