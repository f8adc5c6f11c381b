// Everything the agent asks of Nix: realise a store path from trusted caches, build a flake's
// toplevel, resolve a generation, hold GC roots, and move the system profile. Only Nix 2.8 features.

import { spawn } from 'node:child_process';
import { accessSync, constants, readdirSync, readlinkSync, realpathSync, rmSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { run } from '../shared/exec.ts';
import { SnapbackError } from '../shared/errors.ts';
import { describeTarget, storePathSchema, type Target } from '../shared/model.ts';
import type { ProfileBefore } from './lifecycle.ts';

export interface NixSettings {
  substituters: string[];
  trustedPublicKeys: string[];
}

export type LineSink = (line: string) => void;

const FLAKES = ['--extra-experimental-features', 'nix-command flakes'];

export class Nix {
  readonly settings: NixSettings;
  constructor(settings: NixSettings) {
    this.settings = settings;
  }

  /**
   * `--option` flags adding the agent's caches and keys to Nix's own: naming only your cache must
   * not cut the host off from the cache the rest of the closure comes from.
   */
  trustOptions(): string[] {
    const { substituters, trustedPublicKeys } = this.settings;
    const out: string[] = [];
    if (substituters.length) out.push('--option', 'extra-substituters', substituters.join(' '));
    if (trustedPublicKeys.length) out.push('--option', 'extra-trusted-public-keys', trustedPublicKeys.join(' '));
    return out;
  }

  /**
   * Obtains the target's toplevel in the store, rooted at `gcRoot`, and checks that it is a NixOS
   * toplevel. Nothing on the running system changes here.
   *
   * The toplevel returned is canonical: a store path that is itself a symlink (`nix-store --add` of
   * a link, or a derivation whose `$out` is one) is resolved, because `/run/current-system` reads
   * as the resolved path, and every compare-and-swap compares with what this returns. Whatever
   * resolves outside the store, or below one of its entries, is refused.
   */
  async obtain(target: Target, gcRoot: string, profile: string, onLine?: LineSink): Promise<string> {
    try {
      let path: string;
      if ('storePath' in target) {
        await this.run('nix-store', ['--realise', ...this.trustOptions(), '--add-root', gcRoot, '--', storeArg(target.storePath)], 'fetch-failed', onLine);
        path = target.storePath;
      } else if ('flake' in target) {
        path = await this.buildFlake(target.flake, gcRoot, onLine);
      } else {
        path = generationPath(profile, target.generation);
      }
      const toplevel = canonicalStorePath(path, describeTarget(target));
      // The root holds what runs, not the link to it (a link added with `nix-store --add` does not
      // keep its target alive); for a generation this is its first root.
      if (toplevel !== path || 'generation' in target) {
        await this.run('nix-store', ['--realise', '--add-root', gcRoot, '--', toplevel], 'fetch-failed', onLine);
      }
      assertToplevel(toplevel);
      return toplevel;
    } catch (err) {
      rmSync(gcRoot, { force: true });
      throw err;
    }
  }

  /** Holds an existing store path (the revert target) with a GC root of the agent's own. */
  async hold(path: string, gcRoot: string): Promise<void> {
    await this.run('nix-store', ['--realise', '--add-root', gcRoot, '--', storeArg(path)], 'fetch-failed');
  }

  private async buildFlake(flake: string, gcRoot: string, onLine?: LineSink): Promise<string> {
    const hash = flake.lastIndexOf('#');
    const ref = flake.slice(0, hash);
    const host = flake.slice(hash + 1);
    const installable = `${ref}#nixosConfigurations.${JSON.stringify(host)}.config.system.build.toplevel`;
    // Nix 2.8 has no --print-out-paths: read the path from --json. After `--` the installable is one
    // whatever it begins with: read as options, `-I#…` would leave none, and Nix would build `.`.
    const stdout = await this.run('nix', [...FLAKES, 'build', '--json', '--out-link', gcRoot, ...this.trustOptions(), '--', installable], 'build-failed', onLine);
    try {
      const parsed = JSON.parse(stdout) as { outputs?: { out?: string } }[];
      const out = parsed[0]?.outputs?.out;
      if (typeof out === 'string') return out;
    } catch {}
    throw new SnapbackError('build-failed', `nix build printed no output path for ${installable}`);
  }

  private async run(cmd: string, args: string[], code: 'fetch-failed' | 'build-failed', onLine?: LineSink): Promise<string> {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NIX_PAGER: '' } });
    let stdout = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    let spawnError: Error | undefined;
    const closed = new Promise<number | undefined>((resolve) => {
      child.on('error', (err) => (spawnError = err));
      child.on('close', (c) => resolve(spawnError ? undefined : (c ?? undefined)));
    });
    const tail: string[] = [];
    // Nix's first "error:" line is the cause; what follows is trace and context. It may scroll out of
    // the tail. A fetch fails with a bare "build of … failed": the warning before it says why.
    let firstError: string | undefined;
    const why: string[] = [];
    child.stderr!.setEncoding('utf8');
    let pending = '';
    const keep = (line: string) => {
      tail.push(line);
      if (tail.length > 20) tail.shift();
      const plain = line.replace(/\x1b\[[0-9;]*m/g, '').trim();
      if (!firstError && plain.startsWith('error:')) firstError = plain;
      if (!firstError && plain.startsWith('warning:') && /signed|signature|substitute|hash mismatch/i.test(plain)) why.push(plain);
    };
    child.stderr!.on('data', (chunk: string) => {
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) {
        keep(line);
        onLine?.(line);
      }
    });
    const exitCode = await closed;
    if (pending) keep(pending);
    if (exitCode !== 0) {
      // The summary is the error line; the whole tail goes to the history (the prepare-failed entry's detail).
      const said = tail.filter((l) => l.trim());
      const summary = spawnError ? `could not start: ${spawnError.message}` : firstError ? [...why, firstError].join('; ') : (said.at(-1)?.trim() ?? `exit status ${exitCode}`);
      const output = said.length > 1 ? { output: said.join('\n') } : undefined;
      throw new SnapbackError(code, `${cmd} ${args[0] === '--realise' ? 'could not realise' : 'failed for'} the target: ${summary}`, output);
    }
    return stdout;
  }
}

