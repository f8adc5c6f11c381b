// Several hosts at once: parallel deploys, dependsOn, and --atomic, each host a real agent process
// on loopback with its own profile, state directory and host key.

import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { haveNix } from './helpers/nix.ts';
import { ScratchHost, runController } from './helpers/host.ts';
import { parseFleet } from '../shared/fleet.ts';
import { MAX_SECONDS } from '../shared/model.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const hosts: ScratchHost[] = [];
after(async () => {
  for (const h of hosts) await h.cleanup();
});

/** Two agents (web1, db1) that both trust web1's operator key; a fleet file over both. */
async function pair(hostsConfig: (web1: ScratchHost, db1: ScratchHost) => Record<string, Record<string, unknown>>) {
  const web1 = new ScratchHost('web1').enableWire().install();
  const db1 = new ScratchHost('db1').enableWire().install();
  hosts.push(web1, db1);
  db1.writeConfig({ authorizedKeys: [web1.publicKey('op')] });
  await Promise.all([web1.start(), db1.start()]);
  const entries = hostsConfig(web1, db1);
  const fleet = {
    identity: { sshKey: join(web1.dir, 'op') },
    defaults: { confirmTimeoutSec: 30 },
    hosts: {
      web1: { url: `ws://127.0.0.1:${await web1.port()}`, hostKey: web1.hostPublicKey, ...entries.web1 },
      db1: { url: `ws://127.0.0.1:${await db1.port()}`, hostKey: db1.hostPublicKey, ...entries.db1 },
    },
  };
  const file = join(web1.dir, 'fleet.json');
  writeFileSync(file, JSON.stringify(fleet));
  return { web1, db1, file };
}

const byHost = (r: { result: { hosts: { host: string }[] } }) => Object.fromEntries(r.result.hosts.map((h) => [h.host, h])) as Record<string, any>;

