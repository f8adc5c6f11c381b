// The trial lifecycle of DESIGN §2 as a pure function: (state, event, now) → (state, effects, reply).
// It never reads the clock, the disk or a process; agent.ts carries out the effects it returns.
//
// Read it as the story of one deployment:
//   idle → preparing (build/fetch; nothing changed) → activating (`X test`) → trial (deadline armed)
//        → committing (`nix-env --set X`, `X boot`) → idle: confirmed
//   activating | trial → reverting (`PREV test`) → idle: reverted (reason)
// and every deployment ends with exactly one outcome, recorded in `last` and in the history.

import { z } from 'zod';
import { actorSchema, outcomeSchema, phaseSchema, revertReasonSchema, targetSchema, type Actor, type HistoryEntry, type Outcome, type Phase, type RevertReason, type Target } from '../shared/model.ts';
import { describeOutcome, describeTarget } from '../shared/model.ts';
import type { ErrorCode } from '../shared/errors.ts';

// The state is persisted in state.json and read back after crashes and upgrades: its schema is the
// source of its types, and each phase's record is checked (a trial without its deadline is corrupt).

const deploymentSchema = z.object({
  id: z.string().min(1),
  target: targetSchema,
  requestedBy: actorSchema,
  createdAt: z.string(),
  /** the confirm window, counted from the moment the trial is running */
  timeoutSec: z.number().int().positive(),
  activationTimeoutSec: z.number().int().positive(),
  /** the boot the deployment started in; the monotonic values below only mean something in it */
  bootId: z.string().min(1),
  /** the running system before activation: the revert target, captured once */
  previous: z.string().min(1),
  toplevel: z.string().min(1).optional(),
  activation: z
    .object({
      startedAt: z.string(),
      deadlineMono: z.number(),
      stopping: z.boolean().optional(),
      /** a rollback asked for while the switch was still running */
      revertRequested: z.object({ by: actorSchema, reason: revertReasonSchema }).optional(),
    })
    .optional(),
  trial: z
    .object({
      startedAt: z.string(),
      /** when activation finished: only connections accepted after this may confirm (promise 5) */
      startedMono: z.number(),
      deadlineMono: z.number(),
      deadlineWall: z.string(),
      token: z.string().min(1),
      /** switch-to-configuration exited 4: some units failed to start */
      unitsFailed: z.boolean().optional(),
      /** why the last confirm was refused by the health gate */
      unhealthy: z.string().optional(),
      confirming: actorSchema.optional(),
    })
    .optional(),
  commit: z
    .object({
      by: actorSchema,
      /** the profile's generation before the commit, and the system it pointed at (what a restore puts back) */
      profileBefore: z.number().int().nullable(),
      profilePath: z.string().nullable().optional(),
      /** the newest generation before the commit: only a newer one was created by it */
      newestBefore: z.number().int().nullable().optional(),
      /** a failed commit whose profile could not be put back: the revert then ends `stuck` */
      unrestored: z.string().optional(),
    })
    .optional(),
  revert: z.object({ by: actorSchema, reason: revertReasonSchema, force: z.boolean() }).optional(),
});
export type Deployment = z.infer<typeof deploymentSchema>;

const finishedSchema = z.object({
  id: z.string(),
  target: targetSchema,
  toplevel: z.string().optional(),
  previous: z.string().optional(),
  outcome: outcomeSchema,
  by: actorSchema,
  finishedAt: z.string(),
});
export type Finished = z.infer<typeof finishedSchema>;

/** What each phase needs besides the deployment itself. */
const needs: Record<Phase, (keyof Deployment)[] | null> = {
  idle: null,
  preparing: [],
  activating: ['toplevel', 'activation'],
  trial: ['toplevel', 'trial'],
  committing: ['toplevel', 'trial', 'commit'],
  reverting: ['revert'],
};

export const stateSchema = z
  .object({ phase: phaseSchema, deployment: deploymentSchema.optional(), last: finishedSchema.optional() })
  .superRefine((s, ctx) => {
    const wanted = needs[s.phase];
    if (wanted === null) {
      if (s.deployment) ctx.addIssue({ code: 'custom', path: ['deployment'], message: 'an idle agent has no running deployment' });
      return;
    }
    if (!s.deployment) return ctx.addIssue({ code: 'custom', path: ['deployment'], message: `phase ${s.phase} needs its deployment` });
    for (const key of wanted) {
      if (s.deployment[key] === undefined) ctx.addIssue({ code: 'custom', path: ['deployment', key], message: `phase ${s.phase} needs deployment.${key}` });
    }
  });
