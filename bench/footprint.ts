// Footprint and speed against baselines measured in the same run (tracker issue 12, DESIGN §10):
// `footprintRows()` for bench/run.ts, or `node bench/footprint.ts` alone for a table. Measures the
// compiled build (bench/compiled.ts), with real Nix and fake toplevels built before any timing.
//
// How each figure is measured:
// - RSS: VmRSS of /proc/PID/status. The baseline is a bare `node -e 'setInterval(()=>{}, 1<<30)'`
//   of the same binary (process.execPath), started just before the agent; both are read 2 s after
//   the agent logs "serving", and again after both sat idle side by side for BENCH_IDLE_SEC (60).
//   After the phases below (≥ 10 deployments) and 50 `Session.open` on the wire, the agent's RSS is
//   read again against the same bare process, read at the same instant.
// - Idle CPU: utime + stime of /proc/PID/stat (÷ CLK_TCK) over the idle period, per minute.
// - Phases: a console command from spawn to exit (`snapback-agent activate T --timeout 60`,
//   `confirm`, `rollback`) against the bare commands the agent runs for it, spawned directly
//   (no shell) on the same scratch host's profile and current-system link with the same fake
//   toplevels, interleaved round by round: activate = `nix-store --realise T` then
//   `T/bin/switch-to-configuration test`; confirm = `nix-env -p PROFILE --set T` then
//   `T/bin/switch-to-configuration boot`; rollback = `PREV/bin/switch-to-configuration test` (a
//   trial never touches the profile, so the agent's revert is that switch alone). Medians. For the
//   record (no goal): `snapback-agent status` against `node -e ''`, both spawn to exit: the part of
//   every console command that is the CLI's own start-up.
// - Revert lateness: a trial with the shortest window (confirm.minTimeoutSec = 1 s) left to
//   run out; lateness = the `at` of the history's outcome entry minus the `deadline` of its trial
//   entry (both the agent's wall clock, ms). "Killed": `kill -9` of the agent 150 ms before the
//   deadline and an immediate restart (the harness is the supervisor: systemd's RestartSec=1s is
//   not included), so the restarted agent finds the deadline passed and reverts at start.
// - Fleet: BENCH_FLEET_HOSTS (50) scratch agents on loopback, one fleet file; `snapback deploy
//   --all` (default parallelism, no probes) from spawn to exit, against `snapback deploy --all` of
//   a one-host fleet file, on each of 3 other hosts (median) in the same run — each agent, there
//   and in the fleet, on its first deployment since it started; the controller's VmRSS sampled every
//   50 ms during the fleet deploy; `snapback status --all` from spawn to exit (median of 3). For the
//   record (no goal): the CPU the agents (utime+stime with reaped children, /proc/PID/stat) and the
//   controller used during it; the same deploy back to each host's first generation with
//   --parallel N. A fake toplevel's switch script names its own host's links, so each host has
//   toplevels of its own. The floor (no goal): the bare commands of each fleet host's deployment
//   (those of the phases above), 10 hosts at once like the controller, no agent and no controller:
//   on a machine whose CPUs all the hosts share, no deploy --all can take less.
// Idle CPU is read in clock ticks (10 ms): short BENCH_IDLE_SEC runs give coarse figures.
// Progress goes to stderr; figures only into the rows.

import './compiled.ts';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { haveNix } from '../test/helpers/nix.ts';
import { ScratchHost, runController, type ControllerRun } from '../test/helpers/host.ts';
import { Session } from '../controller/session.ts';
import { keyFileSigner } from '../shared/ssh.ts';

export interface Row {
  name: string;
  value: number;
  unit: string;
  /** the goal bounds `ratio` when the row has one (a baseline's multiple), else `value` (see goalMet) */
  goal?: { max: number };
  /** the same measure of what the row is compared with, from the same run (same unit as value) */
  baseline?: { name: string; value: number };
  /** value / baseline.value */
  ratio?: number;
}

/** Whether the row meets its goal (true without one): `ratio` is checked when present, else `value`. */
export function goalMet(r: Row): boolean {
  if (!r.goal) return true;
  return (r.ratio ?? r.value) <= r.goal.max;
}

