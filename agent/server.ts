// The agent's WebSocket server (DESIGN §4): subprotocol snapback.v1, SSH-key mutual authentication,
// signed state-changing commands, MAC-sealed answers, and the confirm token only for connections
// accepted after the trial's activation finished. Nothing is trusted before `hello` verifies, and no
// unauthenticated client can hold more than its share of the agent.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { IncomingMessage, Server as HttpServer } from 'node:http';
import { createServer as createTcpServer, type AddressInfo, type Server as TcpServer, type Socket } from 'node:net';
import type { SecureContext, TLSSocket } from 'node:tls';
import type { WebSocket, WebSocketServer } from 'ws';
import { KeyExchange, seal } from '../shared/channel.ts';
import type { AgentConfig } from '../shared/config.ts';
import { SnapbackError, describeIssues, retryable, type ErrorCode } from '../shared/errors.ts';
import type { Actor } from '../shared/model.ts';
import {
  MAX_BINARY_PAYLOAD,
  MAX_PAYLOAD,
  SIGNED_TYPES,
  SUBPROTOCOL,
  clientMessageSchema,
  commandPayload,
  transcript,
  type ClientMessage,
  type Handshake,
  type ServerMessage,
  type SignedCommand,
} from '../shared/protocol.ts';
import { authorize, parseAuthorizedKeys, type AuthorizedKey } from '../shared/authorized-keys.ts';
import { formatPublicKey, parsePublicKeyLine, verifySignature, type PublicKey, type Signer } from '../shared/ssh.ts';
import { VERSION } from '../shared/version.ts';
import type { Agent, Progress, Result } from './agent.ts';
import { PUSH_ACK_EVERY, PUSH_WINDOW, Push, invalidPaths, undoTransfer } from './push.ts';
import { now } from './clock.ts';
import type { Logger } from './log.ts';

/** Token bucket per connection: burst and refill per second. */
const BURST = 20;
const REFILL_PER_SEC = 10;
/** A connection we close gets this long to answer the close frame before its socket is destroyed. */
const CLOSE_GRACE_MS = 1000;
/** Ping interval; a connection that missed a whole interval's pong is dropped. */
const KEEPALIVE_MS = 15_000;
/** Refused connections are logged at most this often (a flood must not flood the journal). */
const REFUSAL_LOG_MS = 10_000;

/** One accepted TCP connection, from the accept on: freshness and the limits are counted from here. */
interface Conn {
  raw: Socket;
  /** what HTTP sees: the TLS wrapper on wss://, else `raw` */
  sock: Socket;
  /** the peer address; IPv4-mapped IPv6 written as IPv4 */
  address: string;
  /** what the per-source limit counts: the address, or its /64 for IPv6 */
  source: string;
  acceptedMono: number;
  authenticated: boolean;
  /** its slot is free again (closed, or dropped to make room) */
  released: boolean;
  timer: NodeJS.Timeout;
}

interface Session {
  ws: WebSocket;
  conn: Conn;
  agentNonce: string;
  kex: KeyExchange;
  peer: string;
  tokens: number;
  refilledAt: number;
  auth?: { key: PublicKey; who: string; controllerNonce: string; lastSeq: number; macKey: Buffer; ctr: number };
  /** a push this connection is sending (agent/push.ts) */
  push?: { seq: number; transfer: string; p: Push; acked: number; finishing: boolean };
  /** a `push` is being prepared (substitution may take minutes): a second one is refused meanwhile */
  pushStarting?: boolean;
  /** the connection has closed */
  closed?: boolean;
  /** per transfer: its batches so far and the paths they imported (a refusal undoes them all) */
  transfers?: Map<string, { batches: number; imported: string[] }>;
}

export class WireServer {
  private readonly tcp: TcpServer;
  /** HTTP and WebSocket, loaded with the first connection: an agent nobody calls does without them */
  private layers: Promise<{ http: HttpServer; wss: WebSocketServer }> | undefined;
  private wss: WebSocketServer | undefined;
  private readonly authorized: AuthorizedKey[];
  private readonly agent: Agent;
  private readonly log: Logger;
  private readonly host: Signer;
  private readonly hostKeyLine: string;
  private readonly limits: AgentConfig['listen'];
  /** wss://: Node's TLS and the context, loaded only then */
  private tls: { context: SecureContext; TLSSocket: typeof TLSSocket } | undefined;
  /** keyed by the socket HTTP sees (the TLS wrapper on wss://) */
  private readonly conns = new Map<Socket, Conn>();
  private pending = 0;
  private readonly pendingBySource = new Map<string, number>();
  private refused = { count: 0, loggedMono: -Infinity };

