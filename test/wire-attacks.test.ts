// The wire against the attackers of DESIGN §4: a fleet host that relays the operator to another host,
// an on-path attacker on plain ws://, a connection kept from before the switch, and one client that
// floods the agent with idle sockets or runs it out of file descriptors. Real agents on loopback,
// real controller processes, real Nix.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import WebSocket from 'ws';
import { SUBPROTOCOL } from '../shared/protocol.ts';
import { ScratchHost, waitFor, cleanupsAfterAll } from './helpers/host.ts';
import { haveNix } from './helpers/nix.ts';
import { RawClient } from './helpers/raw.ts';
import { Relay } from './helpers/relay.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

async function wireHost(name: string, extra: Record<string, unknown> = {}): Promise<{ h: ScratchHost; port: number }> {
  const h = new ScratchHost(name).enableWire(extra).install();
  cleanups.push(() => h.cleanup());
  await h.start();
  return { h, port: await h.port() };
}

function relay(port: number, hooks: ConstructorParameters<typeof Relay>[1] = {}): Promise<Relay> {
  const r = new Relay(port, hooks);
  cleanups.push(() => r.close());
  return r.listen();
}

function tcp(port: number, localAddress = '127.0.0.1'): Promise<Socket> {
  const s = connect({ port, host: '127.0.0.1', localAddress });
  s.on('error', () => {});
  cleanups.push(() => s.destroy());
  return once(s, 'connect').then(() => s);
}

/** Nothing happened on the host: no switch, no history. */
function untouched(h: ScratchHost): void {
  assert.deepEqual(h.switchCalls(), []);
  assert.deepEqual(h.history(), []);
  assert.equal(h.running(), h.gen1);
}

