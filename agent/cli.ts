// `snapback-agent`: the daemon (`serve`) and the console commands, a thin skin over agent.ts and
// control.ts. Exit codes: 0 ok, 1 refused/reverted/failed, 2 usage or config, 3 agent unreachable, 4 unknown.

import { parseArgs } from 'node:util';
import { UsageError, parseCommandLine, positiveInt, reportError, wantsJson } from '../shared/cli.ts';
import type { AgentConfig } from '../shared/config.ts';
import { DEFAULT_CONFIG_PATH, controlSocketOf } from '../shared/console-config.ts';
import { EXIT, SnapbackError, exitCodeFor } from '../shared/errors.ts';
import { errorResult, eventLine, resultLine } from '../shared/output.ts';
import type { HistoryEntry, Outcome, Target } from '../shared/model.ts';
import { MAX_SECONDS, describeOutcome } from '../shared/words.ts';
import { VERSION } from '../shared/version.ts';
// Only what every console command needs is imported here; the daemon (agent/serve.ts), the engine
// and the state directory are imported by the commands that use them.
import type { Agent, Progress, Result, Status } from './agent.ts';
import { request } from './control-client.ts';
import type { ControlRequest } from './control.ts';
import { describeStatus, duration, kernelNote } from '../shared/text.ts';

const USAGE = `snapback-agent ${VERSION} — commit-confirmed activation of NixOS systems

usage: snapback-agent <command> [options]      (snapback-agent help COMMAND: that command's options)

  serve                               run the agent (the systemd unit does this)
  try STORE_PATH | --flake REF#HOST | --generation N  [--timeout S]
                                      activate as a trial, then ask on this terminal: keep it? [y/N]
  activate STORE_PATH | --flake REF#HOST | --generation N  [--timeout S] [--dry-run] [--reboot]
                                      build or fetch, activate as a trial, print the deadline
                                      (--dry-run: only show what dry-activate would change;
                                      --reboot: a trial boot, the host reboots into it once)
  status                              the running trial and its countdown, or the last outcome
  confirm [--id ID]                   commit the trial (profile + boot default)
  rollback [--id ID]                  revert the trial now
  extend SECONDS [--id ID]            move the deadline to SECONDS from now (revert target unchanged)
  history [--limit N]                 every transition, who did it, and the outcomes
  revert --id ID                      revert deployment ID (used by the fallback timer)
  check-config                        validate the configuration file and exit

options: --config FILE (default ${DEFAULT_CONFIG_PATH}, or $SNAPBACK_CONFIG), --json, --help, --version
exit codes: 0 ok, 1 refused/reverted/failed, 2 usage or configuration error, 3 agent unreachable, 4 outcome unknown`;

const COMMON = `common options: --config FILE (default ${DEFAULT_CONFIG_PATH}, or $SNAPBACK_CONFIG), --json`;
const TARGET = `  TARGET is one of:
    STORE_PATH            a toplevel in /nix/store (fetched from the configured caches if missing)
    --flake REF#HOST      the agent builds REF#nixosConfigurations.HOST.config.system.build.toplevel
    --generation N        generation N of the system profile`;

