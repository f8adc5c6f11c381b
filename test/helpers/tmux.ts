// A real terminal for tests of the live view: a detached tmux session of a fixed size running one
// command; read what the screen shows, wait until some text appears, send keys. Each Terminal is a
// session of its own, with a name nobody else uses, killed by that name in close().

import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export function haveTmux(): string | undefined {
  return spawnSync('tmux', ['-V'], { stdio: 'ignore' }).status === 0 ? undefined : 'tmux is not installed (apt-get install tmux): skipping the tests of the live terminal view';
}

/** One shell word. */
function quote(word: string): string {
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

export class Terminal {
  readonly name: string;
  private readonly socket: string;
  private readonly statusFile: string;
  private closed = false;

  /**
   * Starts `argv` in a new detached session, `columns` × `rows`, with `env` added. When the command
   * ends the pane stays (remain-on-exit), so its last screen can still be read, and `exitStatus()` says how it ended.
   */
  constructor(argv: string[], opts: { columns?: number; rows?: number; env?: Record<string, string>; cwd?: string; before?: string } = {}) {
    this.name = `snapback-test-${process.pid}-${randomBytes(4).toString('hex')}`;
    // A server of our own (-L): no interference with the tester's tmux, nor with parallel tests.
    this.socket = this.name;
    const env = Object.entries(opts.env ?? {}).map(([k, v]) => `${k}=${quote(v)}`);
    // tmux 3.3 does not always learn a dead pane's status: the shell writes it to a file. Its trap
    // keeps it waiting through C-c (which reaches the command too: the same process group), and a
    // trapped signal is back to its default in the command it starts.
    this.statusFile = join(tmpdir(), `${this.name}.status`);
    const command = `${opts.before ? `${opts.before}; ` : ''}trap : INT; ${env.length ? `env ${env.join(' ')} ` : ''}${argv.map(quote).join(' ')}; echo $? > ${quote(this.statusFile)}`;
    this.tmux(['-f', '/dev/null', 'new-session', '-d', '-s', this.name, '-x', String(opts.columns ?? 160), '-y', String(opts.rows ?? 40), ...(opts.cwd ? ['-c', opts.cwd] : []), command]);
    this.tmux(['set-option', '-t', this.name, 'remain-on-exit', 'on']);
    if (process.env.TMUX_RAW) this.tmux(['pipe-pane', '-t', this.name, `cat >> ${process.env.TMUX_RAW}`]);
  }

  private tmux(args: string[]): string {
    return execFileSync('tmux', ['-L', this.socket, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  }

  /**
   * What the screen shows now, line by line (wrapped lines joined), trailing blanks removed, with the
   * lines scrolled off the top before it (tmux scrolls one up to say "Pane is dead").
   */
  screen(): string {
    return this.tmux(['capture-pane', '-p', '-J', '-S', '-', '-t', this.name])
      .split('\n')
      .map((l) => l.trimEnd())
      .join('\n')
      .trimEnd();
  }

  /** Polls the screen until `pattern` is on it; throws with the screen after `timeoutMs`. */
  async waitFor(pattern: RegExp, timeoutMs = 30_000): Promise<string> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const s = this.screen();
      if (pattern.test(s)) return s;
      if (Date.now() > until) throw new Error(`${pattern} did not appear within ${timeoutMs / 1000}s; the screen:\n${s}`);
      await sleep(100);
    }
  }

  /** Sends keys as tmux names them (`C-c`, `Enter`). */
  keys(...keys: string[]): void {
    this.tmux(['send-keys', '-t', this.name, ...keys]);
  }

  /** The command's exit status once it ended, else undefined. */
  exitStatus(): number | undefined {
    try {
      const text = readFileSync(this.statusFile, 'utf8');
      return text.endsWith('\n') ? Number(text) : undefined;
    } catch {
      return undefined;
    }
  }

  async waitExit(timeoutMs = 30_000): Promise<number> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const s = this.exitStatus();
      if (s !== undefined) return s;
      if (Date.now() > until) {
        const pid = this.format('#{pane_pid} #{pane_dead} #{pane_dead_status} #{pane_tty}');
        const ps = spawnSync('ps', ['-o', 'pid,ppid,stat,tty,args', '-t', pid.split(' ')[3] ?? '?'], { encoding: 'utf8' }).stdout;
        throw new Error(`the command did not end within ${timeoutMs / 1000}s (pane: ${pid}; on its tty:\n${ps}); the screen:\n${this.screen()}`);
      }
      await sleep(100);
    }
  }

  /** A format of the pane (`#{pane_title}`), or of the server (`#{buffer_size}` …). */
  format(f: string): string {
    return this.tmux(['display-message', '-p', '-t', this.name, f]).trim();
  }

  /** The paste buffers of this session's server (OSC 52 would add one). */
  buffers(): string {
    return this.tmux(['list-buffers']).trim();
  }

  /** Sets an option of the session (`set-clipboard on`: accept OSC 52 as a real terminal would). */
  option(name: string, value: string, global = false): void {
    this.tmux(['set-option', ...(global ? ['-s'] : ['-t', this.name]), name, value]);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    // Only our own session, on our own server (which then ends, having no session left).
    spawnSync('tmux', ['-L', this.socket, 'kill-session', '-t', this.name], { stdio: 'ignore' });
    rmSync(this.statusFile, { force: true });
  }
}
