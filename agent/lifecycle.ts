// The trial lifecycle of DESIGN §2 as a pure function: (state, event, now) → (state, effects, reply).
// It never reads the clock, the disk or a process; agent.ts carries out the effects it returns.
//
// Read it as the story of one deployment:
//   idle → preparing (build/fetch; nothing changed) → activating (`X test`) → trial (deadline armed)
//        → committing (`nix-env --set X`, `X boot`) → idle: confirmed
//   activating | trial → reverting (`PREV test`) → idle: reverted (reason)
// and every deployment ends with exactly one outcome, recorded in `last` and in the history.
//
// A trial boot (`--reboot`, DESIGN §11) replaces `X test` by a boot of X, once:
//   activating (arming: X gets its boot entry, the next boot only is pointed at it; rebooting)
//        → [new boot, X runs] trial (window counted from the boot) → committing → idle: confirmed
//        → [new boot, the previous system runs] reverting → idle: reverted (boot-failed)
//   trial → reverting (reboot into the default, which never stopped being the previous system)

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
  /** the kernel-side parts that differ from the booted system (`[]`: userland only); absent: unknown */
  kernel: z.array(z.string()).optional(),
  /** a trial boot: X is booted once instead of `test`-activated */
  reboot: z
    .object({
      loader: z.enum(['systemd-boot', 'grub']),
      /** arming: X's boot entry and the one-shot are being set; rebooting: the reboot was asked for */
      stage: z.enum(['arming', 'rebooting']),
      /** the profile before arming: what forgetting the boot entry puts back */
      profile: z.object({ generation: z.number().int().nullable(), path: z.string().nullable(), newest: z.number().int().nullable() }),
      entry: z.string().optional(),
      generation: z.number().int().optional(),
    })
    .optional(),
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
  /** kernel-side parts that differed from the booted system when it was committed */
  kernel: z.array(z.string()).optional(),
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
  | {
      type: 'start';
      bootId: string;
      current: string | null;
      /** a confirm token, should a trial boot's trial start now */
      token?: string;
      /** when this boot's userspace started (monotonic ms): a trial boot's window counts from there */
      bootStartedMono?: number;
    }
  | {
      type: 'activate';
      id: string;
      target: Target;
      timeoutSec: number;
      activationTimeoutSec: number;
      previous: string;
      bootId: string;
      by: Actor;
      /** a trial boot with this bootloader */
      reboot?: { loader: 'systemd-boot' | 'grub' };
    }
  | { type: 'prepared'; id: string; toplevel: string; kernel?: string[]; profile?: ProfileBefore }
  /** a trial boot's entry and one-shot are set: reboot now */
  | { type: 'boot-armed'; id: string; entry: string; generation: number }
  /** arming failed and was undone (`unrestored`: the undo failed too) */
  | { type: 'boot-arm-failed'; id: string; error: string; unrestored?: string }
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
  | ({ type: 'revert-finished'; id: string; detail?: string } & RevertResult);

/** What a trial boot's revert needs: the bootloader, and the profile before X got its entry. */
export interface BootUndo {
  loader: 'systemd-boot' | 'grub';
  profile: ProfileBefore;
}

/** The system profile before a commit: what a failed commit puts back, and what it may delete. */
export interface ProfileBefore {
  generation: number | null;
  path: string | null;
  newest: number | null;
}

export type Announcement =
  | { type: 'phase'; id: string; phase: Phase; deadline?: string; toplevel?: string; kernel?: string[]; reboot?: { loader: string; entry: string } }
  | { type: 'outcome'; id: string; outcome: Outcome }
  | { type: 'confirm-refused'; id: string; problems: string[]; code?: ErrorCode };

export type Effect =
  | { kind: 'prepare'; deployment: Deployment }
  | { kind: 'activate'; id: string; toplevel: string; resume: boolean }
  | { kind: 'stop-activation'; id: string }
  | { kind: 'arm'; atMono: number }
  | { kind: 'prepare-commit'; id: string; unitsFailed: boolean }
  | { kind: 'commit'; id: string; toplevel: string; previous: string; profile: ProfileBefore; resume: boolean; reason: RevertReason }
  | { kind: 'revert'; id: string; previous: string; toplevel?: string; force: boolean; boot?: BootUndo }
  /** a trial boot: give X a boot entry and point the next boot only at it; the default stays */
  | { kind: 'arm-boot'; id: string; toplevel: string; previous: string; loader: 'systemd-boot' | 'grub'; profile: ProfileBefore }
  | { kind: 'reboot'; id: string }
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
    ...(d.reboot ? { bootId: d.bootId } : {}),
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
    ...(d.kernel?.length ? { kernel: d.kernel } : {}),
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
    ...(d.reboot ? { bootId: d.bootId } : {}),
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
      revertEffect(next, force),
    ],
  };
}

