// The trial lifecycle of DESIGN §2 as a pure function: (state, event, now) → (state, effects, reply).
// It never reads the clock, the disk or a process; agent.ts carries out the effects it returns.
//
// Read it as the story of one deployment:
//   idle → preparing (build/fetch; nothing changed) → activating (`X test`) → trial (deadline armed)
//        → committing (`nix-env --set X`, `X boot`) → idle: confirmed
//   activating | trial → reverting (`PREV test`) → idle: reverted (reason)
// and every deployment ends with exactly one outcome, recorded in `last` and in the history.

import type { Actor, HistoryEntry, Outcome, Phase, RevertReason, Target } from '../shared/model.ts';
import { describeOutcome, describeTarget } from '../shared/model.ts';
import type { ErrorCode } from '../shared/errors.ts';

export interface Deployment {
  id: string;
  target: Target;
  requestedBy: Actor;
  createdAt: string;
  /** the confirm window, counted from the moment the trial is running */
  timeoutSec: number;
  activationTimeoutSec: number;
  /** the boot the deployment started in; the monotonic values below only mean something in it */
  bootId: string;
  /** the running system before activation: the revert target, captured once */
  previous: string;
  toplevel?: string;
  activation?: {
    startedAt: string;
    deadlineMono: number;
    stopping?: boolean;
    /** a rollback asked for while the switch was still running */
    revertRequested?: { by: Actor; reason: RevertReason };
  };
  trial?: {
    startedAt: string;
    /** when activation finished: only connections accepted after this may confirm (promise 5) */
    startedMono: number;
    deadlineMono: number;
    deadlineWall: string;
    token: string;
    /** switch-to-configuration exited 4: some units failed to start */
    unitsFailed?: boolean;
    /** why the last confirm was refused by the health gate */
    unhealthy?: string;
    confirming?: Actor;
  };
  commit?: { by: Actor; profileBefore: number | null };
  revert?: { by: Actor; reason: RevertReason; force: boolean };
}

export interface Finished {
  id: string;
  target: Target;
  toplevel?: string;
  previous?: string;
  outcome: Outcome;
  by: Actor;
  finishedAt: string;
}

export interface State {
  phase: Phase;
  deployment?: Deployment;
  last?: Finished;
}

export const initialState: State = { phase: 'idle' };

export interface Now {
  /** milliseconds on a clock wall-clock jumps cannot move (CLOCK_MONOTONIC, same boot) */
  mono: number;
  wall: string;
}

export type RevertResult =
  | { result: 'reverted' }
  | { result: 'already-previous' }
  | { result: 'conflict'; current: string | null }
  | { result: 'failed'; error: string };

export type Event =
  | { type: 'start'; bootId: string; current: string | null }
  | {
      type: 'activate';
      id: string;
      target: Target;
      timeoutSec: number;
      activationTimeoutSec: number;
      previous: string;
      bootId: string;
      by: Actor;
    }
  | { type: 'prepared'; id: string; toplevel: string }
  | { type: 'prepare-failed'; id: string; code: ErrorCode; message: string }
  | { type: 'activation-finished'; id: string; exit: number | null; timedOut: boolean; token: string }
  | { type: 'tick' }
  | { type: 'confirm'; id?: string; token?: string; requireToken: boolean; by: Actor }
  | { type: 'commit-ready'; id: string; problems: string[]; profileBefore: number | null }
  | { type: 'commit-finished'; id: string; ok: true }
  | { type: 'commit-finished'; id: string; ok: false; error: string; abandoned?: RevertReason }
  | { type: 'rollback'; id?: string; by: Actor; reason: 'requested' | 'fallback-timer' }
  | { type: 'extend'; id?: string; seconds: number; by: Actor }
  | ({ type: 'revert-finished'; id: string } & RevertResult);

export type Announcement =
  | { type: 'phase'; id: string; phase: Phase; deadline?: string; toplevel?: string }
  | { type: 'outcome'; id: string; outcome: Outcome }
  | { type: 'confirm-refused'; id: string; problems: string[] };

