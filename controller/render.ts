// How the controller reports: on a terminal, one live line per host (phase, countdown, probes)
// redrawn in place; otherwise one plain line per event and host; with `--json`, one JSON object per
// event and a final `result` object. Whatever a host said reaches the terminal cleaned of control
// characters (shared/terminal.ts), in every mode.

import { eventLine, resultLine } from '../shared/output.ts';
import { kernelNote } from '../shared/text.ts';
import { clean, oneLine } from '../shared/terminal.ts';
import { duration } from '../shared/text.ts';
import type { DeployEvent, HostResult } from './deploy.ts';

export type Mode = 'json' | 'text' | 'live';

export interface Renderer {
  event(e: DeployEvent): void;
  result(results: HostResult[], exit: number): void;
}

export interface RendererOptions {
  /** the selected hosts: each has its row from the first frame */
  hosts?: string[];
}

export function renderer(mode: Mode, out: NodeJS.WritableStream = process.stdout, opts: RendererOptions = {}): Renderer {
  if (mode === 'live') return new LiveLines(out, opts.hosts ?? []);
  if (mode === 'json') {
    return {
      event: ({ type, ...rest }) => out.write(eventLine(type, rest)),
      result: (hosts, exit) => out.write(resultLine(exit, { hosts })),
    };
  }
  return new PlainLines(out);
}

/** One line per event, prefixed with the host; a retried probe only when its error changes. */
class PlainLines implements Renderer {
  private readonly out: NodeJS.WritableStream;
  private readonly lastAttempt = new Map<string, string>();
  private interruptedRound = 0;

  constructor(out: NodeJS.WritableStream) {
    this.out = out;
  }

  event(e: DeployEvent): void {
    if (e.type === 'probe-attempt') {
      const key = `${e.host}\0${e.name}`;
      if (this.lastAttempt.get(key) === e.error) return;
      this.lastAttempt.set(key, e.error);
    }
    if (e.type === 'interrupted' && e.round > this.interruptedRound) {
      this.interruptedRound = e.round;
      for (const l of interruptHeader(e)) this.out.write(`${l}\n`);
    }
    const line = describe(e);
    if (line !== undefined) this.out.write(`${e.host}: ${oneLine(line)}\n`);
  }

  result(hosts: HostResult[], exit: number): void {
    if (hosts.length > 1) {
      this.out.write('\n');
      for (const h of hosts) this.out.write(`  ${h.host.padEnd(16)} ${h.status.padEnd(12)} ${oneLine(h.message)}\n`);
    }
    this.out.write(exit === 0 ? '' : `exit ${exit}\n`);
  }
}

function describe(e: DeployEvent): string | undefined {
  switch (e.type) {
    case 'queued':
      return e.why === 'connecting…' ? undefined : e.why;
    case 'connecting':
      return undefined;
    case 'connected':
      return `authenticated as ${e.as}`;
    case 'phase':
      if (e.phase === 'activating') return `activating ${e.toplevel ?? ''} (deployment ${e.id})${e.kernel ? `; ${kernelNote(e.kernel)}` : ''}`;
      return e.phase === 'trial' ? undefined : e.phase;
    case 'rebooting':
      return `trial boot: rebooting into ${e.toplevel} once (${e.loader} entry ${e.entry}); the boot default stays the previous system — waiting for the host to come back`;
    case 'line':
      return `  | ${e.line}`;
    case 'trial':
      return `trial running; the host reverts by itself in ${e.secondsLeft}s unless confirmed`;
    case 'reconnecting':
      return `reconnecting (attempt ${e.attempt}): ${e.error}`;
    case 'reconnected':
      return 'reachable over a fresh connection';
    case 'probing':
      return e.names.length ? `probing: ${e.names.join(', ')}` : undefined;
    case 'probe-attempt':
      return `probe ${e.name}: attempt ${e.attempt} failed: ${e.error} (retrying)`;
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
    case 'interrupted':
      return describeInterrupted(e);
    case 'done':
      if (e.result.status === 'confirmed') return e.result.message.startsWith('confirmed') ? e.result.message.split(' — ')[0]! : 'confirmed';
      if (e.result.status === 'dry-run' || e.result.status === 'held') return e.result.message;
      return e.result.outcome ? e.result.message : `${e.result.status}: ${e.result.message}`;
  }
}

type Interrupted = Extract<DeployEvent, { type: 'interrupted' }>;

