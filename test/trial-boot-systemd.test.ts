// Trial boots (DESIGN §11) on test hosts with systemd as PID 1: the agent's `systemctl reboot` is a
// real reboot of the test host (its PID 1 exits, the harness boots it again with a fresh boot id and
// a new /run). The one simulated part is the bootloader: a stand-in bootctl writing entries, the
// default and the one-shot entry to files, the fake toplevels' `boot` acting as NixOS's systemd-boot
// builder, and a boot-time unit starting what that loader picks (helpers/testbed.ts).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import { haveNix } from './helpers/nix.ts';
import { runController } from './helpers/host.ts';
import { TestHost, testbedSkip } from './helpers/testbed.ts';

const skip = testbedSkip(haveNix);
if (skip) console.warn(`SKIPPED: systemd test bed (trial boots): ${skip}`);

/** A test host with the simulated systemd-boot, gen1 installed (kernel k1) and its agent serving. */
async function host(t: TestContext, name: string, opts: Parameters<typeof TestHost.create>[1] = {}): Promise<{ h: TestHost; gen1: string }> {
  const h = await TestHost.create(name, { ...opts, loader: true });
  t.after(() => h.destroy());
  const gen1 = h.install({ kernel: 'k1' });
  // The agent started before the profile existed; it reads the system at each request.
  return { h, gen1 };
}

const status = (h: TestHost) => h.agent('status').out;
const endOf = (h: TestHost, id: string) => h.history().find((e) => e.id === id && e.to === 'idle');

