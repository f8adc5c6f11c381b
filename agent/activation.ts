// The one place that runs `switch-to-configuration`. A run is keyed (`activate-<id>`, `boot-<id>`, ...)
// and its files exist before it starts, so an agent killed at any instant still finds it and its result.

import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, watch, writeFileSync, writeSync, type FSWatcher } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { run } from '../shared/exec.ts';
import { failpoint } from './failpoint.ts';

export type SwitchMode = 'test' | 'boot' | 'switch' | 'dry-activate';

export interface RunResult {
  /** the exit status, or null when the run ended without one (killed, vanished, never started) */
  exit: number | null;
  /** it ran past `RunOptions.timeoutSec` and was stopped */
  timedOut?: boolean;
}

export interface RunOptions {
  /** stop the run when it takes longer (a hung switch must not keep a deployment from ending) */
  timeoutSec?: number;
  /** send the switch's output nowhere instead of `output.log` (a full state directory: a write error must not fail a revert) */
  discardOutput?: boolean;
}

export interface Runner {
  readonly name: 'direct' | 'systemd';
  /**
   * Creates the run's files (`pid`, `status` and `output.log` in `runs/KEY/`) ahead of time. A run
   * prepared while the disk had room needs no new file and no new block to start and to end.
   */
  prepare(key: string): void;
  /** Starts `TOPLEVEL/bin/switch-to-configuration MODE` and resolves when it has ended. */
  run(key: string, toplevel: string, mode: SwitchMode, onLine?: (line: string) => void, options?: RunOptions): Promise<RunResult>;
  /** Waits for a run started by an earlier agent process (exit null if it never started). */
  resume(key: string, onLine?: (line: string) => void, timeoutSec?: number): Promise<RunResult>;
  /** The recorded result of a run that has ended, or undefined (never ran, or still running). */
  finished(key: string): Promise<RunResult | undefined>;
  /** Whether the run is going on now (started by this agent process or an earlier one). */
  running(key: string): Promise<boolean>;
  /** Stops a run (activation timeout); its `run`/`resume` promise then resolves with exit null. */
  stop(key: string): Promise<void>;
}

const POLL_MS = 100;
/** How often a waiting runner asks whether the run is still alive (the status file is polled faster). */
const ALIVE_EVERY = 10;
/**
 * `pid` and `status` hold this many bytes from the start and are overwritten in place, never
 * truncated or renamed: ending a run allocates nothing, and a reader tells an unwritten record
 * (blank) from a written one (which ends in ` end`).
 */
const RECORD_BYTES = 64;
const BLANK = ' '.repeat(RECORD_BYTES - 1) + '\n';

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

  protected abstract start(key: string, switchBin: string, mode: SwitchMode, options: RunOptions): Promise<boolean>;
  protected abstract alive(key: string): Promise<boolean>;
  abstract stop(key: string): Promise<void>;

  running(key: string): Promise<boolean> {
    return this.alive(key);
  }

  prepare(key: string): void {
    const p = this.paths(key);
    mkdirSync(p.dir, { recursive: true, mode: 0o700 });
    blank(p.pid);
    blank(p.status);
    closeSync(openSync(p.log, 'a', 0o600));
  }

  async run(key: string, toplevel: string, mode: SwitchMode, onLine?: (line: string) => void, options: RunOptions = {}): Promise<RunResult> {
    // Still running from before a restart of the agent (a revert it resumes): wait for that run
    // rather than start the switch a second time beside it.
    if (await this.alive(key)) return this.watch(key, onLine, options.timeoutSec);
    this.prepare(key);
    if (!(await this.start(key, join(toplevel, 'bin', 'switch-to-configuration'), mode, options))) return { exit: null };
    failpoint(`spawned:${key.replace(/-\d{8}-\d{6}-[0-9a-f]+$/, '')}`);
    return this.watch(key, onLine, options.timeoutSec);
  }

  resume(key: string, onLine?: (line: string) => void, timeoutSec?: number): Promise<RunResult> {
    return this.watch(key, onLine, timeoutSec);
  }

  async finished(key: string): Promise<RunResult | undefined> {
    const exit = readRecord(this.paths(key).status);
    if (exit === undefined || (await this.alive(key))) return undefined;
    return { exit: parseStatus(exit) };
  }

  /**
   * Reads the status file (and streams new output lines) until the run has ended: at once when the
   * run directory changes (inotify), else every POLL_MS.
   */
  private async watch(key: string, onLine?: (line: string) => void, timeoutSec?: number): Promise<RunResult> {
    const p = this.paths(key);
    const changes = new Changes(p.dir);
    try {
      return await this.watchRun(key, p, changes, onLine, timeoutSec);
    } finally {
      changes.close();
    }
  }

  private async watchRun(key: string, p: ReturnType<StatusFileRunner['paths']>, changes: Changes, onLine?: (line: string) => void, timeoutSec?: number): Promise<RunResult> {
    const tail = new LogTail(p.log, onLine);
    const deadline = timeoutSec === undefined ? Infinity : Date.now() + timeoutSec * 1000;
    let stopping: Promise<void> | undefined;
    for (let i = 0; ; i++) {
      tail.poll();
      if (!stopping && Date.now() >= deadline) stopping = this.stop(key).catch(() => undefined);
      if (stopping) {
        await stopping;
        if (!(await this.alive(key))) {
          tail.poll(true);
          return { exit: null, timedOut: true };
        }
      }
      const status = readRecord(p.status);
      // The record is written last, just before the run's process ends: trust it once that process is gone.
      if (status !== undefined && !(await this.alive(key))) {
        tail.poll(true);
        return { exit: parseStatus(status) };
      }
      if (status === undefined && i % ALIVE_EVERY === 0 && !(await this.alive(key))) {
        // The run may have written its status between our two checks.
        if (readRecord(p.status) !== undefined) continue;
        tail.poll(true);
        return { exit: null };
      }
      // The status is written just before the run's process ends: look again very soon.
      await changes.next(status !== undefined ? 2 : POLL_MS);
    }
  }
}