/** What Ctrl-C did, said once before the hosts' lines. */
function interruptHeader(e: Interrupted): string[] {
  if (e.round === 2) return ['Ctrl-C again: leaving now. Nothing was confirmed or rolled back; these hosts keep their trials:'];
  if (e.exiting) return ['Interrupted (Ctrl-C) before any host was activated: nothing was changed.'];
  return [
    'Interrupted (Ctrl-C). From now on this run confirms, rolls back and starts nothing; it follows each trial to its end.',
    'Decide with the commands below (from another terminal, or after leaving). Ctrl-C again to leave now: the hosts keep their trials.',
  ];
}

function describeInterrupted(e: Interrupted): string {
  if (e.state === 'untouched') return 'not activated; nothing was changed';
  const decide = `keep it: ${e.confirm}   undo it now: ${e.rollback}`;
  if (e.state === 'activating') return `activating: it will be in a trial that reverts on its own unless confirmed — ${decide}`;
  const at = e.deadline ? ` at ${clock(e.deadline)}` : '';
  return `in a trial (deployment ${e.id}): reverts on its own${at}, in ${duration(e.secondsLeft ?? 0)}, unless confirmed — ${decide}`;
}

/** A wall-clock time as the operator reads it: local HH:MM:SS. */
function clock(iso: string): string {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleTimeString('en-GB', { hour12: false });
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

/** What a row remembers besides its text: the countdown, the probes, and what explains its end. */
interface Row {
  text: string;
  deadline?: number;
  done?: boolean;
  /** probes running now: name → the last failed attempt's error, if any */
  probes?: Map<string, string | undefined>;
  /** the host's last output lines (build and switch) */
  tail: string[];
  /** every output line of a dry run: the would-start/stop/restart lists */
  dryRun: string[];
  /** why the host waited, retried or rolled back, in order */
  why: string[];
  /** the last error of a reconnection attempt */
  reconnect?: string;
  /** the interrupt left this trial to the operator */
  leftToOperator?: boolean;
}

const TAIL = 10;
const DRY_RUN_LINES = 40;

/**
 * One line per host, redrawn in place on every event and once a second for the countdowns, with a
 * line per running probe under it. A host that ends leaves the live block: its last line and the
 * lines that explain the end (the switch's last output when activation failed, the dry run's lists,
 * why it timed out) are written once above it, where they stay.
 */
class LiveLines implements Renderer {
  private readonly out: NodeJS.WritableStream;
  private readonly rows = new Map<string, Row>();
  /** lines to write above the live block on the next draw, once */
  private above: string[] = [];
  private drawn = 0;
  private readonly timer: NodeJS.Timeout;
  private interruptedRound = 0;
  private width = 8;

  constructor(out: NodeJS.WritableStream, hosts: string[]) {
    this.out = out;
    for (const h of hosts) this.rows.set(h, newRow('connecting…'));
    this.width = Math.max(8, ...hosts.map((h) => h.length));
    this.timer = setInterval(() => this.draw(), 1000);
    this.timer.unref();
    if (hosts.length) this.draw();
  }

  event(e: DeployEvent): void {
    let row = this.rows.get(e.host);
    if (!row) {
      row = newRow('');
      this.rows.set(e.host, row);
      this.width = Math.max(this.width, e.host.length);
    }
    switch (e.type) {
      case 'trial':
        row.deadline = Date.now() + e.secondsLeft * 1000;
        row.text = 'trial running';
        break;
      case 'line':
        row.text = `| ${e.line}`;
        row.tail.push(e.line);
        if (row.tail.length > TAIL) row.tail.shift();
        if (row.dryRun.length < DRY_RUN_LINES + 1) row.dryRun.push(e.line);
        if (e.line.startsWith('health gate: ')) row.why.push(e.line);
        break;
      case 'probing':
        row.probes = new Map(e.names.map((n) => [n, undefined]));
        row.text = describe(e) ?? row.text;
        break;
      case 'probe-attempt':
        row.probes?.set(e.name, e.error);
        break;
      case 'probe':
        row.probes?.delete(e.name);
        if (!e.ok) row.why.push(`probe ${e.name} failed: ${e.detail}`);
        row.text = this.probeSummary(row, e);
        break;
      case 'reconnecting':
        row.reconnect = e.error;
        row.text = describe(e)!;
        break;
      case 'waiting':
        row.why.push(e.why);
        row.deadline = Date.now() + e.seconds * 1000;
        row.text = `waiting: ${e.why}`;
        break;
      case 'queued':
        row.text = e.why;
        break;
      case 'connecting':
        row.text = 'connecting…';
        break;
      case 'reconnected':
        delete row.reconnect;
        row.text = describe(e)!;
        break;
      case 'rolling-back':
        row.probes = undefined;
        row.text = describe(e)!;
        break;
      case 'interrupted':
        if (e.round > this.interruptedRound) {
          this.interruptedRound = e.round;
          this.above.push('', ...interruptHeader(e));
        }
        this.above.push(`  ${e.host.padEnd(this.width)}  ${describeInterrupted(e)}`);
        if (e.round === 2 || e.exiting) this.above.push('');
        if (e.state === 'trial') {
          row.leftToOperator = true;
          row.probes = undefined;
          row.deadline = Date.now() + (e.secondsLeft ?? 0) * 1000;
          row.text = `in a trial, left to you (${e.confirm}); following it to its end`;
        }
        break;
      case 'done':
        row.done = true;
        delete row.deadline;
        row.probes = undefined;
        row.text = describe(e)!;
        this.above.push(this.line(e.host, row), ...explain(row, e.result).map((l) => `${' '.repeat(this.width + 2)}  ${l}`));
        this.rows.delete(e.host);
        break;
      default: {
        const text = describe(e);
        if (text !== undefined) row.text = text;
      }
    }
    this.draw();
  }

  result(_hosts: HostResult[], exit: number): void {
    clearInterval(this.timer);
    this.draw();
    if (exit !== 0) this.out.write(`exit ${exit}\n`);
  }

  private probeSummary(row: Row, e: Extract<DeployEvent, { type: 'probe' }>): string {
    const last = `probe ${e.name}: ${e.ok ? 'ok' : `FAILED (${e.detail})`}`;
    const waiting = row.probes?.size ?? 0;
    return waiting ? `${last}; ${waiting} more running` : last;
  }

  private line(host: string, row: Row): string {
    const left = row.deadline !== undefined ? `[reverts in ${duration(Math.max(0, Math.ceil((row.deadline - Date.now()) / 1000)))}] ` : '';
    return `${host.padEnd(this.width)}  ${left}${oneLine(row.text)}`;
  }

  private draw(): void {
    const columns = (this.out as { columns?: number }).columns ?? 200;
    // The block must fit on the screen, or moving up to redraw it would miss its first lines.
    const height = Math.max(3, ((this.out as { rows?: number }).rows ?? 50) - 2);
    // A wrapped line would throw the cursor arithmetic off: cut each line to the terminal's width.
    const fit = (l: string) => `\x1b[2K${l.length >= columns ? `${l.slice(0, columns - 2)}…` : l}\n`;
    const block: string[][] = [];
    for (const [host, row] of this.rows) {
      const lines = [this.line(host, row)];
      for (const [name, error] of row.probes ?? []) lines.push(`${' '.repeat(this.width + 2)}  … ${name}${error ? `: ${oneLine(error)}` : ': running'}`);
      block.push(lines);
    }
    let live = block.flat();
    if (live.length > height) live = block.map((b) => b[0]!);
    if (live.length > height) live = [...live.slice(0, height - 1), `… and ${live.length - height + 1} more hosts`];
    let frame = this.drawn ? `\x1b[${this.drawn}F` : '';
    for (const l of this.above) frame += `\x1b[2K${clean(l).split('\n').join(' ')}\n`;
    this.above = [];
    for (const l of live) frame += fit(l);
    frame += '\x1b[J';
    this.drawn = live.length;
    this.out.write(frame);
  }
}

function newRow(text: string): Row {
  return { text, tail: [], dryRun: [], why: [] };
}

/** The lines that explain how a host ended, kept on screen under its last line. */
function explain(row: Row, r: HostResult): string[] {
  const lines: string[] = [];
  const outcome = r.outcome;
  if (r.status === 'dry-run' || (r.status === 'failed' && /^dry-activate/.test(r.message))) {
    lines.push(...row.dryRun.slice(0, DRY_RUN_LINES).map((l) => `| ${l}`));
    if (row.dryRun.length > DRY_RUN_LINES) lines.push('| …');
    return lines;
  }
  if (r.status === 'confirmed') return lines;
  const activation = outcome?.outcome === 'reverted' && outcome.reason === 'activation-failed';
  if ((activation || (outcome?.outcome === 'failed' || r.status === 'failed')) && row.tail.length) {
    lines.push(`the host's last output:`, ...row.tail.map((l) => `| ${l}`));
  }
  for (const w of new Set(row.why)) if (!r.message.includes(w)) lines.push(w);
  if (row.reconnect) lines.push(`last connection attempt: ${row.reconnect}`);
  return lines;
}
