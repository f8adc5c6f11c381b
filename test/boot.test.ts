// Trial boots without a host (DESIGN §11): the kernel-side comparison, GRUB's entry names, and the
// pure lifecycle of a trial boot across its boots, power losses and restarts.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { entryFor, grubEntry, kernelChanges, unsupported } from '../agent/boot.ts';
import { initialState, stateSchema, step, type Effect, type Event, type Now, type State } from '../agent/lifecycle.ts';
import { describeOutcome, type Actor } from '../shared/model.ts';
import { describeStatus } from '../shared/text.ts';

const consoleActor: Actor = { who: 'console', channel: 'console' };
const X = '/nix/store/00000000000000000000000000000000-nixos-system-x';
const PREV = '/nix/store/11111111111111111111111111111111-nixos-system-prev';
const PROFILE = { generation: 1, path: PREV, newest: 1 };

function at(mono: number): Now {
  return { mono, wall: new Date(Date.UTC(2026, 10, 25, 12, 0, 0) + mono).toISOString() };
}

/** Feeds events in order; every state must be one the state file accepts (as after a crash). */
function run(state: State, events: [Event, Now][]): { state: State; effects: Effect[] } {
  let s = state;
  const effects: Effect[] = [];
  for (const [e, n] of events) {
    const r = step(s, e, n);
    s = stateSchema.parse(JSON.parse(JSON.stringify(r.state)));
    effects.push(...r.effects);
  }
  return { state: s, effects };
}

const kinds = (effects: Effect[]) => effects.filter((e) => e.kind !== 'log' && e.kind !== 'announce' && e.kind !== 'record').map((e) => e.kind);
const records = (effects: Effect[]) => effects.flatMap((e) => (e.kind === 'record' ? [e.entry] : []));

const activate = (reboot: boolean): Event => ({
  type: 'activate',
  id: 'd1',
  target: { storePath: X },
  timeoutSec: 60,
  activationTimeoutSec: 30,
  previous: PREV,
  bootId: 'b1',
  by: consoleActor,
  ...(reboot ? { reboot: { loader: 'systemd-boot' as const } } : {}),
});

/** A trial boot up to the moment the reboot is asked for (boot b1). */
function rebooting(): { state: State; effects: Effect[] } {
  return run(initialState, [
    [activate(true), at(0)],
    [{ type: 'prepared', id: 'd1', toplevel: X, kernel: ['kernel', 'initrd'], profile: PROFILE }, at(1000)],
    [{ type: 'boot-armed', id: 'd1', entry: 'nixos-generation-2.conf', generation: 2 }, at(2000)],
  ]);
}

/** …and the new boot b2 runs X: the trial. */
function bootedTrial(): { state: State; effects: Effect[] } {
  return run(rebooting().state, [[{ type: 'start', bootId: 'b2', current: X, token: 'tok', bootStartedMono: 500 }, at(3000)]]);
}

describe('the kernel side', () => {
  const dir = mkdtempSync(join(tmpdir(), 'snapback-kernel-'));
  const toplevel = (name: string, parts: Record<string, string>) => {
    const t = join(dir, name);
    mkdirSync(t);
    for (const [part, content] of Object.entries(parts)) {
      if (content.startsWith('->')) symlinkSync(join(dir, content.slice(2)), join(t, part));
      else writeFileSync(join(t, part), content);
    }
    return t;
  };
  mkdirSync(join(dir, 'linux-6.1'));
  mkdirSync(join(dir, 'linux-6.6'));
  const a = toplevel('a', { kernel: '->linux-6.1', initrd: 'initrd-a', 'kernel-params': 'quiet' });
  const sameKernel = toplevel('b', { kernel: '->linux-6.1', initrd: 'initrd-a', 'kernel-params': 'quiet' });
  const newKernel = toplevel('c', { kernel: '->linux-6.6', initrd: 'initrd-c', 'kernel-params': 'quiet' });
  const newParams = toplevel('d', { kernel: '->linux-6.1', initrd: 'initrd-a', 'kernel-params': 'quiet console=ttyS0' });
  symlinkSync(a, join(dir, 'booted'));

  it('is compared with the booted system: links by target, files by content', () => {
    const booted = join(dir, 'booted');
    assert.deepEqual(kernelChanges(booted, a), []);
    assert.deepEqual(kernelChanges(booted, sameKernel), [], 'another toplevel with the same kernel side: userland only');
    assert.deepEqual(kernelChanges(booted, newKernel), ['kernel', 'initrd']);
    assert.deepEqual(kernelChanges(booted, newParams), ['kernel-params']);
    assert.equal(kernelChanges(join(dir, 'no-booted-system'), newKernel), undefined, 'nothing is claimed without a booted system');
  });

  it('userland only and kernel changes read as such', () => {
    assert.equal(describeOutcome({ outcome: 'confirmed', kernelNotYetBooted: true }), 'confirmed (kernel not yet booted)');
    assert.equal(describeOutcome({ outcome: 'reverted', reason: 'boot-failed' }), 'reverted: boot-failed');
    assert.match(unsupported('none')!, /systemd-boot \(bootctl set-oneshot\) or GRUB \(grub-reboot\)/);
    assert.equal(unsupported('grub'), undefined);
    rmSync(dir, { recursive: true, force: true });
  });
});

