// The agent engine: owns the state, feeds events to the pure lifecycle one at a time, persists the
// new state *before* carrying out its effects (Nix, switch runs, timers, history), and answers requests
// from the console and the network with the same code.

import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { existsSync, lstatSync, readdirSync, rmSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { run } from '../shared/exec.ts';
import type { AgentConfig } from '../shared/config.ts';
import { SnapbackError, type ErrorCode } from '../shared/errors.ts';
import type { Actor, HistoryEntry, Outcome, Phase, Target } from '../shared/model.ts';
import { MAX_TIMER_MS, describeTarget } from '../shared/model.ts';
import { DirectRunner, SystemdRunner, type RunResult, type Runner } from './activation.ts';
import { FallbackTimer, systemdRunning } from './systemd.ts';
import { now, readBootId } from './clock.ts';
import { healthProblems } from './health.ts';
import { step, secondsLeft, type Announcement, type Effect, type Event, type ProfileBefore, type Reply, type State } from './lifecycle.ts';
import type { Logger } from './log.ts';
import { Nix, profiles, readCurrentSystem } from './nix.ts';
import { TrialBoots, bootStartedMono, detectBootloader, kernelChanges, requestReboot, unsupported } from './boot.ts';
import { failpoint } from './failpoint.ts';
import type { PushPlaces } from './push.ts';
import { StateDir } from './state-dir.ts';
import { VERSION } from '../shared/version.ts';
import type { HostStatus } from '../shared/protocol.ts';

/** What listeners see while a deployment runs: lifecycle announcements plus raw output lines. */
export type Progress = Announcement | { type: 'output'; id: string; line: string };

export type Result =
  | {
      ok: true;
      id?: string;
      outcome?: Outcome;
      deadline?: string;
      toplevel?: string;
      dryRun?: { exit: number | null };
      /** the kernel-side parts that differ from the booted system ([]: userland only) */
      kernel?: string[];
      /** a trial boot: the host is rebooting into the target once */
      rebooting?: { loader: string; entry: string };
    }
  | { ok: false; code: ErrorCode; message: string; id?: string; outcome?: Outcome };

/** What `status` answers, on the console and in `welcome` (the schema lives in shared/protocol.ts). */
export type Status = HostStatus;

/**
 * What observers (metrics, outcome hooks) are told: a history entry once it is on disk, in order,
 * and refusals that leave no entry. Observers run after the fact and cannot change it.
 */
export type Observation =
  | { type: 'recorded'; entry: HistoryEntry }
  | { type: 'confirm-refused'; code: ErrorCode }
  | { type: 'auth-failed'; reason: string };

/** How often a state that could not be saved is tried again. */
const RETRY_MS = 1000;
/** Waits between attempts of an effect that threw (a commit, a revert); then it ends the deployment. */
const BACKOFF_MS = [1000, 2000, 4000, 0];

/** The fallback timer fires this long after the deadline: the agent itself reverts first. */
export const FALLBACK_MARGIN_SEC = 5;

export interface AgentOptions {
  /** how the fallback timer starts this agent again: `[node, script, '--config', file]` */
  reinvoke?: string[];
  runner?: Runner;
}

export class Agent {
  readonly config: AgentConfig;
  readonly dir: StateDir;
  private readonly log: Logger;
  private readonly nix: Nix;
  private readonly runner: Runner;
  private readonly fallback: FallbackTimer | undefined;
  private readonly boots: TrialBoots;
  private state: State;
  private queue: Promise<unknown> = Promise.resolve();
  private readonly listeners = new Set<(p: Progress) => void>();
  private readonly observers = new Set<(o: Observation) => void>();
  /** more facts for `status` (agent/metrics.ts adds the counts the metrics expose) */
  facts: (() => Status['metrics']) | undefined;
  private readonly stopped = new Set<string>();
  private readonly background = new Set<Promise<unknown>>();
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  /** the state in memory is not on disk yet (a full or read-only state directory) */
  private dirty = false;
  /** history entries not yet on disk, oldest first */
  private readonly unrecorded: HistoryEntry[] = [];
  private retry: NodeJS.Timeout | undefined;

  private constructor(config: AgentConfig, log: Logger, state: State, options: AgentOptions) {
    this.config = config;
    this.log = log;
    this.dir = new StateDir(config.stateDir);
    this.nix = new Nix(config.nix);
    const kind = config.system.runner ?? (systemdRunning() ? 'systemd' : 'direct');
    this.runner = options.runner ?? (kind === 'systemd' ? new SystemdRunner(this.dir.runsDir) : new DirectRunner(this.dir.runsDir));
    this.fallback = kind === 'systemd' && options.reinvoke ? new FallbackTimer(options.reinvoke, log) : undefined;
    this.state = state;
    this.boots = new TrialBoots({
      system: config.system,
      runner: this.runner,
      runLimit: () => this.runLimit(),
      switchLockFree: (id) => this.switchLockFree(id),
      onLine: (id) => (line) => this.emit({ type: 'output', id, line }),
      log,
    });
  }

  /**
   * Takes the state directory (`busy` if another agent process acts on it) and reads it; a corrupt
   * state file throws `state-corrupt` and nothing is touched.
   */
  static open(config: AgentConfig, log: Logger, options: AgentOptions = {}): Agent {
    const dir = new StateDir(config.stateDir);
    dir.ensure();
    const release = dir.lock(readBootId(config.system.bootIdFile));
    try {
      const agent = new Agent(config, log, dir.load(), options);
      agent.releaseLock = release;
      return agent;
    } catch (err) {
      release();
      throw err;
    }
  }

  private releaseLock: () => void = () => {};

  get runnerName(): 'direct' | 'systemd' {
    return this.runner.name;
  }

  /** Resumes whatever the previous process left: a countdown, a switch, a commit, a revert. */
  async start(): Promise<void> {
    this.recoverOutcome();
    // Leftovers of pushes cut off by a stop: half-received NARs, and roots of pushes a day old that
    // no deployment followed.
    rmSync(this.pushPlaces().tmpDir, { recursive: true, force: true });
    this.sweepRoots({ live: this.state.deployment?.id, pushOlderThanMs: 24 * 3600_000, dryRuns: true });
    const current = readCurrentSystem(this.config.system.currentSystem);
    // A trial boot's window counts from the boot (systemd's start); without systemd, from now.
    const since = this.state.deployment?.reboot && this.runner.name === 'systemd' ? await bootStartedMono().catch(() => undefined) : undefined;
    await this.dispatch({ type: 'start', bootId: this.bootId(), current, token: randomBytes(24).toString('base64url'), ...(since !== undefined ? { bootStartedMono: since } : {}) });
  }

  /**
   * Promise 13: an outcome saved in state.json but missing from the history (killed between the
   * two writes, or a disk that filled up) is appended now, marked as recovered.
   */
  private recoverOutcome(): void {
    const last = this.state.last;
    if (!last) return;
    let mine: HistoryEntry[];
    try {
      mine = this.dir.readHistory().filter((e) => e.id === last.id);
    } catch (err) {
      // An unreadable history must never keep the agent (or a fallback revert) from starting.
      this.log.error({ err: (err as Error).message }, 'cannot read the history; not checking it for the last outcome');
      return;
    }
    if (mine.some((e) => e.outcome)) return;
    this.log.warn({ deployment: last.id }, 'the history lacks the last outcome; appending it from state.json');
    this.unrecorded.push({
      at: last.finishedAt,
      id: last.id,
      from: mine.at(-1)?.to ?? 'idle',
      to: 'idle',
      event: 'recovered',
      by: last.by,
      target: describeTarget(last.target),
      ...(last.toplevel ? { toplevel: last.toplevel } : {}),
      ...(last.previous ? { previous: last.previous } : {}),
      outcome: last.outcome,
      detail: 'recorded at the next start: the agent stopped before the history had it',
    });
    this.flushHistory();
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.retry) clearInterval(this.retry);
    await this.queue;
    this.releaseLock();
  }

  /** Waits for background work (tests, one-shot `revert`). */
  async idle(): Promise<void> {
    while (this.background.size) await Promise.allSettled([...this.background]);
    await this.queue;
  }

  get phase(): Phase {
    return this.state.phase;
  }

  subscribe(listener: (p: Progress) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  observe(observer: (o: Observation) => void): () => void {
    this.observers.add(observer);
    return () => this.observers.delete(observer);
  }

  /** Tells the observers; one that throws is logged and never disturbs the agent. */
  tell(o: Observation): void {
    for (const observer of this.observers) {
      try {
        observer(o);
      } catch (err) {
        this.log.error({ err: (err as Error).stack }, 'an observer failed');
      }
    }
  }

  /** Read once: a process lives in one boot, and a read must not fail later (EMFILE) where a status is asked. */
  private bootId(): string {
    return (this.bootIdCache ??= readBootId(this.config.system.bootIdFile));
  }
  private bootIdCache: string | undefined;

  // ---- the event loop -------------------------------------------------------------------------

  dispatch(event: Event): Promise<Reply | undefined> {
    const run = this.queue.then(() => this.apply(event));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * Promise 17: no effect that moves toward the new system (prepare, switch, health gate, commit)
   * runs before the state that precedes it is on disk. Confirm and extend are refused when the save
   * fails; a step toward the previous system (a revert, an outcome) goes ahead and its state is
   * saved by the retry that runs every second until the disk takes it.
   */
  private async apply(event: Event): Promise<Reply | undefined> {
    const at = now();
    let result = step(this.state, event, at);
    if (result.state !== this.state) {
      const unsaved = this.persist(result.state);
      if (unsaved !== undefined) {
        if (event.type === 'activate' || event.type === 'confirm' || event.type === 'extend') {
          return { ok: false, code: 'state-unwritable', message: `${unsaved}; nothing was changed` };
        }
        if (movesForward(result.effects) || result.state.phase === 'trial' && this.state.phase !== 'trial') {
          const instead = insteadOf(event, unsaved);
          if (!instead) {
            this.log.error({ event: event.type, err: unsaved }, 'cannot save the state; not acting on it');
            return { ok: false, code: 'state-unwritable', message: unsaved };
          }
          result = step(this.state, instead, at);
          if (result.state !== this.state && this.persist(result.state) !== undefined) this.retryLater();
        } else {
          this.log.error({ event: event.type, err: unsaved }, 'cannot save the state; going on toward the previous system and saving it as soon as the disk takes it');
          this.retryLater();
        }
      }
    }
    this.state = result.state;
    for (const effect of result.effects) this.perform(effect, at.wall);
    return result.reply;
  }

  /** Saves `state`; returns why it could not, or undefined. */
  private persist(state: State): string | undefined {
    try {
      this.dir.save(state);
      this.dirty = false;
      return undefined;
    } catch (err) {
      this.dirty = true;
      return (err as Error).message;
    }
  }

  /** Keeps trying to save the state and append the history entries that did not make it to disk. */
  private retryLater(): void {
    if (this.retry || this.closed) return;
    this.retry = setInterval(() => {
      this.queue = this.queue.then(() => {
        if (this.dirty && this.persist(this.state) === undefined) this.log.warn('the state directory takes writes again; state saved');
        this.flushHistory();
        if (!this.dirty && this.unrecorded.length === 0 && this.retry) {
          clearInterval(this.retry);
          this.retry = undefined;
        }
      }).catch((err: Error) => this.log.error({ err: err.stack }, 'retrying the state directory failed'));
    }, RETRY_MS);
  }

  /** Appends the history entries in order; what does not fit now is appended by the retry. */
  private flushHistory(): void {
    while (this.unrecorded.length) {
      try {
        this.dir.appendHistory(this.unrecorded[0]!);
      } catch (err) {
        this.log.error({ err: (err as Error).message, pending: this.unrecorded.length }, 'cannot append to the history; will retry');
        this.retryLater();
        return;
      }
      this.tell({ type: 'recorded', entry: this.unrecorded.shift()! });
    }
  }

  private perform(effect: Effect, at: string): void {
    switch (effect.kind) {
      case 'record':
        this.unrecorded.push({ at, ...effect.entry } as HistoryEntry);
        return this.flushHistory();
      case 'log':
        this.log[effect.level](this.logFields(), effect.msg);
        return;
      case 'announce':
        this.emit(effect.announcement);
        return;
      case 'arm':
        this.arm(effect.atMono);
        return;
      case 'release':
        this.release();
        return;
      case 'fallback': {
        const fallback = this.fallback;
        if (!fallback) return;
        const id = effect.id;
        if ('cancel' in effect) return this.spawn(() => fallback.cancel(id));
        const inSec = (effect.atMono - now().mono) / 1000 + FALLBACK_MARGIN_SEC;
        return this.spawn(() => fallback.arm(id, inSec).catch((err: Error) => this.log.error({ deployment: id }, err.message)));
      }
      case 'prepare':
        return this.spawn(async () => {
          const d = effect.deployment;
          try {
            // Promise 19: garbage collection cannot take the revert target while the deployment lives.
            // Its root is made while the target is obtained (two Nix processes at once, not one after
            // the other: the time to "trial running"); both must succeed before anything runs.
            const held = this.nix.hold(d.previous, this.dir.gcRoot(`${d.id}-previous`)).then(
              () => undefined,
              (err: Error) => new SnapbackError('no-current-system', `cannot hold the previous system ${d.previous} with a GC root: ${err.message}`),
            );
            const toplevel = await this.nix
              .obtain(d.target, this.dir.gcRoot(d.id), this.config.system.profile, (line) => this.emit({ type: 'output', id: d.id, line }))
              .finally(() => held);
            const holdError = await held;
            if (holdError) throw holdError;
            // Promise 17: the switch's and the revert's files exist before anything runs, so a revert
            // on a disk that filled up meanwhile needs no new file.
            try {
              this.runner.prepare(`activate-${d.id}`);
              this.runner.prepare(`revert-${d.id}`);
            } catch (err) {
              throw new SnapbackError('state-unwritable', `cannot create the switch's run files: ${(err as Error).message}`);
            }
            // Promise 3: the independent revert exists before anything changes. Its first time is an
            // upper bound (switch limit + window); the trial's real deadline re-arms it.
            if (this.fallback) {
              try {
                await this.fallback.arm(d.id, d.activationTimeoutSec + d.timeoutSec + FALLBACK_MARGIN_SEC);
              } catch (err) {
                throw new SnapbackError('internal', `${(err as Error).message}; refusing to activate without it`);
              }
            }
            const kernel = kernelChanges(this.config.system.bootedSystem, toplevel);
            let profile: ProfileBefore | undefined;
            if (d.reboot) {
              profile = profiles.snapshot(this.config.system.profile);
              if (profile.path !== d.previous) {
                throw new SnapbackError('no-trial-boot', `a trial boot needs the running system to be the boot default, and ${this.config.system.profile} points at ${profile.path ?? 'nothing'}, not the running ${d.previous}; confirm or switch first`);
              }
            }
            await this.dispatch({ type: 'prepared', id: d.id, toplevel, ...(kernel ? { kernel } : {}), ...(profile ? { profile } : {}) });
          } catch (err) {
            const e = asSnapbackError(err);
            await this.dispatch({ type: 'prepare-failed', id: d.id, code: e.code, message: e.message, ...(typeof e.details?.output === 'string' ? { detail: e.details.output } : {}) });
          }
        });
      case 'activate':
        return this.spawn(async () => {
          const key = `activate-${effect.id}`;
          const onLine = (line: string) => this.emit({ type: 'output', id: effect.id, line });
          let started = effect.resume;
          const { exit } = await this.attempt(
            async () => {
              if (started) return this.runner.resume(key, onLine);
              started = true;
              return this.runner.run(key, effect.toplevel, 'test', onLine);
            },
            (error) => {
              this.log.error({ deployment: effect.id, err: error }, 'lost track of the switch');
              return { exit: null };
            },
          );
          const timedOut = this.stopped.delete(effect.id);
          await this.dispatch({ type: 'activation-finished', id: effect.id, exit, timedOut, token: randomBytes(24).toString('base64url') });
        });
      case 'stop-activation':
        this.stopped.add(effect.id);
        return this.spawn(() => this.runner.stop(`activate-${effect.id}`));
      case 'prepare-commit':
        return this.spawn(async () => {
          const problems = await healthProblems(this.config, effect.unitsFailed, this.runner.name === 'systemd').catch((err: Error) => [`health checks could not run: ${err.message}`]);
          let profile: ProfileBefore = { generation: null, path: null, newest: null };
          try {
            profile = profiles.snapshot(this.config.system.profile);
          } catch (err) {
            problems.push(`cannot read the system profile: ${(err as Error).message}`);
          }
          await this.dispatch({ type: 'commit-ready', id: effect.id, problems, profile });
        });
      // Promise 17: every effect ends in an event; an exception is retried, then becomes the outcome.
      case 'commit':
        return this.spawn(async () =>
          this.dispatch(await this.attempt(() => this.commit(effect), (error) => ({ type: 'commit-finished', id: effect.id, ok: false, error }))),
        );
      case 'revert':
        return this.spawn(async () => {
          const event = await this.attempt(
            () => (effect.boot ? this.boots.revert(effect) : this.revert(effect)),
            (error) => ({ type: 'revert-finished', id: effect.id, result: 'failed', error }) as Event,
          );
          // A trial boot's revert is a reboot: its event comes in the next boot.
          if (event) await this.dispatch(event);
        });
      case 'arm-boot':
        return this.spawn(async () => this.dispatch(await this.boots.arm(effect)));
      case 'reboot':
        return this.spawn(async () => {
          // A moment for the answer (`rebooting`) to reach the controller or the console first.
          await sleep(1000);
          if (this.closed) return;
          failpoint('boot:reboot');
          await this.attempt(
            () => requestReboot(this.config.system.rebootCommand),
            (error) => {
              this.log.error({ deployment: effect.id, err: error }, 'the reboot could not be asked for; the activation limit reverts the trial boot');
            },
          );
        });
    }
  }

  /** Runs `task`, retrying with backoff when it throws; after the last attempt, `otherwise(why)`. */
  private async attempt<T>(task: () => Promise<T>, otherwise: (error: string) => T): Promise<T> {
    for (let i = 0; ; i++) {
      try {
        return await task();
      } catch (err) {
        const error = (err as Error).message;
        // Out of descriptors, processes or memory: that passes, and giving up would leave a trial
        // running past its deadline. Anything else is tried a few times, then ends in an event.
        const transient = /\b(EMFILE|ENFILE|EAGAIN|ENOMEM)\b/.test(error);
        if ((!transient && i + 1 >= BACKOFF_MS.length) || this.closed) return otherwise(error);
        const wait = BACKOFF_MS[Math.min(i, BACKOFF_MS.length - 1)]!;
        this.log.error({ err: error, retryInMs: wait }, 'an effect failed; retrying');
        await sleep(wait);
      }
    }
  }

  /**
   * The fields of a lifecycle log line, for filtering the journal's JSON lines: the deployment, the
   * phase it is in now, and once it ended (back to idle) its outcome and reason.
   */
  private logFields(): Record<string, string> {
    const { phase, deployment, last } = this.state;
    if (deployment) return { deployment: deployment.id, phase };
    if (!last) return { phase };
    const o = last.outcome;
    const reason = o.outcome === 'reverted' ? o.reason : o.outcome === 'failed' ? o.code : o.outcome === 'stuck' ? o.reason : undefined;
    return { deployment: last.id, phase, outcome: o.outcome, ...(reason ? { reason } : {}) };
  }

  private spawn(task: () => Promise<unknown>): void {
    const p = task()
      .catch((err: Error) => this.log.error({ err: err.stack ?? err.message }, 'internal error in a background task'))
      .finally(() => this.background.delete(p));
    this.background.add(p);
  }

  private emit(p: Progress): void {
    for (const l of this.listeners) l(p);
  }

  /** One timer: the lifecycle re-arms for whichever deadline is current and ignores early ticks. */
  private arm(atMono: number): void {
    if (this.closed) return;
    if (this.timer) clearTimeout(this.timer);
    // Node fires a longer timer at once; the early tick changes nothing and arms the rest.
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, atMono - now().mono) + 5);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.dispatch({ type: 'tick' })
        .catch((err: Error) => this.log.error({ err: err.stack }, 'handling the deadline failed'))
        .then(() => {
          const d = this.state.deployment;
          const next = this.state.phase === 'trial' ? d?.trial?.deadlineMono : this.state.phase === 'activating' ? d?.activation?.deadlineMono : undefined;
          if (next !== undefined && !this.timer && next > now().mono) this.arm(next);
        });
    }, delay);
  }

  /** Where a pushed closure goes on its way into the store (agent/push.ts). */
  pushPlaces(): PushPlaces {
    return { tmpDir: join(this.config.stateDir, 'push'), gcRootDir: this.dir.gcRootDir, trustOptions: this.nix.trustOptions(), log: this.log };
  }

  private release(): void {
    // A deployment has ended and no other one lives: its roots, those of ended deployments, and the
    // paths pushed for it (now held by the system profile, or no longer needed) all go.
    this.sweepRoots({ pushOlderThanMs: 0, dryRuns: false });
    this.dir.pruneRuns();
  }

  /**
   * Removes the GC roots no live deployment needs, in one pass over the agent's root directory:
   * those of deployments other than `live` (a `nix-store --add-root` started by an agent that was
   * killed — kill -9, no systemd to end its cgroup — goes on, and makes its root after the next agent
   * released that deployment's; such a root would hold its system for ever), those of pushes at
   * least `pushOlderThanMs` old (pushes no deployment followed), and with `dryRuns` those of dry runs.
   * At each start, and at the end of each deployment.
   */
  private sweepRoots(opts: { live?: string | undefined; pushOlderThanMs: number; dryRuns: boolean }): void {
    const dir = this.dir.gcRootDir;
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return;
    }
    const now = Date.now();
    for (const name of names) {
      const root = join(dir, name);
      if (name.startsWith('push-')) {
        if (opts.pushOlderThanMs && now - (lstatSync(root, { throwIfNoEntry: false })?.mtimeMs ?? 0) < opts.pushOlderThanMs) continue;
      } else if (name.startsWith('dry-')) {
        if (!opts.dryRuns) continue;
      } else {
        const deployment = /^(\d{8}-\d{6}-[0-9a-f]{4})(?:-previous)?$/.exec(name)?.[1];
        if (deployment === undefined || deployment === opts.live) continue;
      }
      try {
        rmSync(root, { force: true });
      } catch (err) {
        this.log.error({ root: name, err: (err as Error).message }, 'cannot remove a GC root no deployment needs');
      }
    }
  }

  // ---- commit and revert: the two operations that change the boot default or the running system

  /**
   * Compare-and-swap (promise 19): waits for NixOS's switch lock, then commits only if the trial's
   * system is the one running. A failed commit puts the profile back by path, deletes only a
   * generation it created, and installs the restored default again.
   */
  private async commit(e: Extract<Effect, { kind: 'commit' }>): Promise<Event> {
    const { profile, currentSystem } = this.config.system;
    const onLine = (line: string) => this.emit({ type: 'output', id: e.id, line });
    await this.switchLockFree(e.id);
    const current = readCurrentSystem(currentSystem);
    if (current !== e.toplevel) {
      if (!e.resume || current !== e.previous) {
        return { type: 'commit-finished', id: e.id, ok: false, error: 'the trial system is no longer running', conflict: current };
      }
      // Rebooted (or switched) mid-commit: the previous system runs, so its generation is the default again.
      const unrestored = await this.restoreProfile(e, onLine);
      const error = 'the trial system was not running when the agent came back; the profile was restored';
      return { type: 'commit-finished', id: e.id, ok: false, abandoned: e.reason, error, ...(unrestored ? { unrestored } : {}) };
    }
    try {
      await profiles.set(profile, e.toplevel);
      const { exit } = await this.runner.run(`boot-${e.id}`, e.toplevel, 'boot', onLine, this.runLimit());
      if (exit !== 0) throw new Error(`switch-to-configuration boot exited ${exit ?? 'without a status'}`);
      return { type: 'commit-finished', id: e.id, ok: true };
    } catch (err) {
      const error = (err as Error).message;
      this.log.error({ deployment: e.id, err: error }, 'commit failed; restoring the profile');
      const unrestored = await this.restoreProfile(e, onLine);
      return { type: 'commit-finished', id: e.id, ok: false, error, ...(unrestored ? { unrestored } : {}) };
    }
  }

  /** Puts the profile back and runs the restored system's `boot`, so the boot default matches it; why not, or undefined. */
  private async restoreProfile(e: Extract<Effect, { kind: 'commit' }>, onLine: (line: string) => void): Promise<string | undefined> {
    try {
      await profiles.restore(this.config.system.profile, e.profile, e.toplevel);
      if (e.profile.path === null) return undefined;
      // The failed or interrupted `boot` may have written the bootloader already.
      const { exit } = await this.runner.run(`boot-restore-${e.id}`, e.profile.path, 'boot', onLine, this.runLimit());
      return exit === 0 ? undefined : `switch-to-configuration boot of the restored ${e.profile.path} exited ${exit ?? 'without a status'}`;
    } catch (err) {
      this.log.error({ deployment: e.id, err: (err as Error).message }, 'restoring the profile failed');
      return (err as Error).message;
    }
  }

  /**
   * Compare-and-swap (promises 9, 19): a revert that already ran (while no agent was up) is not run
   * again; otherwise wait for NixOS's switch lock, then revert only if the trial system (or, after a
   * failed switch, the previous one) runs. Somebody else's system is left alone.
   */
  private async revert(e: Extract<Effect, { kind: 'revert' }>): Promise<Event> {
    const key = `revert-${e.id}`;
    const onLine = (line: string) => this.emit({ type: 'output', id: e.id, line });
    // Running first, then finished: a run that ends between the two checks is read, not started again.
    const limit = this.runLimit();
    if (await this.runner.running(key)) return this.reverted(e, await this.runner.resume(key, onLine, limit.timeoutSec));
    const earlier = await this.runner.finished(key);
    if (earlier) return this.reverted(e, earlier);
    await this.switchLockFree(e.id);
    const current = readCurrentSystem(this.config.system.currentSystem);
    const ours = current === e.toplevel || (e.force && current === e.previous);
    if (!ours) {
      if (current === e.previous) return { type: 'revert-finished', id: e.id, result: 'already-previous' };
      return { type: 'revert-finished', id: e.id, result: 'conflict', current };
    }
    // On a full state directory the switch's output would meet write errors: send it elsewhere.
    const discardOutput = !this.dir.writable();
    return this.reverted(e, await this.runner.run(key, e.previous, 'test', onLine, { discardOutput, ...limit }));
  }

  /** Every switch the agent waits for has a limit: the one for activation. */
  private runLimit(): { timeoutSec: number } {
    return { timeoutSec: this.config.confirm.activationTimeoutSec };
  }

  private reverted(e: Extract<Effect, { kind: 'revert' }>, { exit, timedOut }: RunResult): Event {
    if (timedOut) {
      return { type: 'revert-finished', id: e.id, result: 'failed', error: `${e.previous}/bin/switch-to-configuration test did not finish within confirm.activationTimeoutSec and was stopped` };
    }
    if (exit === 0 || exit === 4) {
      if (exit === 4) this.log.warn({ deployment: e.id }, 'reverted, but some units of the previous system failed to start');
      return { type: 'revert-finished', id: e.id, result: 'reverted' };
    }
    // No status (the run's record was lost): what runs now tells.
    if (exit === null && readCurrentSystem(this.config.system.currentSystem) === e.previous) return { type: 'revert-finished', id: e.id, result: 'reverted' };
    return { type: 'revert-finished', id: e.id, result: 'failed', error: `${e.previous}/bin/switch-to-configuration test exited ${exit ?? 'without a status'}` };
  }

  /** Waits while somebody else's switch holds NixOS's switch lock (at most confirm.activationTimeoutSec). */
  private async switchLockFree(id: string): Promise<void> {
    const lock = this.config.system.switchLock;
    if (!(await switchLockHeld(lock))) return;
    const limit = this.config.confirm.activationTimeoutSec;
    this.log.warn({ deployment: id, lock }, 'another switch-to-configuration holds the switch lock; waiting for it to finish');
    const r = await run('flock', ['--wait', String(limit), '--conflict-exit-code', '75', lock, 'true']);
    if (r.exitCode === 75) throw new SnapbackError('switch-locked', `${lock} was held for more than ${limit}s by another switch`);
    if (r.exitCode !== 0) throw new Error(`flock ${lock}: ${String(r.stderr).trim() || `exit ${r.exitCode}`}`);
  }

  // ---- requests (console and network) ---------------------------------------------------------

  /** Starts a deployment; resolves once the trial runs (with its deadline) or the deployment ended. */
  async activate(req: { target: Target; timeoutSec?: number; by: Actor; reboot?: boolean }, onProgress?: (p: Progress) => void): Promise<Result> {
    const { confirm, system } = this.config;
    const timeoutSec = req.timeoutSec ?? confirm.defaultTimeoutSec;
    if (!Number.isInteger(timeoutSec) || timeoutSec < confirm.minTimeoutSec || timeoutSec > confirm.maxTimeoutSec) {
      return refuse('timeout-out-of-range', `timeout ${timeoutSec}s is outside confirm.minTimeoutSec..maxTimeoutSec (${confirm.minTimeoutSec}..${confirm.maxTimeoutSec})`);
    }
    if (this.state.deployment) {
      return refuse('busy', `deployment ${this.state.deployment.id} is ${this.state.phase}; one deployment at a time`, this.state.deployment.id);
    }
    if (await switchLockHeld(system.switchLock)) {
      return refuse('switch-locked', `${system.switchLock} is held: another switch-to-configuration is running`);
    }
    const previous = readCurrentSystem(system.currentSystem);
    if (!previous) return refuse('no-current-system', `${system.currentSystem} does not resolve; refusing to activate without a revert target`);
    let reboot: { loader: 'systemd-boot' | 'grub' } | undefined;
    if (req.reboot) {
      const loader = await detectBootloader(system);
      const why = unsupported(loader);
      if (why || loader === 'none') return refuse('no-trial-boot', why!);
      if (readCurrentSystem(system.profile) !== previous) {
        return refuse('no-trial-boot', `a trial boot needs the running system to be the boot default: ${system.profile} points at ${readCurrentSystem(system.profile) ?? 'nothing'}, not the running ${previous}`);
      }
      reboot = { loader };
    }
    try {
      this.dir.probeWritable();
    } catch (err) {
      return refuse('state-unwritable', (err as Error).message);
    }
    const id = newDeploymentId();
    return this.await(
      id,
      () =>
        this.dispatch({
          type: 'activate',
          id,
          target: req.target,
          timeoutSec,
          activationTimeoutSec: confirm.activationTimeoutSec,
          previous,
          bootId: this.bootId(),
          by: req.by,
          ...(reboot ? { reboot } : {}),
        }),
      (p) => {
        if (p.type === 'phase' && p.phase === 'activating' && p.reboot) {
          return { ok: true, id, toplevel: p.toplevel!, rebooting: p.reboot, ...(p.kernel ? { kernel: p.kernel } : {}) };
        }
        return p.type === 'phase' && p.phase === 'trial' ? { ok: true, id, deadline: p.deadline!, toplevel: p.toplevel!, ...(kernelOf(this.state) ? { kernel: kernelOf(this.state)! } : {}) } : undefined;
      },
      onProgress,
    );
  }

  /**
   * Builds or fetches the target and runs only `switch-to-configuration dry-activate`, streaming
   * what it says would change. No deployment, no state change, no history entry.
   */
  async dryRun(req: { target: Target; by: Actor }, onProgress?: (p: Progress) => void): Promise<Result> {
    const { system } = this.config;
    if (await switchLockHeld(system.switchLock)) {
      return refuse('switch-locked', `${system.switchLock} is held: another switch-to-configuration is running`);
    }
    const id = `dry-${newDeploymentId()}`;
    const root = this.dir.gcRoot(id);
    const onLine = (line: string) => onProgress?.({ type: 'output', id, line });
    try {
      const toplevel = await this.nix.obtain(req.target, root, system.profile, onLine);
      const { exit } = await this.runner.run(`dry-activate-${id}`, toplevel, 'dry-activate', onLine);
      this.log.info({ deployment: id, by: req.by.who, exit }, `dry run of ${toplevel}: dry-activate exited ${exit ?? 'without a status'}`);
      const kernel = kernelChanges(system.bootedSystem, toplevel);
      return { ok: true, id, toplevel, dryRun: { exit }, ...(kernel ? { kernel } : {}) };
    } catch (err) {
      const e = asSnapbackError(err);
      return refuse(e.code, e.message, id);
    } finally {
      rmSync(root, { force: true });
    }
  }

  /** Confirms the trial; resolves with the outcome (confirmed, or reverted: commit-failed) or a refusal. */
  async confirm(req: { id?: string; token?: string; requireToken: boolean; by: Actor }, onProgress?: (p: Progress) => void): Promise<Result> {
    const id = req.id ?? this.state.deployment?.id;
    const result = await this.await(
      id,
      () => this.dispatch({ type: 'confirm', ...req }),
      (p) => (p.type === 'confirm-refused' ? { ok: false, code: p.code ?? 'health-failed', message: `confirm refused: ${p.problems.join('; ')}`, id: p.id } : undefined),
      onProgress,
    );
    if (!result.ok) this.tell({ type: 'confirm-refused', code: result.code });
    return result;
  }

  rollback(req: { id?: string; by: Actor; reason?: 'requested' | 'fallback-timer' }, onProgress?: (p: Progress) => void): Promise<Result> {
    const id = req.id ?? this.state.deployment?.id;
    return this.await(id, () => this.dispatch({ type: 'rollback', id: req.id, by: req.by, reason: req.reason ?? 'requested' }), () => undefined, onProgress);
  }

  async extend(req: { id?: string; seconds: number; by: Actor }): Promise<Result> {
    const max = this.config.confirm.maxTimeoutSec;
    if (!Number.isInteger(req.seconds) || req.seconds < 1 || req.seconds > max) {
      return refuse('timeout-out-of-range', `extend takes 1..${max} seconds from now (confirm.maxTimeoutSec), not ${req.seconds}`);
    }
    return toResult(await this.dispatch({ type: 'extend', ...req }));
  }

  /**
   * Subscribes before dispatching (no announcement can slip between), then resolves with the
   * immediate reply if it is final, else with `pick`'s answer or the deployment's outcome.
   */
  private async await(
    id: string | undefined,
    send: () => Promise<Reply | undefined>,
    pick: (p: Progress) => Result | undefined,
    onProgress?: (p: Progress) => void,
  ): Promise<Result> {
    let resolve!: (r: Result) => void;
    const done = new Promise<Result>((r) => (resolve = r));
    const off = this.subscribe((p) => {
      if (id !== undefined && p.id !== id) return;
      onProgress?.(p);
      if (p.type === 'outcome') return resolve(outcomeResult(p.id, p.outcome));
      const picked = pick(p);
      if (picked) resolve(picked);
    });
    try {
      const reply = await send();
      if (!reply) return { ok: false, code: 'internal', message: 'no reply from the lifecycle' };
      if (!reply.ok || !reply.accepted) return toResult(reply);
      return await done;
    } finally {
      off();
    }
  }

  status(): Status {
    const facts = this.facts?.();
    return { ...statusOf(this.state, this.bootId(), readCurrentSystem(this.config.system.currentSystem), this.config.system), ...(facts ? { metrics: facts } : {}) };
  }

  history(limit?: number): HistoryEntry[] {
    const all = this.dir.readHistory();
    return limit ? all.slice(-limit) : all;
  }

  /** The confirm token for network sessions authenticated after activation finished (promise 5). */
  trialToken(): { id: string; token: string; readyMono: number } | undefined {
    const d = this.state.deployment;
    if (this.state.phase !== 'trial' || !d?.trial) return undefined;
    return { id: d.id, token: d.trial.token, readyMono: d.bootId === this.bootId() ? d.trial.startedMono : 0 };
  }
}