function revertEffect(d: Deployment, force: boolean): Effect {
  return {
    kind: 'revert',
    id: d.id,
    previous: d.previous,
    ...(d.toplevel ? { toplevel: d.toplevel } : {}),
    force,
    ...(d.reboot ? { boot: { loader: d.reboot.loader, profile: d.reboot.profile } } : {}),
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
        ...(event.reboot ? { reboot: { loader: event.reboot.loader, stage: 'arming' as const, profile: { generation: null, path: null, newest: null } } } : {}),
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
        ...(event.kernel ? { kernel: event.kernel } : {}),
        ...(d.reboot && event.profile ? { reboot: { ...d.reboot, profile: event.profile } } : {}),
      };
      const moved = move(state, next, 'activating', 'prepared', AGENT, {
        announce: { toplevel: event.toplevel, ...(event.kernel ? { kernel: event.kernel } : {}) },
        ...(event.kernel ? { detail: kernelDetail(event.kernel) } : {}),
      });
      const r = next.reboot;
      return {
        state: moved.state,
        effects: [
          ...moved.effects,
          { kind: 'arm', atMono: next.activation!.deadlineMono },
          r
            ? { kind: 'arm-boot', id: d.id, toplevel: event.toplevel, previous: d.previous, loader: r.loader, profile: r.profile }
            : { kind: 'activate', id: d.id, toplevel: event.toplevel, resume: false },
        ],
      };
    }

    case 'boot-armed': {
      if (state.phase !== 'activating' || !d?.reboot || d.id !== event.id) return { state, effects: [] };
      const next: Deployment = { ...d, reboot: { ...d.reboot, stage: 'rebooting', entry: event.entry, generation: event.generation } };
      const requested = d.activation?.revertRequested;
      if (requested) return startRevert(state, next, requested.reason, requested.by, 'rollback', false);
      const moved = move(state, next, 'activating', 'rebooting', AGENT, {
        detail: `the next boot only starts ${d.toplevel} (${d.reboot.loader} entry ${event.entry}); the default stays ${d.previous}`,
        announce: { toplevel: d.toplevel!, reboot: { loader: d.reboot.loader, entry: event.entry }, ...(d.kernel ? { kernel: d.kernel } : {}) },
      });
      return {
        state: moved.state,
        effects: [
          ...moved.effects,
          { kind: 'log', level: 'warn', msg: `trial boot of ${d.toplevel}: rebooting into it once (${event.entry}); the boot default stays ${d.previous}` },
          { kind: 'reboot', id: d.id },
        ],
      };
    }

    case 'boot-arm-failed': {
      if (state.phase !== 'activating' || !d?.reboot || d.id !== event.id) return { state, effects: [] };
      if (event.unrestored) {
        return finish(state, d, { outcome: 'stuck', reason: `the trial boot could not be prepared (${event.error}), nor undone: ${event.unrestored}` }, 'boot-arm-failed', AGENT, now);
      }
      return finish(state, d, { outcome: 'failed', code: 'internal', message: `the trial boot could not be prepared: ${event.error}; nothing was changed` }, 'boot-arm-failed', AGENT, now);
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
      return startTrial(state, d, now, { deadlineMono, deadlineWall, token: event.token, ...(unhealthy ? { unitsFailed: true } : {}) }, 'activated', unhealthy,
        `trial of ${d.toplevel} started: reverting to ${d.previous} in ${d.timeoutSec}s unless confirmed${unhealthy ? ` (unhealthy: ${unhealthy})` : ''}`);
    }

    case 'tick': {
      if (state.phase === 'activating' && d?.reboot && d.activation && now.mono >= d.activation.deadlineMono) {
        const why = d.reboot.stage === 'rebooting' ? 'the host did not reboot' : 'the trial boot was not ready';
        return startRevert(state, d, 'activation-failed', AGENT, 'activation-failed', true, `${why} within confirm.activationTimeoutSec`);
      }
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
      if (event.ok) {
        // A trial boot has booted X; a `test` trial ran X's userland on the booted kernel.
        const notBooted = !d.reboot && (d.kernel?.length ?? 0) > 0;
        return finish(state, d, notBooted ? { outcome: 'confirmed', kernelNotYetBooted: true } : { outcome: 'confirmed' }, 'committed', d.commit.by, now, notBooted ? kernelDetail(d.kernel!) : undefined);
      }
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
          return finish(state, d, { outcome: 'reverted', reason }, 'reverted', by, now, event.detail ?? 'the previous system was already running');
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
  if (d.reboot) {
    const booted = resumeBoot(state, d, event, now);
    if (booted) return booted;
  }

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
      return { state, effects: [revertEffect(d, d.revert!.force)] };
  }
  return { state, effects: [] };
}

