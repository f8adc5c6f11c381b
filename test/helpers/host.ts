// A scratch "host" for integration tests: its own profile, current-system link, boot id, state
// directory and control socket under a temp dir, and a real `snapback-agent serve` process.

import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, realpathSync, rmSync, symlinkSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildToplevel, type Behaviour } from './nix.ts';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const AGENT_BIN = join(ROOT, 'bin', 'snapback-agent.js');
export const CONTROLLER_BIN = join(ROOT, 'bin', 'snapback.js');

export type LogLine = { level: number; msg: string; [k: string]: unknown };

export class ScratchHost {
  readonly dir: string;
  readonly configPath: string;
  readonly calls: string;
  readonly current: string;
  readonly profile: string;
  readonly stateDir: string;
  readonly bootIdFile: string;
  gen1!: string;
  config: Record<string, unknown>;
  agent: ChildProcess | undefined;
  private lines: LogLine[] = [];
  private waiters = new Set<() => void>();

  constructor(name = 'host', config: Record<string, unknown> = {}) {
    this.dir = mkdtempSync(join(tmpdir(), `snapback-${name}-`));
    this.calls = join(this.dir, 'calls.log');
    this.current = join(this.dir, 'current-system');
    this.profile = join(this.dir, 'profiles', 'system');
    this.stateDir = join(this.dir, 'state');
    this.bootIdFile = join(this.dir, 'boot_id');
    this.configPath = join(this.dir, 'agent.json');
    mkdirSync(join(this.dir, 'profiles'));
    writeFileSync(this.calls, '');
    writeFileSync(this.bootIdFile, randomUUID() + '\n');
    this.config = {
      stateDir: this.stateDir,
      controlSocket: join(this.dir, 'control.sock'),
      hostKey: join(this.dir, 'ssh_host_ed25519_key'),
      system: { profile: this.profile, currentSystem: this.current, runner: 'direct', bootIdFile: this.bootIdFile, switchLock: join(this.dir, 'stc.lock') },
      confirm: { defaultTimeoutSec: 30, minTimeoutSec: 1, maxTimeoutSec: 600, activationTimeoutSec: 30 },
      log: { level: 'debug' },
      ...config,
    };
    this.writeConfig();
  }

  writeConfig(patch: Record<string, unknown> = {}): void {
    this.config = { ...this.config, ...patch };
    writeFileSync(this.configPath, JSON.stringify(this.config, null, 2));
  }

  /** The "installed" system: generation 1 of the profile, and running. */
  install(b: Behaviour = {}): this {
    this.gen1 = this.toplevel('gen1', b);
    execFileSync('nix-env', ['-p', this.profile, '--set', this.gen1], { stdio: 'ignore' });
    symlinkSync(this.gen1, this.current);
    return this;
  }

  toplevel(name: string, b: Behaviour = {}): string {
    return buildToplevel(join(this.dir, 'nix'), name, this.calls, this.current, b);
  }

  // ---- the agent process ----------------------------------------------------------------------