const envInt = (name: string, dflt: number) => {
  const v = process.env[name];
  const n = v === undefined || v === '' ? dflt : Number(v);
  if (!Number.isFinite(n) || n < 0) throw new Error(`${name} must be a number ≥ 0, not "${v}"`);
  return n;
};

const progress = (msg: string) => process.stderr.write(`footprint: ${msg}\n`);
export const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
export const rssMiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) / 1024;
/** rssMiB, or 0 once the process is gone (a sampler may outlive it by a tick). */
export const rssOrZero = (pid: number | undefined) => {
  try {
    return pid ? rssMiB(pid) : 0;
  } catch {
    return 0;
  }
};
let clkTck: number | undefined;
/** CPU seconds (user + system) the process has used. */
function cpuSec(pid: number): number {
  clkTck ??= Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after "PID (COMM) ": state is field 3; utime and stime are fields 14 and 15.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / clkTck;
}

/** CPU seconds of the process and of the children it has reaped (Nix, the switch, their shells). */
function cpuWithChildrenSec(pid: number): number {
  cpuSec(pid);
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / clkTck!;
}

/** Spawns argv (no shell) and resolves with its wall time in ms; throws on failure. */
function timed(argv: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const [cmd, ...args] = argv as [string, ...string[]];
    const c = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d) => (err += d));
    c.on('error', reject);
    c.on('exit', (code) => (code === 0 ? resolve(performance.now() - t0) : reject(new Error(`${argv.join(' ')}: exit ${code}: ${err.trim()}`))));
  });
}

/** `T/bin/switch-to-configuration MODE` */
const sw = (t: string, mode: string) => [join(t, 'bin/switch-to-configuration'), mode];

/** The bare commands the agent runs for a phase (the phases' baselines, and the fleet's floor). */
const bareCommands = {
  activate: (t: string) => [['nix-store', '--realise', t], sw(t, 'test')],
  confirm: (h: ScratchHost, t: string) => [['nix-env', '-p', h.profile, '--set', t], sw(t, 'boot')],
};

/** Runs argv one after the other; the total wall time in ms. */
async function timedAll(...argvs: string[][]): Promise<number> {
  let total = 0;
  for (const argv of argvs) total += await timed(argv);
  return total;
}

/** Spawns the bare baseline process: the same node, doing nothing, forever. */
function bareNode(): ChildProcess {
  return spawn(process.execPath, ['-e', 'setInterval(()=>{}, 1<<30)'], { stdio: 'ignore' });
}

function endChild(c: ChildProcess | undefined): Promise<void> {
  if (!c || c.exitCode !== null || c.signalCode !== null) return Promise.resolve();
  const gone = new Promise<void>((r) => c.once('exit', () => r()));
  c.kill('SIGKILL');
  return gone;
}

/** Console commands run on the scratch host; throws unless they exit 0. */
async function console0(h: ScratchHost, args: string[]): Promise<{ out: any; ms: number }> {
  const t0 = performance.now();
  const r = await h.cli(args);
  const ms = performance.now() - t0;
  if (r.code !== 0) throw new Error(`snapback-agent ${args.join(' ')}: exit ${r.code}: ${r.stdout}${r.stderr}`);
  return { out: r.out, ms };
}

/** A toplevel of `pool` that is not the running system. */
function pick(h: ScratchHost, pool: string[], turn: number): string {
  const current = realpathSync(h.current);
  for (let i = 0; i < pool.length; i++) {
    const t = pool[(turn + i) % pool.length]!;
    if (t !== current) return t;
  }
  throw new Error('no toplevel other than the running one');
}

/** The deadline of deployment `id`'s trial and the time its outcome was recorded, from the history. */
function lateness(h: ScratchHost, id: string): { ms: number; outcome: any } {
  const mine = h.history().filter((e) => e.id === id);
  const deadline = mine.filter((e) => e.deadline).at(-1)?.deadline as string | undefined;
  const end = mine.find((e) => e.outcome);
  if (!deadline || !end) throw new Error(`history of ${id} lacks its deadline or outcome: ${JSON.stringify(mine)}`);
  return { ms: Date.parse(end.at) - Date.parse(deadline), outcome: end.outcome };
}

