// Running commands. The agent's (Nix, systemctl, systemd-run, flock, nix-env, health checks with
// their timeout) go through `run`, on Node's own child_process; execa serves the controller's probes
// (timeouts and cancellation) and is imported at its first use: loading it costs about 20 MiB and
// 70 ms (measured, README "Performance"), which an agent and a quick command should not pay, and a
// failed import of it (out of descriptors) would stay failed for the life of the process.

import { spawn } from 'node:child_process';
import type { execa as Execa } from 'execa';

export interface RunResult {
  /** undefined when the command could not start or was killed by a signal */
  exitCode: number | undefined;
  signal: NodeJS.Signals | undefined;
  stdout: string;
  stderr: string;
  /** killed at `timeoutMs` */
  timedOut?: boolean;
}

/**
 * Runs `cmd args` to its end, stdin from `input` (else none); never throws for a failure of the
 * command. `timeoutMs`: the command runs in a process group of its own, which is killed then
 * (whatever it started too), and the result says `timedOut`.
 */
export function run(cmd: string, args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const timed = opts.timeoutMs !== undefined;
    const child = spawn(cmd, args, { stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'], detached: timed, ...(opts.env ? { env: opts.env } : {}) });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let failed: Error | undefined;
    let timedOut = false;
    let ended = false;
    const timer = timed
      ? setTimeout(() => {
          timedOut = true;
          try {
            process.kill(-child.pid!, 'SIGKILL');
          } catch {}
          // A descendant that left the group may hold the pipes open: the answer does not wait for it.
          setTimeout(() => done(null, 'SIGKILL'), 1000).unref();
        }, opts.timeoutMs)
      : undefined;
    const done = (code: number | null, signal: NodeJS.Signals | null) => {
      if (ended) return;
      ended = true;
      clearTimeout(timer);
      resolve({
        ...(timedOut ? { timedOut } : {}),
        // Not started at all (ENOENT, EMFILE…): no exit status, as with a signal.
        exitCode: failed ? undefined : (code ?? undefined),
        signal: signal ?? undefined,
        stdout: Buffer.concat(out).toString(),
        stderr: Buffer.concat(err).toString() + (failed ? `${failed.message}\n` : ''),
      });
    };
    // First, or an error of the spawn itself would be thrown out of the event loop. Out of
    // descriptors (EMFILE), Node makes no pipes and emits no 'close': the error is the end.
    child.on('error', (e) => {
      failed = e;
      if (!child.stdout) done(null, null);
    });
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => err.push(d));
    if (opts.input !== undefined) child.stdin?.on('error', () => {}).end(opts.input);
    child.on('close', done);
  });
}

let execa: Promise<typeof Execa> | undefined;

/** execa, imported at its first use. */
export function loadExeca(): Promise<typeof Execa> {
  // A failed import is not kept here, but Node keeps the failure of a CommonJS file execa needs
  // (out of descriptors, say) for the life of the process: one reason the agent does without it.
  return (execa ??= import('execa').then(
    (m) => m.execa,
    (err: Error) => {
      execa = undefined;
      throw err;
    },
  ));
}
