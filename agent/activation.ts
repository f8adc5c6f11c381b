// The one place that runs `switch-to-configuration`. A run is keyed (`activate-<id>`, `boot-<id>`, ...
// and leaves its exit status on disk, so an agent restarted mid-switch still learns the result.

import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';

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
/** How often a waiting runner asks whether the run is still alive (the status file is polled faster). */
const ALIVE_EVERY = 10;

/**
 * Both runners leave `runs/KEY/status` behind when the switch ends, and `output.log` as it runs;
 * they differ in how the switch is started, stopped and checked for life.
 */
abstract class StatusFileRunner implements Runner {
  abstract readonly name: 'direct' | 'systemd';
  protected readonly runsDir: string;
  constructor(runsDir: string) {
    this.runsDir = runsDir;
  }

  protected paths(key: string) {
    const dir = join(this.runsDir, key);
    return { dir, status: join(dir, 'status'), pid: join(dir, 'pid'), log: join(dir, 'output.log') };
  }

  protected abstract start(key: string, switchBin: string, mode: SwitchMode): Promise<boolean>;
  protected abstract alive(key: string): Promise<boolean>;
  abstract stop(key: string): Promise<void>;

  async run(key: string, toplevel: string, mode: SwitchMode, onLine?: (line: string) => void): Promise<RunResult> {
    const p = this.paths(key);
    // Still running from before a restart of the agent (a revert it resumes): wait for that run
    // rather than start the switch a second time beside it.
    if (await this.alive(key)) return this.watch(key, onLine);
    mkdirSync(p.dir, { recursive: true, mode: 0o700 });
    rmSync(p.status, { force: true });
    if (!(await this.start(key, join(toplevel, 'bin', 'switch-to-configuration'), mode))) return { exit: null };
    return this.watch(key, onLine);
  }

  resume(key: string, onLine?: (line: string) => void): Promise<RunResult> {
    return this.watch(key, onLine);
  }

  /** Polls the status file (and streams new output lines) until the run has ended. */
  private async watch(key: string, onLine?: (line: string) => void): Promise<RunResult> {
    const p = this.paths(key);
    const tail = new LogTail(p.log, onLine);
    for (let i = 0; ; i++) {
      tail.poll();
      if (existsSync(p.status)) {
        tail.poll(true);
        return { exit: parseStatus(readFileSync(p.status, 'utf8')) };
      }
      if (i % ALIVE_EVERY === 0 && !(await this.alive(key))) {
        // The run may have written its status between our two checks.
        if (existsSync(p.status)) continue;
        tail.poll(true);
        return { exit: null };
      }
      await sleep(POLL_MS);
    }
  }
}

/** `3` (direct) or `exit-code exited 3` / `signal killed 9`, one per line (systemd's ExecStopPost variables). */
export function parseStatus(text: string): number | null {
  const t = text.trim();
  if (/^\d+$/.test(t)) return Number(t);
  const [, code, status] = t.split(/\s+/);
  return code === 'exited' && /^\d+$/.test(status ?? '') ? Number(status) : null;
}

/**
 * Runs the switch as a detached process group (`setsid`) wrapped in `/bin/sh`, which writes the exit
 * status via rename. It survives a crash of the agent, not the agent's cgroup being killed by
 * systemd: that is what the systemd runner is for.
 */
export class DirectRunner extends StatusFileRunner {
  readonly name = 'direct' as const;

  protected async start(key: string, switchBin: string, mode: SwitchMode): Promise<boolean> {
    const p = this.paths(key);
    const out = openSync(p.log, 'a', 0o600);
    const child = spawn('/bin/sh', ['-c', '"$0" "$1" </dev/null; s=$?; echo $s > "$2.tmp" && mv "$2.tmp" "$2"', switchBin, mode, p.status], {
      detached: true,
      stdio: ['ignore', out, out],
    });
    closeSync(out);
    if (child.pid === undefined) {
      await new Promise((resolve) => child.once('error', resolve));
      return false;
    }
    writeFileSync(p.pid, `${child.pid}\n`, { mode: 0o600 });
    child.unref();
    return true;
  }

  protected async alive(key: string): Promise<boolean> {
    return this.livePid(key) !== null;
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
}

/**
 * Runs the switch in a transient unit owned by PID 1, like nixos-rebuild does, so that the switch
 * restarting snapback-agent.service neither kills it nor loses its result: `ExecStopPost` writes
 * SERVICE_RESULT, EXIT_CODE and EXIT_STATUS to the status file, never through a pipe to the agent.
 */
export class SystemdRunner extends StatusFileRunner {
  readonly name = 'systemd' as const;

  static unit(key: string): string {
    return `snapback-${key}.service`;
  }

  protected async start(key: string, switchBin: string, mode: SwitchMode): Promise<boolean> {
    const p = this.paths(key);
    const unit = SystemdRunner.unit(key);
    // A unit of the same name from an earlier attempt (a resumed revert) must not block this one.
    await execa('systemctl', ['reset-failed', unit], { reject: false });
    // No "$" in the property: systemd re-parses transient units on daemon-reload (which a switch
    // does), and its escaping of "$$" does not survive that. printenv needs none.
    const record = `/bin/sh -c 'printenv SERVICE_RESULT EXIT_CODE EXIT_STATUS > ${p.status}.tmp && mv ${p.status}.tmp ${p.status}'`;
    const r = await execa(
      'systemd-run',
      [
        `--unit=${unit}`,
        '--service-type=exec',
        '--collect',
        '--quiet',
        '--no-ask-password',
        // The agent's PATH (on NixOS: the unit's `path`), for ExecStopPost's printenv and mv;
        // a transient unit's default PATH names directories NixOS does not have.
        '-E', 'PATH',
        '-E', 'LOCALE_ARCHIVE',
        '-E', 'NIXOS_INSTALL_BOOTLOADER',
        '-p', `StandardOutput=append:${p.log}`,
        '-p', `StandardError=append:${p.log}`,
        '-p', `ExecStopPost=${record}`,
        switchBin,
        mode,
      ],
      { reject: false, stdin: 'ignore' },
    );
    if (r.exitCode !== 0) {
      writeFileSync(p.log, `systemd-run failed: ${String(r.stderr).trim()}\n`, { flag: 'a' });
      return false;
    }
    return true;
  }

  protected async alive(key: string): Promise<boolean> {
    const r = await execa('systemctl', ['is-active', SystemdRunner.unit(key)], { reject: false });
    return ['active', 'activating', 'deactivating', 'reloading'].includes(String(r.stdout).trim());
  }

  async stop(key: string): Promise<void> {
    await execa('systemctl', ['stop', SystemdRunner.unit(key)], { reject: false });
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
