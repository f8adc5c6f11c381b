// How the controller reports: on a terminal, one live line per host (phase, countdown, probes)
// redrawn in place; otherwise one plain line per event and host; with `--json`, one JSON object per
// event and a final `result` object.

import { duration } from '../shared/text.ts';
import type { DeployEvent, HostResult } from './deploy.ts';

export type Mode = 'json' | 'text' | 'live';

export interface Renderer {
  event(e: DeployEvent): void;
  result(results: HostResult[], exit: number): void;
}

export function renderer(mode: Mode, out: NodeJS.WritableStream = process.stdout): Renderer {
  if (mode === 'live') return new LiveLines(out);
  if (mode === 'json') {
    return {
      event: ({ type, ...rest }) => out.write(JSON.stringify({ type: 'event', event: type, ...rest }) + '\n'),
      result: (hosts, exit) => out.write(JSON.stringify({ type: 'result', exit, hosts }) + '\n'),
    };
  }
  return {
    event(e) {
      const line = describe(e);
      if (line !== undefined) out.write(`${e.host}: ${line}\n`);
    },
    result(hosts, exit) {
      if (hosts.length > 1) {
        out.write('\n');
        for (const h of hosts) out.write(`  ${h.host.padEnd(16)} ${h.status.padEnd(12)} ${h.message}\n`);
      }
      out.write(exit === 0 ? '' : `exit ${exit}\n`);
    },
  };
}

function describe(e: DeployEvent): string | undefined {
  switch (e.type) {
    case 'connected':
      return `authenticated as ${e.as}`;
    case 'phase':
      return e.phase === 'activating' ? `activating ${e.toplevel ?? ''} (deployment ${e.id})` : e.phase === 'trial' ? undefined : e.phase;
    case 'line':
      return `  | ${e.line}`;
    case 'trial':
      return `trial running; the host reverts by itself in ${e.secondsLeft}s unless confirmed`;
    case 'reconnecting':
      return `reconnecting (attempt ${e.attempt}): ${e.error}`;
    case 'reconnected':
      return 'reachable over a fresh connection';
    case 'probe':
      return `probe ${e.name}: ${e.ok ? 'ok' : `FAILED (${e.detail})`}`;
    case 'confirming':
      return 'probes passed; confirming';
    case 'rolling-back':
      return `rolling back: ${e.why}`;
    case 'waiting':
      return `waiting ${e.seconds}s for the deadline: ${e.why}`;
    case 'building':
      return `building ${e.installable} here`;
    case 'push':
      return describePush(e);
    case 'done':
      if (e.result.status === 'confirmed') return 'confirmed';
      if (e.result.status === 'dry-run') return e.result.message;
      return e.result.outcome ? e.result.message : `${e.result.status}: ${e.result.message}`;
  }
}

function describePush(e: Extract<DeployEvent, { type: 'push' }>): string {
  const paths = (n: number) => `${n} path${n === 1 ? '' : 's'}`;
  if (e.done) return e.totalPaths ? `pushed ${paths(e.paths)}, ${mib(e.bytes)}` : 'the host has the whole closure already: nothing to push';
  const rate = e.bytesPerSec ? `, ${mib(e.bytesPerSec)}/s, ${duration(e.secondsLeft ?? 0)} left` : '';
  return `pushing ${e.paths}/${paths(e.totalPaths)}, ${mib(e.bytes)} of ${mib(e.totalBytes)}${rate}`;
}

function mib(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

interface Row {
  text: string;
  deadline?: number;
  done?: boolean;
}

/** One line per host, redrawn in place on every event and once a second for the countdowns. */
class LiveLines implements Renderer {
  private readonly out: NodeJS.WritableStream;
  private readonly rows = new Map<string, Row>();
  private drawn = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(out: NodeJS.WritableStream) {
    this.out = out;
    this.timer = setInterval(() => this.draw(), 1000);
    this.timer.unref();
  }

  event(e: DeployEvent): void {
    const row = this.rows.get(e.host) ?? { text: '' };
    this.rows.set(e.host, row);
    if (e.type === 'trial') row.deadline = Date.now() + e.secondsLeft * 1000;
    if (e.type === 'done') {
      row.done = true;
      delete row.deadline;
    }
    const text = e.type === 'line' ? `| ${e.line}` : e.type === 'trial' ? 'trial running' : describe(e);
    if (text !== undefined) row.text = text;
    this.draw();
  }

  result(hosts: HostResult[], exit: number): void {
    clearInterval(this.timer);
    this.draw();
    if (exit !== 0) this.out.write(`exit ${exit}\n`);
  }

  private draw(): void {
    const width = Math.max(8, ...[...this.rows.keys()].map((h) => h.length));
    // A wrapped line would throw the cursor arithmetic off: cut each line to the terminal's width.
    const columns = (this.out as { columns?: number }).columns ?? 200;
    let frame = this.drawn ? `\x1b[${this.drawn}F` : '';
    for (const [host, row] of this.rows) {
      const left = row.deadline !== undefined ? `[reverts in ${duration(Math.max(0, Math.ceil((row.deadline - Date.now()) / 1000)))}] ` : '';
      const line = `${host.padEnd(width)}  ${left}${row.text}`;
      frame += `\x1b[2K${line.length >= columns ? `${line.slice(0, columns - 2)}…` : line}\n`;
    }
    this.drawn = this.rows.size;
    this.out.write(frame);
  }
}
