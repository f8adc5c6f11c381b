// The console channel (DESIGN §5): a Unix socket, mode 0600, newline-delimited JSON. One request
// per connection; the agent streams progress lines and ends with one result line.

import { chmodSync, existsSync, mkdirSync, unlinkSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import { z } from 'zod';
import { SnapbackError, describeIssues } from '../shared/errors.ts';
import { cappedSecondsSchema, secondsSchema, targetSchema, type Actor } from '../shared/model.ts';
import type { Agent, Progress } from './agent.ts';
import type { Logger } from './log.ts';

export const controlRequestSchema = z.discriminatedUnion('cmd', [
  z.strictObject({ cmd: z.literal('status'), user: z.string().optional() }),
  z.strictObject({ cmd: z.literal('history'), limit: z.number().int().positive().optional(), user: z.string().optional() }),
  z.strictObject({
    cmd: z.literal('activate'),
    target: targetSchema,
    timeoutSec: secondsSchema.optional(),
    dryRun: z.boolean().optional(),
    /** a trial boot (DESIGN §11) */
    reboot: z.boolean().optional(),
    user: z.string().optional(),
  }),
  z.strictObject({ cmd: z.literal('confirm'), id: z.string().optional(), user: z.string().optional() }),
  z.strictObject({ cmd: z.literal('rollback'), id: z.string().optional(), user: z.string().optional() }),
  z.strictObject({ cmd: z.literal('extend'), seconds: cappedSecondsSchema, id: z.string().optional(), user: z.string().optional() }),
  z.strictObject({ cmd: z.literal('revert'), id: z.string(), user: z.string().optional() }),
]);
export type ControlRequest = z.infer<typeof controlRequestSchema>;

export type { ControlLine } from './control-client.ts';
export { request } from './control-client.ts';
import type { ControlLine } from './control-client.ts';

const MAX_REQUEST = 64 * 1024;

export class ControlServer {
  private readonly server: Server;
  private readonly path: string;
  private readonly sockets: Set<Socket>;
  private constructor(server: Server, path: string, sockets: Set<Socket>) {
    this.server = server;
    this.path = path;
    this.sockets = sockets;
  }

  /** Listens on `path`; refuses to start when another agent already answers there. */
  static async listen(path: string, agent: Agent, log: Logger): Promise<ControlServer> {
    mkdirSync(dirname(path), { recursive: true, mode: 0o755 });
    if (existsSync(path)) {
      if (await answers(path)) throw new SnapbackError('busy', `another agent is already listening on ${path}`);
      unlinkSync(path);
    }
    const sockets = new Set<Socket>();
    const server = createServer((socket) => {
      sockets.add(socket);
      socket.once('close', () => sockets.delete(socket));
      serve(socket, agent, log);
    });
    // Root only: the socket is created 0600 (umask) before anyone can connect to it.
    const old = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => resolve());
      });
    } finally {
      process.umask(old);
    }
    chmodSync(path, 0o600);
    // Accepting fails with EMFILE when descriptors run out: the console is refused, the agent lives.
    server.on('error', (err) => log.error({ err: err.message }, 'accepting a console connection failed'));
    return new ControlServer(server, path, sockets);
  }

  /** Stops listening and hangs up on waiting clients (a stop must not wait for a trial). */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
    try {
      unlinkSync(this.path);
    } catch {}
  }
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function serve(socket: Socket, agent: Agent, log: Logger): void {
  let buf = '';
  let handled = false;
  const send = (line: ControlLine) => {
    if (!socket.destroyed) socket.write(JSON.stringify(line) + '\n');
  };
  socket.setEncoding('utf8');
  socket.on('error', () => socket.destroy());
  socket.on('data', (chunk: string) => {
    if (handled) return;
    buf += chunk;
    if (buf.length > MAX_REQUEST) {
      handled = true;
      send({ type: 'result', result: { ok: false, code: 'bad-request', message: 'request too large' } });
      socket.end();
      return;
    }
    const nl = buf.indexOf('\n');
    if (nl < 0) return;
    handled = true;
    handle(buf.slice(0, nl), agent, (p) => send({ type: 'progress', progress: p }))
      .then((result) => send({ type: 'result', result }))
      .catch((err: Error) => {
        log.error({ err: err.stack }, 'console request failed');
        send({ type: 'result', result: { ok: false, code: 'internal', message: err.message } });
      })
      .finally(() => socket.end());
  });
}

async function handle(line: string, agent: Agent, progress: (p: Progress) => void): Promise<unknown> {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch {
    return { ok: false, code: 'bad-request', message: 'the request is not JSON' };
  }
  const parsed = controlRequestSchema.safeParse(raw);
  if (!parsed.success) {
    return { ok: false, code: 'bad-request', message: describeIssues(parsed.error).join('; ') };
  }
  const req = parsed.data;
  const by: Actor = { who: req.user ? `console:${req.user}` : 'console', channel: 'console' };
  switch (req.cmd) {
    case 'status':
      return { ok: true, status: agent.status() };
    case 'history':
      return { ok: true, history: agent.history(req.limit) };
    case 'activate':
      if (req.dryRun) return agent.dryRun({ target: req.target, by }, progress);
      return agent.activate({ target: req.target, ...(req.timeoutSec ? { timeoutSec: req.timeoutSec } : {}), ...(req.reboot ? { reboot: true } : {}), by }, progress);
    case 'confirm':
      // Root on the box needs no token: the token proves a fresh network path, not identity.
      return agent.confirm({ ...(req.id ? { id: req.id } : {}), requireToken: false, by }, progress);
    case 'rollback':
      return agent.rollback({ ...(req.id ? { id: req.id } : {}), by }, progress);
    case 'extend':
      return agent.extend({ ...(req.id ? { id: req.id } : {}), seconds: req.seconds, by });
    case 'revert':
      return agent.rollback({ id: req.id, by: { who: 'fallback-timer', channel: 'fallback-timer' }, reason: 'fallback-timer' }, progress);
  }
}