  private constructor(config: AgentConfig, agent: Agent, log: Logger, host: Signer, authorized: AuthorizedKey[]) {
    this.agent = agent;
    this.log = log;
    this.host = host;
    this.hostKeyLine = formatPublicKey({ ...host.publicKey, comment: '' });
    this.authorized = authorized;
    this.limits = config.listen;
    // We accept TCP ourselves and hand the socket to HTTP, so that every limit and the freshness of
    // a connection count from the accept, not from a request or an upgrade that may come much later.
    this.tcp = createTcpServer((raw) => this.accepted(raw));
    // Accepting fails with EMFILE and the like when descriptors run out: log it, never die of it.
    this.tcp.on('error', (err) => this.log.error({ err: err.message }, 'accepting a connection failed'));
  }

  /** The HTTP server that reads the upgrade request, and the WebSocket server; made once. */
  private protocolLayers(): Promise<{ http: HttpServer; wss: WebSocketServer }> {
    // ws through require, not import(): Node's ESM loader keeps a failed load (EMFILE in a file
    // that ws's CommonJS index requires) for the life of the process, require does not. node:http
    // through require too: import() makes its ESM facade read every export, and the lazy ones load
    // Node's fetch (undici): about 50 ms of CPU at the first connection, and memory the agent never
    // uses (measured).
    this.layers ??= Promise.resolve().then(() => {
      const require = createRequire(import.meta.url);
      return [require('node:http'), require('ws')] as [typeof import('node:http'), typeof import('ws')];
    }).then(
      ([{ createServer }, { WebSocketServer }]) => {
        const http = createServer();
        http.on('request', (_req, res) => {
          res.shouldKeepAlive = false;
          res.writeHead(426, { 'content-type': 'text/plain', connection: 'close' }).end(`snapback agent: use a WebSocket with subprotocol ${SUBPROTOCOL}\n`);
        });
        http.on('clientError', (_err, socket) => socket.destroy());
        const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: MAX_BINARY_PAYLOAD, clientTracking: true });
        wss.on('error', (err) => this.log.error({ err: err.message }, 'WebSocket server error'));
        http.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => this.upgrade(wss, req, socket, head));
        this.wss = wss;
        return { http, wss };
      },
      (err: Error) => {
        // Out of descriptors, say: the next connection tries again.
        this.layers = undefined;
        throw err;
      },
    );
    return this.layers;
  }

  /** Parses `authorizedKeys`; lines that cannot be honoured exactly are reported and skipped. */
  static authorizedKeys(lines: string[], log: Logger): AuthorizedKey[] {
    return parseAuthorizedKeys(lines, (msg) => log.warn(msg));
  }

  static async listen(config: AgentConfig, agent: Agent, log: Logger, host: Signer, authorized: AuthorizedKey[]): Promise<WireServer> {
    const server = new WireServer(config, agent, log, host, authorized);
    const tls = config.listen.tls;
    if (tls) {
      const { TLSSocket, createSecureContext } = await import('node:tls');
      server.tls = { context: createSecureContext({ cert: readFileSync(tls.cert), key: readFileSync(tls.key) }), TLSSocket };
    }
    await new Promise<void>((resolve, reject) => {
      const failed = (err: Error) => reject(err);
      server.tcp.once('error', failed);
      server.tcp.listen(config.listen.port, config.listen.host, () => {
        server.tcp.off('error', failed);
        resolve();
      });
    });
    return server;
  }

  address(): AddressInfo {
    return this.tcp.address() as AddressInfo;
  }

  /** Connections now: `pending` have not authenticated yet. */
  connections(): { total: number; pending: number } {
    return { total: this.conns.size, pending: this.pending };
  }

  async close(): Promise<void> {
    for (const ws of this.wss?.clients ?? []) ws.terminate();
    this.wss?.close();
    const closed = new Promise<void>((resolve) => this.tcp.close(() => resolve()));
    for (const c of this.conns.values()) c.raw.destroy();
    await closed;
  }

  private accepted(raw: Socket): void {
    raw.on('error', () => raw.destroy());
    const address = plainAddress(raw.remoteAddress ?? '');
    const source = sourceOf(address);
    const refusal = this.admission(source);
    if (refusal) {
      raw.destroy();
      this.refused.count++;
      const t = now().mono;
      if (t - this.refused.loggedMono >= REFUSAL_LOG_MS) {
        this.log.warn({ peer: address, refused: this.refused.count }, `refusing new connections: ${refusal}`);
        this.refused = { count: 0, loggedMono: t };
      }
      return;
    }
    const sock = this.tls ? new this.tls.TLSSocket(raw, { isServer: true, secureContext: this.tls.context }) : raw;
    const conn: Conn = {
      raw,
      sock,
      address,
      source,
      acceptedMono: now().mono,
      authenticated: false,
      released: false,
      // Destroyed, not closed: a peer that never answers a close frame must not keep its socket.
      timer: setTimeout(() => this.drop(conn), this.limits.handshakeTimeoutSec * 1000),
    };
    this.conns.set(sock, conn);
    this.pending++;
    this.pendingBySource.set(source, (this.pendingBySource.get(source) ?? 0) + 1);
    raw.once('close', () => this.release(conn));
    const handOver = () =>
      this.protocolLayers().then(
        ({ http }) => {
          if (!conn.released) http.emit('connection', sock);
        },
        (err: Error) => {
          this.log.error({ err: err.message }, 'cannot load the protocol for a connection');
          this.drop(conn);
        },
      );
    if (sock !== raw) {
      sock.on('error', () => raw.destroy());
      sock.once('secure', () => void handOver());
    } else {
      void handOver();
    }
  }

  /**
   * Whether a new connection from `source` may be accepted; the reason when not. A source over its
   * own share is refused. When the agent is full, the oldest unauthenticated connection of the
   * source holding the most makes room for a source holding fewer: whoever spreads a flood over
   * many addresses (all of 127.0.0.0/8 is one local user; a routed IPv6 prefix holds many /64s)
   * gets turns like everyone else, and cannot keep a newcomer out by holding every slot first.
   */
  private admission(source: string): string | undefined {
    const { maxConnections, maxPending, maxPendingPerAddress } = this.limits;
    const mine = this.pendingBySource.get(source) ?? 0;
    if (mine >= maxPendingPerAddress) return `${maxPendingPerAddress} connections from ${source} are waiting to authenticate (listen.maxPendingPerAddress)`;
    const full = this.conns.size >= maxConnections ? `${maxConnections} connections are open (listen.maxConnections)` : this.pending >= maxPending ? `${maxPending} connections are waiting to authenticate (listen.maxPending)` : undefined;
    if (!full) return undefined;
    let victim: Conn | undefined;
    let most = mine;
    for (const c of this.conns.values()) {
      const n = c.authenticated ? 0 : (this.pendingBySource.get(c.source) ?? 0);
      if (n > most) {
        most = n;
        victim = c;
      }
    }
    if (!victim) return full;
    this.drop(victim);
    return undefined;
  }

  /** Ends a connection now and frees its slot at once (its `close` event comes later). */
  private drop(conn: Conn): void {
    this.release(conn);
    conn.raw.destroy();
  }

  private release(conn: Conn): void {
    if (conn.released) return;
    conn.released = true;
    clearTimeout(conn.timer);
    this.conns.delete(conn.sock);
    if (!conn.authenticated) this.unpend(conn);
  }

  private unpend(conn: Conn): void {
    this.pending--;
    const n = (this.pendingBySource.get(conn.source) ?? 1) - 1;
    if (n > 0) this.pendingBySource.set(conn.source, n);
    else this.pendingBySource.delete(conn.source);
  }

  private authenticated(conn: Conn): void {
    if (conn.authenticated || conn.released) return;
    conn.authenticated = true;
    clearTimeout(conn.timer);
    this.unpend(conn);
  }

  private upgrade(wss: WebSocketServer, req: IncomingMessage, socket: Socket, head: Buffer): void {
    const conn = this.conns.get(socket);
    const offered = String(req.headers['sec-websocket-protocol'] ?? '')
      .split(',')
      .map((p) => p.trim());
    const reject = (status: string) => {
      socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
      socket.destroySoon();
    };
    if (!conn) {
      socket.destroy();
      return;
    }
    if (!offered.includes(SUBPROTOCOL)) return reject('400 Bad Request');
    wss.handleUpgrade(req, socket, head, (ws) => this.accept(ws, conn));
  }

  private accept(ws: WebSocket, conn: Conn): void {
    // Frames of MAX_PAYLOAD at most, but while a push runs on this connection (frameLimit).
    frameLimit(ws, MAX_PAYLOAD);
    const t = now().mono;
    const s: Session = {
      ws,
      conn,
      agentNonce: randomBytes(32).toString('base64url'),
      kex: new KeyExchange(),
      peer: `${conn.address}:${conn.raw.remotePort}`,
      tokens: BURST,
      refilledAt: t,
    };
    ws.on('error', () => ws.terminate());
    // A controller that vanished without a FIN must not hold its slot for ever: no pong, no connection.
    let answered = true;
    const keepalive = setInterval(() => {
      if (!answered) return ws.terminate();
      answered = false;
      ws.ping();
    }, KEEPALIVE_MS);
    keepalive.unref();
    ws.on('pong', () => (answered = true));
    ws.on('close', () => clearInterval(keepalive));
    ws.on('close', () => {
      s.closed = true;
      // A push cut off half-way keeps what was verified and imported; a retry sends the rest.
      const t = s.push;
      s.push = undefined;
      if (t) {
        void t.p.interrupt().then(
          () => this.log.info({ peer: s.peer, kept: t.p.imported.length }, `kept ${t.p.imported.length} paths of an interrupted push`),
          (err: Error) => this.log.error({ err: err.message }, 'ending an interrupted push failed'),
        );
      }
    });
    ws.on('message', (data, isBinary) => {
      // The NAR stream of a push the operator signed: flow-controlled by its window, so it is
      // exempt from the message rate limit that everything else is under.
      if (isBinary && s.push) return this.pushData(s, data as Buffer);
      // Only a push's frames may be larger than MAX_PAYLOAD (the WebSocket limit is theirs).
      if ((data as Buffer).length > MAX_PAYLOAD) return ws.close(1009, 'message too big');
      if (!this.admit(s)) return;
      if (isBinary) return this.fail(s, 'bad-request', 'binary frames are not part of snapback.v1 outside a push', !s.auth);
      void this.receive(s, data.toString()).catch((err: Error) => {
        this.log.error({ err: err.stack, peer: s.peer }, 'internal error handling a message');
        this.fail(s, 'internal', err.message, false);
      });
    });
    this.send(s, { type: 'challenge', nonce: s.agentNonce, agentVersion: VERSION, hostKey: this.hostKeyLine, kex: s.kex.publicKey });
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

  private async receive(s: Session, text: string): Promise<void> {
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
      if (msg.type !== 'hello') {
        this.agent.tell({ type: 'auth-failed', reason: 'no-hello' });
        return this.fail(s, 'unauthorized', `authenticate with "hello" first, not "${msg.type}"`, true);
      }
      return this.hello(s, msg);
    }
    if (msg.type === 'hello') return this.fail(s, 'bad-request', 'already authenticated', false);
    if (SIGNED_TYPES.has(msg.type)) {
      const cmd = msg as SignedCommand;
      if (cmd.seq <= s.auth.lastSeq) {
        this.agent.tell({ type: 'auth-failed', reason: 'replayed-command' });
        return this.fail(s, 'unauthorized', `sequence number ${cmd.seq} was already used`, true);
      }
      if (!verifySignature(s.auth.key, commandPayload(s.agentNonce, s.auth.controllerNonce, cmd), cmd.sig)) {
        this.log.warn({ peer: s.peer, who: s.auth.who, type: cmd.type }, 'refusing a command with a bad signature');
        this.agent.tell({ type: 'auth-failed', reason: 'command-signature' });
        return this.fail(s, 'unauthorized', 'the signature does not match this session and command', true);
      }
      s.auth.lastSeq = cmd.seq;
    }
    return this.command(s, msg);
  }

  private async hello(s: Session, msg: Extract<ClientMessage, { type: 'hello' }>): Promise<void> {
    let key: PublicKey;
    try {
      key = parsePublicKeyLine(msg.key);
    } catch (err) {
      this.agent.tell({ type: 'auth-failed', reason: 'bad-key' });
      return this.fail(s, 'unauthorized', (err as Error).message, true);
    }
    const h: Handshake = {
      agentNonce: s.agentNonce,
      controllerNonce: msg.nonce,
      controllerKey: msg.key,
      hostKey: this.hostKeyLine,
      agentKex: s.kex.publicKey,
      controllerKex: msg.kex,
    };
    // The signature first: only who holds the key learns anything about its authorizedKeys line,
    // and only they can make the log say more than "bad signature".
    const verdict = verifySignature(key, transcript('client', h), msg.sig) ? authorize(this.authorized, key, s.conn.address, Date.now()) : undefined;
    if (!verdict?.ok) {
      // The client learns only "not authorized"; the log says why (signature, unknown key, from=, expiry-time).
      this.log.warn({ peer: s.peer, key: key.fingerprint }, verdict ? `refusing a controller key: ${verdict.message}` : 'refusing a controller with a bad handshake signature');
      this.agent.tell({ type: 'auth-failed', reason: verdict ? verdict.reason : 'signature' });
      return this.fail(s, 'unauthorized', `key ${key.fingerprint} is not authorized on this host`, true);
    }
    const known = verdict.entry.key;
    let macKey: Buffer;
    try {
      macKey = s.kex.macKey(msg.kex, transcript('host', h));
    } catch (err) {
      this.agent.tell({ type: 'auth-failed', reason: 'kex' });
      return this.fail(s, 'unauthorized', `hello.kex: ${(err as Error).message}`, true);
    }
    const who = `${key.fingerprint}${known.comment ? ` (${known.comment})` : ''}`;
    const hostSig = await this.host.sign(transcript('host', h));
    if (s.ws.readyState !== s.ws.OPEN) return;
    s.auth = { key, who, controllerNonce: msg.nonce, lastSeq: 0, macKey, ctr: 0 };
    this.authenticated(s.conn);
    const status = this.agent.status();
    const trial = this.agent.trialToken();
    this.log.info({ peer: s.peer, who }, 'controller authenticated');
    this.send(s, {
      type: 'welcome',
      hostname: status.hostname,
      machineId: machineId(),
      bootId: status.bootId,
      currentSystem: status.currentSystem,
      agentVersion: VERSION,
      state: status,
      hostSig,
      you: who,
      // Promise 5: a connection accepted (at the TCP level) before the switch finished never gets it.
      ...(trial && s.conn.acceptedMono >= trial.readyMono ? { confirm: { id: trial.id, token: trial.token } } : {}),
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
        return this.reply(s, msg.seq, await this.agent.activate({ target: msg.target, ...(msg.timeoutSec ? { timeoutSec: msg.timeoutSec } : {}), ...(msg.reboot ? { reboot: true } : {}), by }, progress));
      case 'confirm': {
        // Promise 5, enforced twice: the token is handed out only on fresh connections, and a
        // connection that predates the trial cannot confirm even with a token learnt elsewhere.
        const trial = this.agent.trialToken();
        if (trial && trial.id === msg.id && s.conn.acceptedMono < trial.readyMono) {
          this.agent.tell({ type: 'confirm-refused', code: 'bad-token' });
          return this.reply(s, msg.seq, { ok: false, code: 'bad-token', message: 'this connection was opened before the trial started; confirm over a fresh connection', id: msg.id });
        }
        return this.reply(s, msg.seq, await this.agent.confirm({ id: msg.id, token: msg.token, requireToken: true, by }, progress));
      }
      case 'rollback':
        return this.reply(s, msg.seq, await this.agent.rollback({ ...(msg.id ? { id: msg.id } : {}), by }, progress));
      case 'extend':
        return this.reply(s, msg.seq, await this.agent.extend({ ...(msg.id ? { id: msg.id } : {}), seconds: msg.seconds, by }));
      case 'missing':
        return this.send(s, { type: 'missing', paths: await invalidPaths(msg.paths) });
      case 'push':
        return this.startPush(s, msg);
    }
  }

  private async startPush(s: Session, msg: Extract<ClientMessage, { type: 'push' }>): Promise<void> {
    const error = (code: ErrorCode, message: string) => this.send(s, { type: 'error', code, message, retryable: retryable(code), re: msg.seq });
    if (s.push || s.pushStarting) return error('busy', 'a push is already running on this connection');
    const transfers = (s.transfers ??= new Map());
    const transfer = transfers.get(msg.transfer) ?? { batches: 0, imported: [] };
    transfers.set(msg.transfer, transfer);
    let p: Push;
    s.pushStarting = true;
    try {
      p = await Push.prepare(`${msg.transfer}-${transfer.batches++}`, msg.paths, msg.substitute === true, msg.remainingBytes, this.agent.pushPlaces());
    } catch (err) {
      // A later batch refused (no room after all): the transfer is undone, as for a bad NAR, so no
      // half of it stays rooted in the store.
      if (transfer.imported.length) {
        const earlier = transfer.imported;
        transfers.delete(msg.transfer);
        await undoTransfer(this.agent.pushPlaces(), msg.transfer, earlier).catch((e: Error) => this.log.error({ err: e.message }, 'undoing a refused transfer failed'));
      }
      return error(err instanceof SnapbackError ? (err.code as ErrorCode) : 'push-failed', (err as Error).message);
    } finally {
      s.pushStarting = false;
    }
    if (s.closed) {
      // The controller left while the push was prepared: nobody will send it (nor end it).
      this.log.info({ peer: s.peer, paths: msg.paths.length }, 'the controller left before its push began');
      void p.interrupt().catch((err: Error) => this.log.error({ err: err.message }, 'ending an abandoned push failed'));
      return;
    }
    this.log.info({ peer: s.peer, who: s.auth!.who, paths: msg.paths.length, need: p.need.length, bytes: p.total }, `receiving ${p.need.length} of ${msg.paths.length} paths`);
    if (p.complete) {
      await p.finish();
      return this.send(s, { type: 'push-done', re: msg.seq, imported: 0, bytes: 0 });
    }
    const t = { seq: msg.seq, transfer: msg.transfer, p, acked: 0, finishing: false };
    s.push = t;
    frameLimit(s.ws, MAX_BINARY_PAYLOAD);
    // Nix took a NAR: acknowledgements held back for it go out.
    p.onAdded = () => {
      if (s.push === t && !t.finishing) this.pushAck(s, t);
    };
    this.send(s, { type: 'push-ready', re: msg.seq, need: p.need.map((e) => e.path), window: PUSH_WINDOW });
  }

  private pushData(s: Session, data: Buffer): void {
    const t = s.push!;
    if (t.finishing) return this.endPush(s, new SnapbackError('bad-nar', 'bytes after the last path of the manifest'));
    try {
      t.p.receive(data);
    } catch (err) {
      return this.endPush(s, err as Error);
    }
    if (t.p.received - t.acked >= PUSH_ACK_EVERY) this.pushAck(s, t);
    if (!t.p.complete) return;
    t.finishing = true;
    t.p.finish().then(
      (imported) => {
        if (s.push !== t) return;
        s.push = undefined;
        frameLimit(s.ws, MAX_PAYLOAD);
        s.transfers?.get(t.transfer)?.imported.push(...t.p.imported);
        this.log.info({ peer: s.peer, imported, bytes: t.p.received }, `imported ${imported} pushed paths`);
        this.send(s, { type: 'push-done', re: t.seq, imported, bytes: t.p.received });
      },
      (err: Error) => this.endPush(s, err),
    );
  }

  /** Acknowledges what arrived, unless the NARs waiting for Nix are over their budget (Push.holdAcks). */
  private pushAck(s: Session, t: NonNullable<Session['push']>): void {
    if (t.p.holdAcks || t.p.received === t.acked) return;
    t.acked = t.p.received;
    this.send(s, { type: 'push-ack', re: t.seq, bytes: t.p.received, imported: t.p.verified.length });
  }

  /** A push refused half-way (a NAR that does not match, an import that failed): nothing of it stays. */
  private endPush(s: Session, err: Error): void {
    const t = s.push;
    if (!t) return;
    s.push = undefined;
    frameLimit(s.ws, MAX_PAYLOAD);
    const code: ErrorCode = err instanceof SnapbackError ? (err.code as ErrorCode) : 'push-failed';
    this.log.warn({ peer: s.peer, err: err.message }, 'refusing a pushed closure');
    // The whole transfer is undone: this batch, and the batches before it on this connection.
    const earlier = s.transfers?.get(t.transfer)?.imported ?? [];
    s.transfers?.delete(t.transfer);
    void t.p.abort(earlier, t.transfer).catch((e: Error) => this.log.error({ err: e.message }, 'cleaning up a refused push failed'));
    this.send(s, { type: 'error', code, message: err.message, retryable: retryable(code), re: t.seq });
  }

  private progress(s: Session, p: Progress): void {
    if (p.type === 'output') this.send(s, { type: 'progress', id: p.id, line: p.line.slice(0, 4096) });
    else if (p.type === 'phase') {
      this.send(s, {
        type: 'progress',
        id: p.id,
        phase: p.phase,
        ...(p.deadline ? { deadline: p.deadline } : {}),
        ...(p.toplevel ? { toplevel: p.toplevel } : {}),
        ...(p.kernel ? { kernel: p.kernel } : {}),
        ...(p.reboot ? { reboot: p.reboot } : {}),
      });
    } else if (p.type === 'confirm-refused') this.send(s, { type: 'progress', id: p.id, problems: p.problems });
  }

  private reply(s: Session, re: number, r: Result): void {
    if (!r.ok) {
      return this.send(s, { type: 'error', code: r.code, message: r.message, retryable: retryable(r.code), re, ...(r.id ? { id: r.id } : {}), ...(r.outcome ? { outcome: r.outcome } : {}) });
    }
    if (r.dryRun) return this.send(s, { type: 'dry-run', id: r.id!, toplevel: r.toplevel!, exit: r.dryRun.exit, ...(r.kernel ? { kernel: r.kernel } : {}), re });
    if (r.rebooting) return this.send(s, { type: 'rebooting', id: r.id!, toplevel: r.toplevel!, ...r.rebooting, ...(r.kernel ? { kernel: r.kernel } : {}), re });
    if (r.outcome) return this.send(s, { type: 'outcome', id: r.id!, outcome: r.outcome, re });
    if (r.deadline) {
      const secondsLeft = Math.max(0, Math.floor((Date.parse(r.deadline) - Date.now()) / 1000));
      return this.send(s, { type: 'trial', id: r.id!, deadline: r.deadline, secondsLeft, ...(r.toplevel ? { toplevel: r.toplevel } : {}), re });
    }
  }

  private fail(s: Session, code: ErrorCode, message: string, close: boolean): void {
    this.send(s, { type: 'error', code, message, retryable: retryable(code) });
    if (!close) return;
    s.ws.close(1008, code);
    setTimeout(() => s.ws.terminate(), CLOSE_GRACE_MS).unref();
  }

  /** After `hello`, every message is sealed with the next counter and the session's MAC. */
  private send(s: Session, msg: ServerMessage): void {
    if (s.ws.readyState !== s.ws.OPEN) return;
    s.ws.send(JSON.stringify(s.auth ? seal(s.auth.macKey, ++s.auth.ctr, msg) : msg));
  }
}

