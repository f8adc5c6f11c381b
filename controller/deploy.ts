// The deploy flow for one host (DESIGN §6), told in order:
//   authenticate → activate (stream progress) → close → dial a *fresh* connection → probes
//   → confirm (or rollback when a probe fails) → report.
// If no fresh connection gets through inside the window, wait past the deadline and ask again, so
// the report is the host's own outcome, never a guess. The flow is two halves, `trial` (up to
// passed probes) and `finish` (confirm or roll back), so that `--atomic` can hold every host
// between them until all have passed, and `--hold` can leave the trial running for the operator to
// decide (`held`). After an interruption (Ctrl-C) nothing is started, confirmed or rolled back any
// more: a host in a trial is followed until its own outcome.

import { setTimeout as sleep } from 'node:timers/promises';
import { EXIT, SnapbackError, exitCodeFor, type ExitCode } from '../shared/errors.ts';
import type { FleetHost, Probe } from '../shared/fleet.ts';
import { MAX_TIMER_MS, describeOutcome, type Outcome, type Target } from '../shared/model.ts';
import { duration, kernelNote } from '../shared/text.ts';
import type { ServerMessage } from '../shared/protocol.ts';
import type { Signer } from '../shared/ssh.ts';
import { probeName, runProbes, type ProbeResult } from './probes.ts';
import { localClosure, pushClosure, type PushProgress } from './push.ts';
import { Session, type SessionOptions } from './session.ts';

/** `held`: probes passed and the trial left running on purpose (`--hold`); the operator decides. */
export type HostStatus = 'confirmed' | 'reverted' | 'failed' | 'unreachable' | 'unknown' | 'dry-run' | 'held';

export interface HostResult {
  host: string;
  status: HostStatus;
  id?: string;
  outcome?: Outcome;
  failedProbes?: ProbeResult[];
  /** the host's refusal code, when it refused (`timeout-out-of-range`, `busy`, …) */
  code?: string;
  message: string;
  /** a held trial: its deadline (the host's clock, ISO 8601), seconds left then, and the commands that decide it */
  deadline?: string;
  secondsLeft?: number;
  commands?: { confirm: string; extend: string; rollback: string };
}

export type DeployEvent =
  /** selected, not started yet: why it waits (dependencies, --parallel), or that it is about to connect */
  | { type: 'queued'; host: string; why: string }
  | { type: 'connecting'; host: string }
  | { type: 'connected'; host: string; as: string }
  /** `kernel`: the kernel-side parts that differ from the host's booted system ([]: userland only) */
  | { type: 'phase'; host: string; id: string; phase: string; toplevel?: string; kernel?: string[] }
  /** a trial boot (`--reboot`): the host reboots into the target once; the trial starts when it is up */
  | { type: 'rebooting'; host: string; id: string; toplevel: string; loader: string; entry: string }
  | { type: 'line'; host: string; id: string; line: string }
  | { type: 'trial'; host: string; id: string; secondsLeft: number; deadline: string }
  | { type: 'reconnecting'; host: string; attempt: number; error: string }
  | { type: 'reconnected'; host: string }
  | { type: 'probing'; host: string; id: string; names: string[] }
  /** a failed probe attempt that will be retried */
  | { type: 'probe-attempt'; host: string; name: string; attempt: number; error: string }
  | { type: 'probe'; host: string; name: string; ok: boolean; detail?: string }
  | { type: 'confirming'; host: string; id: string }
  | { type: 'rolling-back'; host: string; id: string; why: string }
  | { type: 'waiting'; host: string; id: string; seconds: number; why: string }
  | { type: 'building'; host: string; installable: string }
  | { type: 'push'; host: string; paths: number; totalPaths: number; bytes: number; totalBytes: number; bytesPerSec?: number; secondsLeft?: number; done?: boolean }
  | { type: 'done'; host: string; result: HostResult }
  /**
   * Ctrl-C (`round` 1) or a second one (`round` 2, leaving now): where this host stands, and the
   * commands that decide its trial. `exiting`: the controller exits right after these events.
   */
  | {
      type: 'interrupted';
      host: string;
      round: 1 | 2;
      exiting: boolean;
      state: 'trial' | 'activating' | 'untouched';
      id?: string;
      secondsLeft?: number;
      deadline?: string;
      confirm: string;
      rollback: string;
    };