describe('boot entries', () => {
  it("systemd-boot: the NixOS builder's file name is the entry id", () => {
    assert.equal(entryFor('systemd-boot', 7, X, '/nonexistent'), 'nixos-generation-7.conf');
  });

  it("GRUB: the generation's entry inside NixOS's submenu, found by its system path", () => {
    const cfg = `if [ -s $prefix/grubenv ]; then
  load_env
fi
if [ "\${next_entry}" ]; then
  set default="\${next_entry}"
  set next_entry=
  save_env next_entry
fi
menuentry "NixOS - Default" {
  linux /nix/store/k-linux/bzImage systemConfig=${X} init=${X}/init quiet
}
submenu "NixOS - All configurations" {
menuentry "NixOS - Configuration 2 (2026-11-26 - 25.11)" {
  linux /nix/store/k-linux/bzImage systemConfig=${X} init=${X}/init quiet
}
menuentry "NixOS - Configuration 1 (2026-11-20 - 25.11)" {
  linux /nix/store/k-linux/bzImage systemConfig=${PREV} init=${PREV}/init quiet
}
}
`;
    assert.equal(grubEntry(cfg, 2, X), 'NixOS - All configurations>NixOS - Configuration 2 (2026-11-26 - 25.11)');
    assert.equal(grubEntry(cfg, 1, PREV), 'NixOS - All configurations>NixOS - Configuration 1 (2026-11-20 - 25.11)');
    assert.equal(grubEntry(cfg, 1, X), undefined, 'the number and the system must both match');
    assert.equal(grubEntry(cfg, 3, X), undefined);
  });

  it("GRUB: refused when grub.cfg ignores grub-reboot's next_entry", () => {
    const dir = mkdtempSync(join(tmpdir(), 'snapback-grub-'));
    const cfg = join(dir, 'grub.cfg');
    const menu = `submenu "NixOS - All configurations" {\nmenuentry "NixOS - Configuration 2 (d - v)" {\n  linux k systemConfig=${X}\n}\n}\n`;
    writeFileSync(cfg, `if [ "\${saved_entry}" ]; then set default="\${saved_entry}"; fi\n${menu}`);
    assert.throws(() => entryFor('grub', 2, X, cfg), /does not read grub-reboot's one-time entry/);
    writeFileSync(cfg, `if [ "\${next_entry}" ]; then set default="\${next_entry}"; fi\n${menu}`);
    assert.equal(entryFor('grub', 2, X, cfg), 'NixOS - All configurations>NixOS - Configuration 2 (d - v)');
    rmSync(dir, { recursive: true, force: true });
  });
});

describe('the lifecycle of a trial boot', () => {
  it('a deploy that changes only userland needs no reboot and ends plainly confirmed', () => {
    const r = run(initialState, [
      [activate(false), at(0)],
      [{ type: 'prepared', id: 'd1', toplevel: X, kernel: [] }, at(1000)],
      [{ type: 'activation-finished', id: 'd1', exit: 0, timedOut: false, token: 't' }, at(2000)],
      [{ type: 'confirm', requireToken: false, by: consoleActor }, at(3000)],
      [{ type: 'commit-ready', id: 'd1', problems: [], profile: PROFILE }, at(3100)],
      [{ type: 'commit-finished', id: 'd1', ok: true }, at(3200)],
    ]);
    assert.deepEqual(r.state.last?.outcome, { outcome: 'confirmed' });
    const prepared = r.effects.find((e) => e.kind === 'announce' && e.announcement.type === 'phase' && e.announcement.phase === 'activating');
    assert.deepEqual(prepared?.kind === 'announce' && prepared.announcement.type === 'phase' && prepared.announcement.kernel, []);
    assert.ok(records(r.effects).some((e) => e.detail === 'userland only: no reboot needed'));
  });

  it('a `test` trial whose kernel side differs ends confirmed (kernel not yet booted)', () => {
    const r = run(initialState, [
      [activate(false), at(0)],
      [{ type: 'prepared', id: 'd1', toplevel: X, kernel: ['kernel-params'] }, at(1000)],
      [{ type: 'activation-finished', id: 'd1', exit: 0, timedOut: false, token: 't' }, at(2000)],
      [{ type: 'confirm', requireToken: false, by: consoleActor }, at(3000)],
      [{ type: 'commit-ready', id: 'd1', problems: [], profile: PROFILE }, at(3100)],
      [{ type: 'commit-finished', id: 'd1', ok: true }, at(3200)],
    ]);
    assert.deepEqual(r.state.last?.outcome, { outcome: 'confirmed', kernelNotYetBooted: true });
    assert.deepEqual(r.state.last?.kernel, ['kernel-params']);
  });

  it('arms the boot entry instead of `test`, persists the pending reboot, then reboots', () => {
    const r = rebooting();
    assert.deepEqual(kinds(r.effects), ['prepare', 'arm', 'arm-boot', 'reboot']);
    assert.ok(!r.effects.some((e) => e.kind === 'activate'), 'no switch-to-configuration test');
    assert.equal(r.state.phase, 'activating');
    assert.deepEqual(r.state.deployment?.reboot, { loader: 'systemd-boot', stage: 'rebooting', profile: PROFILE, entry: 'nixos-generation-2.conf', generation: 2 });
    assert.ok(records(r.effects).every((e) => e.bootId === 'b1'));
  });

  it('in the new boot, X running: the trial starts with its window counted from the boot', () => {
    const r = bootedTrial();
    assert.equal(r.state.phase, 'trial');
    assert.equal(r.state.deployment?.bootId, 'b2');
    assert.equal(r.state.deployment?.trial?.deadlineMono, 500 + 60_000, 'from the boot, not from the agent start');
    assert.deepEqual(kinds(r.effects), ['arm', 'fallback']);
    assert.deepEqual(records(r.effects).map((e) => [e.event, e.bootId]), [['booted', 'b2']]);
    // confirm: the ordinary commit (profile + X's boot), and no "kernel not yet booted": it is booted
    const c = run(r.state, [
      [{ type: 'confirm', requireToken: true, token: 'tok', by: consoleActor }, at(4000)],
      [{ type: 'commit-ready', id: 'd1', problems: [], profile: PROFILE }, at(4100)],
      [{ type: 'commit-finished', id: 'd1', ok: true }, at(4200)],
    ]);
    assert.ok(c.effects.some((e) => e.kind === 'commit' && e.toplevel === X));
    assert.deepEqual(c.state.last?.outcome, { outcome: 'confirmed' });
  });

  it('the deadline reboots into the default; the next boot records the revert (both boots in the history)', () => {
    const t = bootedTrial();
    const r = run(t.state, [[{ type: 'tick' }, at(61_000)]]);
    assert.equal(r.state.phase, 'reverting');
    const revert = r.effects.find((e) => e.kind === 'revert');
    assert.deepEqual(revert?.kind === 'revert' && revert.boot, { loader: 'systemd-boot', profile: PROFILE });
    const back = run(r.state, [
      [{ type: 'start', bootId: 'b3', current: PREV, token: 'tok3' }, at(100)],
      [{ type: 'revert-finished', id: 'd1', result: 'already-previous', detail: 'running the default' }, at(200)],
    ]);
    assert.deepEqual(back.state.last?.outcome, { outcome: 'reverted', reason: 'timeout' });
    const all = [...records(t.effects), ...records(r.effects), ...records(back.effects)];
    assert.deepEqual(all.map((e) => [e.event, e.bootId]), [['booted', 'b2'], ['deadline', 'b2'], ['reverted', 'b3']]);
  });

  it('a new system that never came up: the default booted, recorded reverted: boot-failed', () => {
    const r = run(rebooting().state, [
      [{ type: 'start', bootId: 'b2', current: PREV, token: 'tok' }, at(100)],
      [{ type: 'revert-finished', id: 'd1', result: 'already-previous' }, at(200)],
    ]);
    assert.deepEqual(r.state.last?.outcome, { outcome: 'reverted', reason: 'boot-failed' });
    assert.ok(r.effects.some((e) => e.kind === 'revert' && e.boot), 'the revert tidies up the entry and the generation');
  });

  it('a power loss before the one-shot was set is a plain reboot', () => {
    const arming = run(initialState, [
      [activate(true), at(0)],
      [{ type: 'prepared', id: 'd1', toplevel: X, profile: PROFILE }, at(1000)],
    ]).state;
    const r = run(arming, [
      [{ type: 'start', bootId: 'b2', current: PREV }, at(100)],
      [{ type: 'revert-finished', id: 'd1', result: 'already-previous' }, at(200)],
    ]);
    assert.deepEqual(r.state.last?.outcome, { outcome: 'reverted', reason: 'reboot' });
  });

  it('kill -9 in the same boot: arming is done again, a reboot asked for is asked again', () => {
    const arming = run(initialState, [
      [activate(true), at(0)],
      [{ type: 'prepared', id: 'd1', toplevel: X, profile: PROFILE }, at(1000)],
    ]).state;
    assert.deepEqual(kinds(step(arming, { type: 'start', bootId: 'b1', current: PREV }, at(1500)).effects), ['arm', 'arm-boot']);
    assert.deepEqual(kinds(step(rebooting().state, { type: 'start', bootId: 'b1', current: PREV }, at(2500)).effects), ['arm', 'reboot']);
    // …and a trial boot's trial resumed in its own boot keeps its deadline
    const t = step(bootedTrial().state, { type: 'start', bootId: 'b2', current: X }, at(9000));
    assert.equal(t.state.deployment?.trial?.deadlineMono, 60_500);
  });

  it('a power loss during the trial boot reboots into the default: reverted: reboot', () => {
    const r = run(bootedTrial().state, [
      [{ type: 'start', bootId: 'b3', current: PREV }, at(100)],
      [{ type: 'revert-finished', id: 'd1', result: 'already-previous' }, at(200)],
    ]);
    assert.deepEqual(r.state.last?.outcome, { outcome: 'reverted', reason: 'reboot' });
  });

  it('a host that does not reboot within the activation limit is reverted (activation-failed)', () => {
    const r = run(rebooting().state, [[{ type: 'tick' }, at(31_000)]]);
    assert.equal(r.state.phase, 'reverting');
    assert.equal(r.state.deployment?.revert?.reason, 'activation-failed');
  });

  it('a rollback asked for while arming is carried out instead of the reboot', () => {
    const r = run(initialState, [
      [activate(true), at(0)],
      [{ type: 'prepared', id: 'd1', toplevel: X, profile: PROFILE }, at(1000)],
      [{ type: 'rollback', by: consoleActor, reason: 'requested' }, at(1500)],
      [{ type: 'boot-armed', id: 'd1', entry: 'nixos-generation-2.conf', generation: 2 }, at(2000)],
    ]);
    assert.equal(r.state.phase, 'reverting');
    assert.ok(!r.effects.some((e) => e.kind === 'reboot'));
  });

  it('arming that failed and was undone changed nothing', () => {
    const r = run(initialState, [
      [activate(true), at(0)],
      [{ type: 'prepared', id: 'd1', toplevel: X, profile: PROFILE }, at(1000)],
      [{ type: 'boot-arm-failed', id: 'd1', error: 'bootctl: no ESP' }, at(2000)],
    ]);
    assert.equal(r.state.last?.outcome.outcome, 'failed');
  });

  it('status says "confirmed (kernel not yet booted)" while the booted system differs', () => {
    const text = describeStatus({
      hostname: 'h',
      version: '0',
      bootId: 'b',
      currentSystem: X,
      phase: 'idle',
      last: { id: 'd1', target: X, outcome: { outcome: 'confirmed', kernelNotYetBooted: true }, finishedAt: 'now', by: consoleActor },
      bootPending: ['kernel'],
    });
    assert.match(text, /confirmed \(kernel not yet booted\)/);
    assert.match(text, /the boot default's kernel differs from the booted system: the next boot runs them/);
  });
});