export type Effect =
  | { kind: 'prepare'; deployment: Deployment }
  | { kind: 'activate'; id: string; toplevel: string; resume: boolean }
  | { kind: 'stop-activation'; id: string }
  | { kind: 'arm'; atMono: number }
  | { kind: 'prepare-commit'; id: string; unitsFailed: boolean }
  | { kind: 'commit'; id: string; toplevel: string; profileBefore: number | null; resume: boolean; reason: RevertReason }
  | { kind: 'revert'; id: string; previous: string; toplevel?: string; force: boolean }
  | { kind: 'release'; id: string }
  /** (re-)arm the independent fallback timer for the deadline, or cancel it (systemd only) */
  | { kind: 'fallback'; id: string; atMono: number }
  | { kind: 'fallback'; id: string; cancel: true }
  | { kind: 'record'; entry: Omit<HistoryEntry, 'at'> }
  | { kind: 'log'; level: 'info' | 'warn' | 'error'; msg: string }
  | { kind: 'announce'; announcement: Announcement };

export type Reply =
  | { ok: true; id?: string; outcome?: Outcome; deadline?: string; accepted?: boolean }
  | { ok: false; code: ErrorCode; message: string; id?: string; outcome?: Outcome };

export interface Step {
  state: State;
  effects: Effect[];
  reply?: Reply;
}

const AGENT: Actor = { who: 'agent', channel: 'agent' };
const DEADLINE: Actor = { who: 'agent', channel: 'deadline' };

function fail(state: State, code: ErrorCode, message: string, extra: Partial<Reply> = {}): Step {
  return { state, effects: [], reply: { ok: false, code, message, ...extra } as Reply };
}

function inSeconds(fromMono: number, toMono: number): number {
  return Math.max(0, Math.ceil((toMono - fromMono) / 1000));
}

/** A transition to `to`, with its history record and announcement. */
function move(
  state: State,
  d: Deployment,
  to: Phase,
  event: string,
  by: Actor,
  extra: { detail?: string; announce?: Partial<Extract<Announcement, { type: 'phase' }>> } = {},
): { state: State; effects: Effect[] } {
  const next: State = { ...state, phase: to, deployment: d };
  const entry: Omit<HistoryEntry, 'at'> = {
    id: d.id,
    from: state.phase,
    to,
    event,
    by,
    target: describeTarget(d.target),
    ...(d.toplevel ? { toplevel: d.toplevel } : {}),
    previous: d.previous,
    ...(extra.detail ? { detail: extra.detail } : {}),
  };
  return {
    state: next,
    effects: [
      { kind: 'record', entry },
      { kind: 'announce', announcement: { type: 'phase', id: d.id, phase: to, ...extra.announce } },
    ],
  };
}

/** The end of a deployment: back to idle with exactly one outcome. */
function finish(state: State, d: Deployment, outcome: Outcome, event: string, by: Actor, now: Now, detail?: string): Step {
  const last: Finished = {
    id: d.id,
    target: d.target,
    ...(d.toplevel ? { toplevel: d.toplevel } : {}),
    previous: d.previous,
    outcome,
    by,
    finishedAt: now.wall,
  };
  const entry: Omit<HistoryEntry, 'at'> = {
    id: d.id,
    from: state.phase,
    to: 'idle',
    event,
    by,
    target: describeTarget(d.target),
    ...(d.toplevel ? { toplevel: d.toplevel } : {}),
    previous: d.previous,
    outcome,
    ...(detail ? { detail } : {}),
  };
  const level = outcome.outcome === 'confirmed' ? 'info' : outcome.outcome === 'stuck' ? 'error' : 'warn';
  return {
    state: { phase: 'idle', last },
    effects: [
      { kind: 'record', entry },
      { kind: 'fallback', id: d.id, cancel: true },
      { kind: 'release', id: d.id },
      { kind: 'log', level, msg: `deployment ${d.id} ${describeOutcome(outcome)}${detail ? `: ${detail}` : ''}` },
      { kind: 'announce', announcement: { type: 'outcome', id: d.id, outcome } },
    ],
  };
}

