// `snapback`: the controller CLI, a thin skin over fleet loading, sessions and the deploy flow.
// Exit codes (DESIGN §6): 0 all confirmed; 1 some host reverted or failed; 2 usage or config error;
// 3 could not reach or authenticate a host before changing anything; 4 outcome unknown.

import { existsSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { execa } from 'execa';
import { UsageError, parseCommandLine, positiveInt, reportError, wantsJson } from '../shared/cli.ts';
import { EXIT, SnapbackError, exitCodeFor } from '../shared/errors.ts';
import { isHost, loadFleet, parseFleet, type Fleet, type FleetHost } from '../shared/fleet.ts';
import { MAX_SECONDS, describeOutcome, flakeRefSchema, type Target } from '../shared/model.ts';
import { resultLine } from '../shared/output.ts';
import { describeStatus } from '../shared/text.ts';
import { VERSION } from '../shared/version.ts';
import { exitCodeOf } from './deploy.ts';
import { deployFleet } from './orchestrate.ts';
import { resolveSigners } from './identity.ts';
import { planDeploy, type PlanOptions } from './plan.ts';
import { renderer } from './render.ts';
import { clean, oneLine } from '../shared/terminal.ts';
import { Session } from './session.ts';

const USAGE = `snapback ${VERSION} — deploy NixOS systems that revert on their own unless confirmed

usage: snapback <command> [options]      (snapback help COMMAND: that command's options)

  deploy [HOST…|--all|--tag T]   activate, reconnect, probe, confirm (or roll back) each host
         [TOPLEVEL]               one host: push ./result (or a /nix/store path) and activate it
         [--flake REF]            build REF#nixosConfigurations.<host>…toplevel here, push, activate
         [--build-on local|host]  where a flake is built (default: buildOn in the fleet file, local)
         [--substitute-on-host]   the host fetches what its own caches have; only the rest is pushed
         [--timeout S]            confirm window (else the host's confirmTimeoutSec, defaults, or the agent's default)
         [--parallel N]           hosts at once (default: defaults.parallel, 10)
         [--atomic]               confirm nobody until every host passed its probes, else roll all back
         [--dry-run]              build or fetch, then only show what dry-activate would change
  status [HOST…]                 state, countdown and last outcome of each host (default: all)
  confirm HOST                   confirm HOST's running trial (over a fresh connection)
  rollback HOST                  revert HOST's running trial now
  history HOST [--limit N]       HOST's deployment history
  help [COMMAND]                 this text, or COMMAND's own usage and options

options: --fleet FILE (default ./snapback.json; without it, --flake REF reads the flake's 'snapback' output),
         --json, --help, --version
exit codes: 0 all confirmed; 1 some host reverted or failed; 2 usage or config error;
            3 could not reach or authenticate a host before changing anything; 4 outcome unknown`;

const FLEET = `  --fleet FILE             the fleet file (default ./snapback.json; without one, --flake REF reads REF#snapback)
  --json                   JSON Lines: events, then one {"type":"result","exit":N,…}`;

const COMMANDS: Record<string, string> = {
  deploy: `usage: snapback deploy [HOST…|--all|--tag T] [TOPLEVEL] [options]

Per host: activate the target as a trial, reconnect over a fresh connection, run the probes, then
confirm — or roll back when a probe fails. Hosts run in parallel, respecting dependsOn.

  HOST…                    the hosts to deploy (names in the fleet file)
  --all                    every host of the fleet file
  --tag T                  the hosts tagged T (repeatable)
  TOPLEVEL                 one host: push ./result (or a /nix/store path) and activate it
  --flake REF              build REF#nixosConfigurations.<host>.config.system.build.toplevel, push, activate
  --build-on local|host    where a flake is built (default: buildOn in the fleet file, local)
  --substitute-on-host     the host fetches what its own caches have; only the rest is pushed
  --timeout S              confirm window in seconds (else the host's confirmTimeoutSec, defaults, or the agent's)
  --parallel N             hosts at once (default: defaults.parallel, 10)
  --atomic                 confirm nobody until every host passed its probes, else roll all back
  --dry-run                build or fetch, then only show what dry-activate would change
${FLEET}`,
  status: `usage: snapback status [HOST…|--all|--tag T]\n\nState, countdown and last outcome of each host (default: all).\n\n${FLEET}`,
  confirm: `usage: snapback confirm HOST\n\nConfirm HOST's running trial, over a fresh connection.\n\n${FLEET}`,
  rollback: `usage: snapback rollback HOST\n\nRevert HOST's running trial now.\n\n${FLEET}`,
  history: `usage: snapback history HOST [--limit N]\n\nHOST's deployment history: every transition, who did it, the outcomes.\n\n  --limit N                only the last N entries\n${FLEET}`,
  help: `usage: snapback help [COMMAND]\n\nThe commands, or COMMAND's own usage and options.`,
};

const OPTIONS = {
  fleet: { type: 'string' },
  json: { type: 'boolean', default: false },
  all: { type: 'boolean', default: false },
  tag: { type: 'string', multiple: true },
  flake: { type: 'string' },
  'build-on': { type: 'string' },
  'substitute-on-host': { type: 'boolean' },
  timeout: { type: 'string' },
  parallel: { type: 'string' },
  limit: { type: 'string' },
  'dry-run': { type: 'boolean', default: false },
  atomic: { type: 'boolean', default: false },
  help: { type: 'boolean', short: 'h', default: false },
  version: { type: 'boolean', default: false },
} as const;

export async function main(argv: string[]): Promise<number> {
  const parsed = parseCommandLine('snapback', { usage: USAGE, commands: COMMANDS, options: Object.keys(OPTIONS), json: wantsJson(argv) }, () =>
    parseArgs({ args: argv, allowPositionals: true, options: OPTIONS }),
  );
  if (typeof parsed === 'number') return parsed;
  const { values: o, positionals } = parsed;
  const [command, ...names] = positionals as [string, ...string[]];
  try {
    // Checked before any use: a flake reference beginning with "-" would be an option to Nix.
    if (o.flake !== undefined && !flakeRefSchema.safeParse(`${o.flake}#snapback`).success) {
      throw new UsageError(`--flake must be a flake reference without spaces or "#" that does not begin with "-", not "${o.flake}"`);
    }
    const fleet = await fleetFrom(o.fleet, o.flake);
    switch (command) {
      case 'deploy': {
        // A word with a "/" (./result, /nix/store/…) is a toplevel, not a host name.
        const paths = names.filter((n) => n.includes('/'));
        if (paths.length > 1) throw new UsageError(`one toplevel at a time, not ${paths.join(' ')}`);
        if (paths.length && o.flake) throw new UsageError('give a toplevel or --flake REF, not both');
        const hosts = select(fleet, names.filter((n) => !n.includes('/')), o.all, o.tag ?? [], true);
        const timeoutSec = o.timeout ? positiveInt(o.timeout, '--timeout', MAX_SECONDS) : undefined;
        const parallel = o.parallel ? positiveInt(o.parallel, '--parallel') : fleet.defaults.parallel;
        const buildOn = o['build-on'];
        if (buildOn !== undefined && buildOn !== 'local' && buildOn !== 'host') throw new UsageError(`--build-on must be "local" or "host", not "${buildOn}"`);
        return await deploy(fleet, hosts, {
          json: o.json,
          parallel,
          dryRun: o['dry-run'],
          atomic: o.atomic,
          plan: {
            ...(o.flake ? { flake: o.flake } : {}),
            ...(paths[0] ? { path: paths[0] } : {}),
            ...(buildOn ? { buildOn } : {}),
            ...(o['substitute-on-host'] !== undefined ? { substitute: o['substitute-on-host'] } : {}),
          },
          ...(timeoutSec ? { timeoutSec } : {}),
        });
      }
      case 'status':
        return await status(fleet, select(fleet, names, o.all || names.length === 0, o.tag ?? [], false), o.json);
      case 'confirm':
      case 'rollback':
        if (names.length !== 1) throw new UsageError(`${command} takes one HOST`);
        return await act(fleet, names[0]!, command, o.json);
      case 'history':
        if (names.length !== 1) throw new UsageError('history takes one HOST');
        return await history(fleet, names[0]!, o.json, o.limit ? positiveInt(o.limit, '--limit') : undefined);
      default:
        throw new UsageError(`unknown command "${command}"`);
    }
  } catch (err) {
    return reportError('snapback', COMMANDS[command] ?? USAGE, err, o.json);
  }
}

/** Hosts named on the command line, or `--all`, or by `--tag`; in fleet-file order. */
function select(fleet: Fleet, names: string[], all: boolean, tags: string[], requireChoice: boolean): string[] {
  for (const n of names) if (!isHost(fleet, n)) throw new UsageError(`unknown host "${n}" (the fleet file has: ${Object.keys(fleet.hosts).join(', ')})`);
  const chosen = Object.entries(fleet.hosts)
    .filter(([name, h]) => all || names.includes(name) || h.tags.some((t) => tags.includes(t)))
    .map(([name]) => name);
  if (requireChoice && !chosen.length) throw new UsageError(names.length || tags.length ? 'no host matches' : 'name the hosts to deploy, or --all, or --tag T');
  return chosen;
}

/**
 * `--fleet FILE`, else ./snapback.json, else — with `--flake REF` — the flake's `snapback` output
 * (`nix eval --json REF#snapback`), so one flake can carry both the systems and the fleet.
 */
async function fleetFrom(file: string | undefined, flake: string | undefined): Promise<Fleet> {
  if (file || !flake || existsSync('snapback.json')) return loadFleet(file ?? 'snapback.json');
  const installable = `${flake}#snapback`;
  const r = await execa('nix', ['--extra-experimental-features', 'nix-command flakes', 'eval', '--json', '--', installable], { reject: false, stdin: 'ignore' });
  if (r.exitCode !== 0) {
    const why = String(r.stderr).trim().split('\n').filter(Boolean).slice(-2).join(' | ');
    throw new SnapbackError('config-invalid', `no snapback.json here, and nix eval ${installable} failed: ${why}`);
  }
  return parseFleet(String(r.stdout), installable);
}

async function deploy(
  fleet: Fleet,
  names: string[],
  opts: { json: boolean; parallel: number; dryRun: boolean; atomic: boolean; plan: Omit<PlanOptions, 'emit'>; timeoutSec?: number },
): Promise<number> {
  checkAcyclic(fleet, names);
  const signers = await resolveSigners(fleet);
  // Every host has its row from the first frame, before a local build starts.
  const out = renderer(opts.json ? 'json' : process.stdout.isTTY ? 'live' : 'text', process.stdout, { hosts: names });
  const { targets, pushes } = await planDeploy(fleet, names, { ...opts.plan, emit: (e) => out.event(e) });
  const results = await deployFleet(fleet, names, {
    targets,
    pushes,
    parallel: opts.parallel,
    atomic: opts.atomic,
    dryRun: opts.dryRun,
    ...(opts.timeoutSec ? { timeoutSec: opts.timeoutSec } : {}),
    signers,
    emit: (e) => out.event(e),
  });
  const exit = exitCodeOf(results);
  out.result(results, exit);
  return exit;
}

function checkAcyclic(fleet: Fleet, names: string[]): void {
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = (n: string, path: string[]) => {
    if (state.get(n) === 'done') return;
    if (state.get(n) === 'visiting') throw new SnapbackError('config-invalid', `dependsOn forms a cycle: ${[...path, n].join(' → ')}`);
    state.set(n, 'visiting');
    for (const d of fleet.hosts[n]!.dependsOn) if (names.includes(d)) visit(d, [...path, n]);
    state.set(n, 'done');
  };
  for (const n of names) visit(n, []);
}

async function withSession<T>(fleet: Fleet, name: string, fn: (s: Session) => Promise<T>): Promise<T> {
  if (!isHost(fleet, name)) throw new UsageError(`unknown host "${name}" (the fleet file has: ${Object.keys(fleet.hosts).join(', ')})`);
  const host = fleet.hosts[name]!;
  const s = await Session.open(name, host, await resolveSigners(fleet));
  try {
    return await fn(s);
  } finally {
    s.close();
  }
}

async function status(fleet: Fleet, names: string[], json: boolean): Promise<number> {
  const signers = await resolveSigners(fleet);
  const rows = await Promise.all(
    names.map(async (name) => {
      try {
        const s = await Session.open(name, fleet.hosts[name]!, signers);
        s.close();
        return { host: name, ok: true as const, status: s.welcome.state };
      } catch (err) {
        if (err instanceof SnapbackError && err.code === 'config-invalid') throw err;
        return { host: name, ok: false as const, code: err instanceof SnapbackError ? err.code : ('unreachable' as const), error: (err as Error).message };
      }
    }),
  );
  const exit = rows.every((r) => r.ok) ? EXIT.ok : EXIT.unreachable;
  // What a host says is shown without terminal control characters (shared/terminal.ts).
  if (json) process.stdout.write(resultLine(exit, { hosts: rows }));
  else for (const r of rows) process.stdout.write(`${r.host}: ${r.ok ? clean(describeStatus(r.status)).split('\n').join('\n  ') : `unreachable: ${oneLine(r.error ?? '')}`}\n`);
  return exit;
}


async function act(fleet: Fleet, name: string, what: 'confirm' | 'rollback', json: boolean): Promise<number> {
  return withSession(fleet, name, async (s) => {
    const st = s.welcome.state;
    const id = st.deployment?.id;
    if (!id) {
      const msg = `${name} runs no trial${st.last ? ` (last: ${st.last.id} ${describeOutcome(st.last.outcome)})` : ''}`;
      return report(json, { host: name, ok: false, code: 'no-trial', message: msg }, EXIT.failed);
    }
    const token = s.welcome.confirm?.token;
    if (what === 'confirm' && !token) return report(json, { host: name, ok: false, code: 'not-ready', message: `${name}: deployment ${id} is ${st.phase}; retry` }, EXIT.failed);
    const r = await s.command(what === 'confirm' ? { type: 'confirm', id, token: token! } : { type: 'rollback', id });
    if (r.type === 'outcome') {
      const wanted = what === 'confirm' ? 'confirmed' : 'reverted';
      return report(json, { host: name, ok: true, id, outcome: r.outcome, message: `${name}: ${describeOutcome(r.outcome)}` }, r.outcome.outcome === wanted ? EXIT.ok : EXIT.failed);
    }
    if (r.type === 'error') return report(json, { host: name, ok: false, code: r.code, message: `${name}: ${r.message}` }, exitCodeFor(r.code));
    return report(json, { host: name, ok: false, code: 'internal', message: `unexpected answer ${r.type}` }, EXIT.unknown);
  });
}

function report(json: boolean, body: { message: string } & Record<string, unknown>, exit: number): number {
  process.stdout.write(json ? resultLine(exit, body) : clean(body.message) + '\n');
  return exit;
}

async function history(fleet: Fleet, name: string, json: boolean, limit?: number): Promise<number> {
  return withSession(fleet, name, async (s) => {
    const r = await s.request({ type: 'history', ...(limit ? { limit } : {}) });
    if (r.type !== 'history') throw new SnapbackError('unreachable', `${name}: no history answer`);
    // The one result line even when the history is empty: a script reads `entries`, never nothing.
    if (json) process.stdout.write(resultLine(EXIT.ok, { ok: true, host: name, entries: r.entries }));
    else if (!r.entries.length) process.stdout.write(`${name}: no history yet\n`);
    else
      for (const e of r.entries) {
        process.stdout.write(oneLine(`${e.at} ${e.id} ${e.from} → ${e.to} (${e.event}) by ${e.by.who} via ${e.by.channel}${e.outcome ? `: ${describeOutcome(e.outcome)}` : ''}`) + '\n');
      }
    return EXIT.ok;
  });
}
