// `snapback deploy --hold`: activate, reconnect, probe, then leave the trial running for the
// operator, who decides later with the printed commands (`confirm`, `extend`, `rollback`).

import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { haveNix } from './helpers/nix.ts';
import { ScratchHost, cleanupsAfterAll } from './helpers/host.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

async function wireHost(name = 'hold'): Promise<ScratchHost> {
  const h = new ScratchHost(name).enableWire().install();
  cleanups.push(() => h.cleanup());
  await h.start();
  return h;
}

/** The words of a printed command, without the leading `snapback` (plain words only: no quoting in these tests). */
function argv(command: string): string[] {
  const words = command.split(' ');
  assert.equal(words[0], 'snapback');
  return words.slice(1);
}

describe('snapback deploy --hold', { skip }, () => {
  it('probes pass, the trial keeps running: status held, exit 0, the deadline and the commands; confirm later over a fresh connection', async () => {
    const h = await wireHost();
    const x = h.toplevel('x');
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 60, probes: [{ tcp: `127.0.0.1:${await h.port()}` }] });
    const started = Date.now();
    const r = await h.snapback(['deploy', 'web1', '--hold', '--fleet', fleet]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const host = r.result.hosts[0];
    assert.equal(host.status, 'held');
    assert.ok(!r.events.some((e) => e.event === 'confirming' || e.event === 'rolling-back'), 'neither confirmed nor rolled back');
    assert.ok(r.events.some((e) => e.event === 'probe' && e.ok), 'the probes ran');
    // The deadline is the host's, about a minute from the start.
    const deadline = Date.parse(host.deadline);
    assert.ok(deadline > started + 40_000 && deadline < Date.now() + 61_000, host.deadline);
    assert.ok(host.secondsLeft > 40 && host.secondsLeft <= 60, String(host.secondsLeft));
    assert.deepEqual(host.commands, {
      confirm: `snapback confirm web1 --fleet ${fleet}`,
      extend: `snapback extend web1 60 --fleet ${fleet}`,
      rollback: `snapback rollback web1 --fleet ${fleet}`,
    });
    // The host is in its trial: running x, not committed.
    assert.equal(h.running(), x);
    assert.deepEqual(h.generations(), [1]);
    assert.ok(!h.history().some((e) => e.event === 'committed'));
    const st = await h.snapback(['status', 'web1', '--fleet', fleet]);
    assert.equal(st.result.hosts[0].status.phase, 'trial');

    const c = await h.snapback(argv(host.commands.confirm));
    assert.equal(c.code, 0, c.stdout + c.stderr);
    assert.deepEqual(c.result.outcome, { outcome: 'confirmed' });
    assert.deepEqual(h.generations(), [1, 2]);
    assert.equal(h.bootDefault(), x);
  });

  it('the printed extend moves the deadline, the printed rollback reverts; the plain text names the commands', async () => {
    const h = await wireHost();
    const x = h.toplevel('x');
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--hold', '--fleet', fleet], { json: false });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /web1: probes passed; held in its trial \(deployment \S+\): reverts on its own at \d\d:\d\d:\d\d, in \d+s, unless confirmed/);
    assert.ok(r.stdout.includes(`keep it: snapback confirm web1 --fleet ${fleet}`), r.stdout);
    assert.ok(r.stdout.includes(`more time: snapback extend web1 30 --fleet ${fleet}`), r.stdout);
    assert.ok(r.stdout.includes(`undo it now: snapback rollback web1 --fleet ${fleet}`), r.stdout);

    const e = await h.snapback(['extend', 'web1', '300', '--fleet', fleet]);
    assert.equal(e.code, 0, e.stdout + e.stderr);
    assert.ok(e.result.secondsLeft > 290, String(e.result.secondsLeft));
    assert.ok(Date.parse(e.result.deadline) > Date.now() + 280_000);
    assert.ok(h.history().some((l) => l.event === 'extend' && l.by.channel === 'controller'));

    const rb = await h.snapback(['rollback', 'web1', '--fleet', fleet]);
    assert.equal(rb.code, 0, rb.stdout + rb.stderr);
    assert.equal(rb.result.outcome.reason, 'requested');
    assert.equal(h.running(), h.gen1);
    const none = await h.snapback(['extend', 'web1', '60', '--fleet', fleet]);
    assert.equal(none.code, 1);
    assert.equal(none.result.code, 'no-trial');
  });

  it('a failed probe under --hold rolls back as usual (exit 1)', async () => {
    const h = await wireHost();
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 30, probes: [{ name: 'vpn', command: 'exit 3', timeoutSec: 2 }] });
    const r = await h.snapback(['deploy', 'web1', '--hold', '--fleet', fleet]);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.equal(r.result.hosts[0].status, 'reverted');
    assert.match(r.result.hosts[0].message, /probe vpn failed/);
    assert.equal(h.running(), h.gen1);
  });

  it('several hosts are all held, a dependent one too; --atomic and --dry-run with --hold are usage errors', async () => {
    const a = await wireHost('hold-a');
    const b = await wireHost('hold-b');
    // b's agent authorizes a's operator key, so one fleet file (a's identity) reaches both.
    b.writeConfig({ authorizedKeys: [a.publicKey('op')] });
    await b.stop();
    await b.start();
    const fleet = join(a.dir, 'two.json');
    writeFileSync(
      fleet,
      JSON.stringify({
        identity: { sshKey: join(a.dir, 'op') },
        hosts: {
          db1: { url: `ws://127.0.0.1:${await a.port()}`, hostKey: a.hostPublicKey, target: { storePath: a.toplevel('x') }, confirmTimeoutSec: 60 },
          web1: { url: `ws://127.0.0.1:${await b.port()}`, hostKey: b.hostPublicKey, target: { storePath: b.toplevel('y') }, confirmTimeoutSec: 60, dependsOn: ['db1'] },
        },
      }),
    );
    for (const extra of ['--atomic', '--dry-run']) {
      const bad = await a.snapback(['deploy', '--all', '--hold', extra, '--fleet', fleet], { json: false });
      assert.equal(bad.code, 2, `${extra}: ${bad.stdout}${bad.stderr}`);
      assert.match(bad.stderr, /--hold/);
    }
    assert.equal(a.switchCalls().length + b.switchCalls().length, 0);
    const r = await a.snapback(['deploy', '--all', '--hold', '--fleet', fleet]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.deepEqual(r.result.hosts.map((h: any) => [h.host, h.status]), [['db1', 'held'], ['web1', 'held']]);
    assert.equal(a.running(), a.toplevel('x'));
    assert.equal(b.running(), b.toplevel('y'));
    for (const h of r.result.hosts) {
      const c = await a.snapback(argv(h.commands.confirm));
      assert.equal(c.code, 0, c.stdout + c.stderr);
    }
    assert.deepEqual(a.generations(), [1, 2]);
    assert.deepEqual(b.generations(), [1, 2]);
  });
});
