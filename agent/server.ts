// The agent's WebSocket server (DESIGN §4): subprotocol snapback.v1, SSH-key mutual authentication,
// signed state-changing commands, and the confirm token only for connections accepted after the
// trial's activation finished. Nothing is trusted before `hello` verifies.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer, type IncomingMessage, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';
import type { AgentConfig } from '../shared/config.ts';
import { describeIssues, retryable, type ErrorCode } from '../shared/errors.ts';
import type { Actor } from '../shared/model.ts';
import {
  MAX_PAYLOAD,
  SIGNED_TYPES,
  SUBPROTOCOL,
  clientMessageSchema,
  commandPayload,
  transcript,
  type ClientMessage,
  type ServerMessage,
  type SignedCommand,
} from '../shared/protocol.ts';
import { authorize, parseAuthorizedKeys, type AuthorizedKey } from '../shared/authorized-keys.ts';
import { formatPublicKey, parsePublicKeyLine, verifySignature, type PublicKey, type Signer } from '../shared/ssh.ts';
import { VERSION } from '../shared/version.ts';
import type { Agent, Progress, Result } from './agent.ts';
import { now } from './clock.ts';
import type { Logger } from './log.ts';

/** Unauthenticated connections get this long to complete the handshake. */
const HANDSHAKE_MS = 10_000;
/** At most this many connections may be in the handshake at once. */
const MAX_PENDING = 64;
/** Token bucket per connection: burst and refill per second. */
const BURST = 20;
const REFILL_PER_SEC = 10;

interface Session {
  ws: WebSocket;
  acceptedMono: number;
  agentNonce: string;
  peer: string;
  /** the peer's IP address, for authorizedKeys' from= */
  address: string;
  tokens: number;
  refilledAt: number;
  auth?: { key: PublicKey; who: string; controllerNonce: string; lastSeq: number };
}

export class WireServer {
  private readonly http: Server;
  private readonly wss: WebSocketServer;
  private readonly authorized: AuthorizedKey[];
  private pending = 0;
  private readonly agent: Agent;
  private readonly log: Logger;
  private readonly host: Signer;

