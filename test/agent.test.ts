// The agent on real Nix, driven from the console as an operator would: a real `snapback-agent serve`
// process per scratch host, real store paths, profiles, flakes and signed caches. Simulated (and only
// these): the bootloader, NixOS's own switch-to-configuration and a kernel reboot — each through the
// fake toplevel's own script, so the agent runs its production code path.

import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { haveNix, nix, nixStore, storeLink, switchScript, writeFlake } from './helpers/nix.ts';
import { ScratchHost, waitFor } from './helpers/host.ts';
import { Nix, profiles } from '../agent/nix.ts';
import type { SnapbackError } from '../shared/errors.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const hosts: ScratchHost[] = [];
after(async () => {
  for (const h of hosts) await h.cleanup();
});

async function host(config: Record<string, unknown> = {}, start = true): Promise<ScratchHost> {
  const h = new ScratchHost('agent', config).install();
  hosts.push(h);
  if (start) await h.start();
  return h;
}

describe('agent on real Nix', { skip }, () => {
  it('confirm commits: exactly one new generation, `boot` once, the trial system stays', async () => {
    const h = await host();
    const x = h.toplevel('x');
    const a = await h.cli(['activate', x, '--timeout', '30']);
    assert.equal(a.code, 0, a.stderr);
    assert.equal(a.out.toplevel, x);
    assert.ok(Date.parse(a.out.deadline) > Date.now());
    assert.equal(h.running(), x);
    assert.deepEqual(h.generations(), [1], 'the profile must not change during the trial');

    const c = await h.cli(['confirm']);
    assert.equal(c.code, 0, c.stderr);
    assert.deepEqual(c.out.outcome, { outcome: 'confirmed' });
    assert.deepEqual(h.generations(), [1, 2]);
    assert.equal(h.bootDefault(), x);
    assert.deepEqual(h.switchCalls(), [
      [x, 'test'],
      [x, 'boot'],
    ]);
    const last = h.history().at(-1);
    assert.equal(last.outcome.outcome, 'confirmed');
    assert.deepEqual(last.by, { who: 'console', channel: 'console' });
  });

  it('reverts at the deadline: PREV test runs, profile and boot default untouched', async () => {
    const h = await host();
    const x = h.toplevel('x');
    const a = await h.cli(['activate', x, '--timeout', '2']);
    assert.equal(a.code, 0, a.stderr);
    const trialLog = await h.waitLog((l) => l.msg.startsWith('trial of'));
    assert.equal(trialLog.level, 40, 'a trial is logged at warning level');
    const end = await h.waitOutcome(a.out.id);
    assert.equal(end.level, 40, 'a revert is logged at warning level');
    assert.match(end.msg, /reverted: timeout/);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
    assert.equal(h.bootDefault(), h.gen1);
    assert.deepEqual(h.switchCalls(), [
      [x, 'test'],
      [h.gen1, 'test'],
    ]);
    const s = await h.cli(['status']);
    assert.deepEqual(s.out.last.outcome, { outcome: 'reverted', reason: 'timeout' });
  });

  it('exit 2 of the switch reverts at once', async () => {
    const h = await host();
    const x = h.toplevel('x', { afterLink: 'exit 2' });
    const a = await h.cli(['activate', x, '--timeout', '600']);
    assert.equal(a.code, 1);
    assert.deepEqual(a.out.outcome, { outcome: 'reverted', reason: 'activation-failed' });
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.switchCalls().map((c) => c[1]), ['test', 'test']);
  });

  it('exit 4 blocks confirm under the default health policy, then reverts at the deadline', async () => {
    const h = await host();
    const x = h.toplevel('x', { afterLink: 'exit 4' });
    const a = await h.cli(['activate', x, '--timeout', '3']);
    assert.equal(a.code, 0, a.stderr);
    const st = await h.cli(['status']);
    assert.match(st.out.deployment.unhealthy, /exit 4/);
    const c = await h.cli(['confirm']);
    assert.equal(c.code, 1);
    assert.equal(c.out.code, 'health-failed');
    assert.deepEqual(h.generations(), [1]);
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /reverted: health-failed/);
    assert.equal(h.running(), h.gen1);
    assert.ok(!h.switchCalls().some(([, mode]) => mode === 'boot'));
  });

  it('health.failedUnits "ignore" lets an exit-4 trial be confirmed; a failing check command blocks', async () => {
    const h = await host({ health: { failedUnits: 'ignore', checks: [{ name: 'marker', command: ['test', '-e', '/nonexistent/snapback-marker'] }] } });
    const x = h.toplevel('x', { afterLink: 'exit 4' });
    await h.cli(['activate', x, '--timeout', '30']);
    const c = await h.cli(['confirm']);
    assert.equal(c.out.code, 'health-failed');
    assert.match(c.out.message, /check "marker" exited 1/);
    h.writeConfig({ health: { failedUnits: 'ignore', checks: [{ command: 'true' }] } });
    await h.stop();
    await h.start();
    const c2 = await h.cli(['confirm']);
    assert.equal(c2.code, 0, JSON.stringify(c2.out));
  });

  it('a switch hanging past activationTimeoutSec is stopped and reverted', async () => {
    const h = await host({ confirm: { defaultTimeoutSec: 30, minTimeoutSec: 1, maxTimeoutSec: 600, activationTimeoutSec: 2 } });
    const x = h.toplevel('x', { afterLink: 'sleep 600' });
    const a = await h.cli(['activate', x]);
    assert.equal(a.code, 1);
    assert.equal(a.out.outcome.reason, 'activation-failed');
    assert.equal(h.running(), h.gen1);
    const entry = h.history().find((e) => e.event === 'activation-failed');
    assert.match(entry.detail, /activationTimeoutSec/);
  });

  it('kill -9 during the trial: the restarted agent reverts at the original deadline', async () => {
    const h = await host();
    const x = h.toplevel('x');
    const a = await h.cli(['activate', x, '--timeout', '4']);
    const deadline = Date.parse(a.out.deadline);
    await h.kill9();
    // Restart after most of the window has gone: a new window would end ~4 s after this restart.
    await new Promise((r) => setTimeout(r, 2500));
    await h.start();
    await h.waitLog((l) => l.msg.startsWith('trial of') && l.msg.includes('resumed'));
    await h.waitOutcome(a.out.id);
    const reverted = h.history().find((e) => e.id === a.out.id && e.to === 'idle');
    const late = Date.parse(reverted.at) - deadline;
    assert.ok(late >= -50 && late < 1500, `reverted ${late} ms after the original deadline`);
    assert.deepEqual(reverted.outcome, { outcome: 'reverted', reason: 'timeout' });
    assert.equal(h.running(), h.gen1);
  });

  it('a reboot during the trial records reverted: reboot and runs nothing', async () => {
    const h = await host();
    const x = h.toplevel('x');
    const a = await h.cli(['activate', x, '--timeout', '60']);
    await h.reboot();
    const before = h.switchCalls().length;
    await h.start();
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /reverted: reboot/);
    assert.equal(h.switchCalls().length, before, 'no switch after a reboot: the bootloader already reverted');
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
  });

  it('one deployment at a time: a second activate is refused with the running id', async () => {
    const h = await host();
    const x = h.toplevel('x');
    const y = h.toplevel('y');
    const a = await h.cli(['activate', x, '--timeout', '60']);
    const b = await h.cli(['activate', y]);
    assert.equal(b.code, 1);
    assert.equal(b.out.code, 'busy');
    assert.equal(b.out.id, a.out.id);
    assert.ok(b.out.message.includes(a.out.id));
    assert.equal(h.running(), x);
  });

  it('refuses to activate while switch-to-configuration.lock is held', async (t) => {
    const h = await host();
    const lock = (h.config.system as { switchLock: string }).switchLock;
    writeFileSync(lock, '');
    const holder = spawn('flock', [lock, 'sleep', '600'], { stdio: 'ignore' });
    t.after(() => holder.kill('SIGKILL'));
    await h.waitLog(() => execFileSync('sh', ['-c', `flock -n ${lock} true || echo held`], { encoding: 'utf8' }).includes('held'), 5000).catch(() => {});
    const a = await h.cli(['activate', h.toplevel('x')]);
    assert.equal(a.out.code, 'switch-locked');
    assert.equal(h.switchCalls().length, 0);
  });

  it('confirm is bound to the id: a wrong id is refused, a repeat returns the same result', async () => {
    const h = await host();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    const wrong = await h.cli(['confirm', '--id', 'not-this-one']);
    assert.equal(wrong.code, 1);
    assert.equal(wrong.out.code, 'unknown-deployment');
    assert.deepEqual(h.generations(), [1]);
    const first = await h.cli(['confirm', '--id', a.out.id]);
    const again = await h.cli(['confirm', '--id', a.out.id]);
    assert.deepEqual(first.out, again.out);
    assert.equal(again.code, 0);
    assert.deepEqual(h.generations(), [1, 2], 'the repeat commits nothing more');
  });

  it('a confirm while the switch still runs gets a retryable not-ready', async () => {
    const h = await host();
    const marker = join(h.dir, 'release');
    const x = h.toplevel('x', { beforeLink: `while [ ! -e ${marker} ]; do sleep 0.05; done` });
    const activation = h.cli(['activate', x, '--timeout', '60']);
    await h.waitLog((l) => typeof l.msg === 'string' && l.msg.includes('preparing'));
    await waitFor(() => h.switchCalls().length === 1);
    const c = await h.cli(['confirm']);
    assert.equal(c.out.code, 'not-ready');
    writeFileSync(marker, '');
    assert.equal((await activation).code, 0);
  });

  it('an agent killed mid-switch learns the result from disk when it restarts (direct runner)', async () => {
    const h = await host();
    const release = join(h.dir, 'release');
    const x = h.toplevel('x', { beforeLink: `while [ ! -e ${release} ]; do sleep 0.05; done` });
    const activation = h.cli(['activate', x, '--timeout', '60']);
    await waitFor(() => h.switchCalls().length === 1);
    await h.kill9();
    await activation;
    // The switch goes on without the agent and finishes while no agent runs.
    writeFileSync(release, '');
    await waitFor(() => existsSync(join(h.stateDir, 'runs', readdirOf(h, 'activate-')!, 'status')));
    await h.start();
    await h.waitLog((l) => l.msg.startsWith('trial of'));
    const st = await h.cli(['status']);
    assert.equal(st.out.phase, 'trial');
    assert.equal(h.running(), x);
    assert.equal((await h.cli(['confirm'])).code, 0);
    assert.deepEqual(h.switchCalls().map((c) => c[1]), ['test', 'boot'], 'the switch ran once');
  });

  it('an agent killed mid-revert waits for that revert when it restarts instead of running a second one', async () => {
    const h = new ScratchHost('agent');
    hosts.push(h);
    const slow = join(h.dir, 'slow-revert');
    const release = join(h.dir, 'release');
    h.install({ beforeLink: `if [ -e ${slow} ]; then while [ ! -e ${release} ]; do sleep 0.05; done; fi` });
    await h.start();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    writeFileSync(slow, '');
    const rollback = h.cli(['rollback']);
    await waitFor(() => h.switchCalls().some(([p, m]) => p === h.gen1 && m === 'test'));
    await h.kill9();
    await rollback;
    await h.start();
    writeFileSync(release, '');
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /reverted: requested/);
    assert.equal(h.switchCalls().filter(([p]) => p === h.gen1).length, 1, 'the revert ran once');
    assert.equal(h.running(), h.gen1);
  });

  it('rollback from the console reverts now; a second rollback is harmless', async () => {
    const h = await host();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    const r = await h.cli(['rollback']);
    assert.equal(r.code, 0);
    assert.deepEqual(r.out.outcome, { outcome: 'reverted', reason: 'requested' });
    const again = await h.cli(['rollback', '--id', a.out.id]);
    assert.equal(again.code, 0);
    assert.equal(h.switchCalls().length, 2, 'the second rollback runs nothing');
    assert.equal(h.running(), h.gen1);
    const late = await h.cli(['confirm', '--id', a.out.id]);
    assert.equal(late.code, 1);
    assert.equal(late.out.code, 'deployment-finished', 'a confirm for a finished deployment gets its own error');
    assert.deepEqual(late.out.outcome, { outcome: 'reverted', reason: 'requested' });
  });

  it('revert is compare-and-swap: a system switched by someone else is left alone', async () => {
    const h = await host();
    const other = h.toplevel('other');
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    rmSync(h.current);
    symlinkSync(other, h.current);
    const r = await h.cli(['rollback']);
    assert.equal(r.out.outcome.outcome, 'stuck');
    assert.match(r.out.outcome.reason, /conflict/);
    assert.equal(h.running(), other);
    assert.equal(h.switchCalls().length, 1);
    const end = await h.waitOutcome(a.out.id);
    assert.equal(end.level, 50, 'stuck is logged as an error');
  });

  it('extend moves the deadline but not the revert target', async () => {
    const h = await host();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '2']);
    const e = await h.cli(['extend', '3']);
    assert.equal(e.code, 0, e.stderr);
    assert.ok(Date.parse(e.out.deadline) > Date.parse(a.out.deadline));
    const tooLong = await h.cli(['extend', '601']);
    assert.equal(tooLong.code, 2);
    assert.equal(tooLong.out.code, 'timeout-out-of-range');
    const st = await h.cli(['status']);
    assert.equal(st.out.deployment.previous, h.gen1);
    await h.waitOutcome(a.out.id);
    const end = h.history().find((x) => x.id === a.out.id && x.to === 'idle');
    assert.ok(Date.parse(end.at) >= Date.parse(e.out.deadline) - 50, 'not reverted at the old deadline');
    assert.equal(h.running(), h.gen1);
  });

  it('a toplevel whose boot fails: reverted: commit-failed, profile back where it was', async () => {
    const h = await host();
    const x = h.toplevel('x', { boot: 'exit 1' });
    await h.cli(['activate', x, '--timeout', '60']);
    const c = await h.cli(['confirm']);
    assert.equal(c.code, 1);
    assert.deepEqual(c.out.outcome, { outcome: 'reverted', reason: 'commit-failed' });
    assert.deepEqual(h.generations(), [1]);
    assert.equal(h.bootDefault(), h.gen1);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.switchCalls(), [
      [x, 'test'],
      [x, 'boot'],
      [h.gen1, 'boot'],
      [h.gen1, 'test'],
    ]);
  });

  it('an agent killed mid-commit finishes the commit when the new system runs', async () => {
    const h = await host();
    const once = join(h.dir, 'boot-once');
    const x = h.toplevel('x', { boot: `if [ ! -e ${once} ]; then touch ${once}; exec sleep 600; fi` });
    await h.cli(['activate', x, '--timeout', '60']);
    const confirm = h.cli(['confirm']);
    await waitFor(() => existsSync(once));
    await h.kill9();
    await confirm;
    killRun(h, 'boot');
    await h.start();
    await h.waitLog((l) => /confirmed/.test(l.msg));
    assert.deepEqual(h.generations(), [1, 2]);
    assert.equal(h.bootDefault(), x);
  });

  it('a reboot mid-commit with the previous system booted restores the profile', async () => {
    const h = await host();
    const x = h.toplevel('x', { boot: 'exec sleep 600' });
    const a = await h.cli(['activate', x, '--timeout', '60']);
    const confirm = h.cli(['confirm']);
    await waitFor(() => h.switchCalls().some(([, m]) => m === 'boot'));
    killRun(h, 'boot');
    await h.kill9();
    await confirm;
    // The bootloader never learned about X: the machine comes back on generation 1.
    await h.reboot();
    rmSync(h.current);
    symlinkSync(h.gen1, h.current);
    await h.start();
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /reverted: reboot/);
    assert.deepEqual(h.generations(), [1]);
    assert.equal(h.bootDefault(), h.gen1);
    // X's `boot` may have written the bootloader before the power went: the restored one's runs again.
    assert.deepEqual(h.switchCalls().slice(-2), [
      [x, 'boot'],
      [h.gen1, 'boot'],
    ]);
  });

  it('fetches a store path from a signed file:// cache; an untrusted key fails before anything changes', async () => {
    const h = await host({}, false);
    const cache = join(h.dir, 'cache');
    execFileSync('nix-store', ['--generate-binary-cache-key', 'snapback-test-1', join(h.dir, 'sk'), join(h.dir, 'pk')]);
    execFileSync('nix-store', ['--generate-binary-cache-key', 'other-1', join(h.dir, 'sk2'), join(h.dir, 'pk2')]);
    const pk = readFileSync(join(h.dir, 'pk'), 'utf8').trim();
    const pk2 = readFileSync(join(h.dir, 'pk2'), 'utf8').trim();
    const x = h.toplevel('cached');
    nix(['copy', '--to', `file://${cache}?secret-key=${join(h.dir, 'sk')}`, x]);
    nixStore(['--delete', x]);
    assert.ok(!existsSync(x));

    h.writeConfig({ nix: { substituters: [`file://${cache}`], trustedPublicKeys: [pk2] } });
    await h.start();
    const bad = await h.cli(['activate', x, '--timeout', '60']);
    assert.equal(bad.code, 1);
    assert.equal(bad.out.outcome.outcome, 'failed');
    assert.equal(bad.out.outcome.code, 'fetch-failed');
    assert.match(bad.out.outcome.message, /not signed by any of the keys/);
    assert.equal(h.switchCalls().length, 0);
    assert.equal(h.running(), h.gen1);

    await h.stop();
    h.writeConfig({ nix: { substituters: [`file://${cache}`], trustedPublicKeys: [pk] } });
    await h.start();
    const good = await h.cli(['activate', x, '--timeout', '60']);
    assert.equal(good.code, 0, JSON.stringify(good.out));
    assert.equal(h.running(), x);
    assert.ok(existsSync(join(h.stateDir, 'gcroots', good.out.id)), 'the trial is held by a GC root');
    assert.equal((await h.cli(['confirm'])).code, 0);
    assert.ok(!existsSync(join(h.stateDir, 'gcroots', good.out.id)), 'the GC root is released once committed');
  });

  it('builds and activates a flake target', async () => {
    const h = await host();
    const ref = writeFlake(join(h.dir, 'flake'), 'web1', h.calls, h.current);
    const a = await h.cli(['activate', '--flake', `${ref}#web1`, '--timeout', '60']);
    assert.equal(a.code, 0, JSON.stringify(a.out));
    assert.match(a.out.toplevel, /nixos-system-web1-flake$/);
    assert.equal(h.running(), a.out.toplevel);
    const missing = await h.cli(['activate', '--flake', `${ref}#nope`, '--timeout', '60']);
    assert.equal(missing.out.code, 'busy');
    await h.cli(['rollback']);
    const bad = await h.cli(['activate', '--flake', `${ref}#nope`, '--timeout', '60']);
    assert.equal(bad.out.outcome.code, 'build-failed');
  });

  it('activates an existing generation', async () => {
    const h = await host();
    const x = h.toplevel('x');
    await h.cli(['activate', x, '--timeout', '60']);
    await h.cli(['confirm']);
    const back = await h.cli(['activate', '--generation', '1', '--timeout', '60']);
    assert.equal(back.code, 0, JSON.stringify(back.out));
    assert.equal(h.running(), h.gen1);
    const missing = await h.cli(['rollback']);
    assert.equal(missing.code, 0);
    const none = await h.cli(['activate', '--generation', '9']);
    assert.equal(none.out.outcome.code, 'bad-target');
  });

  it('--dry-run builds, shows what dry-activate would change, and changes nothing', async () => {
    const h = await host();
    const x = h.toplevel('x');
    const text = await h.cli(['activate', x, '--dry-run'], { json: false });
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stderr, /would restart the following units: demo\.service/);
    assert.match(text.stdout, /dry-activate exited 0; nothing was changed/);
    assert.deepEqual(h.switchCalls(), [[x, 'dry-activate']]);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
    assert.deepEqual(h.history(), [], 'a dry run is not a deployment');
    assert.deepEqual(readdirSync(join(h.stateDir, 'gcroots')), [], 'its GC root is gone');
    assert.equal((await h.cli(['status'])).out.phase, 'idle');
  });

  it('refuses a path without bin/switch-to-configuration before anything changes', async () => {
    const h = await host();
    const p = h.toplevel('notop', { notToplevel: true });
    const a = await h.cli(['activate', p]);
    assert.equal(a.code, 1);
    assert.equal(a.out.outcome.code, 'bad-target');
    assert.match(a.out.outcome.message, /not a NixOS toplevel/);
    assert.equal(h.switchCalls().length, 0);
    assert.equal(h.running(), h.gen1);
  });

  it('a store path that is a symlink to a toplevel runs, is held and reverts as that toplevel', async () => {
    const h = await host();
    const x = h.toplevel('x');
    const link = storeLink(join(h.dir, 'links'), 'nixos-system-alias', x);
    assert.notEqual(link, x);
    const a = await h.cli(['activate', link, '--timeout', '2']);
    assert.equal(a.code, 0, JSON.stringify(a.out));
    assert.equal(a.out.toplevel, x, 'the toplevel is the resolved path');
    assert.equal(h.running(), x);
    assert.equal(readlinkSync(join(h.stateDir, 'gcroots', a.out.id)), x, 'the GC root holds what runs, not the link');
    assert.equal((await h.cli(['status'])).out.deployment.toplevel, x);
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /reverted: timeout/, 'the revert recognises the running system as the trial');
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
    assert.equal(h.history().find((e) => e.id === a.out.id && e.to === 'idle').toplevel, x);
  });

  it('a flake whose toplevel is a symlink runs and rolls back as the resolved toplevel', async () => {
    const h = await host();
    const ref = writeFlake(join(h.dir, 'flake'), 'web1', h.calls, h.current, {}, { link: true });
    const a = await h.cli(['activate', '--flake', `${ref}#web1`, '--timeout', '60']);
    assert.equal(a.code, 0, JSON.stringify(a.out));
    assert.match(a.out.toplevel, /nixos-system-web1-flake$/, 'not the link');
    assert.equal(h.running(), a.out.toplevel);
    const r = await h.cli(['rollback']);
    assert.deepEqual(r.out.outcome, { outcome: 'reverted', reason: 'requested' });
    assert.equal(h.running(), h.gen1);
  });

  it('refuses a store path that resolves outside the store or below one of its entries, before anything changes', async () => {
    const h = await host();
    // A toplevel anywhere but directly under the store: a scratch directory, a subdirectory of a store path.
    const outside = join(h.dir, 'outside');
    mkdirSync(join(outside, 'bin'), { recursive: true });
    writeFileSync(join(outside, 'bin', 'switch-to-configuration'), switchScript(h.calls, h.current, {}), { mode: 0o755 });
    const tree = join(h.dir, 'tree');
    mkdirSync(join(tree, 'inner', 'bin'), { recursive: true });
    writeFileSync(join(tree, 'inner', 'bin', 'switch-to-configuration'), switchScript(h.calls, h.current, {}), { mode: 0o755 });
    const inStore = nixStore(['--add', tree]);
    for (const [name, target] of [['nixos-system-outside', outside], ['nixos-system-below', join(inStore, 'inner')]] as const) {
      const link = storeLink(join(h.dir, 'links'), name, target);
      const a = await h.cli(['activate', link, '--timeout', '60']);
      assert.equal(a.code, 1, JSON.stringify(a.out));
      assert.equal(a.out.outcome.code, 'bad-target', name);
      assert.match(a.out.outcome.message, /not a directory directly under \/nix\/store/);
      assert.ok(a.out.outcome.message.includes(target), a.out.outcome.message);
    }
    assert.equal(h.switchCalls().length, 0);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
    assert.deepEqual(readdirSync(join(h.stateDir, 'gcroots')), []);
  });

  it('a full state directory refuses activation and leaves the system untouched', async (t) => {
    const h = await host({}, false);
    const mnt = join(h.dir, 'small');
    mkdirSync(mnt);
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', mnt], { stdio: 'pipe' });
    } catch (err) {
      t.skip(`SKIPPED: cannot mount a tmpfs to fill (${(err as Error).message.split('\n')[0]})`);
      return;
    }
    t.after(() => execFileSync('umount', ['-l', mnt]));
    h.writeConfig({ stateDir: mnt });
    await h.start();
    try {
      writeFileSync(join(mnt, 'filler'), Buffer.alloc(1024 * 1024));
    } catch {}
    const a = await h.cli(['activate', h.toplevel('x')]);
    assert.equal(a.code, 1);
    assert.equal(a.out.code, 'state-unwritable');
    assert.equal(h.switchCalls().length, 0);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
  });

  it('a corrupt state file stops the daemon with a clear message and touches nothing', async () => {
    const h = await host({}, false);
    mkdirSync(h.stateDir, { recursive: true });
    writeFileSync(join(h.stateDir, 'state.json'), '{"version":1,"state":{"phase":"tri');
    const r = spawn(process.execPath, [join(import.meta.dirname, '..', 'bin', 'snapback-agent.js'), 'serve', '--config', h.configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    r.stdout.on('data', (c) => (out += c));
    const code = await new Promise((res) => r.on('exit', res));
    assert.equal(code, 2);
    assert.match(out, /state\.json is not valid JSON/);
    assert.equal(readFileSync(join(h.stateDir, 'state.json'), 'utf8'), '{"version":1,"state":{"phase":"tri');
    assert.equal(h.switchCalls().length, 0);
  });

  it('revert --id (the fallback timer) reverts from the state directory while the daemon is down', async () => {
    const h = await host();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    await h.kill9();
    const r = await h.cli(['revert', '--id', a.out.id]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.deepEqual(r.out.outcome, { outcome: 'reverted', reason: 'fallback-timer' });
    assert.equal(h.running(), h.gen1);
    const end = h.history().at(-1);
    assert.deepEqual(end.by, { who: 'fallback-timer', channel: 'fallback-timer' });
    // Once more, with the agent back: nothing left to do, and nothing is done.
    await h.start();
    const again = await h.cli(['revert', '--id', a.out.id]);
    assert.equal(again.code, 0);
    assert.equal(h.switchCalls().length, 2);
  });

  it('a second agent on the same state directory waits, serving nothing, and takes over when the first stops', async (t) => {
    const h = await host();
    const otherSocket = join(h.dir, 'other.sock');
    h.writeConfig({ controlSocket: otherSocket });
    const r = spawn(process.execPath, [join(import.meta.dirname, '..', 'bin', 'snapback-agent.js'), 'serve', '--config', h.configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
    t.after(() => r.kill('SIGKILL'));
    let out = '';
    r.stdout.on('data', (c) => (out += c));
    await waitFor(() => /another snapback-agent \(pid \d+\) is acting on \S+; waiting until it lets go/.test(out));
    await new Promise((res) => setTimeout(res, 1500));
    assert.equal(r.exitCode, null, 'it keeps waiting');
    assert.equal(existsSync(otherSocket), false, 'and serves nothing meanwhile');
    await h.stop();
    await waitFor(() => out.includes('snapback-agent serving'));
    assert.ok(existsSync(otherSocket));
  });

  it('status and history read the state directory when the daemon is down', async () => {
    const h = await host();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    await h.stop();
    const s = await h.cli(['status']);
    assert.equal(s.code, 0);
    assert.equal(s.out.offline, true);
    assert.equal(s.out.phase, 'trial');
    assert.ok(s.out.deployment.secondsLeft > 50);
    const text = await h.cli(['status'], { json: false });
    assert.match(text.stdout, /trial of \/nix\/store\/\S+, reverting in (\d+m)?\d+s/);
    const hist = await h.cli(['history']);
    assert.deepEqual(hist.out.entries.map((e: { to: string }) => e.to), ['preparing', 'activating', 'trial']);
    assert.ok(hist.out.entries.every((e: { id: string }) => e.id === a.out.id));
  });
});

function readdirOf(h: ScratchHost, prefix: string): string | undefined {
  return execFileSync('ls', [join(h.stateDir, 'runs')], { encoding: 'utf8' })
    .split('\n')
    .find((k) => k.startsWith(prefix));
}

/** Kills the detached switch run KEY of the host (the simulated power loss takes it too). */
function killRun(h: ScratchHost, mode: string): void {
  const runs = join(h.stateDir, 'runs');
  for (const key of execFileSync('ls', [runs], { encoding: 'utf8' }).split('\n').filter((k) => k.startsWith(`${mode}-`))) {
    const pid = parseInt(readFileSync(join(runs, key, 'pid'), 'utf8').trim(), 10);
    if (!(pid > 0)) continue;
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {}
  }
}

describe('Nix commands take what comes from outside as arguments', { skip }, () => {
  const nixOf = () => new Nix({ substituters: [], trustedPublicKeys: [] });

  it('a flake reference beginning with "-" is a reference to nix build, never an option', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'snapback-nix-'));
    // Read as an option, `-I#…` leaves nix build no installable: it would build the default package
    // of the flake in the agent's working directory.
    writeFlake(dir, 'web1', join(dir, 'calls'), join(dir, 'current'), {}, { defaultPackage: true });
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      const root = join(dir, 'root');
      await assert.rejects(nixOf().obtain({ flake: '-I#web1' }, root, join(dir, 'profile')), (err: SnapbackError) => {
        assert.equal(err.code, 'build-failed');
        assert.match(err.message, /-I/);
        return true;
      });
      assert.ok(!existsSync(root), 'nothing was built or rooted');
    } finally {
      process.chdir(cwd);
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('nix-store and nix-env are handed only absolute paths (they read a later "-x" as their own flag)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'snapback-nix-'));
    try {
      // `nix-store --realise --dry-run --add-root R` succeeds and roots nothing.
      await assert.rejects(nixOf().hold('--dry-run', join(dir, 'root')), /"--dry-run" is not an absolute path/);
      await assert.rejects(profiles.set(join(dir, 'system'), '--dry-run'), /"--dry-run" is not an absolute path/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