/**
 * A trial boot found by a (re)started agent, or undefined where the ordinary resume applies (a
 * trial or revert resumed in the same boot). In a new boot, what runs tells what happened: X runs →
 * the one-shot boot worked and the trial starts, its window counted from the boot; the previous
 * system runs → X never came up (or the power went before the reboot) and the bootloader's default
 * took over: the revert only tidies up.
 */
function resumeBoot(state: State, d: Deployment, event: Extract<Event, { type: 'start' }>, now: Now): Step | undefined {
  const r = d.reboot!;
  const rebooted = d.bootId !== event.bootId;
  if (!rebooted) {
    if (state.phase !== 'activating') return undefined;
    const arm: Effect = { kind: 'arm', atMono: d.activation!.deadlineMono };
    if (r.stage === 'rebooting') return { state, effects: [arm, { kind: 'log', level: 'warn', msg: `deployment ${d.id}: the reboot into ${d.toplevel} was asked for and has not happened; asking again` }, { kind: 'reboot', id: d.id }] };
    return { state, effects: [arm, { kind: 'arm-boot', id: d.id, toplevel: d.toplevel!, previous: d.previous, loader: r.loader, profile: r.profile }] };
  }
  const here: Deployment = { ...d, bootId: event.bootId };
  const running = event.current ?? 'an unknown system';
  if (state.phase === 'activating') {
    if (event.current === d.toplevel) {
      const requested = d.activation?.revertRequested;
      if (requested) return startRevert(state, here, requested.reason, requested.by, 'rollback', false);
      return startBootTrial(state, here, event, now);
    }
    if (event.current === d.previous) {
      const failed = r.stage === 'rebooting';
      const detail = failed
        ? `${d.toplevel} never came up; the bootloader started the default, ${d.previous}`
        : `the host restarted before the trial boot began; running ${d.previous}`;
      return startRevert(state, here, failed ? 'boot-failed' : 'reboot', AGENT, failed ? 'boot-failed' : 'reboot', false, detail);
    }
    return finish(state, here, conflict(event.current, 'the trial boot was abandoned'), 'boot-conflict', AGENT, now);
  }
  if (state.phase === 'trial') return startRevert(state, here, 'reboot', AGENT, 'reboot', false, `the host restarted during the trial boot; running ${running}`);
  if (state.phase === 'reverting') return { state: { ...state, deployment: here }, effects: [revertEffect(here, here.revert!.force)] };
  return undefined;
}

/** X is running in a new boot: its trial starts, with the window counted from the boot. */
function startBootTrial(state: State, d: Deployment, event: Extract<Event, { type: 'start' }>, now: Now): Step {
  const from = Math.min(event.bootStartedMono ?? now.mono, now.mono);
  const deadlineMono = from + d.timeoutSec * 1000;
  const deadlineWall = new Date(Date.parse(now.wall) + (deadlineMono - now.mono)).toISOString();
  return startTrial(state, d, now, { deadlineMono, deadlineWall, token: event.token ?? `boot-${d.bootId}` }, 'booted',
    `booted ${d.toplevel} (boot ${d.bootId}); the boot default is still ${d.previous}`,
    `trial boot of ${d.toplevel} started: rebooting into ${d.previous} in ${inSeconds(now.mono, deadlineMono)}s unless confirmed`);
}

/** The trial begins: recorded with its deadline, the timer and the fallback timer armed. */
function startTrial(
  state: State,
  d: Deployment,
  now: Now,
  trial: Omit<NonNullable<Deployment['trial']>, 'startedAt' | 'startedMono'>,
  event: 'activated' | 'booted',
  detail: string | undefined,
  msg: string,
): Step {
  const next: Deployment = { ...d, trial: { startedAt: now.wall, startedMono: now.mono, ...trial } };
  const moved = move(state, next, 'trial', event, AGENT, { ...(detail ? { detail } : {}), announce: { deadline: trial.deadlineWall, toplevel: d.toplevel! } });
  return {
    state: moved.state,
    effects: [...moved.effects, { kind: 'arm', atMono: trial.deadlineMono }, { kind: 'fallback', id: d.id, atMono: trial.deadlineMono }, { kind: 'log', level: 'warn', msg }],
  };
}

/** `kernel, initrd differ from the booted system` or `userland only`. */
export function kernelDetail(parts: readonly string[]): string {
  return parts.length ? `${parts.join(', ')} differ${parts.length === 1 ? 's' : ''} from the booted system: a reboot is needed to run them` : 'userland only: no reboot needed';
}

/** Seconds until the running deployment's deadline, for `status`. */
export function secondsLeft(state: State, now: Now): number | undefined {
  const d = state.deployment;
  if (state.phase === 'trial' && d?.trial) return inSeconds(now.mono, d.trial.deadlineMono);
  if (state.phase === 'activating' && d?.activation) return inSeconds(now.mono, d.activation.deadlineMono);
  return undefined;
}
