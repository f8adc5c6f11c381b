// `npm run bench`: how fast and how big the agent and the controller are, on a scratch host on
// loopback with real Nix (toplevels built beforehand, so Nix's build time is not measured).
// Prints a table and, last, one JSON line. Goals are checked here, never in a timed test.

import './compiled.ts';
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { haveNix, nixStore } from '../test/helpers/nix.ts';
import { ScratchHost, haveOwnStore, runController } from '../test/helpers/host.ts';
import { footprintRows, formatRows, goalMet, median, rssOrZero, type Row } from './footprint.ts';
import { keyFileSigner, verifySignature } from '../shared/ssh.ts';

const missing = haveNix();
if (missing) {
  console.error(`bench: ${missing}`);
  process.exit(2);
}

const rows: Row[] = [];

// BENCH_ONLY=push: only the push below; BENCH_ONLY=footprint: only this part (bench/footprint.ts:
// the agent's memory, idle CPU, the time it adds to each phase, revert lateness, a fleet of 50).
if (process.env.BENCH_ONLY !== 'push') {
  rows.push(...(await footprintRows()));
  // Signatures: the per-command cost on both sides (for the record).
  const dir = mkdtempSync(join(tmpdir(), 'snapback-bench-key-'));
  try {
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'op')]);
    const signer = keyFileSigner(join(dir, 'op'));
    const n = 2000;
    let t0 = performance.now();
    const sigs: string[] = [];
    for (let i = 0; i < n; i++) sigs.push(await signer.sign(`message ${i}`));
    rows.push({ name: 'SSHSIG ed25519 sign', value: n / ((performance.now() - t0) / 1000), unit: 'ops/s' });
    t0 = performance.now();
    for (let i = 0; i < n; i++) if (!verifySignature(signer.publicKey, `message ${i}`, sigs[i]!)) throw new Error('verify failed');
    rows.push({ name: 'SSHSIG ed25519 verify', value: n / ((performance.now() - t0) / 1000), unit: 'ops/s' });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// Closure push (tracker issue 10): ~300 MiB in 25 paths into an EMPTY host store (a new ScratchHost