  private constructor(config: AgentConfig, agent: Agent, log: Logger, host: Signer, authorized: AuthorizedKey[]) {
    this.agent = agent;
    this.log = log;
    this.host = host;
    this.authorized = authorized;
    const tls = config.listen.tls;
    this.http = tls
      ? createHttpsServer({ cert: readFileSync(tls.cert), key: readFileSync(tls.key) })
      : createHttpServer();
    this.http.headersTimeout = HANDSHAKE_MS;
    this.http.requestTimeout = HANDSHAKE_MS;
    this.http.on('request', (_req, res) => {
      res.writeHead(426, { 'content-type': 'text/plain' }).end(`snapback agent: use a WebSocket with subprotocol ${SUBPROTOCOL}\n`);
    });
    this.wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: MAX_PAYLOAD, clientTracking: true });
    this.http.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => this.upgrade(req, socket, head));
  }

  /** Parses `authorizedKeys`; lines that cannot be honoured exactly are reported and skipped. */
  static authorizedKeys(lines: string[], log: Logger): AuthorizedKey[] {
    return parseAuthorizedKeys(lines, (msg) => log.warn(msg));
  }

  static async listen(config: AgentConfig, agent: Agent, log: Logger, host: Signer): Promise<WireServer> {
    const server = new WireServer(config, agent, log, host, WireServer.authorizedKeys(config.authorizedKeys, log));
    await new Promise<void>((resolve, reject) => {
      server.http.once('error', reject);
      server.http.listen(config.listen.port, config.listen.host, () => resolve());
    });
    return server;
  }

  address(): AddressInfo {
    return this.http.address() as AddressInfo;
  }

  async close(): Promise<void> {
    for (const ws of this.wss.clients) ws.terminate();
    this.wss.close();
    await new Promise<void>((resolve) => this.http.close(() => resolve()));
  }

  private upgrade(req: IncomingMessage, socket: Socket, head: Buffer): void {
    const offered = String(req.headers['sec-websocket-protocol'] ?? '')
      .split(',')
      .map((p) => p.trim());
    const reject = (status: string) => {
      socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
      socket.destroy();
    };
    if (!offered.includes(SUBPROTOCOL)) return reject('400 Bad Request');
    if (this.pending >= MAX_PENDING) return reject('503 Service Unavailable');
    this.wss.handleUpgrade(req, socket, head, (ws) => this.accept(ws, req));
  }

  private accept(ws: WebSocket, req: IncomingMessage): void {
    const t = now().mono;
    const s: Session = {
      ws,
      acceptedMono: t,
      agentNonce: randomBytes(32).toString('base64url'),
      peer: `${req.socket.remoteAddress}:${req.socket.remotePort}`,
      address: req.socket.remoteAddress ?? '',
      tokens: BURST,
      refilledAt: t,
    };
    this.pending++;
    let counted = true;
    const settle = () => {
      if (counted) this.pending--;
      counted = false;
    };
    const timer = setTimeout(() => {
      if (!s.auth) this.fail(s, 'unauthorized', 'authentication did not complete in time', true);
    }, HANDSHAKE_MS);
    ws.on('close', () => {
      clearTimeout(timer);
      settle();
    });
    ws.on('error', () => ws.terminate());
    ws.on('message', (data, isBinary) => {
      if (!this.admit(s)) return;
      if (isBinary) return this.fail(s, 'bad-request', 'binary frames are not part of snapback.v1', !s.auth);
      void this.receive(s, data.toString(), () => {
        clearTimeout(timer);
        settle();
      }).catch((err: Error) => {
        this.log.error({ err: err.stack, peer: s.peer }, 'internal error handling a message');
        this.fail(s, 'internal', err.message, false);
      });
    });
    this.send(s, { type: 'challenge', nonce: s.agentNonce, agentVersion: VERSION });
  }

  /** Token bucket: a flood gets one error and the connection is closed. */
  private admit(s: Session): boolean {
    const t = now().mono;
    s.tokens = Math.min(BURST, s.tokens + ((t - s.refilledAt) / 1000) * REFILL_PER_SEC);
    s.refilledAt = t;
    if (s.tokens < 1) {
      this.log.warn({ peer: s.peer }, 'closing a connection that sends too many messages');
      this.fail(s, 'rate-limited', `more than ${REFILL_PER_SEC} messages per second`, true);
      return false;
    }
    s.tokens -= 1;
    return true;
  }

  private async receive(s: Session, text: string, authenticated: () => void): Promise<void> {
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch {
      return this.fail(s, 'bad-request', 'the message is not JSON', !s.auth);
    }
    const type = (raw as { type?: unknown })?.type;
    const parsed = clientMessageSchema.safeParse(raw);
    if (!parsed.success) {
      const what = typeof type === 'string' && !clientMessageSchema.options.some((o) => o.shape.type.value === type) ? `unknown message type "${type.slice(0, 40)}"` : describeIssues(parsed.error).join('; ');
      return this.fail(s, 'bad-request', what, !s.auth);
    }
    const msg = parsed.data;
    if (!s.auth) {
      if (msg.type !== 'hello') return this.fail(s, 'unauthorized', `authenticate with "hello" first, not "${msg.type}"`, true);
      return this.hello(s, msg, authenticated);
    }
    if (msg.type === 'hello') return this.fail(s, 'bad-request', 'already authenticated', false);
    if (SIGNED_TYPES.has(msg.type)) {
      const cmd = msg as SignedCommand;
      if (cmd.seq <= s.auth.lastSeq) return this.fail(s, 'unauthorized', `sequence number ${cmd.seq} was already used`, true);
      if (!verifySignature(s.auth.key, commandPayload(s.agentNonce, s.auth.controllerNonce, cmd), cmd.sig)) {
        this.log.warn({ peer: s.peer, who: s.auth.who, type: cmd.type }, 'refusing a command with a bad signature');
        return this.fail(s, 'unauthorized', 'the signature does not match this session and command', true);
      }
      s.auth.lastSeq = cmd.seq;
    }
    return this.command(s, msg);
  }

  private async hello(s: Session, msg: Extract<ClientMessage, { type: 'hello' }>, authenticated: () => void): Promise<void> {
    let key: PublicKey;
    try {
      key = parsePublicKeyLine(msg.key);
    } catch (err) {
      return this.fail(s, 'unauthorized', (err as Error).message, true);
    }
    const verdict = authorize(this.authorized, key, s.address, Date.now());
    if (!verdict.ok || !verifySignature(key, transcript('client', s.agentNonce, msg.nonce, msg.key), msg.sig)) {
      // The client learns only "not authorized"; the log says why (unknown, from=, expiry-time, signature).
      this.log.warn({ peer: s.peer, key: key.fingerprint }, verdict.ok ? 'refusing a controller with a bad handshake signature' : `refusing a controller key: ${verdict.message}`);
      return this.fail(s, 'unauthorized', `key ${key.fingerprint} is not authorized on this host`, true);
    }
    const known = verdict.entry.key;
    const who = `${key.fingerprint}${known.comment ? ` (${known.comment})` : ''}`;
    s.auth = { key, who, controllerNonce: msg.nonce, lastSeq: 0 };
    authenticated();
    const status = this.agent.status();
    const trial = this.agent.trialToken();
    const hostSig = await this.host.sign(transcript('host', s.agentNonce, msg.nonce, msg.key));
    this.log.info({ peer: s.peer, who }, 'controller authenticated');
    this.send(s, {
      type: 'welcome',
      hostname: status.hostname,
      machineId: machineId(),
      bootId: status.bootId,
      currentSystem: status.currentSystem,
      agentVersion: VERSION,
      state: status,
      hostKey: formatPublicKey({ ...this.host.publicKey, comment: '' }),
      hostSig,
      you: who,
      // Promise 5: a connection that survived the switch (accepted before it finished) never gets it.
      ...(trial && s.acceptedMono >= trial.readyMono ? { confirm: { id: trial.id, token: trial.token } } : {}),
    });
  }

  private async command(s: Session, msg: Exclude<ClientMessage, { type: 'hello' }>): Promise<void> {
    const by: Actor = { who: s.auth!.who, channel: 'controller' };
    const progress = (p: Progress) => this.progress(s, p);
    switch (msg.type) {
      case 'status':
        return this.send(s, { type: 'status', status: this.agent.status() });
      case 'history': {
        const entries = this.agent.history().filter((e) => !msg.id || e.id === msg.id);
        return this.send(s, { type: 'history', entries: msg.limit ? entries.slice(-msg.limit) : entries });
      }
      case 'activate':
        if (msg.dryRun) return this.reply(s, msg.seq, await this.agent.dryRun({ target: msg.target, by }, progress));
        return this.reply(s, msg.seq, await this.agent.activate({ target: msg.target, ...(msg.timeoutSec ? { timeoutSec: msg.timeoutSec } : {}), by }, progress));
      case 'confirm': {
        // Promise 5, enforced twice: the token is handed out only on fresh connections, and a
        // connection that predates the trial cannot confirm even with a token learnt elsewhere.
        const trial = this.agent.trialToken();
        if (trial && trial.id === msg.id && s.acceptedMono < trial.readyMono) {
          return this.reply(s, msg.seq, { ok: false, code: 'bad-token', message: 'this connection was opened before the trial started; confirm over a fresh connection', id: msg.id });
        }
        return this.reply(s, msg.seq, await this.agent.confirm({ id: msg.id, token: msg.token, requireToken: true, by }, progress));
      }
      case 'rollback':
        return this.reply(s, msg.seq, await this.agent.rollback({ ...(msg.id ? { id: msg.id } : {}), by }, progress));
      case 'extend':
        return this.reply(s, msg.seq, await this.agent.extend({ ...(msg.id ? { id: msg.id } : {}), seconds: msg.seconds, by }));
    }
  }

  private progress(s: Session, p: Progress): void {
    if (p.type === 'output') this.send(s, { type: 'progress', id: p.id, line: p.line.slice(0, 4096) });
    else if (p.type === 'phase') {
      this.send(s, { type: 'progress', id: p.id, phase: p.phase, ...(p.deadline ? { deadline: p.deadline } : {}), ...(p.toplevel ? { toplevel: p.toplevel } : {}) });
    } else if (p.type === 'confirm-refused') this.send(s, { type: 'progress', id: p.id, problems: p.problems });
  }

  private reply(s: Session, re: number, r: Result): void {
    if (!r.ok) {
      return this.send(s, { type: 'error', code: r.code, message: r.message, retryable: retryable(r.code), re, ...(r.id ? { id: r.id } : {}), ...(r.outcome ? { outcome: r.outcome } : {}) });
    }
    if (r.dryRun) return this.send(s, { type: 'dry-run', id: r.id!, toplevel: r.toplevel!, exit: r.dryRun.exit, re });
    if (r.outcome) return this.send(s, { type: 'outcome', id: r.id!, outcome: r.outcome, re });
    if (r.deadline) {
      const secondsLeft = Math.max(0, Math.floor((Date.parse(r.deadline) - Date.now()) / 1000));
      return this.send(s, { type: 'trial', id: r.id!, deadline: r.deadline, secondsLeft, ...(r.toplevel ? { toplevel: r.toplevel } : {}), re });
    }
  }

  private fail(s: Session, code: ErrorCode, message: string, close: boolean): void {
    this.send(s, { type: 'error', code, message, retryable: retryable(code) });
    if (close) s.ws.close(1008, code);
  }

  private send(s: Session, msg: ServerMessage): void {
    if (s.ws.readyState === s.ws.OPEN) s.ws.send(JSON.stringify(msg));
  }
}

let cachedMachineId: string | undefined;
function machineId(): string {
  if (cachedMachineId === undefined) {
    try {
      cachedMachineId = readFileSync('/etc/machine-id', 'utf8').trim();
    } catch {
      cachedMachineId = '';
    }
  }
  return cachedMachineId;
}