  /**
   * Starts `snapback-agent serve`. `failpoints` makes it kill itself at those instants (agent/failpoint.ts);
   * `wrap` runs it under another program (strace with fault injection).
   */
  async start(opts: { failpoints?: string[]; wrap?: string[] } = {}): Promise<void> {
    this.lines = [];
    const argv = [process.execPath, AGENT_BIN, 'serve', '--config', this.configPath];
    const [cmd, ...args] = [...(opts.wrap ?? []), ...argv] as [string, ...string[]];
    const env = { ...process.env, SNAPBACK_FAILPOINTS: (opts.failpoints ?? []).join(',') };
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    this.agent = child;
    let buf = '';
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          this.lines.push(JSON.parse(line) as LogLine);
        } catch {
          this.lines.push({ level: 30, msg: line });
        }
        for (const w of this.waiters) w();
      }
    });
    let stderr = '';
    child.stderr!.on('data', (c) => (stderr += c));
    const exited = new Promise<never>((_, reject) => child.once('exit', (code) => reject(new Error(`agent exited ${code} before serving: ${stderr}`))));
    await Promise.race([this.waitLog((l) => l.msg === 'snapback-agent serving', 20_000), exited]);
  }

  /** Resolves with the first log line (past or future) matching `pred`. */
  waitLog(pred: (l: LogLine) => boolean, timeoutMs = 30_000): Promise<LogLine> {
    const found = this.lines.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const check = () => {
        const hit = this.lines.find(pred);
        if (hit) {
          cleanup();
          resolve(hit);
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`timed out waiting for a log line; saw:\n${this.lines.map((l) => `  ${l.msg}`).join('\n')}`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      this.waiters.add(check);
    });
  }

  /** Waits until the agent logs the end of deployment `id`. */
  waitOutcome(id: string, timeoutMs = 30_000): Promise<LogLine> {
    return this.waitLog((l) => l.msg.startsWith(`deployment ${id} `) && /^deployment \S+ (confirmed|reverted|failed|stuck)/.test(l.msg), timeoutMs);
  }

  logs(): LogLine[] {
    return this.lines;
  }

  /** Resolves when the agent process has exited on its own (a fault injected into it). */
  async exited(timeoutMs = 30_000): Promise<void> {
    const child = this.agent;
    if (!child) return;
    if (child.exitCode === null && child.signalCode === null) {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('the agent did not exit')), timeoutMs);
        child.once('exit', () => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    this.agent = undefined;
  }

  async kill9(): Promise<void> {
    const child = this.agent;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await gone;
    this.agent = undefined;
  }

  async stop(): Promise<void> {
    const child = this.agent;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await gone;
    this.agent = undefined;
  }

  /** Power loss: the agent dies, the boot id changes, the bootloader boots the profile's generation. */
  async reboot(): Promise<void> {
    await this.kill9();
    writeFileSync(this.bootIdFile, randomUUID() + '\n');
    rmSync(this.current, { force: true });
    symlinkSync(realpathSync(this.profile), this.current);
  }

  // ---- the network side ------------------------------------------------------------------------

  /** Host key, an operator key `op`, the agent listening on loopback with `op` authorized. */
  enableWire(extra: Record<string, unknown> = {}): this {
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'root@scratch', '-f', join(this.dir, 'ssh_host_ed25519_key')]);
    this.operatorKey('op');
    this.writeConfig({ listen: { host: '127.0.0.1', port: 0 }, authorizedKeys: [this.publicKey('op')], ...extra });
    return this;
  }

  /** Makes an ssh-ed25519 key pair `dir/NAME` (optionally with a passphrase) and returns its path. */
  operatorKey(name: string, passphrase = ''): string {
    const path = join(this.dir, name);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', passphrase, '-C', `${name}@test`, '-f', path]);
    return path;
  }

  publicKey(name: string): string {
    return readFileSync(join(this.dir, `${name}.pub`), 'utf8').trim();
  }

  get hostPublicKey(): string {
    return readFileSync(join(this.dir, 'ssh_host_ed25519_key.pub'), 'utf8').trim();
  }

  /** The port the agent listens on (from its log). */
  async port(): Promise<number> {
    const l = await this.waitLog((x) => typeof x.port === 'number');
    return l.port as number;
  }

  /** Writes a fleet file with host `web1` pointing at this agent (or `url`); returns its path. */
  async fleet(host: Record<string, unknown> = {}, top: Record<string, unknown> = {}): Promise<string> {
    const path = join(this.dir, 'snapback.json');
    const fleet = {
      identity: { sshKey: join(this.dir, 'op') },
      ...top,
      hosts: { web1: { url: `ws://127.0.0.1:${await this.port()}`, hostKey: this.hostPublicKey, ...host } },
    };
    writeFileSync(path, JSON.stringify(fleet, null, 2));
    return path;
  }

  /** Runs the controller `snapback ARGS` (see runController). */
  snapback(args: string[], opts: ControllerOptions = {}): Promise<ControllerRun> {
    return runController(args, opts);
  }

  // ---- the console ------------------------------------------------------------------------------

  /** Runs `snapback-agent ARGS --config … --json` and parses its JSON output. */
  cli(args: string[], opts: { json?: boolean } = {}): Promise<{ code: number; out: any; stdout: string; stderr: string }> {
    const json = opts.json ?? true;
    return new Promise((resolve) => {
      const child = spawn(process.execPath, [AGENT_BIN, ...args, '--config', this.configPath, ...(json ? ['--json'] : [])], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (c) => (stdout += c));
      child.stderr.on('data', (c) => (stderr += c));
      child.on('exit', (code) => {
        let out: unknown;
        try {
          out = json ? JSON.parse(stdout) : undefined;
        } catch {}
        resolve({ code: code ?? -1, out, stdout, stderr });
      });
    });
  }

  // ---- what happened on the "host" ------------------------------------------------------------

  /** `switch-to-configuration` calls as `[toplevel, mode]`. */
  switchCalls(): [string, string][] {
    return readFileSync(this.calls, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => l.split(' ') as [string, string]);
  }

  running(): string {
    return realpathSync(this.current);
  }

  generations(): number[] {
    return readdirSync(join(this.dir, 'profiles'))
      .map((f) => /^system-(\d+)-link$/.exec(f)?.[1])
      .filter((n): n is string => !!n)
      .map(Number)
      .sort((a, b) => a - b);
  }

  bootDefault(): string {
    return realpathSync(this.profile);
  }

  history(): any[] {
    try {
      return readFileSync(join(this.stateDir, 'history.jsonl'), 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l));
    } catch {
      return [];
    }
  }

  async cleanup(): Promise<void> {
    await this.kill9();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Polls `cond` every 20 ms until it holds. */
export function waitFor(cond: () => boolean, timeoutMs = 20_000): Promise<void> {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const tick = () => {
      if (cond()) return resolve();
      if (Date.now() - start > timeoutMs) return reject(new Error('condition not met in time'));
      setTimeout(tick, 20);
    };
    tick();
  });
}

export interface ControllerOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  json?: boolean;
  onSpawn?: (c: ChildProcess) => void;
}
export interface ControllerRun {
  code: number;
  events: any[];
  result: any;
  stdout: string;
  stderr: string;
}

/** Runs the controller `snapback ARGS`; `--json` output is parsed into events and the result. */
export function runController(args: string[], opts: ControllerOptions = {}): Promise<ControllerRun> {
  const json = opts.json ?? true;
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CONTROLLER_BIN, ...args, ...(json ? ['--json'] : [])], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, SSH_AUTH_SOCK: '', ...opts.env },
      ...(opts.cwd ? { cwd: opts.cwd } : {}),
    });
    opts.onSpawn?.(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    child.on('exit', (code, signal) => {
      const lines = json
        ? stdout
            .split('\n')
            .filter(Boolean)
            .map((l) => {
              try {
                return JSON.parse(l);
              } catch {
                return { unparsed: l };
              }
            })
        : [];
      resolve({ code: code ?? (signal ? 128 : -1), events: lines.filter((l) => l.type === 'event'), result: lines.find((l) => l.type !== 'event'), stdout, stderr });
    });
  });
}