/**
 * Hosts with an agent that may be running: on Ctrl-C or SIGTERM their agents (and the bare node)
 * are killed by PID, so an interrupted run leaves no 50 agents behind. Their directories stay.
 */
const live = new Set<{ agent?: ChildProcess | undefined }>();
function onSignal(signal: NodeJS.Signals): void {
  for (const h of live) h.agent?.kill('SIGKILL');
  process.stderr.write(`footprint: ${signal}: killed ${live.size} agents and controllers\n`);
  process.exit(130);
}
function track<T extends { agent?: ChildProcess | undefined }>(h: T): T {
  live.add(h);
  return h;
}

/** `snapback ARGS`, its process killed too on Ctrl-C. */
async function controller(args: string[], onSpawn?: (c: ChildProcess) => void): Promise<ControllerRun> {
  const holder: { agent?: ChildProcess } = {};
  track(holder);
  try {
    return await runController(args, {
      onSpawn: (c) => {
        holder.agent = c;
        onSpawn?.(c);
      },
    });
  } finally {
    live.delete(holder);
  }
}

// ---- 1–3: one scratch host ------------------------------------------------------------------------

async function hostRows(rows: Row[]): Promise<void> {
  const idleSec = envInt('BENCH_IDLE_SEC', 60);
  const phaseN = Math.max(1, envInt('BENCH_PHASE_N', 6));
  const sessionsN = envInt('BENCH_SESSIONS', 50);
  const lateN = envInt('BENCH_LATE_N', 20);
  const killN = envInt('BENCH_KILL_N', 5);

  // Production's log level: debug lines would be work an installed agent does not do.
  const h = track(new ScratchHost('footprint').enableWire());
  // 1 s: the shortest window the configuration allows (whole seconds, positive).
  h.writeConfig({ log: { level: 'info' }, confirm: { ...(h.config.confirm as object), minTimeoutSec: 1 } });
  h.install();
  let bare: ChildProcess | undefined;
  try {
    progress('building toplevels');
    const pool = [0, 1, 2].map((i) => h.toplevel(`fp${i}`));

    // 1. Idle: the bare node and the agent side by side.
    bare = bareNode();
    const bareHolder = track({ agent: bare as ChildProcess | undefined });
    const barePid = bare.pid!;
    await h.start();
    const pid = h.agent!.pid!;
    await sleep(2000);
    const bareStart = rssMiB(barePid);
    const agentStart = rssMiB(pid);
    const cpu0 = cpuSec(pid);
    const bareCpu0 = cpuSec(barePid);
    progress(`idle for ${idleSec} s`);
    await sleep(idleSec * 1000);
    const cpu1 = cpuSec(pid);
    const bareCpu1 = cpuSec(barePid);
    const bareIdle = rssMiB(barePid);
    const agentIdle = rssMiB(pid);
    const perMin = idleSec > 0 ? 60 / idleSec : 0;
    rows.push(ratioRow('agent RSS, idle 2 s after start', agentStart, 'MiB', 'bare node, 2 s after start', bareStart, 1.5));
    rows.push(ratioRow(`agent RSS, after ${idleSec} s idle`, agentIdle, 'MiB', `bare node, after the same ${idleSec} s`, bareIdle, 1.5));
    rows.push({ name: `agent CPU while idle (over ${idleSec} s, per minute)`, value: (cpu1 - cpu0) * perMin, unit: 's/min', goal: { max: 0.5 } });
    rows.push({ name: `  bare node CPU over the same ${idleSec} s, per minute`, value: (bareCpu1 - bareCpu0) * perMin, unit: 's/min' });

    // 2. Phases: the console against the bare commands, interleaved round by round.
    progress(`phases: ${phaseN} rounds`);
    const agent = { activate: [] as number[], confirm: [] as number[], rollback: [] as number[] };
    const plain = { activate: [] as number[], confirm: [] as number[], rollback: [] as number[] };
    let turn = 0;
    for (let i = 0; i < phaseN; i++) {
      // Agent: activate T → trial, confirm → committed; activate U, rollback → reverted (to T).
      let t = pick(h, pool, turn++);
      agent.activate.push((await console0(h, ['activate', t, '--timeout', '60'])).ms);
      agent.confirm.push((await console0(h, ['confirm'])).ms);
      await console0(h, ['activate', pick(h, pool, turn++), '--timeout', '60']);
      agent.rollback.push((await console0(h, ['rollback'])).ms);
      if (realpathSync(h.current) !== t) throw new Error(`after the rollback ${h.current} is not ${t}`);
      // Bare: the same work on the same host's links.
      t = pick(h, pool, turn++);
      plain.activate.push(await timedAll(...bareCommands.activate(t)));
      plain.confirm.push(await timedAll(...bareCommands.confirm(h, t)));
      const prev = t;
      await timed(sw(pick(h, pool, turn++), 'test'));
      plain.rollback.push(await timed(sw(prev, 'test')));
      if (realpathSync(h.current) !== prev) throw new Error(`after the bare rollback ${h.current} is not ${prev}`);
    }
    const phase = (label: string, bareLabel: string, a: number[], b: number[]) => {
      const am = median(a);
      const bm = median(b);
      rows.push(ratioRow(`${label}, agent (median of ${a.length})`, am, 'ms', `bare: ${bareLabel}`, bm));
      rows.push({ name: `  time the agent adds to ${label}`, value: am - bm, unit: 'ms', goal: { max: 100 } });
    };
    phase('activate → trial running', 'nix-store --realise T; T/…/switch-to-configuration test', agent.activate, plain.activate);
    phase('confirm → committed', 'nix-env -p PROFILE --set T; T/…/switch-to-configuration boot', agent.confirm, plain.confirm);
    phase('rollback → reverted', 'PREV/…/switch-to-configuration test', agent.rollback, plain.rollback);

    // Where console time goes: the same node starting and ending, and the cheapest console command.
    const startNode: number[] = [];
    const startConsole: number[] = [];
    for (let i = 0; i < phaseN; i++) {
      startNode.push(await timed([process.execPath, '-e', '']));
      startConsole.push((await console0(h, ['status'])).ms);
    }
    rows.push(ratioRow(`console start-up: snapback-agent status (median of ${phaseN}, no goal)`, median(startConsole), 'ms', "bare: node -e ''", median(startNode)));

    // After the deployments, controller sessions (connect + authenticate), then the agent's RSS.
    progress(`${sessionsN} controller sessions`);
    const signer = keyFileSigner(join(h.dir, 'op'));
    const wireHost = { url: `ws://127.0.0.1:${await h.port()}`, hostKey: h.hostPublicKey, tags: [], dependsOn: [] };
    for (let i = 0; i < sessionsN; i++) (await Session.open('footprint', wireHost, [signer])).close();
    rows.push(
      ratioRow(`agent RSS after ${2 * phaseN} deployments and ${sessionsN} sessions`, rssMiB(pid), 'MiB', 'bare node, read at the same instant', rssMiB(barePid), 1.8),
    );
    await endChild(bare);
    live.delete(bareHolder);
    bare = undefined;

    // 3. Revert lateness: windows left to run out, the agent alive.
    if (lateN > 0) {
      progress(`revert lateness: ${lateN} trials`);
      const late: number[] = [];
      for (let i = 0; i < lateN; i++) {
        const { out } = await console0(h, ['activate', pick(h, pool, turn++), '--timeout', '1']);
        const id = deploymentId(out);
        await h.waitOutcome(id, 30_000);
        late.push(checkedLateness(h, id));
      }
      rows.push({ name: `revert lateness after the deadline, agent alive (median of ${lateN})`, value: median(late), unit: 'ms', goal: { max: 100 } });
      rows.push({ name: `  max of the ${lateN}`, value: Math.max(...late), unit: 'ms', goal: { max: 1000 } });
    }
    // … and the agent killed 150 ms before the deadline, restarted at once.
    if (killN > 0) {
      progress(`revert lateness: ${killN} trials with kill -9`);
      const late: number[] = [];
      for (let i = 0; i < killN; i++) {
        const { out } = await console0(h, ['activate', pick(h, pool, turn++), '--timeout', '2']);
        const id = deploymentId(out);
        const deadline = h
          .history()
          .filter((e) => e.id === id && e.deadline)
          .at(-1)?.deadline;
        if (!deadline) throw new Error(`no deadline recorded for ${id}`);
        await sleep(Math.max(0, Date.parse(deadline) - 150 - Date.now()));
        await h.kill9();
        await h.start();
        await h.waitOutcome(id, 30_000);
        late.push(checkedLateness(h, id));
      }
      rows.push({ name: `revert lateness, agent kill -9ed 150 ms before the deadline and restarted (median of ${killN})`, value: median(late), unit: 'ms', goal: { max: 1000 } });
      rows.push({ name: `  max of the ${killN}`, value: Math.max(...late), unit: 'ms' });
    }
  } finally {
    await endChild(bare);
    await h.cleanup();
    live.clear();
  }
}

