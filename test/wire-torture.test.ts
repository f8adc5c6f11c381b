// Odd sockets against a wss:// agent — resets at every
// stage, TLS that never finishes, renegotiation, partial headers, hellos reset while the host key
// signs — then the agent must be alive and its per-source count back to zero (8 fresh connections
// from the same address all get a challenge, and an operator authenticates).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { connect as tcpConnect } from 'node:net';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { connect as tlsConnect } from 'node:tls';
import WebSocket from 'ws';
import { KeyExchange } from '../shared/channel.ts';
import { SUBPROTOCOL, transcript } from '../shared/protocol.ts';
import { formatPublicKey, keyFileSigner } from '../shared/ssh.ts';
import { ScratchHost, cleanupsAfterAll } from './helpers/host.ts';
import { haveNix } from './helpers/nix.ts';
import { randomBytes } from 'node:crypto';

const skip = haveNix();
const cleanups = cleanupsAfterAll();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function wss(port: number): WebSocket {
  const ws = new WebSocket(`wss://127.0.0.1:${port}`, SUBPROTOCOL, { rejectUnauthorized: false, perMessageDeflate: false });
  ws.on('error', () => {});
  return ws;
}

describe('socket torture on wss://', { skip }, () => {
  it('the agent survives and its counts drain', async () => {
    const h = new ScratchHost('rv-tls').enableWire().install();
    cleanups.push(() => h.cleanup());
    const cert = join(h.dir, 'cert.pem');
    const key = join(h.dir, 'key.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2', '-subj', '/CN=web1', '-keyout', key, '-out', cert], { stdio: 'ignore' });
    h.writeConfig({ listen: { host: '127.0.0.1', port: 0, tls: { cert, key }, handshakeTimeoutSec: 2 } });
    await h.start();
    const port = await h.port();
    const op = join(h.dir, 'op');
    const signer = keyFileSigner(op);

    for (let round = 0; round < 5; round++) {
      const jobs: Promise<unknown>[] = [];
      // 1. TCP reset right after connect
      jobs.push((async () => { const s = tcpConnect(port, '127.0.0.1'); s.on('error', () => {}); await once(s, 'connect'); s.resetAndDestroy(); })());
      // 2. half a ClientHello, then reset
      jobs.push((async () => { const s = tcpConnect(port, '127.0.0.1'); s.on('error', () => {}); await once(s, 'connect'); s.write(Buffer.from('160301020001', 'hex')); await sleep(20); s.resetAndDestroy(); })());
      // 3. garbage instead of TLS
      jobs.push((async () => { const s = tcpConnect(port, '127.0.0.1'); s.on('error', () => {}); await once(s, 'connect'); s.write('GET / HTTP/1.1\r\n\r\n'); await sleep(20); s.destroy(); })());
      // 4. TLS up, then reset before any HTTP; and TLS up, partial headers, reset
      jobs.push((async () => { const s = tlsConnect({ port, host: '127.0.0.1', rejectUnauthorized: false }); s.on('error', () => {}); await once(s, 'secureConnect'); s.destroy(); })());
      jobs.push((async () => { const s = tlsConnect({ port, host: '127.0.0.1', rejectUnauthorized: false }); s.on('error', () => {}); await once(s, 'secureConnect'); s.write('GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-'); await sleep(10); (s as any)._parent?.resetAndDestroy?.() ?? s.destroy(); })());
      // 5. TLS 1.2 renegotiation storm
      jobs.push((async () => {
        const s = tlsConnect({ port, host: '127.0.0.1', rejectUnauthorized: false, maxVersion: 'TLSv1.2' });
        s.on('error', () => {});
        await once(s, 'secureConnect');
        for (let i = 0; i < 6 && !s.destroyed; i++) await new Promise((r) => s.renegotiate({ rejectUnauthorized: false }, r) || r(undefined));
        s.destroy();
      })());
      // 6. a valid hello, and the socket reset in the same tick (the host key signs asynchronously)
      jobs.push((async () => {
        const ws = wss(port);
        const [data] = (await once(ws, 'message')) as [Buffer];
        const ch = JSON.parse(data.toString());
        const kex = new KeyExchange();
        const nonce = randomBytes(32).toString('base64url');
        const k = formatPublicKey({ ...signer.publicKey, comment: '' });
        const sig = await signer.sign(transcript('client', { agentNonce: ch.nonce, controllerNonce: nonce, controllerKey: k, hostKey: ch.hostKey, agentKex: ch.kex, controllerKex: kex.publicKey }));
        ws.send(JSON.stringify({ type: 'hello', nonce, key: k, kex: kex.publicKey, sig }));
        ws.send(JSON.stringify({ type: 'hello', nonce, key: k, kex: kex.publicKey, sig }));
        ws.send('{"type":"status"}');
        ws.terminate();
      })());
      // 7. upgrade and trickle a frame one byte at a time, then reset
      jobs.push((async () => { const ws = wss(port); await once(ws, 'open'); const sock = (ws as any)._socket; sock.write(Buffer.from([0x81])); await sleep(50); sock.write(Buffer.from([0xfe])); await sleep(50); ws.terminate(); })());
      await Promise.allSettled(jobs);
    }
    assert.equal(h.agent!.exitCode, null, 'the agent is alive');
    // Counts drained once the agent has seen every close: 8 at once from the same address all get a challenge.
    for (let attempt = 1; ; attempt++) {
      const eight = Array.from({ length: 8 }, () => wss(port));
      cleanups.push(() => eight.forEach((w) => w.terminate()));
      const got = await Promise.all(eight.map((w) => Promise.race([once(w, 'message').then(() => true), once(w, 'close').then(() => false)])));
      eight.forEach((w) => w.terminate());
      if (got.every(Boolean)) break;
      assert.ok(attempt < 40, 'every one of 8 connections from 127.0.0.1 gets a challenge once the torture has ended');
      await sleep(100);
    }
    const fleet = await h.fleet({ url: `wss://127.0.0.1:${port}`, tlsFingerprint: execFileSync('openssl', ['x509', '-in', cert, '-noout', '-fingerprint', '-sha256'], { encoding: 'utf8' }).trim().split('=')[1]!, target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
  });
});
