// Trial boots (DESIGN §11) on scratch hosts: a real `snapback-agent serve`, real Nix, profiles and
// generations; the bootloader is simulated (helpers/loader.ts: a stand-in bootctl and entry files),
// and so is the reboot itself: the agent's reboot command only records the request, and this file
// then "boots" the host — the agent stops, the boot id changes, and the current and booted systems
// become what the simulated loader picks (the one-shot entry, consumed, else the default).

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:net';
import { execFileSync } from 'node:child_process';
import { readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { haveNix, type Behaviour } from './helpers/nix.ts';
import { ScratchHost, cleanupsAfterAll, waitFor } from './helpers/host.ts';
import { SimulatedLoader } from './helpers/loader.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

interface BootHost {
  h: ScratchHost;
  loader: SimulatedLoader;
  booted: string;
  env: Record<string, string>;
  /** a fake toplevel whose `boot` writes the simulated loader's entries; `kernel` names its kernel side */
  toplevel(name: string, kernel: string, b?: Behaviour): string;
  /** the host boots again: the agent stops (a clean shutdown, or power loss), the loader picks */
  boot(how?: { powerLoss?: boolean; hang?: boolean; failpoints?: string[] }): Promise<string>;
  start(failpoints?: string[]): Promise<void>;
}

async function bootHost(config: { bootloader?: string; wire?: boolean } = {}): Promise<BootHost> {
  const h = new ScratchHost('trial-boot');
  cleanups.push(() => h.cleanup());
  const loader = new SimulatedLoader(join(h.dir, 'boot'));
  const bin = join(h.dir, 'bin');
  const { reboot } = loader.installCommands(bin);
  const booted = join(h.dir, 'booted-system');
  const system = { ...(h.config.system as Record<string, unknown>), bootedSystem: booted, rebootCommand: [reboot], ...(config.bootloader ? { bootloader: config.bootloader } : {}) };
  h.writeConfig({ system });
  if (config.wire) {
    h.enableWire();
    h.writeConfig({ listen: { host: '127.0.0.1', port: await freePort() } });
  }
  const builder = loader.bootScript(h.profile);
  h.install({ boot: builder, kernel: 'k1' });
  symlinkSync(h.gen1, booted);
  // The installed system's own `boot` wrote the entries and the default (as at installation).
  execFileSync(join(h.gen1, 'bin', 'switch-to-configuration'), ['boot']);
  writeFileSync(h.calls, '');
  const env = { PATH: `${bin}:${process.env.PATH}` };
  const start = (failpoints: string[] = []) => h.start({ env, failpoints });
  await start();
  return {
    h,
    loader,
    booted,
    env,
    start,
    toplevel: (name, kernel, b = {}) => h.toplevel(name, { ...b, kernel, boot: builder }),
    async boot(how = {}) {
      if (how.powerLoss) await h.kill9();
      else await h.stop();
      const picked = loader.pick();
      writeFileSync(h.bootIdFile, randomUUID() + '\n');
      for (const link of [h.current, booted]) {
        rmSync(link, { force: true });
        symlinkSync(picked, link);
      }
      if (!how.hang) await start(how.failpoints);
      return picked;
    },
  };
}

/** `activate X --reboot` with the agent killed (-9) at failpoint `point`; X. */
async function killedAt(t: BootHost, point: string): Promise<string> {
  const x = t.toplevel(`x-${point.slice(5)}`, 'k2');
  await t.h.stop();
  await t.start([point]);
  await t.h.cli(['activate', x, '--reboot', '--timeout', '30']);
  await t.h.exited();
  return x;
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

const endOf = (h: ScratchHost, id: string) => h.history().find((e) => e.id === id && e.to === 'idle');

describe('trial boots on a scratch host', { skip, timeout: 300_000 }, () => {
  it('a userland-only deploy needs no reboot and says so; a kernel change ends "confirmed (kernel not yet booted)" until it is booted', async () => {
    const t = await bootHost({ bootloader: 'systemd-boot' });
    const { h } = t;
    const y = t.toplevel('y', 'k1');
    const a = await h.cli(['activate', y, '--timeout', '30']);
    assert.equal(a.code, 0, a.stderr);
    assert.deepEqual(a.out.kernel, [], 'the same kernel side: userland only');
    assert.deepEqual(a.events.find((e) => e.phase === 'activating')?.kernel, []);
    assert.deepEqual((await h.cli(['confirm'])).out.outcome, { outcome: 'confirmed' });

    const z = t.toplevel('z', 'k2');
    const b = await h.cli(['activate', z, '--timeout', '30'], { json: false });
    assert.equal(b.code, 0, b.stderr);
    assert.match(b.stdout, /kernel, initrd, kernel-params differ from the booted system: a reboot is needed/);
    const c = await h.cli(['confirm']);
    assert.deepEqual(c.out.outcome, { outcome: 'confirmed', kernelNotYetBooted: true });
    const st = await h.cli(['status']);
    assert.deepEqual(st.out.last.outcome, { outcome: 'confirmed', kernelNotYetBooted: true });
    assert.deepEqual(st.out.bootPending, ['kernel', 'initrd', 'kernel-params']);
    assert.match((await h.cli(['status'], { json: false })).stdout, /confirmed \(kernel not yet booted\)/);
    // The agent down: the state directory says the same.
    await h.stop();
    assert.match((await h.cli(['status'], { json: false })).stdout, /confirmed \(kernel not yet booted\)/);
    await t.start();

    // A reboot boots the new default, z: from then on it is plainly confirmed.
    assert.equal(await t.boot(), z);
    const after = await h.cli(['status']);
    assert.deepEqual(after.out.last.outcome, { outcome: 'confirmed' });
    assert.equal(after.out.bootPending, undefined);
    assert.doesNotMatch((await h.cli(['status'], { json: false })).stdout, /not yet booted/);

    // Another kernel confirmed, then a later deployment reverted: the boot default's kernel has
    // still not run, whatever the last outcome says.
    assert.equal((await h.cli(['activate', t.toplevel('v', 'k3'), '--timeout', '30'])).code, 0);
    assert.deepEqual((await h.cli(['confirm'])).out.outcome, { outcome: 'confirmed', kernelNotYetBooted: true });
    assert.equal((await h.cli(['activate', t.toplevel('w', 'k3'), '--timeout', '30'])).code, 0);
    assert.deepEqual((await h.cli(['rollback'])).out.outcome, { outcome: 'reverted', reason: 'requested' });
    const later = await h.cli(['status']);
    assert.deepEqual(later.out.bootPending, ['kernel', 'initrd', 'kernel-params']);
    assert.match((await h.cli(['status'], { json: false })).stdout, /the boot default's kernel, initrd, kernel-params differ from the booted system/);
  });

  it('trial boot, confirmed: the default stays until confirm, the next boot only starts X, its window counts from that boot', async () => {
    const t = await bootHost(); // bootloader detected: the stand-in bootctl says systemd-boot is installed
    const { h, loader } = t;
    const x = t.toplevel('x', 'k2');
    const a = await h.cli(['activate', x, '--reboot', '--timeout', '30']);
    assert.equal(a.code, 0, a.stderr + JSON.stringify(a.out));
    assert.deepEqual(a.out.rebooting, { loader: 'systemd-boot', entry: 'nixos-generation-2.conf' });
    assert.deepEqual(a.out.kernel, ['kernel', 'initrd', 'kernel-params']);
    await waitFor(() => loader.rebootRequested);
    assert.equal(loader.oneShot, 'nixos-generation-2.conf', 'the next boot only');
    assert.equal(loader.default, 'nixos-generation-1.conf', 'the default stays on the previous system');
    assert.equal(h.bootDefault(), h.gen1, 'the profile too');
    assert.equal(h.running(), h.gen1, 'no switch-to-configuration test of X');
    assert.deepEqual(h.switchCalls(), [[h.gen1, 'boot']], "only the previous system's boot, to write X's entry");
    const waiting = await h.cli(['status'], { json: false });
    assert.match(waiting.stdout, /trial boot of .*: rebooting into it once \(systemd-boot entry nixos-generation-2\.conf\)/);

    assert.equal(await t.boot(), x, 'the one-shot entry');
    assert.equal(loader.oneShot, undefined, 'consumed');
    const st = await h.cli(['status']);
    assert.equal(st.out.phase, 'trial');
    assert.equal(st.out.deployment.reboot.stage, 'rebooting');
    assert.ok(st.out.deployment.secondsLeft <= 30);
    const c = await h.cli(['confirm']);
    assert.deepEqual(c.out.outcome, { outcome: 'confirmed' }, 'booted: no "kernel not yet booted"');
    assert.equal(h.bootDefault(), x);
    assert.equal(loader.default, 'nixos-generation-2.conf', "confirm moved the boot default (X's boot)");
    assert.deepEqual(h.generations(), [1, 2]);
    const entries = h.history().filter((e) => e.id === a.out.id);
    const boots = [...new Set(entries.map((e) => e.bootId))];
    assert.equal(boots.length, 2, `two boots in the history: ${JSON.stringify(entries)}`);
    assert.deepEqual(entries.map((e) => e.event), ['activate', 'prepared', 'rebooting', 'booted', 'confirm', 'committed']);
  });

  it('trial boot reverted at the deadline: back on the previous system after the second reboot, X forgotten', async () => {
    const t = await bootHost({ bootloader: 'systemd-boot' });
    const { h, loader } = t;
    const x = t.toplevel('x', 'k2');
    const a = await h.cli(['activate', x, '--reboot', '--timeout', '3']);
    assert.equal(a.code, 0, a.stderr);
    await waitFor(() => loader.rebootRequested);
    assert.equal(await t.boot(), x);
    await waitFor(() => loader.rebootRequested, 30_000);
    assert.deepEqual(h.generations(), [1], "X's generation is gone before the reboot");
    assert.equal(loader.system('nixos-generation-2.conf'), undefined, 'and its entry');
    assert.equal(await t.boot(), h.gen1, 'the default');
    await h.waitOutcome(a.out.id);
    assert.deepEqual(endOf(h, a.out.id).outcome, { outcome: 'reverted', reason: 'timeout' });
    assert.equal(h.bootDefault(), h.gen1);
    const boots = new Set(h.history().filter((e) => e.id === a.out.id && e.bootId).map((e) => e.bootId));
    assert.equal(boots.size, 3, 'armed in the first boot, the trial in the second, the outcome in the third');
  });

  it('a new system whose boot hangs: the power cycle boots the default and the agent records reverted: boot-failed', async () => {
    const t = await bootHost({ bootloader: 'systemd-boot' });
    const { h, loader } = t;
    const x = t.toplevel('x', 'k2');
    const a = await h.cli(['activate', x, '--reboot', '--timeout', '30']);
    assert.equal(a.code, 0, a.stderr);
    await waitFor(() => loader.rebootRequested);
    assert.equal(await t.boot({ hang: true }), x, 'X "boots" and never gets as far as the agent');
    assert.equal(await t.boot({ powerLoss: true }), h.gen1, 'the one-shot is used up: the default boots');
    await h.waitOutcome(a.out.id);
    assert.deepEqual(endOf(h, a.out.id).outcome, { outcome: 'reverted', reason: 'boot-failed' });
    assert.deepEqual(h.generations(), [1]);
    assert.equal(h.bootDefault(), h.gen1);
  });

  it('kill -9 of the agent at each step of the trial boot: the restarted agent finishes that step', async () => {
    const t = await bootHost({ bootloader: 'systemd-boot' });
    const { h, loader } = t;
    for (const point of ['boot:armed', 'boot:reboot']) {
      const x = await killedAt(t, point);
      assert.equal(loader.rebootRequested, false, `${point}: killed before asking for the reboot`);
      await t.start();
      await waitFor(() => loader.rebootRequested, 20_000);
      assert.equal(loader.oneShot, 'nixos-generation-2.conf', `${point}: one entry for X`);
      assert.equal(h.bootDefault(), h.gen1);
      assert.equal(await t.boot(), x);
      assert.equal((await h.cli(['status'])).out.phase, 'trial');
      // killed during the trial: resumed at the same deadline
      const before = (await h.cli(['status'])).out.deployment.deadline;
      await h.kill9();
      await t.start();
      assert.equal((await h.cli(['status'])).out.deployment.deadline, before);
      // killed right before the reboot that reverts: asked again by the restarted agent
      await h.stop();
      await t.start(['boot:revert-reboot']);
      await h.cli(['rollback']);
      await h.exited();
      await t.start();
      await waitFor(() => loader.rebootRequested, 20_000);
      assert.equal(await t.boot(), h.gen1);
      const st = await h.cli(['status']);
      assert.deepEqual(st.out.last.outcome, { outcome: 'reverted', reason: 'requested' }, point);
      assert.deepEqual(h.generations(), [1]);
    }
  });

  it('a power loss at each step of the trial boot leaves the profile and the default on the previous system', async () => {
    const t = await bootHost({ bootloader: 'systemd-boot' });
    const { h, loader } = t;
    // After the one-shot was set (before or after the agent recorded it): X boots, and its trial runs.
    for (const point of ['boot:armed', 'boot:reboot']) {
      const x = await killedAt(t, point);
      const id = h.history().at(-1).id;
      assert.equal(h.bootDefault(), h.gen1, `${point}: the profile never points at X`);
      assert.equal(loader.default, 'nixos-generation-1.conf');
      assert.equal(await t.boot({ powerLoss: true }), x);
      assert.equal((await h.cli(['status'])).out.phase, 'trial', point);
      // Power loss during the trial boot: the default boots, recorded as a reboot.
      assert.equal(await t.boot({ powerLoss: true }), h.gen1);
      await h.waitOutcome(id);
      assert.deepEqual((await h.cli(['status'])).out.last.outcome, { outcome: 'reverted', reason: 'reboot' }, point);
      assert.deepEqual(h.generations(), [1]);
      assert.equal(loader.system('nixos-generation-2.conf'), undefined);
    }
    // Before anything was set: nothing to see after the power loss but the record of it.
    const y = t.toplevel('y', 'k2');
    await h.stop();
    await t.start(['spawned:boot-entry']);
    await h.cli(['activate', y, '--reboot', '--timeout', '30']);
    await h.exited();
    // The scratch host's switch outlives the agent (a real power loss would end both): let it finish.
    const runs = join(h.stateDir, 'runs');
    await waitFor(() => readdirSync(runs).some((k) => k.startsWith('boot-entry-') && /end/.test(readFileSync(join(runs, k, 'status'), 'utf8'))));
    assert.equal(await t.boot({ powerLoss: true }), h.gen1);
    await waitFor(() => (h.history().at(-1)?.to ?? '') === 'idle');
    assert.deepEqual(h.history().at(-1).outcome, { outcome: 'reverted', reason: 'reboot' });
    assert.equal(h.bootDefault(), h.gen1);
    assert.deepEqual(h.generations(), [1]);

    // Right before the reboot that reverts: the default is the previous system, which boots, and
    // the revert is recorded there.
    const z = t.toplevel('z', 'k2');
    const c = await h.cli(['activate', z, '--reboot', '--timeout', '30']);
    await waitFor(() => loader.rebootRequested);
    assert.equal(await t.boot({ failpoints: ['boot:revert-reboot'] }), z);
    await h.cli(['rollback']);
    await h.exited();
    assert.equal(await t.boot({ powerLoss: true }), h.gen1);
    await h.waitOutcome(c.out.id);
    assert.deepEqual(endOf(h, c.out.id).outcome, { outcome: 'reverted', reason: 'requested' });
    assert.deepEqual(h.generations(), [1]);
  });

  it('refuses a trial boot without a supported bootloader, or when the running system is not the boot default', async () => {
    const t = await bootHost({ bootloader: 'none' });
    const { h } = t;
    const x = t.toplevel('x', 'k2');
    const a = await h.cli(['activate', x, '--reboot', '--timeout', '30']);
    assert.equal(a.code, 1);
    assert.equal(a.out.code, 'no-trial-boot');
    assert.match(a.out.message, /systemd-boot \(bootctl set-oneshot\) or GRUB \(grub-reboot\)/);
    h.writeConfig({ system: { ...(h.config.system as Record<string, unknown>), bootloader: 'systemd-boot' } });
    await h.stop();
    await t.start();
    assert.equal((await h.cli(['activate', x, '--timeout', '30'])).code, 0);
    const b = await h.cli(['activate', t.toplevel('y', 'k3'), '--reboot', '--timeout', '30']);
    assert.equal(b.out.code, 'busy');
    await h.cli(['rollback']);
    // A pattern default (NixOS's builder with boot counting) would make X the default at once.
    const conf = join(t.loader.dir, 'esp', 'loader', 'loader.conf');
    writeFileSync(conf, 'default nixos-generation-*\n');
    const p = await h.cli(['activate', t.toplevel('y2', 'k3'), '--reboot', '--timeout', '30']);
    assert.equal(p.code, 1);
    assert.equal(p.out.outcome.outcome, 'failed');
    assert.match(p.out.outcome.message, /loader\.conf has "default nixos-generation-\*"/);
    assert.deepEqual(h.generations(), [1], 'nothing changed');
    assert.equal(t.loader.oneShot, undefined);
    writeFileSync(conf, 'default nixos-generation-1.conf\n');
    rmSync(h.current);
    symlinkSync(x, h.current);
    const c = await h.cli(['activate', t.toplevel('y', 'k3'), '--reboot', '--timeout', '30']);
    assert.equal(c.out.code, 'no-trial-boot');
    assert.match(c.out.message, /needs the running system to be the boot default/);
  });

  it('snapback deploy --reboot: waits for the host to come back, reconnects, probes, confirms; a failed probe reboots it back', async () => {
    const t = await bootHost({ bootloader: 'systemd-boot', wire: true });
    const { h, loader } = t;
    const fleet = await h.fleet({}, { defaults: { confirmTimeoutSec: 60, probeTimeoutSec: 5 } });
    // The machine that reboots: whenever the agent asks, boot what the loader picks.
    let watching = true;
    const reboots: string[] = [];
    const machine = (async () => {
      while (watching) {
        await waitFor(() => loader.rebootRequested || !watching, 600_000);
        if (watching) reboots.push(await t.boot());
      }
    })();
    try {
      const x = t.toplevel('x', 'k2');
      // The plan says whether a reboot is needed.
      const plan = await h.snapback(['deploy', 'web1', x, '--dry-run', '--fleet', fleet]);
      assert.equal(plan.code, 0, plan.stdout + plan.stderr);
      assert.match(plan.result.hosts[0].message, /kernel, initrd, kernel-params differ from the booted system: a reboot is needed/);
      const same = await h.snapback(['deploy', 'web1', t.toplevel('same', 'k1'), '--dry-run', '--fleet', fleet]);
      assert.match(same.result.hosts[0].message, /userland only: no reboot needed/);
      const r = await h.snapback(['deploy', 'web1', x, '--reboot', '--fleet', fleet]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.equal(r.result.hosts[0].status, 'confirmed');
      assert.ok(r.events.some((e) => e.event === 'rebooting' && e.entry === 'nixos-generation-2.conf'));
      assert.ok(r.events.some((e) => e.event === 'reconnected'));
      const order = r.events.map((e) => e.event).filter((e) => ['rebooting', 'reconnected', 'trial', 'confirming'].includes(e));
      assert.deepEqual(order, ['rebooting', 'reconnected', 'trial', 'confirming'], 'the window is told once the new boot runs it');
      assert.deepEqual(reboots, [x]);
      assert.equal(h.bootDefault(), x);

      // A probe that fails: rolled back, which for a trial boot is a reboot into the default (now x).
      const closed = await freePort();
      const failing = await h.fleet({ probes: [{ tcp: `127.0.0.1:${closed}`, timeoutSec: 2 }] }, { defaults: { confirmTimeoutSec: 60 } });
      const y = t.toplevel('y', 'k3');
      const back = await h.snapback(['deploy', 'web1', y, '--reboot', '--fleet', failing]);
      assert.equal(back.code, 1, back.stdout + back.stderr);
      assert.deepEqual(back.result.hosts[0].outcome, { outcome: 'reverted', reason: 'requested' });
      assert.match(back.result.hosts[0].message, /probe .* failed/);
      assert.deepEqual(reboots, [x, y, x]);
      assert.equal(h.bootDefault(), x);
    } finally {
      watching = false;
      await machine;
    }
  });
});
