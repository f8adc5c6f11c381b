// `snapback`: the controller CLI, a thin skin over fleet loading, sessions and the deploy flow.
// Exit codes (DESIGN §6): 0 all confirmed; 1 some host reverted or failed; 2 usage or config error;
// 3 could not reach or authenticate a host before changing anything; 4 outcome unknown.

import { existsSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { run } from '../shared/exec.ts';
import { UsageError, parseCommandLine, positiveInt, reportError, wantsJson } from '../shared/cli.ts';
import { EXIT, SnapbackError, exitCodeFor } from '../shared/errors.ts';
import { hostOnlyFleet, isHost, loadFleet, parseFleet, type Fleet, type FleetHost } from '../shared/fleet.ts';
import { MAX_SECONDS, describeOutcome, flakeRefSchema } from '../shared/model.ts';
import { resultLine } from '../shared/output.ts';
import { describeStatus, duration } from '../shared/text.ts';
import { VERSION } from '../shared/version.ts';
import { exitCodeOf } from './deploy.ts';
import { deployFleet } from './orchestrate.ts';
import { defaultIdentity, resolveSigners } from './identity.ts';
import { planDeploy, type PlanOptions } from './plan.ts';
import { renderer } from './render.ts';
import { clean, oneLine } from '../shared/terminal.ts';
import { Session, expectedHostKeys } from './session.ts';

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
         [--hold]                 probe, then leave the trial running: print its deadline and the commands
         [--reboot]               a trial boot: boot the new system once (kernel, initrd, kernel parameters);
                                  the boot default moves only on confirm
         [--url U] [--host-key K] [--probe P]   one host without a fleet file (see: snapback help deploy)
  status [HOST…]                 state, countdown and last outcome of each host (default: all)
  confirm HOST                   confirm HOST's running trial (over a fresh connection)
  rollback HOST                  revert HOST's running trial now
  extend HOST SECONDS            move HOST's deadline to SECONDS from now
  history HOST [--limit N]       HOST's deployment history
  help [COMMAND]                 this text, or COMMAND's own usage and options

options: --fleet FILE (default ./snapback.json; without it, --flake REF reads the flake's 'snapback' output;
         with neither, HOST is a host name: ws://HOST:7731, its key from ~/.ssh/known_hosts), --json, --help, --version
exit codes: 0 all confirmed; 1 some host reverted or failed; 2 usage or config error;
            3 could not reach or authenticate a host before changing anything; 4 outcome unknown`;

const FLEET = `  --fleet FILE             the fleet file (default ./snapback.json; without one, --flake REF reads REF#snapback)
  --url U, --host-key K    without a fleet file: the agent's URL (default ws://HOST:7731) and the host's key
                           line (default: ~/.ssh/known_hosts, as ssh reads it)
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
  --reboot                 a trial boot, for changes switch-to-configuration test cannot apply (kernel, initrd,
                           kernel modules or parameters): the host reboots into the new system once while its boot
                           default stays the previous one; reconnect, probe, confirm → the default moves; a failed
                           probe, rollback or the deadline reboot it into the previous system (systemd-boot or GRUB)
  --hold                   probe, then neither confirm nor roll back: leave the trial running and print its
                           deadline and the commands that confirm, extend or roll it back (status "held", exit 0)

Without a fleet file (no ./snapback.json, no --fleet, and no 'snapback' output in the flake), HOST is a
host name: snapback deploy web1.lan --flake .#web1 (REF#NAME names the configuration; --flake REF alone
means REF#<HOST up to its first dot>), or snapback deploy web1.lan ./result. The agent is ws://HOST:7731,
the host key comes from ~/.ssh/known_hosts, the identity from ssh-agent or ~/.ssh/id_ed25519, and a TCP
connect to the agent's port over a fresh connection is the probe.
  --probe P                another probe (repeatable): the fleet file's syntax as JSON ('{"tcp":"web1.lan:22"}'),
                           tcp:HOST:PORT, http(s)://URL (expects 200) or command:CMD
${FLEET}`,
  status: `usage: snapback status [HOST…|--all|--tag T]\n\nState, countdown and last outcome of each host (default: all).\n\n${FLEET}`,
  confirm: `usage: snapback confirm HOST\n\nConfirm HOST's running trial, over a fresh connection.\n\n${FLEET}`,
  rollback: `usage: snapback rollback HOST\n\nRevert HOST's running trial now.\n\n${FLEET}`,
  extend: `usage: snapback extend HOST SECONDS\n\nMove the deadline of HOST's running trial to SECONDS from now (the revert target never changes).\n\n${FLEET}`,
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
  hold: { type: 'boolean', default: false },
  reboot: { type: 'boolean', default: false },
  url: { type: 'string' },
  'host-key': { type: 'string' },
  probe: { type: 'string', multiple: true },
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
    if (o.flake !== undefined && !flakeRefSchema.safeParse(o.flake.includes('#') ? o.flake : `${o.flake}#snapback`).success) {
      throw new UsageError(`--flake must be a flake reference without spaces that does not begin with "-" (REF, or REF#NAME without a fleet file), not "${o.flake}"`);
    }
    if (o.probe?.length && command !== 'deploy') throw new UsageError('--probe is for deploy');
    const hostNames = command === 'extend' || command === 'history' ? names.slice(0, 1) : names.filter((n) => !n.includes('/'));
    const { fleet, args: fleetArgs, hostOnly } = await fleetFrom(o, hostNames);
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
        if (o.hold && o.atomic) throw new UsageError('--hold leaves every trial to you; --atomic decides them all at once: one or the other');
        if (o.hold && o['dry-run']) throw new UsageError('--dry-run starts no trial to hold: one or the other');
        if (o.reboot && o['dry-run']) throw new UsageError('--dry-run changes nothing, so there is nothing to boot: one or the other');
        if (o.reboot && o.atomic) throw new UsageError('--reboot with --atomic is not supported: a trial boot reverts by rebooting, one host at a time');
        return await deploy(fleet, hosts, {
          json: o.json,
          parallel,
          dryRun: o['dry-run'],
          atomic: o.atomic,
          hold: o.hold,
          reboot: o.reboot,
          fleetArgs,
          plan: {
            // Without a fleet file the flake is the host's target already (REF#NAME).
            ...(o.flake && !hostOnly ? { flake: o.flake } : {}),
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
      case 'extend':
        if (names.length !== 2) throw new UsageError('extend takes HOST and SECONDS');
        return await extend(fleet, names[0]!, positiveInt(names[1]!, 'SECONDS', MAX_SECONDS), o.json);
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

interface FleetOptions {
  fleet?: string | undefined;
  flake?: string | undefined;
  url?: string | undefined;
  'host-key'?: string | undefined;
  probe?: string[] | undefined;
}

/**
 * `--fleet FILE`, else ./snapback.json, else — with `--flake REF` — the flake's `snapback` output
 * (`nix eval --json REF#snapback`), so one flake can carry both the systems and the fleet; else the
 * hosts named on the command line, as host names (shared/fleet.ts hostOnlyFleet). `args`: the
 * options that find the same fleet again, for the commands a deploy prints.
 */
async function fleetFrom(o: FleetOptions, names: string[]): Promise<{ fleet: Fleet; args: string[]; hostOnly: boolean }> {
  const hostOnlyOptions = ['url', 'host-key', 'probe'].filter((k) => o[k as keyof FleetOptions] !== undefined).map((k) => `--${k}`);
  const named = o.flake?.includes('#');
  const file = o.fleet ?? (existsSync('snapback.json') ? 'snapback.json' : undefined);
  if (file !== undefined) {
    if (hostOnlyOptions.length) throw new UsageError(`${hostOnlyOptions.join(', ')}: for a host without a fleet file; ${file} is the fleet file here (set url, hostKey and probes there)`);
    if (named) throw new UsageError(`--flake REF#NAME names one configuration, for a host without a fleet file; with ${file}, --flake REF builds REF#<host> for each host`);
    return { fleet: loadFleet(file), args: o.fleet !== undefined ? ['--fleet', o.fleet] : [], hostOnly: false };
  }
  if (o.flake !== undefined && !named && !hostOnlyOptions.length) {
    const fleet = await flakeFleet(o.flake);
    if (fleet) return { fleet, args: ['--flake', o.flake], hostOnly: false };
  }
  if (!names.length) {
    throw new SnapbackError('config-invalid', `no fleet file here (./snapback.json, or --fleet FILE)${o.flake !== undefined && !named ? ` and no snapback output in ${o.flake}` : ''}: name the host (snapback deploy web1.lan --flake .#web1), or write a fleet file`);
  }
  const fleet = hostOnlyFleet(names, {
    ...(o.url !== undefined ? { url: o.url } : {}),
    ...(o['host-key'] !== undefined ? { hostKey: o['host-key'] } : {}),
    ...(o.flake !== undefined ? { flake: o.flake } : {}),
    ...(o.probe ? { probes: o.probe } : {}),
  });
  for (const [name, host] of Object.entries(fleet.hosts)) knownHostKey(name, host);
  const identity = await defaultIdentity();
  return { fleet: identity ? { ...fleet, identity } : fleet, args: [...(o.url !== undefined ? ['--url', o.url] : []), ...(o['host-key'] !== undefined ? ['--host-key', o['host-key']] : [])], hostOnly: true };
}

/** The flake's `snapback` output, or undefined when it has none. */
async function flakeFleet(flake: string): Promise<Fleet | undefined> {
  const installable = `${flake}#snapback`;
  const r = await run('nix', ['--extra-experimental-features', 'nix-command flakes', 'eval', '--json', '--', installable]);
  if (r.exitCode !== 0) {
    if (/does not provide attribute/.test(String(r.stderr))) return undefined;
    const why = String(r.stderr).trim().split('\n').filter(Boolean).slice(-2).join(' | ');
    throw new SnapbackError('config-invalid', `no snapback.json here, and nix eval ${installable} failed: ${why}`);
  }
  return parseFleet(String(r.stdout), installable);
}

/** Without a fleet file, the host's key must be in known_hosts (or --host-key): said before anything starts. */
function knownHostKey(name: string, host: FleetHost): void {
  if (host.hostKey) return;
  try {
    expectedHostKeys(name, host);
  } catch (err) {
    if (!(err instanceof SnapbackError) || err.code !== 'config-invalid') throw err;
    const url = new URL(host.url);
    const hostname = url.hostname.replace(/^\[|\]$/g, '');
    throw new SnapbackError(
      'config-invalid',
      `${name}: no fleet file here, so "${name}" is a host name, and ~/.ssh/known_hosts has no ssh-ed25519 key for ${hostname}${url.port ? ` or [${hostname}]:${url.port}` : ''}. ` +
        `Add the host's key as ssh would: ssh-keyscan -t ed25519 ${hostname} >> ~/.ssh/known_hosts (then check its fingerprint, ssh-keygen -lf ~/.ssh/known_hosts, against the host's own), ` +
        `or pass --host-key 'ssh-ed25519 AAAA…' (ssh-keyscan's line without the host name)`,
    );
  }
}

async function deploy(
  fleet: Fleet,
  names: string[],
  opts: { json: boolean; parallel: number; dryRun: boolean; atomic: boolean; hold: boolean; reboot: boolean; fleetArgs: string[]; plan: Omit<PlanOptions, 'emit'>; timeoutSec?: number },
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
    hold: opts.hold,
    reboot: opts.reboot,
    fleetArgs: opts.fleetArgs,
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

/** `snapback extend HOST SECONDS`: a signed `extend` of the running trial; the answer is its new deadline. */
async function extend(fleet: Fleet, name: string, seconds: number, json: boolean): Promise<number> {
  return withSession(fleet, name, async (s) => {
    const st = s.welcome.state;
    const id = st.deployment?.id;
    if (!id) return report(json, { host: name, ok: false, code: 'no-trial', message: `${name} runs no trial${st.last ? ` (last: ${st.last.id} ${describeOutcome(st.last.outcome)})` : ''}` }, EXIT.failed);
    const r = await s.command({ type: 'extend', id, seconds });
    if (r.type === 'trial') {
      const message = `${name}: deployment ${r.id} now reverts on its own at ${r.deadline} (in ${duration(r.secondsLeft)}) unless confirmed`;
      return report(json, { host: name, ok: true, id: r.id, deadline: r.deadline, secondsLeft: r.secondsLeft, message }, EXIT.ok);
    }
    if (r.type === 'error') return report(json, { host: name, ok: false, code: r.code, message: `${name}: ${r.message}` }, exitCodeFor(r.code));
    return report(json, { host: name, ok: false, message: `unexpected answer ${r.type}` }, EXIT.unknown);
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
        process.stdout.write(oneLine(`${e.at} ${e.id} ${e.from} → ${e.to} (${e.event}) by ${e.by.who} via ${e.by.channel}${e.bootId ? ` in boot ${e.bootId.slice(0, 8)}` : ''}${e.outcome ? `: ${describeOutcome(e.outcome)}` : ''}`) + '\n');
      }
    return EXIT.ok;
  });
}
