// Everything about boots (DESIGN §11): whether a target's kernel side differs from the booted
// system, which bootloader the host has, naming a generation's boot entry, the one-shot boot, the
// reboot, and the trial boot's operations (arm, forget, revert). Its story lives in lifecycle.ts.

import { createHash } from 'node:crypto';
import { existsSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { run as runCommand } from '../shared/exec.ts';
import type { AgentConfig } from '../shared/config.ts';
import { SnapbackError } from '../shared/errors.ts';
import type { Runner } from './activation.ts';
import { failpoint } from './failpoint.ts';
import type { BootUndo, Effect, Event } from './lifecycle.ts';
import type { Logger } from './log.ts';
import { currentGeneration, profiles, readCurrentSystem } from './nix.ts';

/** What `switch-to-configuration test` cannot apply: it needs a boot. */
export const KERNEL_PARTS = ['kernel', 'initrd', 'kernel-modules', 'kernel-params'] as const;
export type KernelPart = (typeof KERNEL_PARTS)[number];

export type Bootloader = 'systemd-boot' | 'grub' | 'none';

/**
 * What identifies one part of a toplevel's kernel side: the store path a link resolves to (`kernel`,
 * `initrd`, `kernel-modules` are links into the store), or the content's hash for a plain file
 * (`kernel-params`), or null when the toplevel has no such part.
 */
function identity(toplevel: string, part: KernelPart): string | null {
  const path = join(toplevel, part);
  let real: string;
  try {
    real = realpathSync(path);
  } catch {
    return null;
  }
  try {
    if (statSync(real).isFile() && (part === 'kernel-params' || real === path)) {
      return `sha256:${createHash('sha256').update(readFileSync(real)).digest('hex')}`;
    }
  } catch {
    return null;
  }
  return real;
}

/**
 * The parts of `target`'s kernel side that differ from the system at `bootedLink` (normally
 * `/run/booted-system`), in KERNEL_PARTS order: `[]` when only userland changes, undefined when the
 * booted system cannot be read (then nothing is claimed either way).
 */
export function kernelChanges(bootedLink: string, target: string): KernelPart[] | undefined {
  let booted: string;
  try {
    booted = realpathSync(bootedLink);
  } catch {
    return undefined;
  }
  if (booted === target) return [];
  return KERNEL_PARTS.filter((part) => identity(booted, part) !== identity(target, part));
}

/** `kernel, initrd` for a sentence. */
export function describeParts(parts: readonly string[]): string {
  return parts.join(', ');
}

// ---- the bootloader -----------------------------------------------------------------------------

export interface BootSettings {
  /** `system.bootloader`: undefined means detect */
  bootloader?: Bootloader | undefined;
  grubConfig: string;
  rebootCommand: string[];
}

/**
 * systemd-boot when `bootctl is-installed` says so; GRUB when its configuration exists and
 * `grub-reboot` is on PATH; else none. Only asked when `system.bootloader` is not set.
 */
export async function detectBootloader(s: BootSettings): Promise<Bootloader> {
  if (s.bootloader) return s.bootloader;
  const sd = await runCommand('bootctl', ['is-installed']);
  if (sd.exitCode === 0) return 'systemd-boot';
  if (existsSync(s.grubConfig)) {
    const grub = await runCommand('sh', ['-c', 'command -v grub-reboot']);
    if (grub.exitCode === 0) return 'grub';
  }
  return 'none';
}

/** Why a trial boot cannot be done with this bootloader, or undefined. */
export function unsupported(loader: Bootloader): string | undefined {
  if (loader !== 'none') return undefined;
  return (
    'a trial boot needs systemd-boot (bootctl set-oneshot) or GRUB (grub-reboot), and this host has neither ' +
    '(system.bootloader is "none", or neither was detected); deploy without --reboot, or set system.bootloader in agent.json'
  );
}

/**
 * The boot entry of profile generation `generation` (whose toplevel is `toplevel`):
 * systemd-boot's `nixos-generation-N.conf` (the NixOS builder's file name, which is the entry's id),
 * GRUB's `NixOS - All configurations>NixOS - Configuration N (DATE - VERSION)` read from grub.cfg.
 */
export function entryFor(loader: Bootloader, generation: number, toplevel: string, grubConfig: string): string {
  if (loader === 'systemd-boot') return `nixos-generation-${generation}.conf`;
  if (loader === 'grub') {
    let cfg: string;
    try {
      cfg = readFileSync(grubConfig, 'utf8');
    } catch (err) {
      throw new Error(`cannot read ${grubConfig}: ${(err as Error).message}`);
    }
    const entry = grubEntry(cfg, generation, toplevel);
    if (!entry) throw new Error(`${grubConfig} has no menu entry for generation ${generation} (${toplevel})`);
    // grub-reboot (GRUB 2) writes next_entry to grubenv; a grub.cfg that only reads saved_entry (what
    // older grub-reboot wrote, and older NixOS install-grub.pl reads) would ignore it.
    if (!/next_entry/.test(cfg)) throw new Error(`${grubConfig} does not read grub-reboot's one-time entry (no next_entry in it): the next boot would not start the new system`);
    return entry;
  }
  throw new SnapbackError('bad-request', unsupported(loader)!);
}

/**
 * GRUB's name for a generation in NixOS's grub.cfg: `SUBMENU>TITLE`, the form grub-reboot takes
 * for an entry inside a submenu, for the entry titled `NixOS - Configuration N (…)` whose kernel line
 * names `toplevel` (install-grub.pl writes `systemConfig=TOPLEVEL` there).
 */
export function grubEntry(cfg: string, generation: number, toplevel: string): string | undefined {
  const submenus: string[] = [];
  let depth = 0;
  let submenuDepth: number[] = [];
  let current: { title: string; body: string[]; depth: number } | undefined;
  for (const line of cfg.split('\n')) {
    const t = line.trim();
    const title = /^(submenu|menuentry)\s+(["'])(.*?)\2/.exec(t);
    if (title && t.endsWith('{')) {
      if (title[1] === 'submenu') {
        submenus.push(title[3]!);
        submenuDepth.push(depth);
      } else current = { title: title[3]!, body: [], depth };
      depth++;
      continue;
    }
    if (t === '}') {
      depth--;
      if (current && current.depth === depth) {
        const named = new RegExp(`^NixOS - Configuration ${generation} \\(`).test(current.title);
        if (named && current.body.some((b) => b.includes(`systemConfig=${toplevel}`) || b.includes(`${toplevel}/init`))) {
          return [...submenus, current.title].join('>');
        }
        current = undefined;
      } else if (submenuDepth.at(-1) === depth) {
        submenus.pop();
        submenuDepth = submenuDepth.slice(0, -1);
      }
      continue;
    }
    current?.body.push(t);
  }
  return undefined;
}

/** Runs a bootloader command: `cmd args…`, throwing with its error output when it fails. */
export type Exec = (cmd: string, args: string[]) => Promise<void>;

/**
 * How the agent runs bootloader commands. Under systemd they run in a transient unit of PID 1
 * (`systemd-run --wait --pipe`), like the switch: the agent's own unit has /boot read-only
 * (ProtectSystem=full), and grub-reboot writes /boot/grub/grubenv.
 */
export function bootCommands(outsideTheSandbox: boolean): Exec {
  if (!outsideTheSandbox) return run;
  return (cmd, args) => run('systemd-run', ['--wait', '--pipe', '--quiet', '--collect', '--service-type=exec', '--no-ask-password', '-E', 'PATH', cmd, ...args]);
}

/** Points the next boot only at `entry`; the default entry stays as it is. */
export async function setOneShot(loader: Bootloader, entry: string, exec: Exec = run): Promise<void> {
  if (loader === 'grub') await exec('grub-reboot', [entry]);
  else await exec('bootctl', ['set-oneshot', entry]);
}

/**
 * The `default` of systemd-boot's loader.conf when it is a pattern (`nixos-generation-*`, which
 * NixOS's builder writes with boot counting): then the newest entry, X's, would become the default
 * the moment it exists. Undefined when the default is one entry, or loader.conf cannot be found.
 */
export async function patternDefault(): Promise<string | undefined> {
  const esp = await runCommand('bootctl', ['--print-esp-path']);
  if (esp.exitCode !== 0) return undefined;
  let conf: string;
  try {
    conf = readFileSync(join(String(esp.stdout).trim(), 'loader', 'loader.conf'), 'utf8');
  } catch {
    return undefined;
  }
  const value = /^\s*default\s+(\S+)/m.exec(conf)?.[1];
  return value && /[*?[]/.test(value) ? value : undefined;
}

/** Forgets a one-shot entry that was set and not used (`bootctl set-oneshot ""`, `grub-editenv - unset next_entry`). */
export async function clearOneShot(loader: Bootloader, grubConfig: string, exec: Exec = run): Promise<void> {
  if (loader === 'grub') {
    const env = join(grubConfig, '..', 'grubenv');
    if (existsSync(env)) await exec('grub-editenv', [env, 'unset', 'next_entry']);
    return;
  }
  if (loader === 'systemd-boot') await exec('bootctl', ['set-oneshot', '']);
}

/** Asks for the reboot (`systemctl reboot` unless `system.rebootCommand` says otherwise). */
export async function requestReboot(command: string[]): Promise<void> {
  const [cmd, ...args] = command as [string, ...string[]];
  await run(cmd, args);
}

async function run(cmd: string, args: string[]): Promise<void> {
  const r = await runCommand(cmd, args);
  if (r.exitCode === undefined) throw new Error(`${cmd}: ${r.signal ? `killed by ${r.signal}` : r.stderr.trim()}`);
  if (r.exitCode !== 0) throw new Error(`${[cmd, ...args].join(' ')}: ${String(r.stderr).trim() || `exit ${r.exitCode}`}`);
}

/**
 * When this boot's userspace started, on the monotonic clock (ms): systemd's
 * UserspaceTimestampMonotonic. A trial boot's window counts from there. Undefined without systemd.
 */
export async function bootStartedMono(): Promise<number | undefined> {
  const r = await runCommand('systemctl', ['show', '-p', 'UserspaceTimestampMonotonic', '--value']);
  const usec = Number(String(r.stdout).trim());
  return r.exitCode === 0 && usec > 0 ? Math.floor(usec / 1000) : undefined;
}

// ---- the trial boot's operations on the host -----------------------------------------------------

/** What the trial boot's operations use of the agent: its settings, its switch runner, its limits. */
export interface TrialBootHost {
  system: AgentConfig['system'];
  runner: Runner;
  runLimit: () => { timeoutSec: number };
  /** waits while somebody else's switch holds NixOS's switch lock */
  switchLockFree: (id: string) => Promise<void>;
  /** where a deployment's switch output goes */
  onLine: (id: string) => (line: string) => void;
  log: Logger;
}

/** Arming, forgetting and reverting a trial boot: the effects `arm-boot` and a trial boot's `revert`. */
export class TrialBoots {
  private readonly host: TrialBootHost;
  constructor(host: TrialBootHost) {
    this.host = host;
  }

  /**
   * Gives X a boot entry without making it the default, and points the next boot only at it. The
   * NixOS bootloader builders write an entry for every profile generation and make the default the
   * generation of the toplevel whose `boot` runs: so X becomes a generation (the profile points at
   * it for one nix-env call), the profile goes back to the previous generation at once, the previous
   * system's `boot` rewrites the menu (X's entry included, the default unchanged), and the one-shot
   * names X's entry. Safe to run again after a crash; any failure is undone before it is reported.
   */
  async arm(e: Extract<Effect, { kind: 'arm-boot' }>): Promise<Event> {
    const { profile, grubConfig } = this.host.system;
    const onLine = this.host.onLine(e.id);
    try {
      await this.host.switchLockFree(e.id);
      if (e.profile.generation === null) throw new Error(`${profile} has no generation to keep as the boot default`);
      const pattern = e.loader === 'systemd-boot' ? await patternDefault() : undefined;
      if (pattern) {
        throw new Error(`systemd-boot's loader.conf has "default ${pattern}" (boot counting?): the new generation's entry would become the boot default; a trial boot needs a default that names one entry`);
      }
      await profiles.set(profile, e.toplevel);
      const generation = currentGeneration(profile);
      if (generation === null) throw new Error(`${profile} does not point at a generation after nix-env --set`);
      await profiles.switchTo(profile, e.profile.generation);
      const { exit } = await this.host.runner.run(`boot-entry-${e.id}`, e.previous, 'boot', onLine, this.host.runLimit());
      if (exit !== 0) throw new Error(`${e.previous}/bin/switch-to-configuration boot exited ${exit ?? 'without a status'}`);
      const entry = entryFor(e.loader, generation, e.toplevel, grubConfig);
      await setOneShot(e.loader, entry, bootCommands(this.host.runner.name === 'systemd'));
      failpoint('boot:armed');
      return { type: 'boot-armed', id: e.id, entry, generation };
    } catch (err) {
      const error = (err as Error).message;
      this.host.log.error({ deployment: e.id, err: error }, 'preparing the trial boot failed; undoing it');
      const unrestored = await this.forget(e.id, e.toplevel, e.previous, { loader: e.loader, profile: e.profile }).catch((u: Error) => u.message);
      return { type: 'boot-arm-failed', id: e.id, error, ...(unrestored ? { unrestored } : {}) };
    }
  }

  /**
   * Undoes a trial boot's entry: no one-shot left, the profile back where it was and without X's
   * generation, the previous system's `boot` writing the menu and default again. Returns why not, or
   * undefined.
   */
  private async forget(id: string, toplevel: string, previous: string, boot: BootUndo): Promise<string | undefined> {
    const onLine = this.host.onLine(id);
    await clearOneShot(boot.loader, this.host.system.grubConfig, bootCommands(this.host.runner.name === 'systemd')).catch((err: Error) => this.host.log.warn({ deployment: id, err: err.message }, 'cannot clear the one-shot boot entry'));
    if (boot.profile.path === null) return undefined;
    await profiles.restore(this.host.system.profile, boot.profile, toplevel);
    const { exit } = await this.host.runner.run(`boot-forget-${id}`, previous, 'boot', onLine, this.host.runLimit());
    return exit === 0 ? undefined : `${previous}/bin/switch-to-configuration boot exited ${exit ?? 'without a status'}`;
  }

  /**
   * A trial boot's revert. X runs: forget its entry (the default never stopped being the previous
   * system) and reboot; the outcome is recorded in the next boot. The previous system runs (the
   * reboot happened, or X never came up): tidy up, and that is the revert.
   */
  async revert(e: Extract<Effect, { kind: 'revert' }>): Promise<Event | undefined> {
    const boot = e.boot!;
    await this.host.switchLockFree(e.id);
    const current = readCurrentSystem(this.host.system.currentSystem);
    if (current === e.previous) {
      const unrestored = e.toplevel ? await this.forget(e.id, e.toplevel, e.previous, boot) : undefined;
      if (unrestored) return { type: 'revert-finished', id: e.id, result: 'failed', error: `the previous system runs, but ${unrestored}` };
      return { type: 'revert-finished', id: e.id, result: 'already-previous', detail: `running ${e.previous}, the boot default` };
    }
    if (current !== e.toplevel) return { type: 'revert-finished', id: e.id, result: 'conflict', current };
    const unrestored = await this.forget(e.id, e.toplevel, e.previous, boot);
    if (unrestored) throw new Error(unrestored);
    this.host.log.warn({ deployment: e.id }, `rebooting into the boot default ${e.previous}`);
    failpoint('boot:revert-reboot');
    await requestReboot(this.host.system.rebootCommand);
    return undefined;
  }
}
