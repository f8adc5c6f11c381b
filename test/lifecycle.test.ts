// The pure lifecycle, without a host: every transition of DESIGN §2 and its effects.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { step, initialState, stateSchema, type Event, type Effect, type State, type Now } from '../agent/lifecycle.ts';
import type { Actor } from '../shared/model.ts';

const consoleActor: Actor = { who: 'console', channel: 'console' };
const X = '/nix/store/00000000000000000000000000000000-nixos-system-x';
const PREV = '/nix/store/11111111111111111111111111111111-nixos-system-prev';

function at(mono: number, wallOffsetMs = 0): Now {
  return { mono, wall: new Date(Date.UTC(2026, 10, 25, 12, 0, 0) + mono + wallOffsetMs).toISOString() };
}

function run(state: State, events: [Event, Now][]): { state: State; effects: Effect[] } {
  let s = state;
  const effects: Effect[] = [];
  for (const [e, n] of events) {
    const r = step(s, e, n);
    s = r.state;
    effects.push(...r.effects);
  }
  return { state: s, effects };
}

const activate: Event = { type: 'activate', id: 'd1', target: { storePath: X }, timeoutSec: 60, activationTimeoutSec: 30, previous: PREV, bootId: 'b1', by: consoleActor };

function inTrial(exit = 0): State {
  return run(initialState, [
    [activate, at(0)],
    [{ type: 'prepared', id: 'd1', toplevel: X }, at(1000)],
    [{ type: 'activation-finished', id: 'd1', exit, timedOut: false, token: 'tok' }, at(2000)],
  ]).state;
}

const kinds = (effects: Effect[]) => effects.map((e) => e.kind);