function ratioRow(name: string, value: number, unit: string, baselineName: string, baseline: number, goalRatio?: number): Row {
  return { name, value, unit, baseline: { name: baselineName, value: baseline }, ratio: value / baseline, ...(goalRatio !== undefined ? { goal: { max: goalRatio } } : {}) };
}

function deploymentId(out: any): string {
  const id = out?.id ?? out?.deployment?.id ?? out?.data?.id;
  if (typeof id !== 'string') throw new Error(`no deployment id in ${JSON.stringify(out)}`);
  return id;
}

function checkedLateness(h: ScratchHost, id: string): number {
  const { ms, outcome } = lateness(h, id);
  if (outcome.outcome !== 'reverted' || outcome.reason !== 'timeout') throw new Error(`deployment ${id} ended ${JSON.stringify(outcome)}, not reverted at its deadline`);
  return ms;
}

// ---- 4: a fleet on loopback ------------------------------------------------------------------------

/** The controller's default parallelism (DESIGN: `--parallel N`, default 10). */
const FLEET_PARALLEL = 10;

async function fleetRows(rows: Row[]): Promise<void> {
  const n = envInt('BENCH_FLEET_HOSTS', 50);
  if (n < 1) return;
  const hosts: ScratchHost[] = [];
  try {
    // One operator key, authorized on every host; each host has its own key, state and links.
    // The baseline's hosts are like the fleet's: a fresh agent, deployed once (its first deployment
    // loads what an idle agent left out), each alone.
    const ONE = 3;
    const single = track(new ScratchHost('fp-one0').enableWire());
    hosts.push(single);
    const opKey = join(single.dir, 'op');
    const opPub = single.publicKey('op');
    single.writeConfig({ log: { level: 'info' } });
    const singles = [single];
    for (let i = 1; i < ONE; i++) {
      const h = track(new ScratchHost(`fp-one${i}`).enableWire({ authorizedKeys: [opPub], log: { level: 'info' } }));
      hosts.push(h);
      singles.push(h);
    }
    progress(`fleet: building toplevels for ${n + ONE} hosts`);
    const singleTargets = singles.map((h) => h.install().toplevel('one'));
    const fleet: ScratchHost[] = [];
    const targets: string[] = [];
    for (let i = 0; i < n; i++) {
      const h = track(new ScratchHost(`fp-fleet${i}`).enableWire({ authorizedKeys: [opPub], log: { level: 'info' } }));
      hosts.push(h);
      fleet.push(h);
      h.install();
      // A fake toplevel names its host's links: one per host, built before anything is timed.
      targets.push(h.toplevel('fleet'));
    }
    progress(`fleet: starting ${n + ONE} agents`);
    const all = [...singles, ...fleet];
    for (let i = 0; i < all.length; i += 4) await Promise.all(all.slice(i, i + 4).map((h) => h.start()));

    const hostEntry = async (h: ScratchHost, t: string) => ({ url: `ws://127.0.0.1:${await h.port()}`, hostKey: h.hostPublicKey, target: { storePath: t }, confirmTimeoutSec: 60 });
    const writeFleet = (path: string, hostsJson: Record<string, unknown>) => {
      writeFileSync(path, JSON.stringify({ identity: { sshKey: opKey }, hosts: hostsJson }, null, 2));
      return path;
    };
    const check = (what: string, r: ControllerRun) => {
      if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}): ${r.stdout.slice(-2000)}${r.stderr.slice(-2000)}`);
    };

    // One host alone, three times: a host each.
    const one: number[] = [];
    for (const [i, h] of singles.entries()) {
      const file = writeFleet(join(h.dir, 'one.json'), { one: await hostEntry(h, singleTargets[i]!) });
      const t0 = performance.now();
      check('one-host deploy', await controller(['deploy', '--all', '--fleet', file]));
      one.push(performance.now() - t0);
    }

    // All of them, the controller's RSS sampled every 50 ms.
    const fleetHosts: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) fleetHosts[`h${String(i).padStart(2, '0')}`] = await hostEntry(fleet[i]!, targets[i]!);
    const file = writeFleet(join(single.dir, 'fleet.json'), fleetHosts);
    progress(`fleet: deploy --all to ${n} hosts`);
    let controllerPid: number | undefined;
    let peak = 0;
    let controllerCpu = 0;
    const sampler = setInterval(() => {
      peak = Math.max(peak, rssOrZero(controllerPid));
      try {
        if (controllerPid) controllerCpu = cpuSec(controllerPid);
      } catch {}
    }, 50);
    const agentCpu = () => fleet.reduce((sum, h) => sum + cpuWithChildrenSec(h.agent!.pid!), 0);
    const agentCpu0 = agentCpu();
    let t0 = performance.now();
    let r: ControllerRun;
    try {
      r = await controller(['deploy', '--all', '--fleet', file], (c) => (controllerPid = c.pid));
    } finally {
      clearInterval(sampler);
    }
    const fleetMs = performance.now() - t0;
    const agentCpu1 = agentCpu();
    check(`deploy --all to ${n} hosts`, r);
    const wrong = fleet.filter((h, i) => realpathSync(h.current) !== targets[i] || realpathSync(h.profile) !== targets[i]);
    if (wrong.length) throw new Error(`after deploy --all, ${wrong.length} hosts do not run and boot their target`);
    rows.push(ratioRow(`snapback deploy --all, ${n} hosts, no probes`, fleetMs, 'ms', `one host alone (median of ${one.length} hosts)`, median(one), 3));
    rows.push({ name: `controller RSS during deploy --all to ${n} hosts (max, 50 ms samples)`, value: peak, unit: 'MiB', goal: { max: 200 } });
    rows.push({ name: `  CPU of the ${n} agents during it, with their children, per host (no goal)`, value: (agentCpu1 - agentCpu0) / n, unit: 's' });
    rows.push({ name: `  CPU of the controller during it (last 50 ms sample, no goal)`, value: controllerCpu, unit: 's' });

    // For the record: all hosts at once (back to each host's first generation, built already); each
    // agent's second deployment, against the same cold baseline.
    const back: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) back[`h${String(i).padStart(2, '0')}`] = await hostEntry(fleet[i]!, fleet[i]!.gen1);
    const backFile = writeFleet(join(single.dir, 'fleet-back.json'), back);
    t0 = performance.now();
    check(`deploy --all --parallel ${n}`, await controller(['deploy', '--all', '--parallel', String(n), '--fleet', backFile]));
    rows.push(ratioRow(`  the same with --parallel ${n}, each agent's 2nd deployment (no goal)`, performance.now() - t0, 'ms', `one host alone (median of ${one.length} hosts)`, median(one)));

    // The floor: what the agents' own Nix commands cost on this machine, with no agent and no
    // controller. Each fleet host's bare commands of one deployment (as in the phases above:
    // realise, switch test, profile set, switch boot) back to its fleet target, the controller's
    // default parallelism of them at once, against the same commands of one host alone (3 hosts,
    // median). The 50 hosts share this machine's CPUs, so this is the least any deploy --all of
    // them could take here.
    const bareDeploy = (h: ScratchHost, t: string) => timedAll(...bareCommands.activate(t), ...bareCommands.confirm(h, t));
    const bareOne: number[] = [];
    for (let i = 0; i < ONE; i++) bareOne.push(await bareDeploy(fleet[i]!, targets[i]!));
    t0 = performance.now();
    let next = 0;
    await Promise.all(
      Array.from({ length: Math.min(FLEET_PARALLEL, n) }, async () => {
        for (let i = next++; i < n; i = next++) await bareDeploy(fleet[i]!, targets[i]!);
      }),
    );
    const floorMs = performance.now() - t0;
    rows.push(ratioRow(`  floor: the bare commands of ${n} deployments, ${Math.min(FLEET_PARALLEL, n)} at once (no goal)`, floorMs, 'ms', `one host alone (median of ${one.length} hosts)`, median(one)));
    rows.push(ratioRow(`  the same floor, against one host's bare commands (no goal)`, floorMs, 'ms', `one host's bare commands (median of ${bareOne.length})`, median(bareOne)));
    rows.push(ratioRow(`  snapback deploy --all against the floor (no goal)`, fleetMs, 'ms', 'the floor above', floorMs));

    // Status of all of them.
    const status: number[] = [];
    for (let i = 0; i < 3; i++) {
      t0 = performance.now();
      const s = await controller(['status', '--all', '--fleet', file]);
      status.push(performance.now() - t0);
      check('status --all', s);
    }
    rows.push({ name: `snapback status --all, ${n} hosts (median of ${status.length})`, value: median(status), unit: 'ms', goal: { max: 1000 } });
  } finally {
    progress(`fleet: cleaning up ${hosts.length} hosts`);
    for (const h of hosts) await h.cleanup();
    live.clear();
  }
}