/** The `status` answer for a state, as the daemon or (when it is down) the state directory has it. */
export function statusOf(state: State, bootId: string, currentSystem: string | null, boot?: { bootedSystem: string; profile: string }): Status {
  const d = state.deployment;
  const t = now();
  const sameBoot = d?.bootId === bootId;
  const left = sameBoot ? secondsLeft(state, t) : undefined;
  const deadline = state.phase === 'trial' ? d?.trial?.deadlineWall : undefined;
  const unhealthy = d?.trial?.unhealthy ?? (d?.trial?.unitsFailed ? 'some units failed during activation (exit 4)' : undefined);
  return {
    hostname: hostname(),
    version: VERSION,
    bootId,
    currentSystem,
    phase: state.phase,
    ...(d
      ? {
          deployment: {
            id: d.id,
            target: describeTarget(d.target),
            ...(d.toplevel ? { toplevel: d.toplevel } : {}),
            previous: d.previous,
            requestedBy: d.requestedBy,
            ...(deadline ? { deadline } : {}),
            ...(left !== undefined ? { secondsLeft: left } : {}),
            ...(unhealthy ? { unhealthy } : {}),
            ...(d.kernel ? { kernel: d.kernel } : {}),
            ...(d.reboot ? { reboot: { loader: d.reboot.loader, stage: d.reboot.stage, ...(d.reboot.entry ? { entry: d.reboot.entry } : {}) } } : {}),
          },
        }
      : {}),
    ...(state.last ? lastOf(state.last, boot?.bootedSystem) : {}),
    ...(boot ? bootPending(boot) : {}),
  };
}