/**
 * An interruption of the whole run (Ctrl-C). The flows check it at every decision; it also knows
 * which hosts were sent `activate` and, once it runs, their trial's deadline.
 */
export class Interruption {
  private readonly ac = new AbortController();
  /** hosts sent `activate` and not ended: their trial once it runs (monotonic deadline, the host's wall-clock one) */
  readonly live = new Map<string, { id?: string; deadline?: number; wall?: string }>();
  /** the options that find the fleet again (`--fleet FILE`), for the commands shown */
  private readonly fleetArgs: string[];

  constructor(fleetArgs: string[] = []) {
    this.fleetArgs = fleetArgs;
  }

  get signal(): AbortSignal {
    return this.ac.signal;
  }

  get interrupted(): boolean {
    return this.ac.signal.aborted;
  }

  interrupt(): void {
    this.ac.abort();
  }

  command(verb: 'confirm' | 'rollback' | 'extend', host: string, ...args: string[]): string {
    return ['snapback', verb, host, ...args, ...this.fleetArgs].map(shellWord).join(' ');
  }

  /** The event that tells where `host` stands, with its commands. */
  event(host: string, round: 1 | 2, exiting: boolean): Extract<DeployEvent, { type: 'interrupted' }> {
    const t = this.live.get(host);
    const state = !t ? 'untouched' : t.deadline === undefined ? 'activating' : 'trial';
    return {
      type: 'interrupted',
      host,
      round,
      exiting,
      state,
      ...(t?.id ? { id: t.id } : {}),
      ...(t?.deadline !== undefined ? { secondsLeft: Math.max(0, Math.round((t.deadline - mono()) / 1000)) } : {}),
      ...(t?.wall ? { deadline: t.wall } : {}),
      confirm: this.command('confirm', host),
      rollback: this.command('rollback', host),
    };
  }
}

