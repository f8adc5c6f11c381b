// The console's side of the control socket: one request, its progress lines, its result. Without
// the schemas (agent/control.ts checks requests where they arrive), so that a console command
// loads no more than it needs.

import { createConnection } from 'node:net';
import { SnapbackError } from '../shared/errors.ts';
import type { Progress, Result } from './agent.ts';
import type { ControlRequest } from './control.ts';

export type ControlLine = { type: 'progress'; progress: Progress } | { type: 'result'; result: unknown };

/** Sends one request; calls `onProgress` per progress line; resolves with the result line. */
export function request(path: string, req: ControlRequest, onProgress?: (p: Progress) => void): Promise<Result & Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path);
    let buf = '';
    let result: (Result & Record<string, unknown>) | undefined;
    socket.setEncoding('utf8');
    socket.once('connect', () => socket.write(JSON.stringify(req) + '\n'));
    socket.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = JSON.parse(buf.slice(0, nl)) as ControlLine;
        buf = buf.slice(nl + 1);
        if (line.type === 'progress') onProgress?.(line.progress);
        else result = line.result as Result & Record<string, unknown>;
      }
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      // The socket is root's (0600): a refusal means the wrong user, not an agent that is down.
      if (err.code === 'EACCES' || err.code === 'EPERM') {
        reject(new SnapbackError('unauthorized', `cannot talk to the agent at ${path}: the console must run as root (try sudo)`));
      } else {
        reject(new SnapbackError('unreachable', `cannot reach the agent at ${path}: ${err.code ?? err.message} (is snapback-agent serve running?)`));
      }
    });
    socket.once('close', () => {
      if (result) resolve(result);
      else reject(new SnapbackError('unreachable', `the agent at ${path} hung up without an answer (was it restarted? see: snapback-agent status)`));
    });
  });
}
