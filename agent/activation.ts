// The one place that runs `switch-to-configuration`. A run is keyed (`<id>-test`, `<id>-boot`, ...)
// and leaves its exit status on disk, so an agent restarted mid-switch still learns the result.

import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export type SwitchMode = 'test' | 'boot' | 'switch' | 'dry-activate';

export interface RunResult {
  /** the exit status, or null when the run ended without one (killed, vanished) */
  exit: number | null;
}

export interface Runner {
  readonly name: 'direct' | 'systemd';
  /** Starts `TOPLEVEL/bin/switch-to-configuration MODE` and resolves when it has ended. */
  run(key: string, toplevel: string, mode: SwitchMode, onLine?: (line: string) => void): Promise<RunResult>;
  /** Waits for a run started by an earlier agent process. */
  resume(key: string, onLine?: (line: string) => void): Promise<RunResult>;
  /** Stops a run (activation timeout); its `run`/`resume` promise then resolves with exit null. */
  stop(key: string): Promise<void>;
}

const POLL_MS = 100;

/**
 * Runs the switch as a detached process group (`setsid`) wrapped in `/bin/sh`, which writes the exit
 * status to `runs/KEY/status` via rename. It survives a crash of the agent, not the agent's cgroup
 * being killed by systemd: that is what the systemd runner is for.
 */
export class DirectRunner implements Runner {
  readonly name = 'direct' as const;
  private readonly runsDir: string;
  constructor(runsDir: string) {
    this.runsDir = runsDir;
  }

  private paths(key: string) {
    const dir = join(this.runsDir, key);
    return { dir, status: join(dir, 'status'), pid: join(dir, 'pid'), log: join(dir, 'output.log') };
  }

  async run(key: string, toplevel: string, mode: SwitchMode, onLine?: (line: string) => void): Promise<RunResult> {
    const p = this.paths(key);
    mkdirSync(p.dir, { recursive: true, mode: 0o700 });
    rmSync(p.status, { force: true });
    const out = openSync(p.log, 'a', 0o600);
    const child = spawn(
      '/bin/sh',
      ['-c', '"$0" "$1" </dev/null; s=$?; echo $s > "$2.tmp" && mv "$2.tmp" "$2"', join(toplevel, 'bin', 'switch-to-configuration'), mode, p.status],
      { detached: true, stdio: ['ignore', out, out] },
    );
    closeSync(out);
    if (child.pid === undefined) {
      await new Promise((resolve) => child.once('error', resolve));
      return { exit: null };
    }
    writeFileSync(p.pid, `${child.pid}\n`, { mode: 0o600 });
    child.unref();
    return this.watch(key, onLine);
  }

  resume(key: string, onLine?: (line: string) => void): Promise<RunResult> {
    return this.watch(key, onLine);
  }

  async stop(key: string): Promise<void> {
    const pid = this.livePid(key);
    if (pid === null) return;
    try {
      process.kill(-pid, 'SIGTERM');
    } catch {}
    for (let i = 0; i < 50 && this.livePid(key) !== null; i++) await sleep(POLL_MS);
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {}
  }

  /** The wrapper's pid if it is still our wrapper (pids get reused after a reboot or long uptime). */
  private livePid(key: string): number | null {
    const p = this.paths(key);
    let pid: number;
    try {
      pid = Number(readFileSync(p.pid, 'utf8').trim());
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (!cmdline.includes(p.status)) return null;
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (/\) Z /.test(stat)) return null;
    } catch {
      return null;
    }
    return pid;
  }

  /** Polls the status file (and streams new output lines) until the run has ended. */
  private async watch(key: string, onLine?: (line: string) => void): Promise<RunResult> {
    const p = this.paths(key);
    const tail = new LogTail(p.log, onLine);
    for (;;) {
      tail.poll();
      if (existsSync(p.status)) {
        tail.poll(true);
        const text = readFileSync(p.status, 'utf8').trim();
        const exit = /^\d+$/.test(text) ? Number(text) : null;
        return { exit };
      }
      if (this.livePid(key) === null) {
        // The wrapper may have renamed the status file between our two checks.
        if (existsSync(p.status)) continue;
        tail.poll(true);
        return { exit: null };
      }
      await sleep(POLL_MS);
    }
  }
}

/** Follows a growing log file and hands out complete lines. */
export class LogTail {
  private offset = 0;
  private pending = '';
  private readonly path: string;
  private readonly onLine: ((line: string) => void) | undefined;
  constructor(path: string, onLine?: (line: string) => void) {
    this.path = path;
    this.onLine = onLine;
  }
  poll(flush = false): void {
    if (!this.onLine) return;
    let fd: number;
    try {
      fd = openSync(this.path, 'r');
    } catch {
      return;
    }
    try {
      const buf = Buffer.alloc(64 * 1024);
      for (;;) {
        const n = readSync(fd, buf, 0, buf.length, this.offset);
        if (n <= 0) break;
        this.offset += n;
        this.pending += buf.subarray(0, n).toString('utf8');
      }
    } finally {
      closeSync(fd);
    }
    const lines = this.pending.split('\n');
    this.pending = lines.pop() ?? '';
    for (const line of lines) this.onLine(line);
    if (flush && this.pending) {
      this.onLine(this.pending);
      this.pending = '';
    }
  }
}
