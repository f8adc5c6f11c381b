// A scratch "host" for integration tests: its own profile, current-system link, boot id, state
// directory and control socket under a temp dir, and a real `snapback-agent serve` process.
// With ownStore() the host also has its own Nix store, apart from the operator's (the test process's).

import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readdirSync, realpathSync, rmSync, symlinkSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';
import { fileURLToPath } from 'node:url';
import { NIX_CONFIG, buildToplevel, haveNix, runHere, type Behaviour, type Runner } from './nix.ts';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
/** Where the commands are: the checkout's, or a compiled copy's (the bench's, bench/compiled.ts). */
const BIN_DIR = process.env.SNAPBACK_BIN_DIR ?? join(ROOT, 'bin');
export const AGENT_BIN = join(BIN_DIR, 'snapback-agent.js');
export const CONTROLLER_BIN = join(BIN_DIR, 'snapback.js');

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
  private holder: ChildProcess | undefined;
  private hostEnv: string[] = [];

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
      // bootedSystem: the machine's own /run/booted-system (on NixOS) is not this host's.
      system: { profile: this.profile, currentSystem: this.current, runner: 'direct', bootIdFile: this.bootIdFile, switchLock: join(this.dir, 'stc.lock'), bootedSystem: join(this.dir, 'booted-system') },
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

  // ---- the host's own Nix store ----------------------------------------------------------------

  /**
   * Gives the host a Nix store of its own: a process holds a private mount namespace in which `/nix`
   * is the empty `dir/nix-root` (or, with `sizeMiB`, a tmpfs that small), and every host-side
   * process — the agent, the console, install()'s Nix commands, the host* helpers — runs in it
   * through nsenter. Debian's Nix lives in /usr/bin, so it works there on a fresh store and database.
   * Call it right after the constructor; tests using it skip on haveOwnStore(). A `sizeMiB` store
   * runs its Nix with gc-reserved-space = 0, or the reserve alone would fill it.
   */
  ownStore(opts: { sizeMiB?: number } = {}): this {
    if (this.holder) throw new Error('ownStore() called twice');
    if (this.gen1 !== undefined) throw new Error('ownStore() must come before install(): gen1 would be in the operator\'s store');
    const root = join(this.dir, 'nix-root');
    mkdirSync(root);
    // Nix reserves gc-reserved-space (8 MiB) in its database directory: that would fill a small store.
    if (opts.sizeMiB !== undefined) this.hostEnv = ['env', `NIX_CONFIG=${process.env.NIX_CONFIG ?? NIX_CONFIG}\ngc-reserved-space = 0\n`];
    const mount = opts.sizeMiB !== undefined ? `mount -t tmpfs -o size=${Math.floor(opts.sizeMiB)}m,mode=0755 snapback-store /nix` : `mount --bind '${root}' /nix`;
    const log = join(this.dir, 'holder.log');
    const fd = openSync(log, 'w');
    // unshare, sh and sleep exec one another: the holder keeps one PID. setpriv's parent-death
    // signal ends it with the test process should cleanup() never run.
    const argv = ['unshare', '-m', '--propagation', 'private', 'sh', '-c', `${mount} && exec sleep infinity`];
    const [cmd, ...args] = (haveSetpriv() ? ['setpriv', '--pdeathsig', 'KILL', ...argv] : argv) as [string, ...string[]];
    const child = spawn(cmd, args, { stdio: ['ignore', fd, fd] });
    closeSync(fd);
    child.unref();
    this.holder = child;
    const pid = child.pid;
    if (pid === undefined) throw new Error(`could not start the store holder (${cmd})`);
    // Ready once the mount is done, that is once `sleep` runs; a failed mount ends the holder.
    const start = Date.now();
    for (;;) {
      const stat = procStat(pid);
      if (stat === undefined || stat.state === 'Z') throw new Error(`the store holder failed: ${readFileSync(log, 'utf8').trim() || 'no output'}`);
      if (stat.comm === 'sleep') break;
      if (Date.now() - start > 10_000) throw new Error('the store holder did not mount /nix in 10 s');
      sleepSync(10);
    }
    return this;
  }

  /** PID of the process holding the host's mount namespace (ownStore), else undefined. */
  get holderPid(): number | undefined {
    return this.holder?.pid;
  }

  /** The command prefix that runs something as the host: in its mount namespace (ownStore), else as is. */
  hostPrefix(): string[] {
    const pid = this.holderPid;
    // nsenter -m would leave us in `/`: keep the test's working directory.
    return pid === undefined ? [] : ['nsenter', '-t', String(pid), '-m', `--wd=${process.cwd()}`, '--', ...this.hostEnv];
  }

  /** Runs CMD ARGS on the host (in its own store's namespace, if any); its stdout, trimmed. Throws on failure. */
  hostRun(cmd: string, args: string[] = []): string {
    const [c, ...a] = [...this.hostPrefix(), cmd, ...args] as [string, ...string[]];
    return runHere(c, a);
  }

  /** `path` with every symlink resolved as the host sees it (its store, not the operator's). */
  hostRealpath(path: string): string {
    return this.holder ? this.hostRun('readlink', ['-e', '--', path]) : realpathSync(path);
  }

  /**
   * Whether `path` exists as the host sees it, following links: a GC root or profile link points into
   * the host's store, where existsSync (the operator's view) would look in the wrong one.
   */
  hostExists(path: string): boolean {
    if (!this.holder) return existsSync(path);
    try {
      this.hostRun('test', ['-e', path]);
      return true;
    } catch {
      return false;
    }
  }

  /** Whether `path` is valid in the host's store. */
  hostHas(path: string): boolean {
    try {
      this.hostRun('nix-store', ['--check-validity', '--', path]);
      return true;
    } catch {
      return false;
    }
  }

  /** Every valid path of the host's store, sorted; `.drv` files only with `drvs`. */
  hostPaths(opts: { drvs?: boolean } = {}): string[] {
    // A path deleted between Nix listing it and reading it fails the listing: it is taken again.
    let listing: string | undefined;
    for (let i = 0; listing === undefined; i++) {
      try {
        listing = this.hostRun('nix', ['--extra-experimental-features', 'nix-command', 'path-info', '--all']);
      } catch (err) {
        if (i >= 20 || !/is not valid/.test((err as Error).message)) throw err;
      }
    }
    return listing
      .split('\n')
      .filter((p) => p && (opts.drvs || !p.endsWith('.drv')))
      .sort();
  }

  /** Bytes free (for an unprivileged user) on the file system of the host's /nix/store. */
  hostStoreFree(): number {
    // /nix/store exists once Nix first ran; /nix is the same file system under ownStore.
    const [avail, bsize] = this.hostRun('sh', ['-c', 'stat -f -c "%a %S" /nix/store 2>/dev/null || stat -f -c "%a %S" /nix']).split(' ').map(Number) as [number, number];
    return avail * bsize;
  }

  private get hostRunner(): Runner {
    return (cmd, args) => this.hostRun(cmd, args);
  }

  /** The "installed" system: generation 1 of the profile, and running — in the host's store. */
  install(b: Behaviour = {}): this {
    this.gen1 = this.hostToplevel('gen1', b);
    this.hostRun('nix-env', ['-p', this.profile, '--set', this.gen1]);
    symlinkSync(this.gen1, this.current);
    return this;
  }

  /** A fake toplevel built in the operator's store (the test process's, the real one). */
  toplevel(name: string, b: Behaviour = {}): string {
    return buildToplevel(join(this.dir, 'nix'), name, this.calls, this.current, b);
  }

  /** A fake toplevel built in the host's store (the same as toplevel() without ownStore). */
  hostToplevel(name: string, b: Behaviour = {}): string {
    if (!this.holder) return this.toplevel(name, b);
    return buildToplevel(join(this.dir, 'host-nix'), name, this.calls, this.current, b, this.hostRunner);
  }

  // ---- the agent process ----------------------------------------------------------------------

  /**
   * Starts `snapback-agent serve`. `failpoints` makes it kill itself at those instants (agent/failpoint.ts);
   * `wrap` runs it under another program (strace with fault injection), itself inside the host's
   * mount namespace with ownStore.
   */
  async start(opts: { failpoints?: string[]; wrap?: string[]; env?: Record<string, string> } = {}): Promise<void> {
    this.lines = [];
    const argv = [process.execPath, AGENT_BIN, 'serve', '--config', this.configPath];
    const [cmd, ...args] = [...this.hostPrefix(), ...(opts.wrap ?? []), ...argv] as [string, ...string[]];
    const env = { ...process.env, ...opts.env, SNAPBACK_FAILPOINTS: (opts.failpoints ?? []).join(',') };
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
    symlinkSync(this.hostRealpath(this.profile), this.current);
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

  /**
   * Runs `snapback-agent ARGS --config … --json` and parses its JSON Lines: `out` is the result line
   * (the last), `events` the lines before it.
   */
  cli(args: string[], opts: { json?: boolean } = {}): Promise<{ code: number; out: any; events: any[]; stdout: string; stderr: string }> {
    const json = opts.json ?? true;
    return new Promise((resolve) => {
      const [cmd, ...argv] = [...this.hostPrefix(), process.execPath, AGENT_BIN, ...args, '--config', this.configPath, ...(json ? ['--json'] : [])] as [string, ...string[]];
      const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (c) => (stdout += c));
      child.stderr.on('data', (c) => (stderr += c));
      child.on('exit', (code) => {
        const lines = json ? jsonLines(stdout) : [];
        resolve({ code: code ?? -1, out: lines.find((l) => l.type === 'result'), events: lines.filter((l) => l.type === 'event'), stdout, stderr });
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
    return this.hostRealpath(this.current);
  }

  generations(): number[] {
    return readdirSync(join(this.dir, 'profiles'))
      .map((f) => /^system-(\d+)-link$/.exec(f)?.[1])
      .filter((n): n is string => !!n)
      .map(Number)
      .sort((a, b) => a - b);
  }

  bootDefault(): string {
    return this.hostRealpath(this.profile);
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

  /** Ends the agent, then the store holder (by PID: the namespace and a tmpfs store go with it), then removes the dir. */
  async cleanup(): Promise<void> {
    await this.kill9();
    await this.endHolder();
    // Store paths are read-only; root removes them anyway, anyone else needs write access back.
    if (existsSync(join(this.dir, 'nix-root'))) spawnSync('chmod', ['-R', 'u+w', join(this.dir, 'nix-root')], { stdio: 'ignore' });
    rmSync(this.dir, { recursive: true, force: true });
  }

  private async endHolder(): Promise<void> {
    const child = this.holder;
    if (!child) return;
    if (child.exitCode === null && child.signalCode === null) {
      const gone = new Promise((r) => child.once('exit', r));
      child.ref(); // unref'd at start: the wait for its exit must keep the process alive
      child.kill('SIGKILL');
      await gone;
    }
    this.holder = undefined;
  }
}

/** Why a test cannot give a scratch host its own store (ownStore), or undefined if it can. */
export function haveOwnStore(): string | undefined {
  const nix = haveNix();
  if (nix) return nix;
  if (!existsSync('/nix')) return 'no /nix directory to mount a store over: skipping tests that give a host its own Nix store';
  const probe = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', 'mount -t tmpfs -o size=1m snapback-probe /nix && nsenter --version'], { encoding: 'utf8' });
  if (probe.status !== 0) {
    const why = probe.error?.message ?? (probe.stderr.trim() || `exit ${probe.status}`);
    return `cannot make a mount namespace with its own /nix (unshare -m, mount and nsenter need root or CAP_SYS_ADMIN): ${why}: skipping tests that give a host its own Nix store`;
  }
  return undefined;
}

let setpriv: boolean | undefined;
function haveSetpriv(): boolean {
  setpriv ??= spawnSync('setpriv', ['--version'], { stdio: 'ignore' }).status === 0;
  return setpriv;
}

/** State and command name of process `pid` from /proc, or undefined once it is gone. */
function procStat(pid: number): { state: string; comm: string } | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // "PID (COMM) STATE …": COMM may hold spaces and parentheses, the last ')' ends it.
    const close = stat.lastIndexOf(')');
    return { comm: stat.slice(stat.indexOf('(') + 1, close), state: stat.slice(close + 2, close + 3) };
  } catch {
    return undefined;
  }
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
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
      const lines = json ? jsonLines(stdout) : [];
      resolve({ code: code ?? (signal ? 128 : -1), events: lines.filter((l) => l.type === 'event'), result: lines.find((l) => l.type === 'result'), stdout, stderr });
    });
  });
}

/** `--json` output, one parsed object per line (a line that is no JSON: `{ unparsed: LINE }`). */
export function jsonLines(stdout: string): any[] {
  return stdout
    .split('\n')
    .filter(Boolean)
    .map((l) => {
      try {
        return JSON.parse(l);
      } catch {
        return { unparsed: l };
      }
    });
}

/** Cleanups of one test file (hosts, proxies, sockets), run after all its tests, newest first. */
export function cleanupsAfterAll(): (() => unknown)[] {
  const cleanups: (() => unknown)[] = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c();
  });
  return cleanups;
}
