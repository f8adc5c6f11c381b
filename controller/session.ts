// One authenticated connection to an agent: dial, check the TLS pin, prove the operator's key, check
// the host's key, then send (signed) commands and collect the answers. Short-lived by design: the
// deploy flow closes it after activation and dials a fresh one to confirm.

import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import WebSocket from 'ws';
import { KeyExchange, opens } from '../shared/channel.ts';
import { SnapbackError } from '../shared/errors.ts';
import { expandHome, type FleetHost } from '../shared/fleet.ts';
import {
  MAX_PAYLOAD,
  SUBPROTOCOL,
  commandPayload,
  serverMessageSchema,
  transcript,
  type CommandBody,
  type Handshake,
  type ServerMessage,
  type SignedCommand,
  type Welcome,
} from '../shared/protocol.ts';
import { knownHosts, type KnownHosts } from '../shared/known-hosts.ts';
import { formatPublicKey, parsePublicKeyLine, verifySignature, type PublicKey, type Signer } from '../shared/ssh.ts';

export interface SessionOptions {
  /** for the connection and the handshake */
  timeoutMs?: number;
  knownHostsFile?: string;
}

/** Ping interval; a connection is given up after two intervals without a pong. */
const KEEPALIVE_MS = 3000;

type Pending = { match: (m: ServerMessage) => boolean; resolve: (m: ServerMessage) => void; onOther?: (m: ServerMessage) => void };

export class Session {
  readonly welcome: Welcome;
  readonly signer: Signer;
  private readonly ws: WebSocket;
  private readonly agentNonce: string;
  private readonly controllerNonce: string;
  private seq = 0;
  private readonly pending = new Set<Pending>();
  private closedWith: SnapbackError | undefined;

  private constructor(ws: WebSocket, welcome: Welcome, signer: Signer, agentNonce: string, controllerNonce: string, macKey: Buffer) {
    this.ws = ws;
    this.welcome = welcome;
    this.signer = signer;
    this.agentNonce = agentNonce;
    this.controllerNonce = controllerNonce;
    // `welcome` was message 1; from here on every message must carry the next counter and the MAC.
    let ctr = 1;
    ws.on('message', (data) => {
      const raw = parseJson(data.toString());
      if (!opens(macKey, ctr + 1, raw)) {
        // Not from the host, or replayed, or reordered: nothing on this connection can be believed
        // any more. Whatever was asked is answered "unreachable", never with the forged answer.
        this.closedWith ??= new SnapbackError('unreachable', 'a message the host did not seal arrived (tampered with on the way?): dropping the connection');
        ws.terminate();
        return;
      }
      ctr++;
      const msg = parseServerMessage(raw);
      if (!msg) return;
      for (const p of this.pending) {
        if (p.match(msg)) {
          this.pending.delete(p);
          p.resolve(msg);
          return;
        }
      }
      for (const p of this.pending) p.onOther?.(msg);
    });
    // A cut link shows no error, only silence: ping, and give the connection up when the agent's
    // pongs stop, so the deploy flow can go on to reconnect and learn the outcome.
    let answered = true;
    this.keepalive = setInterval(() => {
      if (!answered) {
        this.closedWith ??= new SnapbackError('unreachable', `no answer from the agent for ${(2 * KEEPALIVE_MS) / 1000}s: the connection is lost`);
        ws.terminate();
        return;
      }
      answered = false;
      ws.ping();
    }, KEEPALIVE_MS);
    this.keepalive.unref();
    ws.on('pong', () => (answered = true));
    ws.on('close', () => {
      clearInterval(this.keepalive);
      this.closedWith ??= new SnapbackError('unreachable', 'the connection to the agent was lost');
      for (const p of this.pending) p.resolve({ type: 'error', code: 'unreachable', message: this.closedWith.message, retryable: true });
      this.pending.clear();
    });
  }

  private readonly keepalive: NodeJS.Timeout;