/**
 * The boot default's kernel side, where it differs from the booted system's: what the next boot
 * will change, whichever deployment (or operator) made that system the default.
 */
function bootPending(boot: { bootedSystem: string; profile: string }): Pick<Status, 'bootPending'> {
  const next = readCurrentSystem(boot.profile);
  const parts = next ? kernelChanges(boot.bootedSystem, next) : undefined;
  return parts?.length ? { bootPending: parts } : {};
}

/**
 * The last outcome for `status`. A commit whose kernel side differed from the booted system stays
 * `confirmed (kernel not yet booted)` until a boot of a system with that kernel side succeeded:
 * `/run/booted-system` tells, at every asking.
 */
function lastOf(last: NonNullable<State['last']>, bootedSystem: string | undefined): Pick<Status, 'last'> {
  let outcome = last.outcome;
  if (outcome.outcome === 'confirmed' && outcome.kernelNotYetBooted) {
    const now = bootedSystem && last.toplevel ? kernelChanges(bootedSystem, last.toplevel) : undefined;
    if (now && now.length === 0) outcome = { outcome: 'confirmed' };
  }
  return { last: { id: last.id, target: describeTarget(last.target), ...(last.toplevel ? { toplevel: last.toplevel } : {}), outcome, finishedAt: last.finishedAt, by: last.by } };
}

