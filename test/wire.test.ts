// The agent's WebSocket server under attack, with a hand-driven client: authentication, the fresh
// connection rule (promise 5), replays, tampering, malformed input and floods. Real agent processes
// on loopback, real Nix, real keys from ssh-keygen.

import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { haveNix } from './helpers/nix.ts';
import { ScratchHost } from './helpers/host.ts';
import { RawClient } from './helpers/raw.ts';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { Session } from '../controller/session.ts';
import { keyFileSigner } from '../shared/ssh.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const hosts: ScratchHost[] = [];
const clients: RawClient[] = [];
after(async () => {
  for (const c of clients) c.ws.terminate();
  for (const h of hosts) await h.cleanup();
});

async function wireHost(extra: Record<string, unknown> = {}): Promise<{ h: ScratchHost; port: number; op: string }> {
  const h = new ScratchHost('wire').enableWire(extra).install();
  hosts.push(h);
  await h.start();
  return { h, port: await h.port(), op: join(h.dir, 'op') };
}

function client(port: number, protocol?: string): RawClient {
  const c = new RawClient(port, protocol);
  clients.push(c);
  return c;
}

/** The agent still serves and nothing changed on the host. */
async function intact(h: ScratchHost, port: number, op: string): Promise<void> {
  const c = client(port);
  const w = await c.authenticate(op);
  assert.equal(w.type, 'welcome');
  assert.equal(w.state.phase, 'idle');
  assert.equal(h.switchCalls().length, 0);
  assert.deepEqual(h.history(), []);
  c.close();
}