  /**
   * Opens an authenticated session, trying each signer in turn (like ssh tries its keys). Throws
   * `unreachable` (cannot connect), `unauthorized` (no key accepted, or the host key is wrong).
   */
  static async open(name: string, host: FleetHost, signers: Signer[], opts: SessionOptions = {}): Promise<Session> {
    const expected = expectedHostKeys(name, host, opts.knownHostsFile);
    let last: SnapbackError | undefined;
    for (const signer of signers) {
      try {
        return await Session.openWith(name, host, signer, expected, opts);
      } catch (err) {
        if (!(err instanceof SnapbackError) || err.code !== 'unauthorized' || err.details?.hostKey) throw err;
        last = err;
      }
    }
    if (!last) throw new SnapbackError('unauthorized', 'no SSH key to authenticate with');
    // The agent tells only "not authorized" (its log says why): say how to authorize the key.
    throw /is not authorized/.test(last.message) ? new SnapbackError('unauthorized', `${last.message}. ${howToAuthorize(signers)}`) : last;
  }

  private static openWith(name: string, host: FleetHost, signer: Signer, expected: KnownHosts, opts: SessionOptions): Promise<Session> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const pin = host.tlsFingerprint?.replace(/:/g, '').toLowerCase();
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(host.url, SUBPROTOCOL, {
        perMessageDeflate: false,
        maxPayload: MAX_PAYLOAD,
        handshakeTimeout: timeoutMs,
        // Masking protects proxies that cache by content, not us: the session is authenticated and
        // NARs are checked against their signed hashes. A zero mask lets both ends skip the XOR of
        // every byte of a pushed closure.
        generateMask: (mask: Buffer) => void mask.fill(0),
        // A pinned self-signed certificate is checked below, before a single byte of ours is sent.
        ...(pin ? { rejectUnauthorized: false } : {}),
      });
      const controllerNonce = randomBytes(32).toString('base64url');
      let done = false;
      const timer = setTimeout(() => fail(new SnapbackError('unreachable', `${name}: no answer from ${host.url} within ${timeoutMs / 1000}s`)), timeoutMs);
      const fail = (err: SnapbackError) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        ws.terminate();
        reject(err);
      };
      ws.on('upgrade', (res) => {
        if (!pin) return;
        const cert = (res.socket as TLSSocket).getPeerCertificate?.();
        const got = cert?.raw ? createHash('sha256').update(cert.raw).digest('hex') : undefined;
        if (got !== pin) fail(new SnapbackError('unauthorized', `${name}: the TLS certificate does not match tlsFingerprint (got ${got ?? 'none'})`, { hostKey: true }));
      });
      let explaining = false;
      ws.on('error', (err) => {
        explaining = true;
        void explainConnectError(host.url, err).then((why) => fail(new SnapbackError('unreachable', `${name}: cannot connect to ${host.url}: ${why}`)));
      });
      ws.on('close', (code, reason) => {
        if (!explaining) fail(new SnapbackError('unreachable', `${name}: the agent closed the connection (${code} ${reason.toString()})`));
      });
      const kex = new KeyExchange();
      const key = formatPublicKey({ ...signer.publicKey, comment: '' });
      let handshake: Handshake | undefined;
      let hostKey: PublicKey | undefined;
      ws.on('message', async (data) => {
        if (done) return;
        const raw = parseJson(data.toString());
        const msg = parseServerMessage(raw);
        if (!msg) return fail(new SnapbackError('unreachable', `${name}: the agent sent a malformed message`));
        if (msg.type === 'challenge' && !handshake) {
          // The host key comes first and is checked before anything is signed: the signature we
          // give covers this key, so no other host can use it (a fleet host relaying the challenge
          // of another would have to show that host's key, which is not the one we expect here).
          try {
            hostKey = parsePublicKeyLine(msg.hostKey);
          } catch {
            return fail(new SnapbackError('unauthorized', `${name}: the agent sent an unusable host key`, { hostKey: true }));
          }
          if (expected.revoked.some((k) => k.blob.equals(hostKey!.blob))) {
            return fail(new SnapbackError('unauthorized', `${name}: host key ${hostKey.fingerprint} is revoked (@revoked in known_hosts)`, { hostKey: true }));
          }
          if (!expected.keys.some((k) => k.blob.equals(hostKey!.blob))) {
            return fail(
              new SnapbackError('unauthorized', `${name}: host key ${hostKey.fingerprint} does not match the expected host key ${expected.keys.map((k) => k.fingerprint).join(' or ')}`, {
                hostKey: true,
              }),
            );
          }
          handshake = { agentNonce: msg.nonce, controllerNonce, controllerKey: key, hostKey: msg.hostKey, agentKex: msg.kex, controllerKex: kex.publicKey };
          const sig = await signer.sign(transcript('client', handshake));
          if (done) return;
          ws.send(JSON.stringify({ type: 'hello', nonce: controllerNonce, key, kex: kex.publicKey, sig }));
          return;
        }
        if (msg.type === 'error') {
          const code = msg.code === 'unauthorized' ? 'unauthorized' : 'unreachable';
          return fail(new SnapbackError(code, `${name}: ${msg.message}`));
        }
        if (msg.type !== 'welcome' || !handshake || !hostKey) return fail(new SnapbackError('unreachable', `${name}: unexpected "${msg.type}" during the handshake`));
        // The host proves itself with its SSH host key over the whole handshake, and seals the
        // welcome (its facts, the confirm token) under the key only the two ends can derive.
        if (!verifySignature(hostKey, transcript('host', handshake), msg.hostSig)) {
          return fail(new SnapbackError('unauthorized', `${name}: the host's signature over this session does not verify`, { hostKey: true }));
        }
        let macKey: Buffer;
        try {
          macKey = kex.macKey(handshake.agentKex, transcript('host', handshake));
        } catch (err) {
          return fail(new SnapbackError('unauthorized', `${name}: challenge.kex: ${(err as Error).message}`, { hostKey: true }));
        }
        if (!opens(macKey, 1, raw)) return fail(new SnapbackError('unreachable', `${name}: the welcome is not sealed by the host (tampered with on the way?)`));
        done = true;
        clearTimeout(timer);
        ws.removeAllListeners('message');
        ws.removeAllListeners('close');
        ws.on('error', () => {});
        resolve(new Session(ws, msg, signer, handshake.agentNonce, controllerNonce, macKey));
      });
    });
  }

  /** Sends a state-changing command, signed over this session; resolves with its final answer. */
  async command(
    cmd: CommandBody,
    onProgress?: (m: ServerMessage) => void,
  ): Promise<ServerMessage> {
    const seq = ++this.seq;
    const unsigned = { ...cmd, seq } as Omit<SignedCommand, 'sig'>;
    const sig = await this.signer.sign(commandPayload(this.agentNonce, this.controllerNonce, unsigned));
    const final = (m: ServerMessage) => (m.type === 'outcome' || m.type === 'error' || m.type === 'trial' || m.type === 'dry-run' || m.type === 'rebooting' || m.type === 'push-done') && (m.re === seq || m.re === undefined);
    return this.ask({ ...unsigned, sig }, final, onProgress);
  }

  /** Sends an unsigned read-only request (`status`, `history`). */
  request(msg: { type: 'status' } | { type: 'history'; id?: string; limit?: number } | { type: 'missing'; paths: string[] }): Promise<ServerMessage> {
    return this.ask(msg, (m) => m.type === msg.type || m.type === 'error');
  }

  private ask(msg: object, match: (m: ServerMessage) => boolean, onOther?: (m: ServerMessage) => void): Promise<ServerMessage> {
    if (this.closedWith || this.ws.readyState !== WebSocket.OPEN) {
      return Promise.resolve({ type: 'error', code: 'unreachable', message: 'the connection to the agent was lost', retryable: true });
    }
    return new Promise((resolve) => {
      this.pending.add({ match, resolve, ...(onOther ? { onOther } : {}) });
      this.ws.send(JSON.stringify(msg));
    });
  }

  get open(): boolean {
    return !this.closedWith && this.ws.readyState === WebSocket.OPEN;
  }

  /**
   * One binary frame of a push's NAR stream. Resolves at once while the socket's own buffer is small,
   * else once this frame has gone out: the NAR source is paused instead of piling up here.
   */
  sendBinary(data: Buffer): Promise<void> {
    if (this.ws.bufferedAmount < 1024 * 1024) {
      this.ws.send(data, { binary: true });
      return Promise.resolve();
    }
    return new Promise((resolve) => this.ws.send(data, { binary: true }, () => resolve()));
  }

  /** Sends raw text (tests use it to probe the agent's defences). */
  sendRaw(data: string): void {
    this.ws.send(data);
  }

  close(): void {
    clearInterval(this.keepalive);
    this.closedWith ??= new SnapbackError('unreachable', 'closed');
    this.ws.close(1000);
  }
}