describe('lifecycle', () => {
  it('activates: preparing, then activating with the pending record, then a trial with a deadline', () => {
    const r1 = step(initialState, activate, at(0));
    assert.equal(r1.state.phase, 'preparing');
    assert.equal(r1.state.deployment?.previous, PREV);
    assert.ok(kinds(r1.effects).includes('prepare'));
    const r2 = step(r1.state, { type: 'prepared', id: 'd1', toplevel: X }, at(1000));
    assert.equal(r2.state.phase, 'activating');
    assert.equal(r2.state.deployment?.activation?.deadlineMono, 31_000);
    // the activate effect comes after the state that records it (the engine persists first)
    assert.deepEqual(kinds(r2.effects).slice(-1), ['activate']);
    const r3 = step(r2.state, { type: 'activation-finished', id: 'd1', exit: 0, timedOut: false, token: 't' }, at(2000));
    assert.equal(r3.state.phase, 'trial');
    assert.equal(r3.state.deployment?.trial?.deadlineMono, 62_000);
    assert.ok(r3.effects.some((e) => e.kind === 'log' && e.level === 'warn'));
  });

  it('refuses a second activate with the running id', () => {
    const r = step(inTrial(), { ...activate, id: 'd2' }, at(3000));
    assert.deepEqual(r.reply && !r.reply.ok && [r.reply.code, r.reply.id], ['busy', 'd1']);
    assert.equal(r.effects.length, 0);
  });

  it('reverts at the deadline on the monotonic clock, whatever the wall clock says', () => {
    const s = inTrial();
    const early = step(s, { type: 'tick' }, at(61_999, 10 * 3600_000));
    assert.equal(early.state.phase, 'trial', 'a wall-clock jump forward must not shorten the window');
    const late = step(s, { type: 'tick' }, at(62_000, -10 * 3600_000));
    assert.equal(late.state.phase, 'reverting', 'a wall-clock jump backward must not stretch it');
    assert.equal(late.state.deployment?.revert?.reason, 'timeout');
  });

  it('reverts at once when the switch fails or times out', () => {
    for (const [exit, timedOut] of [[2, false], [1, false], [null, false], [0, true]] as const) {
      const s = run(initialState, [
        [activate, at(0)],
        [{ type: 'prepared', id: 'd1', toplevel: X }, at(1)],
      ]).state;
      const r = step(s, { type: 'activation-finished', id: 'd1', exit, timedOut, token: 't' }, at(2));
      assert.equal(r.state.phase, 'reverting', `exit ${exit} timedOut ${timedOut}`);
      assert.equal(r.state.deployment?.revert?.reason, 'activation-failed');
      assert.ok(r.effects.some((e) => e.kind === 'revert' && e.force));
    }
  });

  it('stops a switch past its activation deadline once', () => {
    const s = run(initialState, [
      [activate, at(0)],
      [{ type: 'prepared', id: 'd1', toplevel: X }, at(0)],
    ]).state;
    const r = step(s, { type: 'tick' }, at(30_000));
    assert.deepEqual(kinds(r.effects), ['log', 'stop-activation']);
    assert.equal(step(r.state, { type: 'tick' }, at(30_500)).effects.length, 0);
  });

  it('on start: a stop of an overdue switch that the previous process began is issued again', () => {
    const s = run(initialState, [
      [activate, at(0)],
      [{ type: 'prepared', id: 'd1', toplevel: X }, at(0)],
      [{ type: 'tick' }, at(30_000)],
    ]).state;
    assert.equal(s.deployment?.activation?.stopping, true);
    const resumed = step(s, { type: 'start', bootId: 'b1', current: X }, at(31_000));
    assert.ok(resumed.effects.some((e) => e.kind === 'activate' && e.resume));
    const tick = step(resumed.state, { type: 'tick' }, at(31_000));
    assert.ok(tick.effects.some((e) => e.kind === 'stop-activation'));
  });

  it('keeps a trial after exit 4 but marks it, and a refused confirm makes the deadline revert health-failed', () => {
    const s = inTrial(4);
    assert.equal(s.phase, 'trial');
    assert.equal(s.deployment?.trial?.unitsFailed, true);
    const c = step(s, { type: 'confirm', id: 'd1', token: 'tok', requireToken: true, by: consoleActor }, at(3000));
    assert.deepEqual(c.effects, [{ kind: 'prepare-commit', id: 'd1', unitsFailed: true }]);
    const refused = step(c.state, { type: 'commit-ready', id: 'd1', problems: ['failed units: x.service'], profile: { generation: 1, path: '/nix/store/gen1', newest: 1 } }, at(3100));
    assert.equal(refused.state.phase, 'trial');
    assert.ok(refused.effects.some((e) => e.kind === 'announce' && e.announcement.type === 'confirm-refused'));
    const end = step(refused.state, { type: 'tick' }, at(62_000));
    assert.equal(end.state.deployment?.revert?.reason, 'health-failed');
  });

  it('binds confirm to the deployment id and token, and answers a repeat with the same result', () => {
    const s = inTrial();
    const wrongId = step(s, { type: 'confirm', id: 'other', token: 'tok', requireToken: true, by: consoleActor }, at(3000));
    assert.equal(wrongId.reply?.ok === false && wrongId.reply.code, 'unknown-deployment');
    const wrongToken = step(s, { type: 'confirm', id: 'd1', token: 'nope', requireToken: true, by: consoleActor }, at(3000));
    assert.equal(wrongToken.reply?.ok === false && wrongToken.reply.code, 'bad-token');
    const done = run(s, [
      [{ type: 'confirm', id: 'd1', token: 'tok', requireToken: true, by: consoleActor }, at(3000)],
      [{ type: 'commit-ready', id: 'd1', problems: [], profile: { generation: 1, path: '/nix/store/gen1', newest: 1 } }, at(3100)],
      [{ type: 'commit-finished', id: 'd1', ok: true }, at(3200)],
    ]).state;
    assert.deepEqual(done.last?.outcome, { outcome: 'confirmed' });
    const again = step(done, { type: 'confirm', id: 'd1', token: 'tok', requireToken: true, by: consoleActor }, at(4000));
    assert.deepEqual(again.reply, { ok: true, id: 'd1', outcome: { outcome: 'confirmed' } });
  });

  it('answers a confirm before the trial is ready with a retryable not-ready', () => {
    const s = step(initialState, activate, at(0)).state;
    const r = step(s, { type: 'confirm', id: 'd1', requireToken: false, by: consoleActor }, at(1));
    assert.equal(r.reply?.ok === false && r.reply.code, 'not-ready');
  });

  it('extends the deadline relative to now without touching the revert target', () => {
    const s = inTrial();
    const r = step(s, { type: 'extend', id: 'd1', seconds: 120, by: consoleActor }, at(10_000));
    assert.equal(r.state.deployment?.trial?.deadlineMono, 130_000);
    assert.equal(r.state.deployment?.previous, PREV);
  });

  it('turns a failed commit into a revert with reason commit-failed', () => {
    const s = run(inTrial(), [
      [{ type: 'confirm', id: 'd1', requireToken: false, by: consoleActor }, at(3000)],
      [{ type: 'commit-ready', id: 'd1', problems: [], profile: { generation: 1, path: '/nix/store/gen1', newest: 1 } }, at(3100)],
    ]).state;
    assert.equal(s.phase, 'committing');
    const r = step(s, { type: 'commit-finished', id: 'd1', ok: false, error: 'boot exited 1' }, at(3200));
    assert.equal(r.state.phase, 'reverting');
    assert.equal(r.state.deployment?.revert?.reason, 'commit-failed');
  });

  it('records a conflict as stuck and leaves the system alone', () => {
    const s = step(inTrial(), { type: 'rollback', id: 'd1', by: consoleActor, reason: 'requested' }, at(3000)).state;
    const r = step(s, { type: 'revert-finished', id: 'd1', result: 'conflict', current: '/nix/store/other' }, at(3100));
    assert.equal(r.state.last?.outcome.outcome, 'stuck');
    assert.ok(!kinds(r.effects).includes('revert'));
  });

  it('on start: resumes a trial at its original deadline, or records reboot after a new boot', () => {
    const s = inTrial();
    const same = step(s, { type: 'start', bootId: 'b1', current: X }, at(5000));
    assert.deepEqual(same.effects.find((e) => e.kind === 'arm'), { kind: 'arm', atMono: 62_000 });
    const rebooted = step(s, { type: 'start', bootId: 'b2', current: PREV }, at(5));
    assert.deepEqual(rebooted.state.last?.outcome, { outcome: 'reverted', reason: 'reboot' });
    assert.ok(!kinds(rebooted.effects).includes('revert'), 'a reboot already reverted: run nothing');
  });

  it('on start: finishes or abandons an interrupted commit', () => {
    const s = run(inTrial(), [
      [{ type: 'confirm', id: 'd1', requireToken: false, by: consoleActor }, at(3000)],
      [{ type: 'commit-ready', id: 'd1', problems: [], profile: { generation: 1, path: '/nix/store/gen1', newest: 1 } }, at(3100)],
    ]).state;
    const r = step(s, { type: 'start', bootId: 'b2', current: PREV }, at(1));
    const commit = r.effects.find((e) => e.kind === 'commit');
    assert.deepEqual(commit && commit.kind === 'commit' && [commit.resume, commit.reason, commit.profile], [true, 'reboot', { generation: 1, path: '/nix/store/gen1', newest: 1 }]);
  });

  it('ignores events for other deployments and stale results', () => {
    const s = inTrial();
    for (const e of [
      { type: 'prepared', id: 'd1', toplevel: X },
      { type: 'activation-finished', id: 'd9', exit: 0, timedOut: false, token: 'x' },
      { type: 'revert-finished', id: 'd1', result: 'reverted' },
      { type: 'commit-finished', id: 'd1', ok: true },
    ] as Event[]) {
      const r = step(s, e, at(3000));
      assert.equal(r.state, s, e.type);
      assert.equal(r.effects.length, 0);
    }
  });

  it('late is late: a confirm or extend after the deadline is refused by its own time, and the revert starts', () => {
    for (const e of [
      { type: 'confirm', id: 'd1', token: 'tok', requireToken: true, by: consoleActor },
      { type: 'extend', id: 'd1', seconds: 300, by: consoleActor },
    ] as Event[]) {
      // The trial started at 2000 with a 60 s window: the deadline is 62000, and no tick has come yet.
      const early = step(inTrial(), e, at(61_999));
      assert.equal(early.reply?.ok, true, `${e.type} a millisecond before the deadline`);
      const r = step(inTrial(), e, at(62_000));
      assert.ok(r.reply && !r.reply.ok, `${e.type} at the deadline is refused`);
      assert.equal(r.reply.code, 'deployment-finished');
      assert.match(r.reply.message, /too late/);
      assert.equal(r.state.phase, 'reverting');
      assert.deepEqual(r.state.deployment?.revert?.reason, 'timeout');
      assert.ok(kinds(r.effects).includes('revert'));
      assert.ok(!kinds(r.effects).includes('prepare-commit') && !kinds(r.effects).includes('arm'));
    }
  });

  it('the state file schema accepts every state the lifecycle makes and refuses records that do not fit their phase', () => {
    const made = [
      initialState,
      step(initialState, activate, at(0)).state,
      run(initialState, [[activate, at(0)], [{ type: 'prepared', id: 'd1', toplevel: X }, at(1)]]).state,
      inTrial(),
      run(inTrial(), [
        [{ type: 'confirm', id: 'd1', requireToken: false, by: consoleActor }, at(3000)],
        [{ type: 'commit-ready', id: 'd1', problems: [], profile: { generation: 1, path: PREV, newest: 1 } }, at(3100)],
      ]).state,
      step(inTrial(), { type: 'rollback', id: 'd1', by: consoleActor, reason: 'requested' }, at(3000)).state,
      run(inTrial(), [
        [{ type: 'rollback', id: 'd1', by: consoleActor, reason: 'requested' }, at(3000)],
        [{ type: 'revert-finished', id: 'd1', result: 'reverted' }, at(3100)],
      ]).state,
    ];
    for (const s of made) assert.ok(stateSchema.safeParse(JSON.parse(JSON.stringify(s))).success, s.phase);
    const trial = inTrial();
    const { trial: _, ...withoutTrial } = trial.deployment!;
    const broken: [unknown, RegExp][] = [
      [{ phase: 'trial' }, /deployment/],
      [{ ...trial, deployment: withoutTrial }, /deployment\.trial/],
      [{ phase: 'idle', deployment: trial.deployment }, /idle/],
      [{ ...trial, deployment: { ...trial.deployment, trial: { ...trial.deployment!.trial, deadlineMono: 'soon' } } }, /deadlineMono/],
      [{ phase: 'waiting' }, /phase/],
    ];
    for (const [s, why] of broken) {
      const r = stateSchema.safeParse(s);
      assert.ok(!r.success, JSON.stringify(s).slice(0, 80));
      assert.match(JSON.stringify(r.error.issues), why);
    }
  });
});