function kernelOf(state: State): string[] | undefined {
  return state.deployment?.kernel;
}

function refuse(code: ErrorCode, message: string, id?: string): Result {
  return { ok: false, code, message, ...(id ? { id } : {}) };
}

function toResult(reply: Reply | undefined): Result {
  if (!reply) return { ok: false, code: 'internal', message: 'no reply' };
  if (!reply.ok) return reply;
  return { ok: true, ...(reply.id ? { id: reply.id } : {}), ...(reply.outcome ? { outcome: reply.outcome } : {}), ...(reply.deadline ? { deadline: reply.deadline } : {}) };
}

function outcomeResult(id: string, outcome: Outcome): Result {
  return { ok: true, id, outcome };
}

export function asSnapbackError(err: unknown): SnapbackError {
  if (err instanceof SnapbackError) return err;
  return new SnapbackError('internal', (err as Error)?.message ?? String(err));
}

/** `20261125-200612-3fa9`: sortable, readable in `systemctl list-units`, unique enough per host. */
export function newDeploymentId(): string {
  const s = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  return `${s}-${randomBytes(2).toString('hex')}`;
}

/** Effects that move toward the new system: they wait until the state before them is on disk. */
function movesForward(effects: Effect[]): boolean {
  return effects.some((e) => e.kind === 'prepare' || e.kind === 'prepare-commit' || ((e.kind === 'activate' || e.kind === 'commit') && !e.resume));
}

/** What the lifecycle is told instead of a step toward the new system whose state could not be saved. */
function insteadOf(event: Event, why: string): Event | undefined {
  const message = `${why}; not going ahead`;
  if (event.type === 'prepared') return { type: 'prepare-failed', id: event.id, code: 'state-unwritable', message };
  if (event.type === 'commit-ready') return { type: 'confirm-aborted', id: event.id, code: 'state-unwritable', message };
  // A trial that is not on disk would come back after a restart with a new deadline: revert instead.
  if (event.type === 'activation-finished') return { ...event, unsaved: why };
  return undefined;
}

/** Held when a non-blocking flock on switch-to-configuration's lock file fails. */
async function switchLockHeld(lock: string): Promise<boolean> {
  if (!existsSync(lock)) return false;
  const r = await run('flock', ['--nonblock', '--conflict-exit-code', '75', lock, 'true']);
  return r.exitCode === 75;
}