/** Changes in a directory (inotify), to wait on; without inotify (out of watches), plain timeouts. */
class Changes {
  private watcher: FSWatcher | undefined;
  private wake: (() => void) | undefined;
  private changed = false;

  constructor(dir: string) {
    try {
      this.watcher = watch(dir, () => {
        this.changed = true;
        this.wake?.();
      });
      this.watcher.on('error', () => this.close());
    } catch {
      this.watcher = undefined;
    }
  }

  /** Resolves at the next change (or one since the last call), or after `ms`. */
  next(ms: number): Promise<void> {
    if (this.changed) {
      this.changed = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const finish = () => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
      const timer = setTimeout(finish, ms);
      this.wake = () => {
        this.changed = false;
        finish();
      };
    });
  }

  close(): void {
    this.watcher?.close();
    this.watcher = undefined;
  }
}

/** Writes the blank record in place (creating the file if needed). */
function blank(path: string): void {
  let fd: number;
  try {
    fd = openSync(path, 'r+');
  } catch {
    fd = openSync(path, 'w', 0o600);
  }
  try {
    writeSync(fd, BLANK, 0);
  } finally {
    closeSync(fd);
  }
}

/** The text of a written record without its ` end` marker, or undefined while it is blank, torn or missing. */
function readRecord(path: string): string | undefined {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    // Only a missing record means "not written"; EMFILE and the like must not pass for an answer.
    if (['ENOENT', 'ENOTDIR'].includes((err as NodeJS.ErrnoException).code ?? '')) return undefined;
    throw err;
  }
  const m = /^([^]*?)\s+end\s*$/.exec(text);
  return m && m[1]!.trim() ? m[1]!.trim() : undefined;
}

/** `3` (direct) or `exit-code exited 3` / `signal killed 9`, one per line (systemd's ExecStopPost variables). */
export function parseStatus(text: string): number | null {
  const t = text.trim();
  if (/^\d+$/.test(t)) return Number(t);
  const [, code, status] = t.split(/\s+/);
  return code === 'exited' && /^\d+$/.test(status ?? '') ? Number(status) : null;
}

/**
 * Runs the switch as a detached process group (`setsid`) wrapped in `/bin/sh`, which records its
 * own pid first and the exit status last, both in place. It survives a crash of the agent, not the
 * agent's cgroup being killed by systemd: that is what the systemd runner is for.
 */
export class DirectRunner extends StatusFileRunner {
  readonly name = 'direct' as const;