describe('fleet deploys', { skip }, () => {
  it('--all deploys every host; each result stands on its own without --atomic (exit 1 if any failed)', async () => {
    const { web1, db1, file } = await pair((w, d) => ({
      web1: { target: { storePath: w.toplevel('x') } },
      db1: { target: { storePath: d.toplevel('y') }, probes: [{ command: 'exit 1', timeoutSec: 1 }] },
    }));
    const r = await runController(['deploy', '--all', '--fleet', file]);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    const res = byHost(r);
    assert.equal(res.web1.status, 'confirmed');
    assert.equal(res.db1.status, 'reverted');
    assert.deepEqual(web1.generations(), [1, 2]);
    assert.deepEqual(db1.generations(), [1]);
  });

  it('dependsOn: a host starts only after its dependency confirmed', async () => {
    const { db1, file } = await pair((w, d) => ({
      web1: { target: { storePath: w.toplevel('x') }, dependsOn: ['db1'] },
      db1: { target: { storePath: d.toplevel('y') }, probes: [{ command: 'sleep 1' }] },
    }));
    const ok = await runController(['deploy', '--all', '--fleet', file]);
    assert.equal(ok.code, 0, ok.stdout);
    const order = ok.events.filter((e) => e.event === 'connected' || e.event === 'done').map((e) => `${e.event}:${e.host}`);
    assert.ok(order.indexOf('done:db1') < order.indexOf('connected:web1'), order.join(' '));

    const fleet = JSON.parse(readFileSync(file, 'utf8'));
    Object.assign(fleet.hosts.db1, { probes: [{ command: 'exit 1', timeoutSec: 1 }], target: { storePath: db1.toplevel('z') } });
    writeFileSync(file, JSON.stringify(fleet));
    const blocked = await runController(['deploy', '--all', '--fleet', file]);
    assert.equal(blocked.code, 1);
    assert.match(byHost(blocked).web1.message, /not started: dependency db1 is reverted/);
  });

  it('--atomic: one failing host rolls every host back; nobody was confirmed', async () => {
    const { web1, db1, file } = await pair((w, d) => ({
      web1: { target: { storePath: w.toplevel('x') } },
      db1: { target: { storePath: d.toplevel('y') }, probes: [{ name: 'vpn', command: 'sleep 1; exit 1', timeoutSec: 1 }] },
    }));
    const r = await runController(['deploy', '--all', '--atomic', '--fleet', file]);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    const res = byHost(r);
    assert.equal(res.web1.status, 'reverted');
    assert.match(res.web1.message, /atomic: db1 reverted/);
    assert.equal(res.db1.status, 'reverted');
    assert.ok(!r.events.some((e) => e.event === 'confirming'), 'no host was confirmed');
    assert.deepEqual(web1.generations(), [1]);
    assert.deepEqual(db1.generations(), [1]);
    assert.equal(web1.running(), web1.gen1);
  });

  it('--atomic: when every host passed, every host is confirmed, none before the last passed', async () => {
    const { web1, db1, file } = await pair((w, d) => ({
      web1: { target: { storePath: w.toplevel('x') } },
      db1: { target: { storePath: d.toplevel('y') }, probes: [{ command: 'sleep 1' }] },
    }));
    const r = await runController(['deploy', '--all', '--atomic', '--fleet', file]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const kinds = r.events.map((e) => `${e.event}:${e.host}`);
    const firstConfirm = kinds.findIndex((k) => k.startsWith('confirming:'));
    assert.ok(kinds.indexOf('probe:db1') < firstConfirm, kinds.join(' '));
    assert.ok(kinds.includes('waiting:web1'), 'web1 held until db1 passed');
    assert.deepEqual(web1.generations(), [1, 2]);
    assert.deepEqual(db1.generations(), [1, 2]);
  });

  it('--atomic: a window that runs out while waiting rolls everybody back before any host reverts on its own', async () => {
    const { web1, db1, file } = await pair((w, d) => ({
      web1: { target: { storePath: w.toplevel('x') }, confirmTimeoutSec: 3 },
      db1: { target: { storePath: d.toplevel('y') }, probes: [{ command: 'sleep 5', timeoutSec: 20 }] },
    }));
    const r = await runController(['deploy', '--all', '--atomic', '--fleet', file]);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    const res = byHost(r);
    assert.match(res.web1.message, /atomic: web1's confirm window ran out/);
    assert.deepEqual(res.web1.outcome, { outcome: 'reverted', reason: 'requested' }, 'rolled back by the controller, not by the deadline');
    assert.equal(res.db1.status, 'reverted');
    assert.deepEqual(web1.generations(), [1]);
    assert.deepEqual(db1.generations(), [1]);
  });
});

/** The problems parseFleet reports for `fleet`, one line each. */
function problems(fleet: unknown): string {
  try {
    parseFleet(JSON.stringify(fleet), 'snapback.json');
  } catch (err) {
    return ((err as { details?: { problems?: string[] } }).details?.problems ?? []).join('\n');
  }
  assert.fail('the fleet file was accepted');
}

describe('the fleet file', () => {
  const url = 'ws://127.0.0.1:7731';

  it('caps every seconds key at MAX_SECONDS, naming the key and the limit', () => {
    const huge = 3_000_000;
    const text = problems({
      defaults: { confirmTimeoutSec: huge, probeTimeoutSec: huge, outcomeGraceSec: huge, probes: [{ tcp: 'a:1', timeoutSec: huge }] },
      hosts: { web1: { url, confirmTimeoutSec: huge, probes: [{ http: 'http://a/', timeoutSec: huge }, { command: 'true', timeoutSec: huge }] } },
    });
    const keys = [
      'defaults.confirmTimeoutSec',
      'defaults.probeTimeoutSec',
      'defaults.outcomeGraceSec',
      'defaults.probes.0.timeoutSec',
      'hosts.web1.confirmTimeoutSec',
      'hosts.web1.probes.0.timeoutSec',
      'hosts.web1.probes.1.timeoutSec',
    ];
    for (const key of keys) assert.ok(text.includes(`${key}: must be at most ${MAX_SECONDS} seconds (7 days)`), `${key} in:\n${text}`);
  });

  it('refuses the names every JavaScript object has, as host names and as dependencies', () => {
    for (const name of ['constructor', 'toString', '__proto__']) {
      // JSON.parse keeps "__proto__" as an ordinary key, as a fleet file read from disk has it.
      const asHost = problems(JSON.parse(`{"hosts": {"web1": {"url": "${url}"}, "${name}": {"url": "${url}"}}}`));
      assert.match(asHost, new RegExp(`hosts\\.${name}: "${name}" cannot be a host name`));
      const asDependency = problems({ hosts: { web1: { url, dependsOn: [name] } } });
      assert.match(asDependency, new RegExp(`hosts\\.web1\\.dependsOn: unknown host "${name}"`));
    }
  });
});