describe('trial boots under systemd (test bed)', { skip, timeout: 900_000 }, () => {
  it('reverted at the deadline: a real reboot into X, then back into the previous system; the history shows both boots', async (t) => {
    const { h, gen1 } = await host(t, 'tb-deadline');
    const x = h.toplevel('x', { kernel: 'k2' });
    const a = h.agent(`activate ${x} --reboot --timeout 8`);
    assert.equal(a.code, 0, JSON.stringify(a.out));
    assert.deepEqual(a.out.rebooting, { loader: 'systemd-boot', entry: 'nixos-generation-2.conf' });
    await h.booted(1);
    assert.equal(h.running(), x, 'the one-shot entry booted');
    assert.equal(h.loaderState().default, 'nixos-generation-1.conf', 'the default stayed');
    await h.until(() => status(h).phase === 'trial', 30_000, 'the trial to start in the new boot');
    assert.equal(h.sh('readlink -f /nix/var/nix/profiles/system').trim(), gen1);
    // the deadline: the agent reboots the host into its default
    await h.booted(2, 60_000);
    assert.equal(h.running(), gen1);
    await h.until(() => !!endOf(h, a.out.id), 30_000, 'the outcome in the third boot');
    assert.deepEqual(endOf(h, a.out.id).outcome, { outcome: 'reverted', reason: 'timeout' });
    const boots = new Set(h.history().filter((e) => e.id === a.out.id && e.bootId).map((e) => e.bootId));
    assert.equal(boots.size, 3, 'armed, trial and outcome each in its own boot');
    assert.deepEqual(h.bootLog(), [x, gen1]);
    assert.equal(h.sh('readlink -f /nix/var/nix/profiles/system').trim(), gen1);
    assert.deepEqual(h.loaderState().entries, ['nixos-generation-1.conf'], "X's entry and generation were removed");
  });

  it('a new system that hangs at boot: the power cycle boots the default, recorded reverted: boot-failed', async (t) => {
    const { h, gen1 } = await host(t, 'tb-hang');
    const x = h.toplevel('x', { kernel: 'k2', hangsAtBoot: true });
    const a = h.agent(`activate ${x} --reboot --timeout 30`);
    assert.equal(a.code, 0, JSON.stringify(a.out));
    await h.booted(1);
    assert.equal(h.running(), x);
    assert.equal(h.show('snapback-agent', ['ActiveState']).ActiveState, 'inactive', 'the agent never started');
    await h.powerOff();
    await h.boot();
    assert.equal(h.running(), gen1, 'the one-shot was used up: the default');
    await h.until(() => !!endOf(h, a.out.id), 30_000, 'the outcome');
    assert.deepEqual(endOf(h, a.out.id).outcome, { outcome: 'reverted', reason: 'boot-failed' });
    assert.equal(h.sh('readlink -f /nix/var/nix/profiles/system').trim(), gen1);
  });

  it('kill -9 of the agent and power losses at each step of the trial boot', async (t) => {
    const { h, gen1 } = await host(t, 'tb-faults');
    // 1. kill -9 right after the answer, while the reboot is not asked for yet: the restarted agent asks.
    const x = h.toplevel('x', { kernel: 'k2' });
    const a = h.agent(`activate ${x} --reboot --timeout 60`);
    assert.equal(a.code, 0, JSON.stringify(a.out));
    h.try('systemctl kill -s KILL --kill-whom=main snapback-agent');
    await h.booted(1);
    assert.equal(h.running(), x);
    await h.until(() => status(h).phase === 'trial', 30_000, 'the trial');
    // 2. kill -9 during the trial boot's trial: the same deadline
    const deadline = status(h).deployment.deadline;
    h.sh('systemctl kill -s KILL --kill-whom=main snapback-agent');
    await h.until(() => status(h).deployment?.deadline === deadline, 30_000, 'the restarted agent with the same deadline');
    // 3. power loss during the trial boot: the default boots; reverted: reboot
    await h.powerOff();
    await h.boot();
    assert.equal(h.running(), gen1);
    await h.until(() => !!endOf(h, a.out.id), 30_000, 'the outcome');
    assert.deepEqual(endOf(h, a.out.id).outcome, { outcome: 'reverted', reason: 'reboot' });
    assert.equal(h.sh('readlink -f /nix/var/nix/profiles/system').trim(), gen1);

    // 4. power loss after the one-shot was set, before the reboot (masked here, so it cannot happen
    //    first): X boots once, and its trial runs
    const y = h.toplevel('y', { kernel: 'k3' });
    h.sh('systemctl mask --runtime reboot.target');
    const b = h.agent(`activate ${y} --reboot --timeout 60`);
    assert.equal(b.code, 0, JSON.stringify(b.out));
    await h.until(() => /reboot\.target is masked|could not be asked|retrying/.test(h.sh('journalctl -u snapback-agent --no-pager')), 20_000, 'the reboot to be refused');
    assert.equal(h.sh('readlink -f /nix/var/nix/profiles/system').trim(), gen1, 'the profile never points at y');
    assert.equal(h.loaderState().default, 'nixos-generation-1.conf');
    await h.powerOff();
    await h.boot();
    const booted = h.boots;
    assert.equal(h.running(), y);
    await h.until(() => status(h).phase === 'trial', 30_000, 'the trial of y');
    // 5. rollback: a reboot into the default (gen1), which the profile never left
    h.try('snapback-agent rollback');
    await h.booted(booted, 60_000);
    assert.equal(h.running(), gen1);
    await h.until(() => !!endOf(h, b.out.id), 30_000, 'the outcome of y');
    assert.deepEqual(endOf(h, b.out.id).outcome, { outcome: 'reverted', reason: 'requested' });
    assert.deepEqual(h.loaderState(), { default: 'nixos-generation-1.conf', entries: ['nixos-generation-1.conf'] });
  });

  it('"confirmed (kernel not yet booted)" until the host boots it; a userland-only change needs no reboot', async (t) => {
    const { h } = await host(t, 'tb-kernel');
    const y = h.toplevel('y', { kernel: 'k1' });
    const a = h.agent(`activate ${y} --timeout 60`);
    assert.deepEqual(a.out.kernel, []);
    assert.deepEqual(h.agent('confirm').out.outcome, { outcome: 'confirmed' });
    const x = h.toplevel('x', { kernel: 'k2' });
    assert.equal(h.agent(`activate ${x} --timeout 60`).code, 0);
    assert.deepEqual(h.agent('confirm').out.outcome, { outcome: 'confirmed', kernelNotYetBooted: true });
    assert.match(h.sh('snapback-agent status'), /confirmed \(kernel not yet booted\)/);
    const before = h.boots;
    h.try('systemctl reboot');
    await h.booted(before);
    assert.equal(h.running(), x, 'the new default');
    await h.until(() => h.try('snapback-agent status').code === 0, 30_000, 'the agent');
    assert.doesNotMatch(h.sh('snapback-agent status'), /not yet booted/);
    assert.deepEqual(status(h).last.outcome, { outcome: 'confirmed' });
  });

  it('snapback deploy --reboot: the controller waits for the host to come back, probes and confirms', async (t) => {
    const keys = mkdtempSync(join(tmpdir(), 'snapback-tb-reboot-'));
    t.after(() => rmSync(keys, { recursive: true, force: true }));
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'root@tb', '-f', join(keys, 'host')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'op@test', '-f', join(keys, 'op')]);
    const { h } = await host(t, 'tb-deploy', {
      network: 9,
      files: { '/etc/ssh/ssh_host_ed25519_key': { text: readFileSync(join(keys, 'host'), 'utf8'), mode: 0o600 } },
      config: { listen: { host: '0.0.0.0', port: 7731 }, authorizedKeys: [readFileSync(join(keys, 'op.pub'), 'utf8').trim()] },
    });
    await h.until(() => h.try(`ss -ltn | grep -q ':7731'`).code === 0, 10_000, 'the agent to listen');
    const x = h.toplevel('x', { kernel: 'k2' });
    const fleet = join(keys, 'snapback.json');
    writeFileSync(
      fleet,
      JSON.stringify({
        identity: { sshKey: join(keys, 'op') },
        defaults: { confirmTimeoutSec: 60, outcomeGraceSec: 60 },
        hosts: { tb: { url: `ws://${h.address}:7731`, hostKey: readFileSync(join(keys, 'host.pub'), 'utf8').trim(), target: { storePath: x } } },
      }),
    );
    const r = await runController(['deploy', 'tb', '--reboot', '--fleet', fleet]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.deepEqual(r.result.hosts[0].outcome, { outcome: 'confirmed' });
    assert.ok(r.events.some((e) => e.event === 'rebooting'));
    assert.ok(r.events.some((e) => e.event === 'reconnecting'), 'the host was away while it rebooted');
    assert.equal(h.boots, 2);
    assert.equal(h.running(), x);
    assert.equal(h.sh('readlink -f /nix/var/nix/profiles/system').trim(), x);
    assert.equal(h.loaderState().default, 'nixos-generation-2.conf', 'confirm moved the default');
  });
});