/** `::ffff:10.0.0.1` is the IPv4 peer 10.0.0.1. */
export function plainAddress(address: string): string {
  const v4 = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return v4 ? v4[1]! : address;
}

/** What one source is for the per-source limit: an IPv4 address, or the /64 of an IPv6 address. */
export function sourceOf(address: string): string {
  if (!address.includes(':')) return address;
  const [head = '', tail = ''] = address.split('%')[0]!.split('::');
  const left = head ? head.split(':') : [];
  const right = address.includes('::') ? (tail ? tail.split(':') : []) : [];
  const groups = address.includes('::') ? [...left, ...Array(Math.max(0, 8 - left.length - right.length)).fill('0'), ...right] : left;
  return `${groups
    .slice(0, 4)
    .map((g) => g.toLowerCase().replace(/^0+(?=.)/, ''))
    .join(':')}::/64`;
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

/**
 * The largest frame this connection may send: ws takes one limit for the whole server (a push's
 * chunks, MAX_BINARY_PAYLOAD); each connection gets MAX_PAYLOAD unless a push runs on it, so that
 * a connection nobody has authenticated cannot make the agent read 1 MiB frames. Through ws's
 * receiver (a private field of the pinned version); without it, the server's limit holds.
 */
function frameLimit(ws: WebSocket, bytes: number): void {
  const receiver = (ws as unknown as { _receiver?: { _maxPayload?: unknown } })._receiver;
  if (receiver && typeof receiver._maxPayload === 'number') receiver._maxPayload = bytes;
}