function startRevert(state: State, d: Deployment, reason: RevertReason, by: Actor, event: string, force: boolean, detail?: string): Step {
  const next: Deployment = { ...d, revert: { by, reason, force } };
  const moved = move(state, next, 'reverting', event, by, detail ? { detail } : {});
  return {
    state: moved.state,
    effects: [
      ...moved.effects,
      { kind: 'log', level: 'warn', msg: `reverting deployment ${d.id} to ${d.previous} (${reason})${detail ? `: ${detail}` : ''}` },
      { kind: 'revert', id: d.id, previous: d.previous, ...(d.toplevel ? { toplevel: d.toplevel } : {}), force },
    ],
  };
}

/** Answer for a request naming a deployment that is not the running one. */
function notRunning(state: State, id: string | undefined, what: string): Step {
  const last = state.last;
  if (id !== undefined && last && last.id === id) {
    return fail(state, 'deployment-finished', `deployment ${id} already ended: ${describeOutcome(last.outcome)}`, {
      id,
      outcome: last.outcome,
    });
  }
  if (id !== undefined && state.deployment && state.deployment.id !== id) {
    return fail(state, 'unknown-deployment', `deployment ${id} is not the running one (${state.deployment.id} is)`, {
      id: state.deployment.id,
    });
  }
  if (id !== undefined) return fail(state, 'unknown-deployment', `no deployment ${id} is known here`);
  return fail(state, 'no-trial', `there is no trial to ${what}`);
}