/** `word` as one shell word: as is when it is plain, else single-quoted. */
export function shellWord(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/** A toplevel in the operator's store, sent to the host before it is activated. */
export interface PushPlan {
  toplevel: string;
  /** the host fetches what its own caches have first */
  substitute: boolean;
}

export interface DeployHostOptions {
  name: string;
  host: FleetHost;
  target: Target;
  timeoutSec?: number;
  probes: Probe[];
  probeTimeoutSec: number;
  signers: Signer[];
  emit: (e: DeployEvent) => void;
  session?: SessionOptions;
  /** how long to keep asking for the outcome after the deadline (default 120 s) */
  graceSec?: number;
  /** only build or fetch and `switch-to-configuration dry-activate`: show what would change */
  dryRun?: boolean;
  push?: PushPlan;
  interruption?: Interruption;
  /** `--hold`: once the probes passed, neither confirm nor roll back; report the trial as `held` */
  hold?: boolean;
  /** `--reboot`: a trial boot (DESIGN §11) instead of `switch-to-configuration test` */
  reboot?: boolean;
}

/** How long a trial boot's host may take to come back before its window starts. */
export const BOOT_WAIT_SEC = 600;

const mono = () => performance.now();

/** A host whose trial runs and whose probes passed, held on a fresh connection that may confirm. */
export interface Passed {
  kind: 'passed';
  host: string;
  id: string;
  session: Session;
  token: string;
  /** monotonic ms: the host's deadline, and the latest moment to send confirm or rollback */
  deadline: number;
  lastCall: number;
  /** the host's own deadline (its clock, ISO 8601), when it said it */
  wall?: string;
  /** the confirm window the trial started with, in seconds */
  windowSec: number;
}

export async function deployHost(o: DeployHostOptions): Promise<HostResult> {
  const t = await trial(o);
  if (t.kind === 'ended') return t.result;
  return o.hold ? hold(o, t) : finish(o, t, { confirm: true });
}

function done(o: DeployHostOptions, result: HostResult): HostResult {
  o.interruption?.live.delete(o.name);
  o.emit({ type: 'done', host: o.name, result });
  return result;
}

/** The first half: everything up to passed probes. Anything else ends here, reported, with its result. */
export async function trial(o: DeployHostOptions): Promise<Passed | { kind: 'ended'; result: HostResult }> {
  const r = await trialFlow(o).catch((err: Error) => afterActivation(o.name, err));
  return 'kind' in r ? r : { kind: 'ended', result: done(o, r) };
}

/**
 * What an error that escaped the flow means: every failure before `activate` is answered inside it
 * (exit 3, nothing changed), so whatever escapes came after — the host may be in a trial, and its
 * own deadline decides. One host's surprise never takes the other hosts' results with it.
 */
function afterActivation(host: string, err: Error): HostResult {
  // A fleet file that cannot be used is the operator's error (exit 2), found before any change.
  if (err instanceof SnapbackError && err.code === 'config-invalid') throw err;
  return { host, status: 'unknown', message: `outcome unknown: ${err.message}` };
}

async function trialFlow(o: DeployHostOptions): Promise<Passed | HostResult> {
  const { name } = o;
  const x = o.interruption;
  if (x?.interrupted) return notStarted(name);
  o.emit({ type: 'connecting', host: name });
  // What to push is read from this machine's store while the host is dialled.
  if (o.push) void localClosure(o.push.toplevel);
  let first: Session;
  try {
    first = await Session.open(name, o.host, o.signers, o.session);
  } catch (err) {
    return unreachable(name, err);
  }
  o.emit({ type: 'connected', host: name, as: first.welcome.you });
  if (o.push) {
    const refused = await push(o, first, o.push);
    if (refused) return refused;
  }
  if (o.dryRun) return dryRun(o, first);
  if (x?.interrupted) {
    first.close();
    return notStarted(name);
  }

  let id: string | undefined;
  // From here the host may change: an interruption must wait for the answer and then say so.
  x?.live.set(name, {});
  const answer = await first.command({ type: 'activate', target: o.target, ...(o.timeoutSec ? { timeoutSec: o.timeoutSec } : {}), ...(o.reboot ? { reboot: true } : {}) }, (m) => {
    if (m.type !== 'progress') return;
    id ??= m.id;
    if (m.phase && !m.reboot) o.emit({ type: 'phase', host: name, id: m.id, phase: m.phase, ...(m.toplevel ? { toplevel: m.toplevel } : {}), ...(m.kernel ? { kernel: m.kernel } : {}) });
    if (m.line !== undefined) o.emit({ type: 'line', host: name, id: m.id, line: m.line });
  });
  // The connection that carried the activation may have survived the switch only thanks to
  // conntrack: it must not be the one that confirms (promise 5).
  first.close();

  let deadline: number;
  let wall: string | undefined;
  let windowSec = o.timeoutSec ?? 300;
  if (answer.type === 'trial') {
    id = answer.id;
    deadline = mono() + answer.secondsLeft * 1000;
    wall = answer.deadline;
    windowSec = o.timeoutSec ?? answer.secondsLeft;
    x?.live.set(name, { id, deadline, wall: answer.deadline });
    o.emit({ type: 'trial', host: name, id, secondsLeft: answer.secondsLeft, deadline: answer.deadline });
    if (x?.interrupted) {
      o.emit(x.event(name, 1, false));
      return follow(o, id, deadline);
    }
  } else if (answer.type === 'rebooting') {
    // The window starts once the new system is up: wait for the host to come back first.
    id = answer.id;
    deadline = mono() + (BOOT_WAIT_SEC + windowSec) * 1000;
    x?.live.set(name, { id });
    o.emit({ type: 'rebooting', host: name, id, toplevel: answer.toplevel, loader: answer.loader, entry: answer.entry });
  } else if (answer.type === 'outcome') {
    const r = fromOutcome(name, answer.id, answer.outcome);
    return answer.outcome.outcome === 'failed' ? { ...r, message: r.message + hintFor(o, answer.outcome.code) } : r;
  } else if (answer.type === 'error' && answer.code === 'unreachable' && id) {
    // Lost during the switch: the host holds its own deadline; find out where it stands.
    deadline = mono() + (o.timeoutSec ?? 300) * 1000;
    x?.live.set(name, { id });
  } else if (answer.type === 'error') {
    const status: HostStatus = answer.code === 'unauthorized' ? 'unreachable' : answer.code === 'unreachable' ? 'unknown' : 'failed';
    return { host: name, status, code: answer.code, ...(answer.id ? { id: answer.id } : {}), message: `activate refused (${answer.code}): ${answer.message}${hintFor(o, answer.code)}` };
  } else {
    return { host: name, status: 'unknown', message: `unexpected answer "${answer.type}" to activate` };
  }

  const window = Math.max(0, deadline - mono());
  const margin = Math.min(10_000, Math.max(1000, window * 0.1));
  const fresh = await freshTrialSession(o, id, deadline - margin, window);
  if (fresh.kind === 'outcome') return fromOutcome(name, id, fresh.outcome);
  if (x?.interrupted) {
    if (fresh.kind === 'session') fresh.session.close();
    return follow(o, id, deadline);
  }
  if (fresh.kind === 'none') {
    const seconds = Math.ceil((deadline - mono()) / 1000);
    o.emit({ type: 'waiting', host: name, id, seconds: Math.max(0, seconds), why: 'no fresh connection got through inside the confirm window; the host will revert on its own' });
    return learnOutcome(o, id, deadline);
  }
  const { session, token } = fresh;
  // The host's own countdown is the truth (our estimate is rough if the first connection was lost).
  if (fresh.secondsLeft !== undefined) deadline = mono() + fresh.secondsLeft * 1000;
  wall = fresh.deadline ?? wall;
  x?.live.set(name, { ...x.live.get(name), id, deadline, ...(wall ? { wall } : {}) });
  // A trial boot's trial began in the new boot: this is the first the controller hears of its window.
  if (o.reboot && fresh.secondsLeft !== undefined && wall) o.emit({ type: 'trial', host: name, id, secondsLeft: fresh.secondsLeft, deadline: wall });

  const budget = deadline - margin - mono();
  o.emit({ type: 'probing', host: name, id, names: o.probes.map(probeName) });
  const results = await runProbes(
    o.probes,
    o.probeTimeoutSec,
    budget,
    (r) => {
      if (!x?.interrupted) o.emit({ type: 'probe', host: name, name: r.name, ok: r.ok, ...(r.detail ? { detail: r.detail } : {}) });
    },
    {
      ...(x ? { signal: x.signal } : {}),
      onAttempt: (probe, attempt, error) => o.emit({ type: 'probe-attempt', host: name, name: probe, attempt, error }),
    },
  );
  if (x?.interrupted) {
    session.close();
    return follow(o, id, deadline);
  }
  const failed = results.filter((r) => !r.ok);
  if (failed.length) {
    const why = failed.map((r) => `probe ${r.name} failed: ${r.detail}`).join('; ');
    o.emit({ type: 'rolling-back', host: name, id, why });
    const r = await session.command({ type: 'rollback', id });
    session.close();
    const outcome = await settle(o, id, deadline, r);
    return { ...outcome, failedProbes: failed, message: `${outcome.message} — ${why}` };
  }

  return { kind: 'passed', host: name, id, session, token, deadline, lastCall: deadline - margin, windowSec, ...(wall ? { wall } : {}) };
}

/**
 * The second half: confirm (the host's health gate may still refuse: then roll back rather than
 * leave it waiting for its deadline), or roll back with the reason given.
 */
export async function finish(o: DeployHostOptions, p: Passed, decision: { confirm: true } | { confirm: false; why: string }): Promise<HostResult> {
  return finishFlow(o, p, decision).catch((err: Error) => done(o, { ...afterActivation(o.name, err), id: p.id }));
}

async function finishFlow(o: DeployHostOptions, p: Passed, decision: { confirm: true } | { confirm: false; why: string }): Promise<HostResult> {
  const { name } = o;
  const { session, id, deadline } = p;
  if (o.interruption?.interrupted) {
    session.close();
    return done(o, await follow(o, id, deadline));
  }
  if (!decision.confirm) {
    o.emit({ type: 'rolling-back', host: name, id, why: decision.why });
    const back = await session.command({ type: 'rollback', id });
    session.close();
    const outcome = await settle(o, id, deadline, back);
    return done(o, { ...outcome, message: `${outcome.message} — ${decision.why}` });
  }
  o.emit({ type: 'confirming', host: name, id });
  const r = await session.command({ type: 'confirm', id, token: p.token }, (m) => {
    if (m.type === 'progress' && m.problems) o.emit({ type: 'line', host: name, id, line: `health gate: ${m.problems.join('; ')}` });
  });
  if (r.type === 'error' && r.code === 'health-failed' && o.interruption?.interrupted) {
    session.close();
    return done(o, await follow(o, id, deadline));
  }
  if (r.type === 'error' && r.code === 'health-failed') {
    o.emit({ type: 'rolling-back', host: name, id, why: r.message });
    const back = await session.command({ type: 'rollback', id });
    session.close();
    const outcome = await settle(o, id, deadline, back);
    return done(o, { ...outcome, message: `${outcome.message} — ${r.message}` });
  }
  session.close();
  return done(o, await settle(o, id, deadline, r));
}

/**
 * `--hold`: the probes passed, and the operator asked to decide later. The fresh connection is
 * closed without a word: the trial runs on, and a later `snapback confirm` dials its own fresh one
 * (the agent hands the token to every connection accepted after the switch). Nothing was decided,
 * so the host is reported `held`, with its deadline and the exact commands that decide it.
 */
export async function hold(o: DeployHostOptions, p: Passed): Promise<HostResult> {
  const { name } = o;
  const { session, id, deadline } = p;
  session.close();
  if (o.interruption?.interrupted) return done(o, await follow(o, id, deadline));
  const secondsLeft = Math.max(0, Math.floor((deadline - mono()) / 1000));
  const wall = p.wall ?? new Date(Date.now() + secondsLeft * 1000).toISOString();
  const x = o.interruption ?? new Interruption();
  const commands = { confirm: x.command('confirm', name), extend: x.command('extend', name, String(p.windowSec)), rollback: x.command('rollback', name) };
  const at = new Date(wall).toLocaleTimeString('en-GB', { hour12: false });
  const message =
    `probes passed; held in its trial (deployment ${id}): reverts on its own at ${at}, in ${duration(secondsLeft)}, unless confirmed` +
    ` — keep it: ${commands.confirm}   more time: ${commands.extend}   undo it now: ${commands.rollback}`;
  return done(o, { host: name, status: 'held', id, deadline: wall, secondsLeft, commands, message });
}

/**
 * Sends what the host lacks of the toplevel's closure over the authenticated session, reporting
 * progress at most twice a second. Nothing on the running system changes; a refusal ends here.
 */
async function push(o: DeployHostOptions, session: Session, plan: PushPlan): Promise<HostResult | undefined> {
  const started = mono();
  let last = -Infinity;
  const emit = (p: PushProgress, done = false) => {
    const t = mono();
    if (!done && t - last < 500) return;
    last = t;
    const seconds = (t - started) / 1000;
    const rate = seconds > 0.2 && p.bytes > 0 ? p.bytes / seconds : undefined;
    o.emit({
      type: 'push',
      host: o.name,
      ...p,
      ...(rate ? { bytesPerSec: Math.round(rate), secondsLeft: Math.ceil((p.totalBytes - p.bytes) / rate) } : {}),
      ...(done ? { done } : {}),
    });
  };
  try {
    emit(await pushClosure(session, plan.toplevel, { substitute: plan.substitute, onProgress: (p) => emit(p) }), true);
    return undefined;
  } catch (err) {
    session.close();
    const e = err as SnapbackError;
    const status: HostStatus = e.code === 'unreachable' ? 'unreachable' : 'failed';
    return { host: o.name, status, message: `push of ${plan.toplevel} refused (${e.code ?? 'push-failed'}): ${e.message}; the running system was not touched` };
  }
}

async function dryRun(o: DeployHostOptions, session: Session): Promise<HostResult> {
  const answer = await session.command({ type: 'activate', target: o.target, dryRun: true }, (m) => {
    if (m.type === 'progress' && m.line !== undefined) o.emit({ type: 'line', host: o.name, id: m.id, line: m.line });
  });
  session.close();
  if (answer.type === 'dry-run') {
    const ok = answer.exit === 0;
    const kernel = answer.kernel ? `; ${kernelNote(answer.kernel)}` : '';
    return { host: o.name, status: ok ? 'dry-run' : 'failed', id: answer.id, message: `dry-activate of ${answer.toplevel} exited ${answer.exit ?? 'without a status'}; nothing was changed${kernel}` };
  }
  if (answer.type === 'error') return { host: o.name, status: 'failed', message: `dry run refused (${answer.code}): ${answer.message}` };
  return { host: o.name, status: 'unknown', message: `unexpected answer "${answer.type}" to a dry run` };
}

/** Turns the final answer to confirm/rollback into a result; asks again if the connection dropped. */
async function settle(o: DeployHostOptions, id: string, deadline: number, m: ServerMessage): Promise<HostResult> {
  if (m.type === 'outcome') return fromOutcome(o.name, id, m.outcome);
  if (m.type === 'error' && m.outcome) return fromOutcome(o.name, id, m.outcome);
  if (m.type === 'error' && m.code === 'unreachable' && o.reboot) {
    // A trial boot reverts by rebooting: the outcome is told once the host is back.
    const until = Math.max(deadline, mono()) + (BOOT_WAIT_SEC + (o.graceSec ?? 120)) * 1000;
    return askOutcome(o, id, () => until, 'outcome unknown after the trial boot');
  }
  if (m.type === 'error' && m.code === 'unreachable') return learnOutcome(o, id, deadline);
  if (m.type === 'error') return { host: o.name, status: 'unknown', id, message: `${m.code}: ${m.message}` };
  return { host: o.name, status: 'unknown', id, message: `unexpected answer "${m.type}"` };
}

/** A host this run will not start, after an interruption. */
function notStarted(host: string): HostResult {
  return { host, status: 'failed', message: 'not started: interrupted (Ctrl-C); nothing was changed' };
}

/**
 * After an interruption: this run decides nothing, but it does not leave the operator guessing
 * either. It asks the host every 2 s until the trial ends — confirmed or rolled back by hand
 * (`snapback confirm HOST`), or reverted at its deadline — and reports that outcome.
 */
async function follow(o: DeployHostOptions, id: string, deadline: number): Promise<HostResult> {
  let until = deadline + (o.graceSec ?? 120) * 1000;
  // The host's own count: an extend moves the end of the wait with it. Quiet while the trial runs.
  return askOutcome(o, id, () => until, 'outcome unknown after the interruption', (secondsLeft) => {
    if (secondsLeft !== undefined) until = mono() + secondsLeft * 1000 + (o.graceSec ?? 120) * 1000;
  });
}

/**
 * Asks the host every 2 s, over a new connection each time, for the outcome of `id` until `until()`:
 * that outcome, or `unknown` with the last thing learnt. `onRunning` (if given) hears each answer of
 * a deployment still running instead of it being reported as a reconnect.
 */
async function askOutcome(o: DeployHostOptions, id: string, until: () => number, unknown: string, onRunning?: (secondsLeft?: number) => void): Promise<HostResult> {
  let last = 'no connection';
  for (let attempt = 1; mono() < until(); attempt++) {
    try {
      const s = await Session.open(o.name, o.host, o.signers, { ...o.session, timeoutMs: 5000 });
      const st = s.welcome.state;
      s.close();
      if (st.last?.id === id) return fromOutcome(o.name, id, st.last.outcome);
      if (st.deployment?.id !== id) {
        last = `the host does not know ${id}`;
        break;
      }
      last = `still ${st.phase}`;
      if (onRunning) onRunning(st.deployment.secondsLeft);
      else o.emit({ type: 'reconnecting', host: o.name, attempt, error: last });
    } catch (err) {
      if (err instanceof SnapbackError && err.code === 'config-invalid') throw err;
      last = suspicious(err);
      o.emit({ type: 'reconnecting', host: o.name, attempt, error: last });
    }
    await sleep(Math.min(2000, Math.max(0, until() - mono())));
  }
  return { host: o.name, status: 'unknown', id, message: `${unknown}: ${last}` };
}

type Fresh = { kind: 'session'; session: Session; token: string; secondsLeft?: number; deadline?: string } | { kind: 'outcome'; outcome: Outcome } | { kind: 'none' };

/** Dials new connections with backoff until one carries the confirm token for `id`, or `until`. */
async function freshTrialSession(o: DeployHostOptions, id: string, until: number, windowMs: number): Promise<Fresh> {
  let delay = 250;
  for (let attempt = 1; mono() < until && !o.interruption?.interrupted; attempt++) {
    let error: string;
    try {
      const s = await Session.open(o.name, o.host, o.signers, { ...o.session, timeoutMs: Math.max(500, Math.min(5000, until - mono())) });
      const w = s.welcome;
      if (w.confirm?.id === id) {
        o.emit({ type: 'reconnected', host: o.name });
        const left = w.state.deployment?.secondsLeft;
        const wall = w.state.deployment?.deadline;
        return { kind: 'session', session: s, token: w.confirm.token, ...(left !== undefined ? { secondsLeft: left } : {}), ...(wall ? { deadline: wall } : {}) };
      }
      s.close();
      if (w.state.last?.id === id) return { kind: 'outcome', outcome: w.state.last.outcome };
      if (w.state.deployment?.id !== id) return { kind: 'none' };
      error = `the deployment is ${w.state.phase}`;
      // Still building or switching: its window has not even started.
      if (w.state.phase === 'preparing' || w.state.phase === 'activating') until = Math.max(until, mono() + windowMs);
    } catch (err) {
      if (err instanceof SnapbackError && err.code === 'config-invalid') throw err;
      error = suspicious(err);
    }
    o.emit({ type: 'reconnecting', host: o.name, attempt, error });
    await sleep(Math.max(0, Math.min(delay, until - mono())), undefined, o.interruption ? { signal: o.interruption.signal } : {}).catch(() => {});
    delay = Math.min(delay * 2, 2000);
  }
  return { kind: 'none' };
}

/** After the deadline: keep asking the host for the outcome of `id`; `unknown` if it never answers. */
async function learnOutcome(o: DeployHostOptions, id: string, deadline: number): Promise<HostResult> {
  // In steps: Node fires a timer longer than MAX_TIMER_MS at once, and the host tells the deadline.
  while (deadline + 1000 - mono() > 0) await sleep(Math.min(MAX_TIMER_MS, deadline + 1000 - mono()));
  const until = mono() + (o.graceSec ?? 120) * 1000;
  return askOutcome(o, id, () => until, 'outcome unknown');
}

/**
 * After the activation a wrong host key (or TLS pin) is not "nothing changed, stop": the host is in
 * a trial either way. It is said loudly, and the next attempt may reach the real host.
 */
function suspicious(err: unknown): string {
  const message = (err as Error).message;
  return err instanceof SnapbackError && err.details?.hostKey ? `${message} — the host was reached with the right key before; someone in the middle?` : message;
}

/** What to do about a refusal the operator can fix from here. */
function hintFor(o: DeployHostOptions, code: string): string {
  if (code === 'fetch-failed' && 'storePath' in o.target && !o.push) {
    return ' — this machine does not have that path either, so it was not pushed: build it here (nix build, or nix-store --realise) and deploy again to push it, or give the host a cache that has it (nix.substituters in its agent.json)';
  }
  return '';
}

function fromOutcome(host: string, id: string, outcome: Outcome): HostResult {
  const status: HostStatus = outcome.outcome === 'confirmed' ? 'confirmed' : outcome.outcome === 'reverted' ? 'reverted' : 'failed';
  return { host, status, id, outcome, message: describeOutcome(outcome) };
}

function unreachable(host: string, err: unknown): HostResult {
  if (err instanceof SnapbackError && err.code === 'config-invalid') throw err;
  return { host, status: 'unreachable', message: `${(err as Error).message} — nothing was changed` };
}

/** 0 all confirmed; 4 any outcome unknown; 1 any reverted or failed; 3 any unreachable before a change. */
export function exitCodeOf(results: HostResult[]): ExitCode {
  const has = (s: HostStatus) => results.some((r) => r.status === s);
  if (has('unknown')) return EXIT.unknown;
  // Refused as the operator's error (timeout-out-of-range): exit 2, as the console says it.
  const usage = (r: HostResult) => r.code !== undefined && exitCodeFor(r.code) === EXIT.usage;
  if (results.some(usage) && !results.some((r) => (r.status === 'reverted' || r.status === 'failed') && !usage(r))) return EXIT.usage;
  if (has('reverted') || has('failed')) return EXIT.failed;
  if (has('unreachable')) return EXIT.unreachable;
  return EXIT.ok;
}