export type State = z.infer<typeof stateSchema>;

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
  | { type: 'prepare-failed'; id: string; code: ErrorCode; message: string; /** the command's whole output, for the history */ detail?: string }
  | {
      type: 'activation-finished';
      id: string;
      exit: number | null;
      timedOut: boolean;
      token: string;
      /** the trial could not be saved: it must not run on state that is not on disk */
      unsaved?: string;
    }
  | { type: 'tick' }
  | { type: 'confirm'; id?: string; token?: string; requireToken: boolean; by: Actor }
  | { type: 'commit-ready'; id: string; problems: string[]; profile: ProfileBefore }
  /** the confirm cannot go ahead for a reason of the agent's own (its state cannot be saved) */
  | { type: 'confirm-aborted'; id: string; code: ErrorCode; message: string }
  | { type: 'commit-finished'; id: string; ok: true }
  | {
      type: 'commit-finished';
      id: string;
      ok: false;
      error: string;
      abandoned?: RevertReason;
      /** somebody else's system runs: the commit was not attempted */
      conflict?: string | null;
      /** the profile could not be put back */
      unrestored?: string;
    }
  | { type: 'rollback'; id?: string; by: Actor; reason: 'requested' | 'fallback-timer' }
  | { type: 'extend'; id?: string; seconds: number; by: Actor }
  | ({ type: 'revert-finished'; id: string } & RevertResult);

/** The system profile before a commit: what a failed commit puts back, and what it may delete. */
export interface ProfileBefore {
  generation: number | null;
  path: string | null;
  newest: number | null;
}

export type Announcement =
  | { type: 'phase'; id: string; phase: Phase; deadline?: string; toplevel?: string }
  | { type: 'outcome'; id: string; outcome: Outcome }
  | { type: 'confirm-refused'; id: string; problems: string[]; code?: ErrorCode };

export type Effect =
  | { kind: 'prepare'; deployment: Deployment }
  | { kind: 'activate'; id: string; toplevel: string; resume: boolean }
  | { kind: 'stop-activation'; id: string }
  | { kind: 'arm'; atMono: number }
  | { kind: 'prepare-commit'; id: string; unitsFailed: boolean }
  | { kind: 'commit'; id: string; toplevel: string; previous: string; profile: ProfileBefore; resume: boolean; reason: RevertReason }
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
    ...(extra.announce?.deadline ? { deadline: extra.announce.deadline } : {}),
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

function conflict(current: string | null, what: string): Outcome {
  return { outcome: 'stuck', reason: `conflict: the running system is ${current ?? 'unknown'}, neither the trial nor the previous one; ${what}` };
}

/**
 * A confirm or extend that arrives after the deadline is refused by the event's own time, whether
 * or not the timer has fired yet: the revert the deadline calls for starts now.
 */