const COMMANDS: Record<string, string> = {
  serve: `usage: snapback-agent serve [--config FILE]\n\nRun the agent: the control socket, the network port, the deadline. The systemd unit runs this.`,
  try: `usage: snapback-agent try TARGET [--timeout S]

Activate TARGET as a trial, then ask on this terminal, with a countdown, "keep this configuration? [y/N]":
"y" confirms; "n", Enter, Ctrl-C or the deadline reverts. Needs a terminal: in scripts use
"snapback-agent activate TARGET" and then "snapback-agent confirm".

${TARGET}
  --timeout S             the confirm window in seconds (default: confirm.defaultTimeoutSec)

${COMMON}`,
  activate: `usage: snapback-agent activate TARGET [--timeout S] [--dry-run] [--reboot]

Build or fetch TARGET, activate it as a trial and print the deadline; it reverts at the deadline
unless confirmed (snapback-agent confirm).

${TARGET}
  --timeout S             the confirm window in seconds (default: confirm.defaultTimeoutSec)
  --dry-run               only show what switch-to-configuration dry-activate would change
  --reboot                a trial boot (kernel, initrd, kernel modules or parameters changed): the next boot
                          only starts TARGET, the boot default stays the running system; the host reboots now,
                          and the window counts from the new boot. Confirm moves the boot default; rollback or
                          the deadline reboot into the previous system; a boot that never comes up falls back
                          at the next power cycle (reverted: boot-failed)

${COMMON}`,
  status: `usage: snapback-agent status\n\nThe running trial and its countdown, or the last outcome (read from the state directory when the agent is down).\n\n${COMMON}`,
  confirm: `usage: snapback-agent confirm [--id ID]\n\nCommit the running trial: it becomes the profile's new generation and the boot default.\n\n  --id ID                 only if ID is the running deployment\n\n${COMMON}`,
  rollback: `usage: snapback-agent rollback [--id ID]\n\nRevert the running trial now.\n\n  --id ID                 only if ID is the running deployment\n\n${COMMON}`,
  extend: `usage: snapback-agent extend SECONDS [--id ID]\n\nMove the deadline to SECONDS from now; the revert target never changes.\n\n  --id ID                 only if ID is the running deployment\n\n${COMMON}`,
  history: `usage: snapback-agent history [--limit N]\n\nEvery transition: when, which deployment, from → to, who, through which channel, the outcome.\n\n  --limit N               only the last N entries\n\n${COMMON}`,
  revert: `usage: snapback-agent revert --id ID\n\nRevert deployment ID, through the agent or, when it is down, from the state directory (the fallback timer runs this).\n\n${COMMON}`,
  'check-config': `usage: snapback-agent check-config [--config FILE]\n\nValidate the configuration file and exit.`,
  help: `usage: snapback-agent help [COMMAND]\n\nThe commands, or COMMAND's own usage and options.`,
};

/** What a console command has of the configuration: the control socket, and the rest on demand. */
interface ConsoleConfig {
  controlSocket: string;
  /** the whole configuration, validated (`config-invalid` names every problem) */
  full: () => Promise<AgentConfig>;
}

const OPTIONS = {
  config: { type: 'string' },
  json: { type: 'boolean', default: false },
  flake: { type: 'string' },
  generation: { type: 'string' },
  timeout: { type: 'string' },
  id: { type: 'string' },
  limit: { type: 'string' },
  'dry-run': { type: 'boolean', default: false },
  reboot: { type: 'boolean', default: false },
  help: { type: 'boolean', short: 'h', default: false },
  version: { type: 'boolean', default: false },
} as const;