/** The running toplevel behind `/run/current-system` (or its configured stand-in); any link's target, or null. */
export function readCurrentSystem(link: string): string | null {
  try {
    return realpathSync(link);
  } catch {
    return null;
  }
}

const STORE_DIR = '/nix/store';

/**
 * `path` with every symlink resolved, which must be a directory directly under the store
 * (`/nix/store/<hash>-<name>`, nothing below it); else `bad-target`, naming `what` was asked for.
 */
export function canonicalStorePath(path: string, what: string): string {
  let real: string;
  try {
    real = realpathSync(path);
  } catch (err) {
    throw new SnapbackError('bad-target', `${what} does not resolve to an existing path: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (!storePathSchema.safeParse(real).success) {
    throw new SnapbackError('bad-target', `${what} resolves to ${real}, which is not a directory directly under ${STORE_DIR}; refused`);
  }
  if (!statSync(real).isDirectory()) throw new SnapbackError('bad-target', `${what} resolves to ${real}, which is not a directory; refused`);
  return real;
}

/**
 * nix-store and nix-env (Nix 2.8) accept `--` but still read a later `-x` as their own flag: a path
 * handed to them must be absolute, so it cannot begin with `-`.
 */
function storeArg(path: string): string {
  if (!path.startsWith('/')) throw new SnapbackError('bad-target', `"${path}" is not an absolute path; refused`);
  return path;
}

export function assertToplevel(path: string): void {
  try {
    accessSync(join(path, 'bin', 'switch-to-configuration'), constants.X_OK);
  } catch {
    throw new SnapbackError('bad-target', `${path} is not a NixOS toplevel: bin/switch-to-configuration is missing or not executable`);
  }
}

export function generationPath(profile: string, n: number): string {
  const link = `${profile}-${n}-link`;
  try {
    return realpathSync(link);
  } catch {
    throw new SnapbackError('bad-target', `generation ${n} does not exist (${link})`);
  }
}

/** The generation number the profile points at, or null when there is no profile yet. */
export function currentGeneration(profile: string): number | null {
  let target: string;
  try {
    target = readlinkSync(profile);
  } catch {
    return null;
  }
  const m = /-(\d+)-link$/.exec(basename(target));
  return m ? Number(m[1]) : null;
}

/** `nix-env -p PROFILE OP -- ARGS…`: the profile and every path argument absolute (see storeArg). */
async function nixEnv(profile: string, op: string, args: string[]): Promise<void> {
  for (const a of args) if (!/^\d+$/.test(a)) storeArg(a);
  const r = await run('nix-env', ['-p', storeArg(profile), op, '--', ...args]);
  if (r.exitCode !== 0) throw new Error(`nix-env -p ${profile} ${op} ${args.join(' ')}: ${String(r.stderr).trim() || `exit ${r.exitCode}`}`);
}

/** The generation numbers of a profile (`system-N-link` beside `system`), ascending. */
function generations(profile: string): number[] {
  const prefix = `${basename(profile)}-`;
  let names: string[];
  try {
    names = readdirSync(dirname(profile));
  } catch {
    return [];
  }
  return names
    .map((n) => (n.startsWith(prefix) ? /^(\d+)-link$/.exec(n.slice(prefix.length))?.[1] : undefined))
    .filter((n): n is string => n !== undefined)
    .map(Number)
    .sort((a, b) => a - b);
}

export const profiles = {
  /** What a commit records before it touches the profile. */
  snapshot(profile: string): ProfileBefore {
    return { generation: currentGeneration(profile), path: readCurrentSystem(profile), newest: generations(profile).at(-1) ?? null };
  },

  /** `nix-env -p P --set X`: a new generation, unless X is already the newest one. */
  set: (profile: string, path: string) => nixEnv(profile, '--set', [path]),

  /** `nix-env -p P --switch-generation N`: the profile points at generation N again. */
  switchTo: (profile: string, generation: number) => nixEnv(profile, '--switch-generation', [String(generation)]),

  /**
   * Puts the profile back to what `before` recorded, by the system's path (its generation may be
   * gone), and deletes what the commit created: generations newer than every one before it that
   * point at `toplevel` — never one it merely pointed the profile at, never somebody else's. A profile
   * somebody else moved meanwhile is left alone (throws).
   */
  async restore(profile: string, before: ProfileBefore, toplevel: string): Promise<void> {
    const points = readCurrentSystem(profile);
    if (points !== toplevel && points !== before.path) {
      throw new Error(`the profile was moved to ${points ?? 'nothing'} by somebody else meanwhile; left alone`);
    }
    if (points === toplevel) {
      if (before.path === null) rmSync(profile, { force: true });
      else if (before.generation !== null && readGeneration(profile, before.generation) === before.path) {
        await nixEnv(profile, '--switch-generation', [String(before.generation)]);
      } else await nixEnv(profile, '--set', [before.path]);
    }
    const current = currentGeneration(profile);
    const created = generations(profile).filter((n) => n > (before.newest ?? 0) && n !== current && readGeneration(profile, n) === toplevel);
    if (created.length === 0) return;
    if (before.path === null) for (const n of created) rmSync(`${profile}-${n}-link`, { force: true });
    else await nixEnv(profile, '--delete-generations', created.map(String));
  },
};

function readGeneration(profile: string, n: number): string | null {
  return readCurrentSystem(`${profile}-${n}-link`);
}