// with its own store for every measurement), over loopback, by the real controller, against the
// physical limit measured in the same run: `nix-store --export … | nix-store --import` of the same
// paths into another empty store. Snapback's time runs from spawning `snapback deploy` to the
// arrival of its `push` event with `done` (process start, authentication, closure query, the
// manifest, the transfer and the import: everything before activation); the limit's from spawning
// the pipeline (with its `nix-store -qR`) to its end. Medians of 5, measurements interleaved (the
// limit alone moves by 20 % from run to run on this machine).
const ownStoreMissing = process.env.BENCH_ONLY === 'footprint' ? 'BENCH_ONLY=footprint' : haveOwnStore();
if (ownStoreMissing) {
  console.error(`bench: push benchmark skipped: ${ownStoreMissing}`);
} else {
  const ROUNDS = 5;
  const CLOSURE = { paths: 24, sizeKiB: 12800 };
  const hosts: ScratchHost[] = [];
  const fresh = (name: string, wire: boolean) => {
    const h = new ScratchHost(name).ownStore();
    hosts.push(h);
    return (wire ? h.enableWire() : h).install();
  };
  const done = async (h: ScratchHost) => {
    hosts.splice(hosts.indexOf(h), 1);
    await h.cleanup();
  };
  try {
    const limits: number[] = [];
    const pushes: number[] = [];
    const transfers: number[] = [];
    const deploys: number[] = [];
    let controllerRss = 0;
    let agentRss = 0;
    let closure: string[] = [];
    let narBytes = 0;
    for (let round = 0; round < ROUNDS; round++) {
      // Built (in the operator's store) before anything is timed. A toplevel names its host's
      // directory, so each host gets its own; the 24 dependencies are the same bytes and paths every
      // time (seeded by name), built once per operator store.
      const h = fresh('bench-push', true);
      const toplevel = h.toplevel('bench-push', { closure: CLOSURE });
      closure = nixStore(['--query', '--requisites', toplevel]).split('\n').filter(Boolean);
      narBytes = closure.reduce((n, p) => n + Number(nixStore(['--query', '--size', p])), 0);
      // Both measurements read the operator's store from the page cache.
      await sh(`nix-store --export $(nix-store -qR '${toplevel}') > /dev/null`);

      // The limit: the same paths, streamed by Nix itself into an empty store.
      const l = fresh('bench-limit', false);
      let t0 = performance.now();
      await sh(`nix-store --export $(nix-store -qR '${toplevel}') | ${l.hostPrefix().join(' ')} nix-store --import > /dev/null`);
      limits.push(performance.now() - t0);
      const imported = closure.filter((p) => l.hostHas(p)).length;
      if (imported !== closure.length) throw new Error(`the limit's import left ${closure.length - imported} of ${closure.length} paths out`);
      await done(l);

      // Snapback: `snapback deploy web1 TOPLEVEL`, no probes, into an empty store.
      await h.start();
      const agentPid = h.agent!.pid!;
      const fleet = await h.fleet({ confirmTimeoutSec: 60 });
      let controllerPid: number | undefined;
      let firstPush = 0;
      let pushDone = 0;
      const sampler = setInterval(() => {
        if (pushDone) return;
        controllerRss = Math.max(controllerRss, rssOrZero(controllerPid));
        agentRss = Math.max(agentRss, rssOrZero(agentPid));
      }, 100);
      t0 = performance.now();
      let r;
      try {
        r = await runController(['deploy', 'web1', toplevel, '--fleet', fleet], {
          onSpawn: (c) => {
            controllerPid = c.pid;
            let buf = '';
            c.stdout!.on('data', (chunk: Buffer) => {
              buf += chunk.toString();
              for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
                const line = buf.slice(0, nl);
                buf = buf.slice(nl + 1);
                if (!line.includes('"push"')) continue;
                const e = JSON.parse(line) as { event?: string; done?: boolean };
                if (e.event !== 'push') continue;
                firstPush ||= performance.now();
                if (e.done) pushDone ||= performance.now();
              }
            });
          },
        });
      } finally {
        clearInterval(sampler);
      }
      const end = performance.now();
      if (r.code !== 0 || !pushDone) throw new Error(`deploy with push failed (exit ${r.code}): ${r.stdout}${r.stderr}`);
      const last = r.events.filter((e) => e.event === 'push').at(-1);
      if (last.totalPaths !== closure.length) throw new Error(`pushed ${last.totalPaths} of ${closure.length} paths`);
      pushes.push(pushDone - t0);
      transfers.push(pushDone - firstPush);
      deploys.push(end - t0);
      const missing = closure.filter((p) => !h.hostHas(p));
      if (missing.length) throw new Error(`after the push the host lacks ${missing.join(' ')}`);
      await done(h);
    }
    const push = median(pushes);
    const limit = median(limits);
    const n = `${Math.round(narBytes / 2 ** 20)} MiB in ${closure.length} paths`;
    rows.push({ name: `push ${n}: deploy start → push done (median of ${ROUNDS})`, value: push, unit: 'ms' });
    rows.push({ name: `  of which the push phase (first push event → done)`, value: median(transfers), unit: 'ms' });
    rows.push({ name: `  whole deploy (push, activate, confirm)`, value: median(deploys), unit: 'ms' });
    rows.push({ name: `limit: nix-store --export | --import, same paths (median of ${ROUNDS})`, value: limit, unit: 'ms' });
    rows.push({ name: 'push time / limit', value: push, unit: 'ms', baseline: { name: 'export | import', value: limit }, ratio: push / limit, goal: { max: 1.25 } });
    rows.push({ name: 'push throughput (whole push time)', value: narBytes / 2 ** 20 / (push / 1000), unit: 'MiB/s' });
    rows.push({ name: 'controller RSS during a push (max, 100 ms samples)', value: controllerRss, unit: 'MiB', goal: { max: 150 } });
    rows.push({ name: 'agent RSS during a push (max, 100 ms samples)', value: agentRss, unit: 'MiB', goal: { max: 150 } });
  } finally {
    for (const h of [...hosts]) await h.cleanup();
  }
}

/** Runs a shell command line; throws on failure (with its stderr). */
function sh(cmd: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = spawn('bash', ['-o', 'pipefail', '-c', cmd], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d) => (err += d));
    c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd}: exit ${code}: ${err.trim()}`))));
  });
}

console.log(formatRows(rows));
const missed = rows.filter((r) => !goalMet(r));
console.log(JSON.stringify({ bench: 'snapback', node: process.version, rows, missed: missed.map((r) => r.name) }));
process.exit(missed.length ? 1 : 0);