export async function main(argv: string[]): Promise<number> {
  const parsed = parseCommandLine('snapback-agent', { usage: USAGE, commands: COMMANDS, options: Object.keys(OPTIONS), json: wantsJson(argv) }, () =>
    parseArgs({ args: argv, allowPositionals: true, options: OPTIONS }),
  );
  if (typeof parsed === 'number') return parsed;
  const { values: o, positionals } = parsed;
  const [command, ...rest] = positionals as [string, ...string[]];
  // Before the configuration: a script gets its answer even on a host without one.
  if (command === 'try' && !process.stdin.isTTY) {
    const message = 'try asks on a terminal, and standard input is not one; in a script use "snapback-agent activate TARGET [--timeout S]", then "snapback-agent confirm"';
    if (o.json) printResult(EXIT.usage, errorResult('bad-request', message));
    else process.stderr.write(`snapback-agent: ${message}\n`);
    return EXIT.usage;
  }
  const configPath = o.config ?? process.env.SNAPBACK_CONFIG ?? DEFAULT_CONFIG_PATH;
  // serve, check-config and revert read the whole configuration, validated; the other commands only
  // need the control socket (and the rest when the agent is down): read without loading the schemas.
  const full = () => import('../shared/config.ts').then((m) => m.loadAgentConfig(configPath));
  let config: ConsoleConfig;
  try {
    const socket = ['serve', 'check-config', 'revert'].includes(command) ? undefined : controlSocketOf(configPath);
    if (socket) config = { controlSocket: socket, full };
    else {
      const all = await full();
      config = { controlSocket: all.controlSocket, full: async () => all };
    }
  } catch (err) {
    const denied = /EACCES|EPERM/.test((err as Error).message) && process.getuid?.() !== 0;
    const message = `${(err as Error).message}${denied ? ' (snapback-agent must run as root: try sudo)' : ''}`;
    if (o.json) printResult(EXIT.usage, errorResult('config-invalid', message));
    else process.stderr.write(`snapback-agent: ${message}\n`);
    return EXIT.usage;
  }
  try {
    switch (command) {
      case 'serve':
        return await (await import('./serve.ts')).serve(await config.full(), configPath);
      case 'check-config':
        if (o.json) printResult(EXIT.ok, { ok: true, config: await config.full() });
        else print(`${configPath}: ok`);
        return EXIT.ok;
      case 'status':
        return await status(config, o.json);
      case 'history':
        return await history(config, o.json, o.limit ? positiveInt(o.limit, '--limit') : undefined);
      case 'activate': {
        const target = parseTarget(rest, o.flake, o.generation);
        const timeoutSec = o.timeout ? positiveInt(o.timeout, '--timeout', MAX_SECONDS) : undefined;
        const dryRun = o['dry-run'] ? { dryRun: true } : {};
        if (o.reboot && o['dry-run']) throw new UsageError('--dry-run changes nothing, so there is nothing to boot: one or the other');
        const reboot = o.reboot ? { reboot: true } : {};
        return await ask(config, { cmd: 'activate', target, ...(timeoutSec ? { timeoutSec } : {}), ...dryRun, ...reboot, ...user() }, o.json);
      }
      case 'try': {
        const target = parseTarget(rest, o.flake, o.generation);
        const timeoutSec = o.timeout ? positiveInt(o.timeout, '--timeout', MAX_SECONDS) : undefined;
        return await tryIt(config, { cmd: 'activate', target, ...(timeoutSec ? { timeoutSec } : {}), ...user() }, o.json);
      }
      case 'confirm':
        return await ask(config, { cmd: 'confirm', ...(o.id ? { id: o.id } : {}), ...user() }, o.json);
      case 'rollback':
        return await ask(config, { cmd: 'rollback', ...(o.id ? { id: o.id } : {}), ...user() }, o.json);
      case 'extend': {
        if (rest.length !== 1) throw new UsageError('extend takes one argument: SECONDS');
        return await ask(config, { cmd: 'extend', seconds: positiveInt(rest[0]!, 'SECONDS', MAX_SECONDS), ...(o.id ? { id: o.id } : {}), ...user() }, o.json);
      }
      case 'revert': {
        if (!o.id) throw new UsageError('revert needs --id ID');
        return await revert(await config.full(), o.id, o.json);
      }
      default:
        throw new UsageError(`unknown command "${command}"`);
    }
  } catch (err) {
    return reportError('snapback-agent', COMMANDS[command] ?? USAGE, err, o.json);
  }
}

function print(s: string): void {
  process.stdout.write(s + '\n');
}

/** `--json`: the one result line, last (shared/output.ts). */
function printResult(exit: number, body: Record<string, unknown>): void {
  process.stdout.write(resultLine(exit, body));
}

/** `--json`: what the agent says while a request runs, one event line each; build and switch output is a `line`. */
function printEvent(p: Progress): void {
  const { type, ...rest } = p;
  process.stdout.write(eventLine(type === 'output' ? 'line' : type, rest));
}