export function step(state: State, event: Event, now: Now): Step {
  const d = state.deployment;
  const same = (id: string | undefined) => d !== undefined && (id === undefined || id === d.id);

  switch (event.type) {
    case 'start':
      return resume(state, event, now);

    case 'activate': {
      if (d) return fail(state, 'busy', `deployment ${d.id} is ${state.phase}; one deployment at a time`, { id: d.id });
      const deployment: Deployment = {
        id: event.id,
        target: event.target,
        requestedBy: event.by,
        createdAt: now.wall,
        timeoutSec: event.timeoutSec,
        bootId: event.bootId,
        previous: event.previous,
        activationTimeoutSec: event.activationTimeoutSec,
      };
      const moved = move(state, deployment, 'preparing', 'activate', event.by);
      return {
        ...moved,
        effects: [
          ...moved.effects,
          { kind: 'log', level: 'info', msg: `deployment ${event.id}: preparing ${describeTarget(event.target)}` },
          { kind: 'prepare', deployment },
        ],
        reply: { ok: true, id: event.id, accepted: true },
      };
    }

    case 'prepared': {
      if (state.phase !== 'preparing' || !d || d.id !== event.id) return { state, effects: [] };
      // The activation deadline counts from here: building may take long, the switch may not.
      const next: Deployment = {
        ...d,
        toplevel: event.toplevel,
        activation: { startedAt: now.wall, deadlineMono: now.mono + d.activationTimeoutSec * 1000 },
      };
      const moved = move(state, next, 'activating', 'prepared', AGENT, { announce: { toplevel: event.toplevel } });
      return {
        state: moved.state,
        effects: [
          ...moved.effects,
          { kind: 'arm', atMono: next.activation!.deadlineMono },
          { kind: 'activate', id: d.id, toplevel: event.toplevel, resume: false },
        ],
      };
    }

    case 'prepare-failed': {
      if (state.phase !== 'preparing' || !d || d.id !== event.id) return { state, effects: [] };
      return finish(state, d, { outcome: 'failed', code: event.code, message: event.message }, 'prepare-failed', AGENT, now);
    }

    case 'activation-finished': {
      if (state.phase !== 'activating' || !d || d.id !== event.id) return { state, effects: [] };
      const requested = d.activation?.revertRequested;
      const ok = !event.timedOut && (event.exit === 0 || event.exit === 4);
      if (!ok) {
        const detail = event.timedOut
          ? 'switch-to-configuration did not finish within confirm.activationTimeoutSec'
          : `switch-to-configuration test exited ${event.exit ?? 'without a status'}`;
        return startRevert(state, d, 'activation-failed', AGENT, 'activation-failed', true, detail);
      }
      if (requested) return startRevert(state, d, requested.reason, requested.by, 'rollback', false);
      const deadlineMono = now.mono + d.timeoutSec * 1000;
      const deadlineWall = new Date(Date.parse(now.wall) + d.timeoutSec * 1000).toISOString();
      const unhealthy = event.exit === 4 ? 'switch-to-configuration test exited 4: some units failed' : undefined;
      const next: Deployment = {
        ...d,
        trial: { startedAt: now.wall, startedMono: now.mono, deadlineMono, deadlineWall, token: event.token, ...(unhealthy ? { unitsFailed: true } : {}) },
      };
      const moved = move(state, next, 'trial', 'activated', AGENT, {
        ...(unhealthy ? { detail: unhealthy } : {}),
        announce: { deadline: deadlineWall, toplevel: d.toplevel! },
      });
      return {
        state: moved.state,
        effects: [
          ...moved.effects,
          { kind: 'arm', atMono: deadlineMono },
          { kind: 'fallback', id: d.id, atMono: deadlineMono },
          {
            kind: 'log',
            level: 'warn',
            msg: `trial of ${d.toplevel} started: reverting to ${d.previous} in ${d.timeoutSec}s unless confirmed${unhealthy ? ` (unhealthy: ${unhealthy})` : ''}`,
          },
        ],
      };
    }

    case 'tick': {
      if (state.phase === 'activating' && d?.activation && now.mono >= d.activation.deadlineMono && !d.activation.stopping) {
        const next: Deployment = { ...d, activation: { ...d.activation, stopping: true } };
        return {
          state: { ...state, deployment: next },
          effects: [
            { kind: 'log', level: 'warn', msg: `activation of ${d.id} exceeded confirm.activationTimeoutSec; stopping it` },
            { kind: 'stop-activation', id: d.id },
          ],
        };
      }
      if (state.phase === 'trial' && d?.trial && now.mono >= d.trial.deadlineMono) {
        const reason: RevertReason = d.trial.unhealthy ? 'health-failed' : 'timeout';
        return startRevert(state, d, reason, DEADLINE, 'deadline', false, d.trial.unhealthy);
      }
      return { state, effects: [] };
    }

    case 'confirm': {
      if (!same(event.id) || state.phase === 'idle') {
        // A repeated confirm of a committed deployment gets the same answer again.
        if (event.id !== undefined && state.last?.id === event.id && state.last.outcome.outcome === 'confirmed') {
          return { state, effects: [], reply: { ok: true, id: event.id, outcome: state.last.outcome } };
        }
        return notRunning(state, event.id, 'confirm');
      }
      switch (state.phase) {
        case 'preparing':
        case 'activating':
          return fail(state, 'not-ready', `deployment ${d!.id} is still ${state.phase}; retry when the trial runs`, { id: d!.id });
        case 'committing':
          return { state, effects: [], reply: { ok: true, id: d!.id, accepted: true } };
        case 'reverting':
          return fail(state, 'deployment-finished', `deployment ${d!.id} is being reverted (${d!.revert?.reason})`, { id: d!.id });
      }
      const trial = d!.trial!;
      if (event.requireToken && event.token !== trial.token) {
        return fail(state, 'bad-token', 'the confirm token is missing or wrong; confirm over a connection opened after activation', {
          id: d!.id,
        });
      }
      if (trial.confirming) return { state, effects: [], reply: { ok: true, id: d!.id, accepted: true } };
      const next: Deployment = { ...d!, trial: { ...trial, confirming: event.by } };
      return {
        state: { ...state, deployment: next },
        effects: [{ kind: 'prepare-commit', id: d!.id, unitsFailed: trial.unitsFailed === true }],
        reply: { ok: true, id: d!.id, accepted: true },
      };
    }

    case 'commit-ready': {
      if (state.phase !== 'trial' || !d?.trial?.confirming || d.id !== event.id) return { state, effects: [] };
      const by = d.trial.confirming;
      if (event.problems.length > 0) {
        const unhealthy = event.problems.join('; ');
        const { confirming: _, ...rest } = d.trial;
        const next: Deployment = { ...d, trial: { ...rest, unhealthy } };
        return {
          state: { ...state, deployment: next },
          effects: [
            {
              kind: 'record',
              entry: { id: d.id, from: 'trial', to: 'trial', event: 'confirm-refused', by, toplevel: d.toplevel, previous: d.previous, detail: unhealthy },
            },
            { kind: 'log', level: 'warn', msg: `confirm of ${d.id} refused by the health gate: ${unhealthy}` },
            { kind: 'announce', announcement: { type: 'confirm-refused', id: d.id, problems: event.problems } },
          ],
        };
      }
      const next: Deployment = { ...d, commit: { by, profileBefore: event.profileBefore } };
      const moved = move(state, next, 'committing', 'confirm', by);
      return {
        state: moved.state,
        effects: [
          ...moved.effects,
          { kind: 'commit', id: d.id, toplevel: d.toplevel!, profileBefore: event.profileBefore, resume: false, reason: 'commit-failed' },
        ],
      };
    }

    case 'commit-finished': {
      if (state.phase !== 'committing' || !d?.commit || d.id !== event.id) return { state, effects: [] };
      if (event.ok) return finish(state, d, { outcome: 'confirmed' }, 'committed', d.commit.by, now);
      if (event.abandoned) {
        return finish(state, d, { outcome: 'reverted', reason: event.abandoned, detail: event.error }, 'commit-abandoned', AGENT, now);
      }
      return startRevert(state, d, 'commit-failed', d.commit.by, 'commit-failed', false, event.error);
    }

    case 'rollback': {
      if (!same(event.id) || state.phase === 'idle') {
        if (event.id !== undefined && state.last?.id === event.id && state.last.outcome.outcome === 'reverted') {
          return { state, effects: [], reply: { ok: true, id: event.id, outcome: state.last.outcome } };
        }
        return notRunning(state, event.id, 'roll back');
      }
      switch (state.phase) {
        case 'preparing':
          return fail(state, 'not-ready', `deployment ${d!.id} is still preparing; nothing has changed yet`, { id: d!.id });
        case 'activating': {
          const next: Deployment = { ...d!, activation: { ...d!.activation!, revertRequested: { by: event.by, reason: event.reason } } };
          return { state: { ...state, deployment: next }, effects: [], reply: { ok: true, id: d!.id, accepted: true } };
        }
        case 'committing':
          return fail(state, 'deployment-finished', `deployment ${d!.id} is already being committed`, { id: d!.id });
        case 'reverting':
          return { state, effects: [], reply: { ok: true, id: d!.id, accepted: true } };
      }
      return { ...startRevert(state, d!, event.reason, event.by, 'rollback', false), reply: { ok: true, id: d!.id, accepted: true } };
    }

    case 'extend': {
      if (!same(event.id) || state.phase === 'idle') return notRunning(state, event.id, 'extend');
      if (state.phase !== 'trial') return fail(state, 'not-ready', `deployment ${d!.id} is ${state.phase}, not in its trial`, { id: d!.id });
      const trial = d!.trial!;
      const deadlineMono = now.mono + event.seconds * 1000;
      const deadlineWall = new Date(Date.parse(now.wall) + event.seconds * 1000).toISOString();
      const next: Deployment = { ...d!, trial: { ...trial, deadlineMono, deadlineWall } };
      return {
        state: { ...state, deployment: next },
        effects: [
          {
            kind: 'record',
            entry: { id: d!.id, from: 'trial', to: 'trial', event: 'extend', by: event.by, toplevel: d!.toplevel, previous: d!.previous, detail: `deadline ${deadlineWall}` },
          },
          { kind: 'arm', atMono: deadlineMono },
          { kind: 'fallback', id: d!.id, atMono: deadlineMono },
          { kind: 'log', level: 'warn', msg: `trial of ${d!.id} extended: reverting in ${event.seconds}s unless confirmed` },
          { kind: 'announce', announcement: { type: 'phase', id: d!.id, phase: 'trial', deadline: deadlineWall } },
        ],
        reply: { ok: true, id: d!.id, deadline: deadlineWall },
      };
    }

    case 'revert-finished': {
      if (state.phase !== 'reverting' || !d?.revert || d.id !== event.id) return { state, effects: [] };
      const { reason, by } = d.revert;
      switch (event.result) {
        case 'reverted':
          return finish(state, d, { outcome: 'reverted', reason }, 'reverted', by, now);
        case 'already-previous':
          return finish(state, d, { outcome: 'reverted', reason }, 'reverted', by, now, 'the previous system was already running');
        case 'conflict':
          return finish(
            state,
            d,
            { outcome: 'stuck', reason: `conflict: the running system is ${event.current ?? 'unknown'}, neither the trial nor the previous one; left alone` },
            'revert-conflict',
            by,
            now,
          );
        case 'failed':
          return finish(state, d, { outcome: 'stuck', reason: `revert failed: ${event.error}` }, 'revert-failed', by, now);
      }
    }
  }
}

