// Running commands. Commands that simply run to their end (Nix queries, systemctl, systemd-run,
// flock, nix-env) go through `run`, on Node's own child_process; execa serves the ones with a
// timeout or a cancellation (health checks, the controller's probes) and is imported at its first
// use: loading it costs about 20 MiB and 70 ms (measured, README "Performance"), which an idle
// agent, a deployment and a quick CLI command should not pay.

import { spawn } from 'node:child_process';
import type { execa as Execa } from 'execa';

export interface RunResult {
  /** undefined when the command could not start or was killed by a signal */
  exitCode: number | undefined;
  signal: NodeJS.Signals | undefined;
  stdout: string;
  stderr: string;
}

/** Runs `cmd args` to its end, stdin from `input` (else none); never throws for a failure of the command. */
export function run(cmd: string, args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'], ...(opts.env ? { env: opts.env } : {}) });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let failed: Error | undefined;
    const done = (code: number | null, signal: NodeJS.Signals | null) =>
      resolve({
        // Not started at all (ENOENT, EMFILE…): no exit status, as with a signal.
        exitCode: failed ? undefined : (code ?? undefined),
        signal: signal ?? undefined,
        stdout: Buffer.concat(out).toString(),
        stderr: Buffer.concat(err).toString() + (failed ? `${failed.message}\n` : ''),
      });
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
  // A failed import (out of file descriptors, say) is tried again at the next use.
  return (execa ??= import('execa').then(
    (m) => m.execa,
    (err: Error) => {
      execa = undefined;
      throw err;
    },
  ));
}