function late(state: State, d: Deployment, now: Now, what: 'confirm' | 'extend'): Step {
  const reason: RevertReason = d.trial!.unhealthy ? 'health-failed' : 'timeout';
  const reverting = startRevert(state, d, reason, DEADLINE, 'deadline', false, d.trial!.unhealthy);
  const passed = inSeconds(d.trial!.deadlineMono, now.mono);
  return {
    ...reverting,
    reply: { ok: false, code: 'deployment-finished', message: `too late to ${what}: the deadline passed ${passed}s ago (${d.trial!.deadlineWall}); deployment ${d.id} is being reverted`, id: d.id },
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
      return finish(state, d, { outcome: 'failed', code: event.code, message: event.message }, 'prepare-failed', AGENT, now, event.detail);
    }

    case 'activation-finished': {
      if (state.phase !== 'activating' || !d || d.id !== event.id) return { state, effects: [] };
      const requested = d.activation?.revertRequested;
      const ok = !event.timedOut && (event.exit === 0 || event.exit === 4) && !event.unsaved;
      if (!ok) {
        const detail = event.unsaved
          ? `the trial could not be saved: ${event.unsaved}`
          : event.timedOut
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
      if (now.mono >= trial.deadlineMono) return late(state, d!, now, 'confirm');
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
      const { generation, path, newest } = event.profile;
      const next: Deployment = { ...d, commit: { by, profileBefore: generation, profilePath: path, newestBefore: newest } };
      const moved = move(state, next, 'committing', 'confirm', by);
      return {
        state: moved.state,
        effects: [...moved.effects, { kind: 'commit', id: d.id, toplevel: d.toplevel!, previous: d.previous, profile: event.profile, resume: false, reason: 'commit-failed' }],
      };
    }

    case 'confirm-aborted': {
      if (state.phase !== 'trial' || !d?.trial?.confirming || d.id !== event.id) return { state, effects: [] };
      const { confirming: by, ...trial } = d.trial;
      return {
        state: { ...state, deployment: { ...d, trial } },
        effects: [
          { kind: 'log', level: 'error', msg: `confirm of ${d.id} by ${by.who} not carried out: ${event.message}` },
          { kind: 'announce', announcement: { type: 'confirm-refused', id: d.id, problems: [event.message], code: event.code } },
        ],
      };
    }

    case 'commit-finished': {
      if (state.phase !== 'committing' || !d?.commit || d.id !== event.id) return { state, effects: [] };
      if (event.ok) return finish(state, d, { outcome: 'confirmed' }, 'committed', d.commit.by, now);
      if (event.conflict !== undefined) return finish(state, d, conflict(event.conflict, 'left alone'), 'commit-conflict', d.commit.by, now);
      if (event.abandoned) {
        const outcome: Outcome = event.unrestored
          ? { outcome: 'stuck', reason: `the interrupted commit could not be undone: ${event.unrestored}` }
          : { outcome: 'reverted', reason: event.abandoned, detail: event.error };
        return finish(state, d, outcome, 'commit-abandoned', AGENT, now);
      }
      const next: Deployment = event.unrestored ? { ...d, commit: { ...d.commit, unrestored: event.unrestored } } : d;
      return startRevert(state, next, 'commit-failed', d.commit.by, 'commit-failed', false, event.error);
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
      if (now.mono >= trial.deadlineMono) return late(state, d!, now, 'extend');
      const deadlineMono = now.mono + event.seconds * 1000;
      const deadlineWall = new Date(Date.parse(now.wall) + event.seconds * 1000).toISOString();
      const next: Deployment = { ...d!, trial: { ...trial, deadlineMono, deadlineWall } };
      return {
        state: { ...state, deployment: next },
        effects: [
          {
            kind: 'record',
            entry: { id: d!.id, from: 'trial', to: 'trial', event: 'extend', by: event.by, toplevel: d!.toplevel, previous: d!.previous, detail: `deadline ${deadlineWall}`, deadline: deadlineWall },
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
      if (d.commit?.unrestored && (event.result === 'reverted' || event.result === 'already-previous')) {
        // The running system is the previous one, but the boot default may still be the unconfirmed one.
        const outcome: Outcome = { outcome: 'stuck', reason: `reverted, but the profile could not be put back after the failed commit: ${d.commit.unrestored}` };
        return finish(state, d, outcome, 'reverted', by, now);
      }
      switch (event.result) {
        case 'reverted':
          return finish(state, d, { outcome: 'reverted', reason }, 'reverted', by, now);
        case 'already-previous':
          return finish(state, d, { outcome: 'reverted', reason }, 'reverted', by, now, 'the previous system was already running');
        case 'conflict':
          return finish(state, d, conflict(event.current, 'left alone'), 'revert-conflict', by, now);
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
    const c = d.commit!;
    const profile: ProfileBefore = { generation: c.profileBefore, path: c.profilePath ?? null, newest: c.newestBefore ?? c.profileBefore };
    return {
      state,
      effects: [
        { kind: 'log', level: 'warn', msg: `finishing the interrupted commit of ${d.id}` },
        { kind: 'commit', id: d.id, toplevel: d.toplevel!, previous: d.previous, profile, resume: true, reason: rebooted ? 'reboot' : 'commit-failed' },
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