/** What a (re)started agent does with the state it finds (promises 1, 2 and 15). */
function resume(state: State, event: Extract<Event, { type: 'start' }>, now: Now): Step {
  const d = state.deployment;
  if (!d || state.phase === 'idle') return { state, effects: [] };
  const rebooted = d.bootId !== event.bootId;

  if (state.phase === 'preparing') {
    return finish(
      state,
      d,
      { outcome: 'failed', code: 'internal', message: 'the agent stopped while preparing; nothing was changed' },
      'interrupted',
      AGENT,
      now,
    );
  }
  if (state.phase === 'committing') {
    return {
      state,
      effects: [
        { kind: 'log', level: 'warn', msg: `finishing the interrupted commit of ${d.id}` },
        {
          kind: 'commit',
          id: d.id,
          toplevel: d.toplevel!,
          profileBefore: d.commit!.profileBefore,
          resume: true,
          reason: rebooted ? 'reboot' : 'commit-failed',
        },
      ],
    };
  }
  if (rebooted) {
    // The bootloader still pointed at the previous generation: the reboot was the revert.
    const detail = event.current === d.previous ? undefined : `running ${event.current ?? 'unknown'} after the reboot`;
    return finish(state, d, { outcome: 'reverted', reason: 'reboot' }, 'reboot', AGENT, now, detail);
  }
  switch (state.phase) {
    case 'activating': {
      // A stop begun by the previous process may not have finished: the next tick issues it again.
      const { stopping: _, ...activation } = d.activation!;
      return {
        state: { ...state, deployment: { ...d, activation } },
        effects: [
          { kind: 'arm', atMono: d.activation!.deadlineMono },
          { kind: 'activate', id: d.id, toplevel: d.toplevel!, resume: true },
        ],
      };
    }
    case 'trial': {
      const left = inSeconds(now.mono, d.trial!.deadlineMono);
      // A confirm in flight died with the old process; the confirmer will retry.
      const { confirming: _, ...trial } = d.trial!;
      return {
        state: { ...state, deployment: { ...d, trial } },
        effects: [
          { kind: 'log', level: 'warn', msg: `trial of ${d.toplevel} resumed: reverting to ${d.previous} in ${left}s unless confirmed` },
          { kind: 'arm', atMono: d.trial!.deadlineMono },
        ],
      };
    }
    case 'reverting':
      return {
        state,
        effects: [{ kind: 'revert', id: d.id, previous: d.previous, ...(d.toplevel ? { toplevel: d.toplevel } : {}), force: d.revert!.force }],
      };
  }
  return { state, effects: [] };
}

/** Seconds until the running deployment's deadline, for `status`. */
export function secondsLeft(state: State, now: Now): number | undefined {
  const d = state.deployment;
  if (state.phase === 'trial' && d?.trial) return inSeconds(now.mono, d.trial.deadlineMono);
  if (state.phase === 'activating' && d?.activation) return inSeconds(now.mono, d.activation.deadlineMono);
  return undefined;
}