/** `try`: the trial, then the question on the terminal; exit 0 only when the new system was kept. */
async function tryIt(config: { controlSocket: string }, req: Extract<ControlRequest, { cmd: 'activate' }>, json: boolean): Promise<number> {
  const { tryOnTerminal } = await import('./try.ts');
  const { cmd, result } = await tryOnTerminal(config.controlSocket, req, json ? process.stderr : process.stdout, showProgress, user());
  const exit = !result.ok ? exitCodeFor(result.code) : result.outcome?.outcome === 'confirmed' ? EXIT.ok : EXIT.failed;
  if (json) printResult(exit, result);
  else print(describeResult(cmd, result));
  return exit;
}

function parseTarget(rest: string[], flake: string | undefined, generation: string | undefined): Target {
  const given = [rest.length > 0, flake !== undefined, generation !== undefined].filter(Boolean).length;
  if (given !== 1 || rest.length > 1) throw new UsageError('give exactly one target: STORE_PATH, --flake REF#HOST or --generation N');
  if (flake !== undefined) return { flake };
  if (generation !== undefined) {
    if (!/^\d+$/.test(generation) || Number(generation) <= 0) throw new UsageError(`--generation must be a generation number, not "${generation}"`);
    return { generation: Number(generation) };
  }
  return { storePath: rest[0]! };
}

function user(): { user?: string } {
  const name = process.env.SUDO_USER ?? process.env.USER;
  return name && name !== 'root' ? { user: name } : {};
}

// ---- console commands -----------------------------------------------------------------------------

async function ask(config: { controlSocket: string }, req: ControlRequest, json: boolean): Promise<number> {
  const result = await request(config.controlSocket, req, json ? printEvent : showProgress);
  const exit = exitFor(req.cmd, result);
  if (json) printResult(exit, result);
  else print(describeResult(req.cmd, result));
  return exit;
}

function showProgress(p: Progress): void {
  if (p.type === 'output') process.stderr.write(`  | ${p.line}\n`);
  else if (p.type === 'phase') process.stderr.write(`${p.id}: ${p.phase}${p.toplevel && p.phase === 'activating' ? ` ${p.toplevel}` : ''}\n`);
  else if (p.type === 'confirm-refused') process.stderr.write(`${p.id}: confirm refused: ${p.problems.join('; ')}\n`);
}

function describeResult(cmd: string, r: Result): string {
  if (!r.ok) return `${cmd} refused (${r.code}): ${r.message}`;
  if (r.dryRun) return `dry run of ${r.toplevel}: switch-to-configuration dry-activate exited ${r.dryRun.exit ?? 'without a status'}; nothing was changed${r.kernel ? `; ${kernelNote(r.kernel)}` : ''}`;
  if (r.rebooting) {
    return `trial boot of ${r.toplevel}: rebooting into it once (${r.rebooting.loader} entry ${r.rebooting.entry}); the boot default stays the running system. Once it is up: snapback-agent status, then confirm (deployment ${r.id})`;
  }
  if (r.outcome) return `deployment ${r.id}: ${describeOutcome(r.outcome)}`;
  if (r.deadline) {
    const left = Math.max(0, Math.round((Date.parse(r.deadline) - Date.now()) / 1000));
    const what = cmd === 'extend' ? 'deadline moved' : `trial of ${r.toplevel ?? r.id} running`;
    const kernel = r.kernel ? `; ${kernelNote(r.kernel)}` : '';
    return `${what}: deployment ${r.id} reverts at ${r.deadline} (in ${duration(left)}) unless confirmed (snapback-agent confirm)${kernel}`;
  }
  return `${cmd}: ok${r.id ? ` (${r.id})` : ''}`;
}

function exitFor(cmd: string, r: Result): number {
  if (!r.ok) return exitCodeFor(r.code);
  if (r.dryRun) return r.dryRun.exit === 0 ? EXIT.ok : EXIT.failed;
  if (!r.outcome) return EXIT.ok;
  return wanted(cmd, r.outcome) ? EXIT.ok : EXIT.failed;
}

function wanted(cmd: string, o: Outcome): boolean {
  if (cmd === 'rollback' || cmd === 'revert') return o.outcome === 'reverted';
  return o.outcome === 'confirmed';
}


