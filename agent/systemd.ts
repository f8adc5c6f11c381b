// What the agent asks of systemd besides running the switch: sd_notify (READY, STATUS, WATCHDOG),
// the fallback revert timer owned by PID 1 (promise 3), and noticing that its own unit changed.

import { readFileSync, existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { spawn } from 'node:child_process';
import { run } from '../shared/exec.ts';
import type { Logger } from './log.ts';

export function systemdRunning(): boolean {
  return existsSync('/run/systemd/system');
}

// ---- sd_notify ----------------------------------------------------------------------------------

export interface Notifier {
  readonly via: 'sd-notify' | 'systemd-notify' | 'none';
  ready(): void;
  status(text: string): void;
  /** STATUS=text, and more time before systemd's start timeout gives up on an agent not yet ready. */
  waiting(text: string): void;
  stopping(): void;
  close(): void;
}

// Each waiting() buys this much more start time; serve calls it far more often than that.
const WAIT_EXTENSION_USEC = 10_000_000;

interface SdNotifyAddon {
  sendState(state: string): void;
}

/**
 * Nothing when NOTIFY_SOCKET is unset. Otherwise the `sd-notify` addon (libsystemd), or, if it is
 * missing or was built for another Node, a spawned `systemd-notify` (needs NotifyAccess=all).
 * WATCHDOG=1 goes out at half of WATCHDOG_USEC from the event loop: a hung loop stops the pings
 * and systemd restarts the agent.
 */
export function createNotifier(log: Logger, env: NodeJS.ProcessEnv = process.env): Notifier {
  if (!env.NOTIFY_SOCKET) return { via: 'none', ready() {}, status() {}, waiting() {}, stopping() {}, close() {} };
  let send: (state: string) => void;
  let via: Notifier['via'];
  try {
    // SNAPBACK_NOTIFY=systemd-notify forces the fallback (tests; a broken addon in the field).
    if (env.SNAPBACK_NOTIFY === 'systemd-notify') throw new Error('SNAPBACK_NOTIFY=systemd-notify');
    const addon = createRequire(import.meta.url)('sd-notify') as SdNotifyAddon;
    send = (state) => addon.sendState(state);
    via = 'sd-notify';
  } catch (err) {
    log.info({ err: (err as Error).message.split('\n')[0] }, 'sd-notify addon unavailable; using systemd-notify');
    send = (state) => {
      const child = spawn('systemd-notify', [`--pid=${process.pid}`, ...state.split('\n').filter(Boolean)], { stdio: 'ignore' });
      child.on('error', () => {});
    };
    via = 'systemd-notify';
  }
  let timer: NodeJS.Timeout | undefined;
  const usec = Number(env.WATCHDOG_USEC);
  const forUs = !env.WATCHDOG_PID || Number(env.WATCHDOG_PID) === process.pid;
  if (usec > 0 && forUs) {
    const every = Math.max(100, Math.floor(usec / 2000));
    timer = setInterval(() => send('WATCHDOG=1'), every);
    log.info({ everyMs: every }, 'systemd watchdog enabled');
  }
  let lastStatus = '';
  return {
    via,
    ready: () => send('READY=1'),
    status(text) {
      if (text === lastStatus) return;
      lastStatus = text;
      send(`STATUS=${text.replace(/\n/g, ' ')}`);
    },
    waiting(text) {
      lastStatus = text;
      send(`STATUS=${text.replace(/\n/g, ' ')}\nEXTEND_TIMEOUT_USEC=${WAIT_EXTENSION_USEC}`);
    },
    stopping: () => send('STOPPING=1'),
    close: () => timer && clearInterval(timer),
  };
}

// ---- the fallback timer -------------------------------------------------------------------------

/**
 * A transient timer owned by PID 1 that runs `snapback-agent revert --id ID` of the agent running
 * now (the known-good one) a little after the deadline, even if the agent is dead, stopped or
 * masked. Re-arming starts the new timer before stopping the old one, so there is never a gap.
 */
export class FallbackTimer {
  private readonly command: string[];
  private readonly log: Logger;
  private seq = 0;
  /** arm and cancel run one after another: a cancel must see the timer an earlier arm created */
  private chain: Promise<unknown> = Promise.resolve();

  constructor(command: string[], log: Logger) {
    this.command = command;
    this.log = log;
  }

  private serial<T>(op: () => Promise<T>): Promise<T> {
    const next = this.chain.then(op);
    this.chain = next.catch(() => undefined);
    return next;
  }

  static unitPrefix(id: string): string {
    return `snapback-fallback-${id}`;
  }

  arm(id: string, inSec: number): Promise<void> {
    return this.serial(() => this.armNow(id, inSec));
  }

  cancel(id: string): Promise<void> {
    return this.serial(() => this.stopAll(id));
  }

  private async armNow(id: string, inSec: number): Promise<void> {
    const unit = `${FallbackTimer.unitPrefix(id)}-${Date.now().toString(36)}${(this.seq++).toString(36)}`;
    const r = await run(
      'systemd-run',
      [
        `--unit=${unit}`,
        `--on-active=${Math.max(1, Math.ceil(inSec))}s`,
        '--timer-property=AccuracySec=1s',
        // The revert needs nix-env and systemd-run: give it the agent's PATH (the unit's `path`).
        '-E', 'PATH',
        '--collect',
        '--quiet',
        '--no-ask-password',
        '--description=snapback: revert deployment ' + id + ' if nobody confirmed it',
        ...this.command,
        'revert',
        '--id',
        id,
      ],
    );
    if (r.exitCode !== 0) throw new Error(`systemd-run could not arm the fallback timer: ${String(r.stderr).trim()}`);
    this.log.info({ deployment: id, unit: `${unit}.timer`, inSec: Math.ceil(inSec) }, 'fallback timer armed');
    await this.stopAll(id, `${unit}.timer`);
  }

  /** Stops every fallback timer of `id` (except `keep`). */
  private async stopAll(id: string, keep?: string): Promise<void> {
    const r = await run('systemctl', ['list-units', '--all', '--plain', '--no-legend', '--no-pager', `${FallbackTimer.unitPrefix(id)}-*.timer`]);
    const units = String(r.stdout)
      .split('\n')
      .map((l) => l.trim().split(/\s+/)[0])
      .filter((u): u is string => !!u && u !== keep);
    if (units.length) await run('systemctl', ['stop', ...units]);
  }
}

// ---- the agent's own unit -------------------------------------------------------------------------

/** The service unit this process runs in, from its cgroup (`…/snapback-agent.service`). */
export function ownUnit(): string | undefined {
  try {
    const cgroup = readFileSync('/proc/self/cgroup', 'utf8');
    return /\/([^/\n]+\.service)\s*$/m.exec(cgroup)?.[1];
  } catch {
    return undefined;
  }
}

/** `systemctl cat UNIT`: the unit file and drop-ins, which name the package in ExecStart. */
export async function unitText(unit: string): Promise<string | undefined> {
  const r = await run('systemctl', ['cat', '--no-pager', unit]);
  return r.exitCode === 0 ? String(r.stdout) : undefined;
}
