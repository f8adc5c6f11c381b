// Deploying a fleet: hosts in parallel (at most `parallel` at once), each starting only after the
// hosts it depends on; with `atomic`, nobody is confirmed until every host passed its probes, and
// if one fails — or a passed host's window runs out while it waits — every host is rolled back.
// Ctrl-C stops every decision (nothing is started, confirmed or rolled back by it), says which hosts
// are in a trial, when each reverts and the commands that decide it; a second Ctrl-C exits.
// With `hold`, every host is left in its trial once its probes passed, for the operator to decide.

import { existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Fleet } from '../shared/fleet.ts';
import type { Target } from '../shared/model.ts';
import type { Signer } from '../shared/ssh.ts';
import { Interruption, deployHost, finish, trial, type DeployEvent, type DeployHostOptions, type HostResult, type Passed, type PushPlan } from './deploy.ts';

export interface FleetDeployOptions {
  targets: Map<string, Target>;
  /** hosts whose toplevel comes from the operator's store: pushed before it is activated */
  pushes?: Map<string, PushPlan>;
  parallel: number;
  atomic: boolean;
  dryRun: boolean;
  timeoutSec?: number;
  signers: Signer[];
  emit: (e: DeployEvent) => void;
  /** who handles Ctrl-C: by default deployFleet itself, for as long as it runs (see onInterrupt) */
  interruption?: Interruption;
  /** leave every host in its trial once its probes passed (`--hold`); not with `atomic` or `dryRun` */
  hold?: boolean;
  /** a trial boot per host (`--reboot`) */
  reboot?: boolean;
  /** the options that find this fleet again, for the commands shown (default: fleetArgs(process.argv)) */
  fleetArgs?: string[];
}

const mono = () => performance.now();

export async function deployFleet(fleet: Fleet, names: string[], opts: FleetDeployOptions): Promise<HostResult[]> {
  const ended = new Set<string>();
  const emit = (e: DeployEvent) => {
    if (e.type === 'done') ended.add(e.host);
    opts.emit(e);
  };
  if (opts.hold && (opts.atomic || opts.dryRun)) throw new Error('hold is for a real deploy without atomic');
  const interruption = opts.interruption ?? new Interruption(opts.fleetArgs ?? fleetArgs(process.argv));
  const stopListening = opts.interruption ? () => {} : onInterrupt(interruption, () => names.filter((n) => !ended.has(n)), emit);
  try {
    return await deployAll(fleet, names, { ...opts, emit, interruption });
  } finally {
    stopListening();
  }
}

/**
 * Ctrl-C handling, from now until the returned function is called. The first: if no host was sent
 * `activate`, nothing changed and the controller exits (130); otherwise it stops deciding and says
 * where every host stands. The second exits at once, saying again which hosts keep their trials.
 */
export function onInterrupt(x: Interruption, pending: () => string[], emit: (e: DeployEvent) => void, exit: (code: number) => void = (c) => process.exit(c)): () => void {
  let presses = 0;
  const handler = () => {
    presses++;
    const live = pending().filter((n) => x.live.has(n));
    if (presses === 1) {
      x.interrupt();
      const exiting = live.length === 0;
      for (const n of exiting ? pending() : live) emit(x.event(n, 1, exiting));
      if (exiting) exit(130);
      return;
    }
    for (const n of live) emit(x.event(n, 2, true));
    exit(130);
  };
  process.on('SIGINT', handler);
  return () => void process.off('SIGINT', handler);
}

/** The options of this command line that find the same fleet again: `--fleet FILE`, or `--flake REF` when it was the fleet's source. */
export function fleetArgs(argv: string[]): string[] {
  const value = (name: string): string | undefined => {
    for (let i = 0; i < argv.length; i++) {
      if (argv[i] === name) return argv[i + 1];
      if (argv[i]!.startsWith(`${name}=`)) return argv[i]!.slice(name.length + 1);
    }
    return undefined;
  };
  const file = value('--fleet');
  if (file !== undefined) return ['--fleet', file];
  const flake = value('--flake');
  if (flake !== undefined && !existsSync('snapback.json')) return ['--flake', flake];
  return [];
}