describe('the wire under attack', { skip }, () => {
  it('a fleet host that relays the operator to another host gets nothing done there, whether it shows that host key or its own', async () => {
    // "evil" is a fleet host the operator means to deploy; it relays everything to "victim".
    const { h: victim, port } = await wireHost('victim');
    const evilKey = victim.operatorKey('evil-host');
    const evilHostKey = victim.publicKey('evil-host');
    const target = { storePath: victim.toplevel('x') };

    // 1. It passes the victim's challenge on unchanged: the controller sees a host key it did not
    //    expect and stops before it signs anything.
    const honest = await relay(port);
    const fleet1 = await victim.fleet({ url: `ws://127.0.0.1:${honest.port}`, hostKey: evilHostKey, target });
    const r1 = await victim.snapback(['deploy', 'web1', '--fleet', fleet1]);
    assert.equal(r1.code, 3, r1.stdout + r1.stderr);
    assert.match(r1.result.hosts[0].message, /does not match the expected host key/);
    assert.ok(!honest.seenFromController.some((m) => m.type === 'hello'), 'no hello was signed for the wrong host');

    // 2. It shows its own host key instead: the operator signs for that key, which the victim,
    //    checking the transcript against its own key, refuses.
    const lying = await relay(port, { fromAgent: (m) => (m.type === 'challenge' ? { ...m, hostKey: evilHostKey.split(' ').slice(0, 2).join(' ') } : m) });
    const fleet2 = await victim.fleet({ url: `ws://127.0.0.1:${lying.port}`, hostKey: evilHostKey, target });
    const r2 = await victim.snapback(['deploy', 'web1', '--fleet', fleet2]);
    assert.equal(r2.code, 3, r2.stdout + r2.stderr);
    assert.ok(lying.seenFromController.some((m) => m.type === 'hello'), 'the operator did sign for the key it was shown');
    await victim.waitLog((l) => l.msg === 'refusing a controller with a bad handshake signature');
    assert.ok(evilKey);
    untouched(victim);
  });

  it('an on-path attacker who drops the confirm and answers "confirmed" is not believed: the deploy reports the revert', async () => {
    const { h, port } = await wireHost('onpath');
    let forged = 0;
    const mitm = await relay(port, {
      fromController: (m, c) => {
        if (m.type !== 'confirm') return m;
        forged++;
        c.toController({ type: 'outcome', id: m.id, outcome: { outcome: 'confirmed' }, re: m.seq, ctr: 2, mac: 'A'.repeat(43) });
        return undefined;
      },
    });
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${mitm.port}`, target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 3 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.ok(forged >= 1, 'the attacker answered a confirm');
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.deepEqual(r.result.hosts[0].outcome, { outcome: 'reverted', reason: 'timeout' });
    assert.deepEqual(h.generations(), [1]);
    assert.equal(h.running(), h.gen1);
  });

  it('a status or progress changed on the way ends the connection; the controller reports what the host says, not what the attacker wrote', async () => {
    const { h, port } = await wireHost('tamper');
    const mitm = await relay(port, {
      fromAgent: (m) => (m.type === 'progress' && m.phase === 'trial' ? { ...m, deadline: '2099-01-01T00:00:00.000Z' } : m),
    });
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${mitm.port}`, target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    // The activation's connection is dropped at the forged message; the deploy goes on over a
    // fresh connection and confirms with what the host itself said.
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.ok(!r.events.some((e) => e.event === 'phase' && e.deadline === '2099-01-01T00:00:00.000Z'));
    assert.deepEqual(h.generations(), [1, 2]);
  });

  it('freshness counts from the TCP accept: a socket opened before the switch and upgraded after it gets no token; plain HTTP answers close', async () => {
    const { h, port } = await wireHost('fresh');
    // A non-upgrade request is answered and the connection closed: no keep-alive to reuse later.
    const http = await tcp(port);
    http.write(`GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n`);
    let answer = '';
    http.on('data', (d) => (answer += d));
    await once(http, 'close');
    assert.match(answer, /^HTTP\/1\.1 426 /);

    const early = await tcp(port);
    const op = join(h.dir, 'op');
    const a = new RawClient(port);
    cleanups.push(() => a.ws.terminate());
    await a.authenticate(op);
    a.send(await a.signed({ type: 'activate', target: { storePath: h.toplevel('x') }, timeoutSec: 60 }));
    const trial = await a.next((m) => m.type === 'trial');
    // The socket accepted before the trial now speaks WebSocket for the first time.
    const late = new RawClient(port, SUBPROTOCOL, { createConnection: () => early });
    cleanups.push(() => late.ws.terminate());
    const w = await late.authenticate(op);
    assert.equal(w.type, 'welcome');
    assert.equal(w.confirm, undefined, 'no token for a connection accepted before the trial');
    const fresh = new RawClient(port);
    cleanups.push(() => fresh.ws.terminate());
    const token = (await fresh.authenticate(op)).confirm.token;
    late.send(await late.signed({ type: 'confirm', id: trial.id, token }));
    assert.equal((await late.next((m) => m.type === 'error')).code, 'bad-token');
    assert.deepEqual(h.generations(), [1]);
  });

  it('a flood of idle sockets from 127.0.0.2 does not keep a controller on 127.0.0.1 from deploying and confirming', async () => {
    const { h, port } = await wireHost('flood');
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 30 });
    let flooding = true;
    let opened = 0;
    const open = new Set<{ destroy(): void }>();
    // One attacker, two kinds of idle connection, each reopened as soon as the agent drops it.
    const bare = (): void => {
      if (!flooding) return;
      const s = connect({ port, host: '127.0.0.1', localAddress: '127.0.0.2' });
      opened++;
      open.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        open.delete(s);
        setTimeout(bare, 20);
      });
    };
    const upgraded = (): void => {
      if (!flooding) return;
      const ws = new WebSocket(`ws://127.0.0.1:${port}`, SUBPROTOCOL, { localAddress: '127.0.0.2', perMessageDeflate: false });
      opened++;
      const handle = { destroy: () => ws.terminate() };
      open.add(handle);
      ws.on('error', () => {});
      ws.on('close', () => {
        open.delete(handle);
        setTimeout(upgraded, 20);
      });
    };
    const stop = () => {
      flooding = false;
      for (const s of open) s.destroy();
    };
    cleanups.push(stop);
    for (let i = 0; i < 150; i++) bare();
    for (let i = 0; i < 150; i++) upgraded();
    await h.waitLog((l) => /refusing new connections: 8 connections from 127\.0\.0\.2/.test(l.msg));

    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    const during = opened;
    stop();
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(r.result.hosts[0].status, 'confirmed');
    assert.ok(during > 300, `the flood kept going (${during} connections opened)`);
    assert.deepEqual(h.generations(), [1, 2]);
  });

  it('listen.maxConnections caps every connection; a freed slot takes the next controller', async () => {
    const { h, port } = await wireHost('cap', { listen: { host: '127.0.0.1', port: 0, maxConnections: 3 } });
    const held = [await tcp(port, '127.0.0.3'), await tcp(port, '127.0.0.4'), await tcp(port, '127.0.0.5')];
    await waitFor(() => held.every((s) => !s.destroyed));
    const extra = await tcp(port, '127.0.0.6');
    await once(extra, 'close');
    held[0]!.destroy();
    // The agent learns of the freed slot when it sees the close; until then it may still refuse.
    for (let attempt = 1; ; attempt++) {
      const c = new RawClient(port);
      cleanups.push(() => c.ws.terminate());
      const w = await c.authenticate(join(h.dir, 'op')).catch(() => undefined);
      if (w?.type === 'welcome') break;
      assert.ok(attempt < 50, 'a controller got the freed slot');
      await new Promise((r) => setTimeout(r, 50));
    }
  });

  it('out of file descriptors (EMFILE) at the deadline: connections are refused, the agent lives, and the revert happens once descriptors are back', async (t) => {
    try {
      execFileSync('prlimit', ['--version'], { stdio: 'ignore' });
    } catch {
      t.skip('SKIPPED: prlimit (util-linux) is not installed');
      return;
    }
    const { h, port } = await wireHost('emfile');
    const op = join(h.dir, 'op');
    const pid = h.agent!.pid!;
    const c = new RawClient(port);
    cleanups.push(() => c.ws.terminate());
    await c.authenticate(op);
    c.send(await c.signed({ type: 'activate', target: { storePath: h.toplevel('x') }, timeoutSec: 2 }));
    await c.next((m) => m.type === 'trial');
    const limits = execFileSync('prlimit', ['--pid', String(pid), '--nofile', '--output', 'SOFT,HARD', '--noheadings'], { encoding: 'utf8' }).trim().split(/\s+/);
    execFileSync('prlimit', ['--pid', String(pid), `--nofile=${readdirSync(`/proc/${pid}/fd`).length}:${limits[1]}`]);
    // Connections and a console request while no descriptor is left, then the deadline passes.
    const sockets = await Promise.all(Array.from({ length: 12 }, (_, i) => tcp(port, `127.0.1.${i + 1}`)));
    const ctl = connect(join(h.dir, 'control.sock'));
    ctl.on('error', () => {});
    cleanups.push(() => ctl.destroy());
    await h.waitLog((l) => l.msg === 'an effect failed; retrying' && /EMFILE/.test(String(l.err)));
    for (const s of sockets) s.destroy();
    ctl.destroy();
    // Longer than the retries an ordinary failure gets (3): running out of descriptors passes.
    const failures = new Set();
    await h.waitLog((l) => (l.msg === 'an effect failed; retrying' && /EMFILE/.test(String(l.err)) && failures.add(l), failures.size >= 4), 20_000);
    execFileSync('prlimit', ['--pid', String(pid), `--nofile=${limits[0]}:${limits[1]}`]);
    await h.waitLog((l) => /reverted: timeout/.test(l.msg), 30_000);
    assert.equal(h.agent!.exitCode, null, 'the agent is alive');
    assert.equal(h.running(), h.gen1);
    const again = new RawClient(port);
    cleanups.push(() => again.ws.terminate());
    assert.equal((await again.authenticate(op)).type, 'welcome');
    assert.equal((await h.cli(['status'])).code, 0);
  });
});