/**
 * Every footprint figure of issue 12, each with its baseline from this run. BENCH_FOOTPRINT=host
 * or =fleet runs one half; BENCH_IDLE_SEC, BENCH_PHASE_N, BENCH_SESSIONS, BENCH_LATE_N,
 * BENCH_KILL_N and BENCH_FLEET_HOSTS shrink it for development.
 */
export async function footprintRows(): Promise<Row[]> {
  const missing = haveNix();
  if (missing) throw new Error(missing);
  const only = process.env.BENCH_FOOTPRINT ?? '';
  const rows: Row[] = [];
  process.on('SIGINT', onSignal).on('SIGTERM', onSignal);
  try {
    if (only !== 'fleet') await hostRows(rows);
    if (only !== 'host') await fleetRows(rows);
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
  }
  return rows;
}

/** The rows as a table: value, baseline, ratio, goal. */
export function formatRows(rows: Row[]): string {
  const width = Math.max(7, ...rows.map((r) => r.name.length));
  const bw = Math.max(8, ...rows.map((r) => (r.baseline ? r.baseline.name.length : 0)));
  const num = (v: number, unit: string) => v.toFixed(unit === '×' || unit === 's/min' || unit === 's' ? 2 : 1);
  const lines = [`${'measure'.padEnd(width)}  ${'value'.padStart(9)} unit   ${'baseline'.padEnd(bw)}  ${'value'.padStart(9)}  ratio  goal`];
  for (const r of rows) {
    const b = r.baseline ? `${r.baseline.name.padEnd(bw)}  ${num(r.baseline.value, r.unit).padStart(9)}` : ' '.repeat(bw + 11);
    const ratio = r.ratio !== undefined ? `${r.ratio.toFixed(2)}×`.padStart(5) : '     ';
    const goal = r.goal ? `≤ ${r.goal.max}${r.ratio !== undefined ? '×' : ` ${r.unit}`} ${goalMet(r) ? 'met' : 'MISSED'}` : '';
    lines.push(`${r.name.padEnd(width)}  ${num(r.value, r.unit).padStart(9)} ${r.unit.padEnd(6)} ${b}  ${ratio}  ${goal}`);
  }
  return lines.join('\n');
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const rows = await footprintRows();
  console.log(formatRows(rows));
  const missed = rows.filter((r) => !goalMet(r)).map((r) => r.name);
  console.log(JSON.stringify({ bench: 'snapback-footprint', node: process.version, rows, missed }));
  process.exit(missed.length ? 1 : 0);
}