async function deployAll(fleet: Fleet, names: string[], opts: FleetDeployOptions & { interruption: Interruption }): Promise<HostResult[]> {
  const hostOptions = (name: string): DeployHostOptions => {
    const host = fleet.hosts[name]!;
    const timeoutSec = opts.timeoutSec ?? host.confirmTimeoutSec ?? fleet.defaults.confirmTimeoutSec;
    return {
      name,
      host,
      target: opts.targets.get(name)!,
      ...(opts.pushes?.has(name) ? { push: opts.pushes.get(name)! } : {}),
      ...(timeoutSec ? { timeoutSec } : {}),
      probes: host.probes ?? fleet.defaults.probes ?? [],
      probeTimeoutSec: fleet.defaults.probeTimeoutSec,
      graceSec: fleet.defaults.outcomeGraceSec,
      dryRun: opts.dryRun,
      hold: opts.hold ?? false,
      reboot: opts.reboot ?? false,
      signers: opts.signers,
      emit: opts.emit,
      interruption: opts.interruption,
    };
  };
  const slots = semaphore(opts.parallel);
  const notStarted = (name: string, dep: string, status: string): HostResult => {
    const result: HostResult = { host: name, status: 'failed', message: `not started: dependency ${dep} is ${status}` };
    opts.emit({ type: 'done', host: name, result });
    return result;
  };
  const deps = (name: string) => fleet.hosts[name]!.dependsOn.filter((d) => names.includes(d));

  // Every selected host has its row from the start, saying what it waits for.
  let free = opts.parallel;
  for (const name of names) {
    const after = deps(name);
    const why = after.length ? `waiting for ${after.join(', ')} (dependsOn)` : free-- > 0 ? 'connecting…' : `queued (--parallel ${opts.parallel})`;
    opts.emit({ type: 'queued', host: name, why });
  }

  if (!opts.atomic || opts.dryRun) {
    // A dependency must be confirmed first; a dry run changes nothing, so nothing waits for it.
    // Held, a dependency has passed its probes, which is all --atomic asks of one either.
    const started = new Map<string, Promise<HostResult>>();
    const run = (name: string): Promise<HostResult> => {
      let p = started.get(name);
      if (!p) {
        p = (async () => {
          const before = await Promise.all(deps(name).map(run));
          const blocked = opts.dryRun ? undefined : before.find((r) => r.status !== 'confirmed' && !(opts.hold && r.status === 'held'));
          if (blocked) return notStarted(name, blocked.host, blocked.status);
          return slots.with(() => deployHost(hostOptions(name)));
        })();
        started.set(name, p);
      }
      return p;
    };
    return Promise.all(names.map(run));
  }

  // Atomic: trials first, then one decision for everybody.
  const results = new Map<string, HostResult>();
  const passed = new Map<string, Passed>();
  const finishing: Promise<void>[] = [];
  let abortedBecause: string | undefined;
  const rollBack = (p: Passed, why: string) =>
    finishing.push(finish(hostOptions(p.host), p, { confirm: false, why: `atomic: ${why}` }).then((r) => void results.set(p.host, r)));
  const abort = (why: string) => {
    if (abortedBecause) return;
    abortedBecause = why;
    for (const p of passed.values()) rollBack(p, why);
    passed.clear();
  };

  const trials = new Map<string, Promise<'passed' | 'ended'>>();
  const run = (name: string): Promise<'passed' | 'ended'> => {
    let p = trials.get(name);
    if (!p) {
      p = (async () => {
        const before = await Promise.all(deps(name).map(run));
        const blocker = deps(name).find((_, i) => before[i] !== 'passed');
        if (blocker || abortedBecause) {
          results.set(name, notStarted(name, blocker ?? 'another host', blocker ? results.get(blocker)?.status ?? 'failed' : 'rolled back'));
          abort(`${name} was not started`);
          return 'ended';
        }
        // Hosts hold no slot while they wait for the decision, or a small --parallel would deadlock.
        const t = await slots.with(() => trial(hostOptions(name)));
        if (t.kind === 'ended') {
          results.set(name, t.result);
          abort(`${name} ${t.result.status}: ${t.result.message}`);
          return 'ended';
        }
        if (abortedBecause) {
          rollBack(t, abortedBecause);
          return 'passed';
        }
        passed.set(name, t);
        opts.emit({ type: 'waiting', host: name, id: t.id, seconds: Math.max(0, Math.floor((t.lastCall - mono()) / 1000)), why: 'probes passed; holding until every host has (--atomic)' });
        return 'passed';
      })();
      trials.set(name, p);
    }
    return p;
  };

  // While hosts wait, a window may run out: decide before any host reverts on its own.
  let watching = true;
  const watch = (async () => {
    while (watching && !abortedBecause) {
      const late = [...passed.values()].find((p) => mono() >= p.lastCall);
      if (late) abort(`${late.host}'s confirm window ran out while waiting for the others`);
      await sleep(200);
    }
  })();
  await Promise.all(names.map(run));
  watching = false;
  await watch;

  if (!abortedBecause) {
    await Promise.all([...passed.values()].map(async (p) => results.set(p.host, await finish(hostOptions(p.host), p, { confirm: true }))));
  }
  await Promise.all(finishing);
  return names.map((n) => results.get(n)!);
}

function semaphore(limit: number) {
  let running = 0;
  const queue: (() => void)[] = [];
  return {
    async with<T>(fn: () => Promise<T>): Promise<T> {
      if (running >= limit) await new Promise<void>((r) => queue.push(r));
      running++;
      try {
        return await fn();
      } finally {
        running--;
        queue.shift()?.();
      }
    },
  };
}