  protected async start(key: string, switchBin: string, mode: SwitchMode, options: RunOptions): Promise<boolean> {
    const p = this.paths(key);
    // $2 (the run directory) in its command line also lets a restarted agent find the wrapper in
    // /proc before it has written its pid.
    const script = 'printf "%s end\\n" $$ 1<>"$2/pid"; "$0" "$1" </dev/null >>"$3" 2>&1; s=$?; printf "%s end\\n" $s 1<>"$2/status"';
    const child = spawn('/bin/sh', ['-c', script, switchBin, mode, p.dir, options.discardOutput ? '/dev/null' : p.log], {
      detached: true,
      stdio: 'ignore',
    });
    if (child.pid === undefined) {
      // Not started at all (EMFILE, EAGAIN…): an error the caller may retry, not a run that ended.
      throw await new Promise<Error>((resolve) => child.once('error', resolve));
    }
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

  /**
   * The wrapper's pid if it still runs: from its own record, else (killed between spawn and that
   * record) by its command line, which names the run directory. Pids get reused: check both.
   */
  private livePid(key: string): number | null {
    const p = this.paths(key);
    const recorded = Number(readRecord(p.pid));
    if (recorded > 0) return isWrapper(recorded, p.dir) ? recorded : null;
    if (!existsSync(p.dir)) return null;
    for (const name of readdirSync('/proc')) {
      if (/^\d+$/.test(name) && isWrapper(Number(name), p.dir)) return Number(name);
    }
    return null;
  }
}

function isWrapper(pid: number, runDir: string): boolean {
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    if (argv[0] !== '/bin/sh' || argv[5] !== runDir) return false;
    return !/\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch (err) {
    // Gone is gone; out of descriptors is no answer, and a run taken for dead would be run twice.
    if (['ENOENT', 'ESRCH'].includes((err as NodeJS.ErrnoException).code ?? '')) return false;
    throw err;
  }
}

/**
 * Runs the switch in a transient unit owned by PID 1, like nixos-rebuild does, so that the switch
 * restarting snapback-agent.service neither kills it nor loses its result: `ExecStopPost` writes
 * SERVICE_RESULT, EXIT_CODE and EXIT_STATUS to the status file, never through a pipe to the agent.
 * The unit's name is the run's record: systemd knows it from the moment systemd-run asked for it.
 */
export class SystemdRunner extends StatusFileRunner {
  readonly name = 'systemd' as const;

  static unit(key: string): string {
    return `snapback-${key}.service`;
  }

  protected async start(key: string, switchBin: string, mode: SwitchMode, options: RunOptions): Promise<boolean> {
    const p = this.paths(key);
    const unit = SystemdRunner.unit(key);
    // A unit of the same name from an earlier attempt (a resumed revert) must not block this one.
    await run('systemctl', ['reset-failed', unit]);
    // Nothing but words in the property: systemd re-parses transient units on daemon-reload (which a
    // switch does), and neither its escaping of "$$" nor a ";" survives that. printenv needs no "$",
    // and prints the `end` marker from the unit's environment last. `1<>` writes in place.
    const record = `/bin/sh -c 'printenv SERVICE_RESULT EXIT_CODE EXIT_STATUS SNAPBACK_RECORD_END 1<> ${p.status}'`;
    // Without the log (a full state directory), the output goes to the journal.
    const output = options.discardOutput ? [] : ['-p', `StandardOutput=append:${p.log}`, '-p', `StandardError=append:${p.log}`];
    const r = await run(
      'systemd-run',
      [
        `--unit=${unit}`,
        '--service-type=exec',
        '--collect',
        '--quiet',
        '--no-ask-password',
        // The agent's PATH (on NixOS: the unit's `path`), for ExecStopPost's printenv;
        // a transient unit's default PATH names directories NixOS does not have.
        '-E', 'PATH',
        '-E', 'LOCALE_ARCHIVE',
        '-E', 'NIXOS_INSTALL_BOOTLOADER',
        '-p', 'Environment=SNAPBACK_RECORD_END=end',
        ...output,
        '-p', `ExecStopPost=${record}`,
        switchBin,
        mode,
      ],
    );
    // systemd-run itself did not start (EMFILE, EAGAIN…): retryable, unlike systemd refusing the unit.
    if (r.exitCode === undefined) throw new Error(`systemd-run: ${r.signal ? `killed by ${r.signal}` : r.stderr.trim()}`);
    if (r.exitCode !== 0) {
      try {
        writeFileSync(p.log, `systemd-run failed: ${String(r.stderr).trim()}\n`, { flag: 'a' });
      } catch {}
      return false;
    }
    return true;
  }

  /**
   * Only systemd's own "inactive" or "failed" means the run has ended: a bus that does not answer
   * (a daemon-reload or re-exec in progress) is asked again, and never taken for an ended run.
   */
  protected async alive(key: string): Promise<boolean> {
    for (let i = 0; i < 10; i++) {
      const r = await run('systemctl', ['is-active', SystemdRunner.unit(key)]);
      const state = String(r.stdout).trim();
      if (state === 'inactive' || state === 'failed') return false;
      if (['active', 'activating', 'deactivating', 'reloading', 'refreshing'].includes(state)) return true;
      await sleep(200);
    }
    return true;
  }

  async stop(key: string): Promise<void> {
    await run('systemctl', ['stop', SystemdRunner.unit(key)]);
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