describe('wire protocol', { skip }, () => {
  it('authenticates both ways: welcome with host facts, signed by the host key', async () => {
    const { h, port, op } = await wireHost();
    const c = client(port);
    const w = await c.authenticate(op);
    assert.equal(w.type, 'welcome');
    assert.match(w.you, /^SHA256:\S+ \(op@test\)$/);
    assert.equal(w.currentSystem, h.gen1);
    assert.equal(c.challenge.hostKey, h.hostPublicKey.split(' ').slice(0, 2).join(' '), 'the host key comes in the challenge');
    assert.ok(w.mac && w.ctr === 1, 'the welcome is sealed');
    assert.ok(w.bootId && w.agentVersion && 'machineId' in w);
    assert.equal(w.confirm, undefined, 'no trial, no token');
  });

  it('refuses an unknown key and a hello signed for another session', async () => {
    const { h, port, op } = await wireHost();
    const stranger = h.operatorKey('stranger');
    const c = client(port);
    const e = await c.authenticate(stranger);
    assert.equal(e.code, 'unauthorized');
    assert.equal(await c.closed, 1008);

    // A valid hello recorded on one connection does not open another.
    const a = client(port);
    await a.next((m) => m.type === 'challenge');
    const recorded = await a.hello(keyFileSigner(op));
    a.send(recorded);
    assert.equal((await a.next((m) => m.type === 'welcome' || m.type === 'error')).type, 'welcome');
    const b = client(port);
    await b.next((m) => m.type === 'challenge');
    b.send(recorded);
    assert.equal((await b.next((m) => m.type === 'error')).code, 'unauthorized');
    await intact(h, port, op);
  });

  it('a connection that does not authenticate within listen.handshakeTimeoutSec is destroyed, close frame or not', async () => {
    const { port } = await wireHost({ listen: { host: '127.0.0.1', port: 0, handshakeTimeoutSec: 2 } });
    // A WebSocket client that never answers: no close handshake is waited for (ws would wait 30 s).
    const c = client(port);
    await c.next((m) => m.type === 'challenge');
    const t0 = Date.now();
    (c.ws as unknown as { _socket: Socket })._socket.pause();
    assert.equal(await c.closed, 1006, 'the socket was destroyed, not closed politely');
    assert.ok(Date.now() - t0 < 5000, `closed after ${Date.now() - t0} ms`);
    // A bare TCP connection that sends nothing at all is destroyed at the same limit.
    const sock = connect(port, '127.0.0.1');
    const t1 = Date.now();
    await once(sock, 'close');
    assert.ok(Date.now() - t1 < 5000, `closed after ${Date.now() - t1} ms`);
  });

  it('rejects connections without the snapback.v1 subprotocol', async () => {
    const { port } = await wireHost();
    const c = client(port, 'chat');
    const code = await c.closed;
    assert.notEqual(code, 1000);
    assert.equal(c.messages.length, 0);
  });

  it('a connection opened before activation cannot confirm; a fresh one gets the token', async () => {
    const { h, port, op } = await wireHost();
    const old = client(port);
    await old.authenticate(op);
    old.send(await old.signed({ type: 'activate', target: { storePath: h.toplevel('x') }, timeoutSec: 60 }));
    const trial = await old.next((m) => m.type === 'trial');

    const fresh = client(port);
    const w = await fresh.authenticate(op);
    assert.equal(w.confirm.id, trial.id);
    // The old connection (the one a conntrack rule would keep alive) cannot use the token.
    old.send(await old.signed({ type: 'confirm', id: trial.id, token: w.confirm.token }));
    assert.equal((await old.next((m) => m.type === 'error')).code, 'bad-token');
    assert.deepEqual(h.generations(), [1]);
    // A wrong token on a fresh connection is refused too.
    fresh.send(await fresh.signed({ type: 'confirm', id: trial.id, token: 'guess' }));
    assert.equal((await fresh.next((m) => m.type === 'error')).code, 'bad-token');
    fresh.send(await fresh.signed({ type: 'confirm', id: trial.id, token: w.confirm.token }));
    const out = await fresh.next((m) => m.type === 'outcome');
    assert.deepEqual(out.outcome, { outcome: 'confirmed' });
    assert.deepEqual(h.generations(), [1, 2]);
  });

  it('a recorded activate or confirm replayed on a new connection is refused; so is a reused seq', async () => {
    const { h, port, op } = await wireHost();
    const a = client(port);
    await a.authenticate(op);
    const activate = await a.signed({ type: 'activate', target: { storePath: h.toplevel('x') }, timeoutSec: 60 });
    a.close();
    const b = client(port);
    await b.authenticate(op);
    b.send(activate);
    assert.equal((await b.next((m) => m.type === 'error')).code, 'unauthorized');
    assert.equal(h.switchCalls().length, 0);

    const c = client(port);
    await c.authenticate(op);
    const mine = await c.signed({ type: 'activate', target: { storePath: h.toplevel('x') }, timeoutSec: 60 });
    c.send(mine);
    const trial = await c.next((m) => m.type === 'trial');
    c.send(mine);
    assert.match((await c.next((m) => m.type === 'error')).message, /sequence number/);

    const d = client(port);
    const w = await d.authenticate(op);
    const confirm = await d.signed({ type: 'confirm', id: trial.id, token: w.confirm.token });
    d.close();
    const e = client(port);
    await e.authenticate(op);
    e.send(confirm);
    assert.equal((await e.next((m) => m.type === 'error')).code, 'unauthorized');
    assert.deepEqual(h.generations(), [1], 'nothing committed by a replay');
  });

  it('a tampered signed message is refused', async () => {
    const { h, port, op } = await wireHost();
    const c = client(port);
    await c.authenticate(op);
    const msg = await c.signed({ type: 'activate', target: { storePath: h.toplevel('x') }, timeoutSec: 60 });
    c.send({ ...msg, timeoutSec: 600 });
    assert.equal((await c.next((m) => m.type === 'error')).code, 'unauthorized');
    await intact(h, port, op);
  });

  it('malformed JSON, unknown types, oversized frames and floods: errors or closes, agent unharmed', async () => {
    const { h, port, op } = await wireHost();
    // before authentication: one error, then the connection is closed
    for (const bad of ['{not json', JSON.stringify({ type: 'launch-missiles' }), JSON.stringify({ type: 'status' })]) {
      const c = client(port);
      await c.next((m) => m.type === 'challenge');
      c.send(bad);
      const e = await c.next((m) => m.type === 'error');
      assert.ok(['bad-request', 'unauthorized'].includes(e.code), e.message);
      assert.equal(await c.closed, 1008);
    }
    const big = client(port);
    await big.next((m) => m.type === 'challenge');
    big.send('x'.repeat(300 * 1024));
    assert.equal(await big.closed, 1009, 'frames above maxPayload close the connection');
    const flood = client(port);
    await flood.next((m) => m.type === 'challenge');
    for (let i = 0; i < 200; i++) flood.send('{}');
    assert.equal(await flood.closed, 1008, 'a flood before authentication is cut off at its first frame');
    assert.ok(flood.messages.filter((m) => m.type === 'error').length <= 1, 'one error reply, not one per frame');

    // after authentication: error replies name the problem, the connection stays
    const c = client(port);
    await c.authenticate(op);
    c.send('{not json');
    assert.match((await c.next((m) => m.type === 'error')).message, /not JSON/);
    c.send({ type: 'nope' });
    assert.match((await c.next((m) => m.type === 'error')).message, /unknown message type "nope"/);
    c.send(await c.signed({ type: 'activate', target: { storePath: '/tmp/not-a-store-path' } }));
    assert.match((await c.next((m) => m.type === 'error')).message, /target/);
    c.send({ type: 'status' });
    assert.equal((await c.next((m) => m.type === 'status')).status.phase, 'idle');
    for (let i = 0; i < 200; i++) c.send({ type: 'status' });
    await c.closed;
    assert.ok(c.messages.some((m) => m.code === 'rate-limited'));
    await intact(h, port, op);
  });

  it('frames larger than MAX_PAYLOAD only inside a push: an authenticated connection sending one outside is closed (1009)', async () => {
    const { port, op } = await wireHost();
    const c = client(port);
    assert.equal((await c.authenticate(op)).type, 'welcome');
    c.ws.send(Buffer.alloc(300 * 1024), { binary: true });
    assert.equal(await c.closed, 1009, 'a 300 KiB frame outside a push is refused before it is read whole');
  });

  it('the controller session verifies the host key and the TLS pin before sending anything', async () => {
    const { h, port } = await wireHost();
    const other = h.operatorKey('not-the-host');
    const signer = keyFileSigner(join(h.dir, 'op'));
    await assert.rejects(
      Session.open('web1', { url: `ws://127.0.0.1:${port}`, hostKey: h.publicKey('not-the-host'), tags: [], dependsOn: [] }, [signer]),
      (err: Error & { code?: string }) => err.code === 'unauthorized' && /does not match the expected host key/.test(err.message),
    );
    assert.ok(other);
    const s = await Session.open('web1', { url: `ws://127.0.0.1:${port}`, hostKey: h.hostPublicKey, tags: [], dependsOn: [] }, [signer]);
    assert.equal(s.welcome.state.phase, 'idle');
    s.close();
  });
});