/** The fix for a key the agent refused: the exact line to add, and where it goes. */
function howToAuthorize(signers: Signer[]): string {
  const lines = signers.map((s) => formatPublicKey(s.publicKey));
  const list = lines.map((l) => `"${l}"`).join(' ');
  return (
    `To let ${lines.length > 1 ? 'one of these keys' : 'this key'} in, add ${lines.length > 1 ? 'its line' : 'the line'} to the host's authorized keys — ` +
    `on NixOS: services.snapback.authorizedKeys = [ ${list} ]; elsewhere: "authorizedKeys": [ ${lines.map((l) => JSON.stringify(l)).join(', ')} ] in /etc/snapback/agent.json, ` +
    'then restart snapback-agent. Listed already? The agent\'s log says why it refused (journalctl -u snapback-agent)'
  );
}

/**
 * What a failed connection means, in the operator's terms: something that is not an agent on the
 * port, or ws:// and wss:// mixed up between the fleet file and the agent's listen.tls.
 */
async function explainConnectError(url: string, err: Error & { code?: string }): Promise<string> {
  const u = new URL(url);
  const hostPort = u.host;
  const http = /^Unexpected server response: (\d+)/.exec(err.message);
  if (http) {
    return `something that is not a Snapback agent answers there (an HTTP server: it answered the WebSocket upgrade with status ${http[1]}); check the host and port in the url (the agent's port is listen.port, 7731 unless set)`;
  }
  const port = Number(u.port || (u.protocol === 'wss:' ? 443 : 80));
  const host = u.hostname.replace(/^\[|\]$/g, '');
  const cutShort = err.code === 'EPROTO' || err.code === 'ECONNRESET' || /wrong version number|packet length too long|before secure TLS connection|socket hang up/i.test(err.message);
  if (u.protocol === 'wss:' && cutShort && !(await speaksTls(host, port))) {
    return `the server there does not speak TLS: if it is the agent without listen.tls, use ws://${hostPort} (or give the agent listen.tls)`;
  }
  if (u.protocol === 'ws:' && cutShort && (await speaksTls(host, port))) {
    return `the server there speaks TLS (an agent with listen.tls): use wss://${hostPort}, with tlsFingerprint for a self-signed certificate`;
  }
  return err.message;
}