/** Asks the daemon; when it is down, reads the state directory (DESIGN §5). */
async function status(config: ConsoleConfig, json: boolean): Promise<number> {
  let s: Status;
  try {
    s = ((await request(config.controlSocket, { cmd: 'status', ...user() })) as unknown as { status: Status }).status;
  } catch (err) {
    if (!(err instanceof SnapbackError) || err.code !== 'unreachable') throw err;
    const [{ StateDir }, { statusOf }, { readBootId }, { readCurrentSystem }] = await Promise.all([import('./state-dir.ts'), import('./agent.ts'), import('./clock.ts'), import('./nix.ts')]);
    const all = await config.full();
    const state = new StateDir(all.stateDir).load();
    s = { ...statusOf(state, readBootId(all.system.bootIdFile), readCurrentSystem(all.system.currentSystem), all.system), offline: true };
  }
  if (json) printResult(EXIT.ok, { ok: true, ...s });
  else print(describeStatus(s));
  return EXIT.ok;
}


async function history(config: ConsoleConfig, json: boolean, limit?: number): Promise<number> {
  let entries: HistoryEntry[];
  try {
    entries = ((await request(config.controlSocket, { cmd: 'history', ...(limit ? { limit } : {}) })) as unknown as { history: HistoryEntry[] }).history;
  } catch (err) {
    if (!(err instanceof SnapbackError) || err.code !== 'unreachable') throw err;
    const { StateDir } = await import('./state-dir.ts');
    entries = new StateDir((await config.full()).stateDir).readHistory();
    if (limit) entries = entries.slice(-limit);
  }
  // The result line even when there is nothing yet: a script reads `entries`, never an empty output.
  if (json) printResult(EXIT.ok, { ok: true, entries });
  else if (!entries.length) print('no history yet');
  else
    for (const e of entries) {
      print(`${e.at} ${e.id} ${e.from} → ${e.to} (${e.event}) by ${e.by.who} via ${e.by.channel}${e.bootId ? ` in boot ${e.bootId.slice(0, 8)}` : ''}${e.outcome ? `: ${describeOutcome(e.outcome)}` : ''}${e.detail ? ` — ${e.detail}` : ''}`);
    }
  return EXIT.ok;
}

/**
 * `revert --id` is what the fallback timer runs. It asks the daemon; if the daemon is gone (crashed,
 * stopped, masked) it performs the revert itself from the state directory with the same engine.
 */
async function revert(config: AgentConfig, id: string, json: boolean): Promise<number> {
  const req: ControlRequest = { cmd: 'revert', id };
  // A daemon that holds the state directory but does not answer is hung: the watchdog restarts it
  // soon, and then it answers. Keep trying for a minute rather than act beside it.
  for (let attempt = 0; attempt < 60; attempt++) {
    try {
      return await ask(config, req, json);
    } catch (err) {
      if (!(err instanceof SnapbackError) || err.code !== 'unreachable') throw err;
    }
    const [{ createLogger }, { Agent }, { Metrics }, { OutcomeHooks }] = await Promise.all([import('./log.ts'), import('./agent.ts'), import('./metrics.ts'), import('./hooks.ts')]);
    const log = createLogger(config.log.level, 2);
    let agent: Agent;
    try {
      agent = Agent.open(config, log);
    } catch (err) {
      if (err instanceof SnapbackError && err.code === 'busy') {
        await new Promise((r) => setTimeout(r, 1000));
        continue;
      }
      throw err;
    }
    const metrics = new Metrics(agent, config.metrics, log);
    const hooks = OutcomeHooks.attach(agent, config.hooks.onOutcome, log);
    await agent.start();
    const result = await agent.rollback({ id, by: { who: 'fallback-timer', channel: 'fallback-timer' }, reason: 'fallback-timer' });
    await agent.idle();
    metrics.writeTextfile();
    await agent.close();
    await hooks.settled();
    const exit = exitFor('revert', result);
    if (json) printResult(exit, result);
    else print(describeResult('revert', result));
    return exit;
  }
  throw new SnapbackError('unreachable', `the agent holding ${config.stateDir} neither answers nor lets go`);
}