function speaksTls(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = tlsConnect({ host, port, rejectUnauthorized: false, ...(isIP(host) ? {} : { servername: host }) });
    const done = (v: boolean) => {
      s.destroy();
      resolve(v);
    };
    s.setTimeout(3000, () => done(false));
    s.once('secureConnect', () => done(true));
    s.once('error', () => done(false));
  });
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function parseServerMessage(raw: unknown): ServerMessage | undefined {
  const r = serverMessageSchema.safeParse(raw);
  return r.success ? r.data : undefined;
}

/**
 * The fleet file's `hostKey`, else the host's ssh-ed25519 entries in ~/.ssh/known_hosts; and the keys
 * known_hosts marks @revoked for the host, which stay refused even when the fleet file names them.
 */
export function expectedHostKeys(name: string, host: FleetHost, knownHostsFile = expandHome('~/.ssh/known_hosts')): KnownHosts {
  const url = new URL(host.url);
  const hostname = url.hostname.replace(/^\[|\]$/g, '');
  let text = '';
  try {
    text = readFileSync(knownHostsFile, 'utf8');
  } catch {}
  const known = knownHosts(text, hostname, url.port ? Number(url.port) : undefined);
  if (host.hostKey) {
    try {
      return { keys: [parsePublicKeyLine(host.hostKey)], revoked: known.revoked };
    } catch (err) {
      throw new SnapbackError(
        'config-invalid',
        `hosts.${name}.hostKey: ${(err as Error).message}; a host key line looks like "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… root@${hostname}": get it with "ssh-keyscan -t ed25519 ${hostname}"`,
      );
    }
  }
  if (!known.keys.length) {
    throw new SnapbackError(
      'config-invalid',
      `hosts.${name}: no hostKey in the fleet file and no ssh-ed25519 key for ${hostname} in ${knownHostsFile} (add "hostKey": the output of "ssh-keyscan -t ed25519 ${hostname}" without the host name)`,
    );
  }
  return known;
}
