// `npm run bench`: how fast and how big the agent and the controller are, on a scratch host on
// loopback with real Nix (toplevels built beforehand, so Nix's build time is not measured).
// Prints a table and, last, one JSON line. Goals are checked here, never in a timed test.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { haveNix } from '../test/helpers/nix.ts';
import { ScratchHost, runController } from '../test/helpers/host.ts';
import { Session } from '../controller/session.ts';
import { keyFileSigner, verifySignature } from '../shared/ssh.ts';

const missing = haveNix();
if (missing) {
  console.error(`bench: ${missing}`);
  process.exit(2);
}

interface Row {
  name: string;
  value: number;
  unit: string;
  goal?: { max: number };
}

const rows: Row[] = [];
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const rssMiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) / 1024;

const h = new ScratchHost('bench').enableWire().install();
try {
  const targets = Array.from({ length: 12 }, (_, i) => h.toplevel(`t${i}`));
  await h.start();
  const pid = h.agent!.pid!;
  const port = await h.port();
  rows.push({ name: 'agent RSS, idle after start', value: rssMiB(pid), unit: 'MiB', goal: { max: 120 } });

  // Console: activate → trial, then confirm (commit = nix-env --set + boot), per deployment.
  const activate: number[] = [];
  const confirm: number[] = [];
  for (const t of targets.slice(0, 6)) {
    let t0 = performance.now();
    const a = await h.cli(['activate', t, '--timeout', '60']);
    if (a.code !== 0) throw new Error(`activate failed: ${a.stdout}${a.stderr}`);
    activate.push(performance.now() - t0);
    t0 = performance.now();
    await h.cli(['confirm']);
    confirm.push(performance.now() - t0);
  }
  rows.push({ name: 'console activate → trial running (median of 6)', value: median(activate), unit: 'ms', goal: { max: 2000 } });
  rows.push({ name: 'console confirm → committed (median of 6)', value: median(confirm), unit: 'ms', goal: { max: 2000 } });

  // Wire: connect + mutual authentication.
  const signer = keyFileSigner(join(h.dir, 'op'));
  const host = { url: `ws://127.0.0.1:${port}`, hostKey: h.hostPublicKey, tags: [], dependsOn: [] };
  const handshakes: number[] = [];
  for (let i = 0; i < 50; i++) {
    const t0 = performance.now();
    const s = await Session.open('bench', host, [signer]);
    handshakes.push(performance.now() - t0);
    s.close();
  }
  rows.push({ name: 'controller connect + authenticate (median of 50)', value: median(handshakes), unit: 'ms', goal: { max: 50 } });

  // A whole `snapback deploy` (process start included), no probes.
  const deploys: number[] = [];
  for (const t of targets.slice(6, 10)) {
    const fleet = await h.fleet({ target: { storePath: t }, confirmTimeoutSec: 60 });
    const t0 = performance.now();
    const r = await runController(['deploy', 'web1', '--fleet', fleet]);
    if (r.code !== 0) throw new Error(`deploy failed: ${r.stdout}${r.stderr}`);
    deploys.push(performance.now() - t0);
  }
  rows.push({ name: 'snapback deploy, one host, no probes (median of 4)', value: median(deploys), unit: 'ms', goal: { max: 5000 } });
  rows.push({ name: 'agent RSS after 10 deployments and 50 sessions', value: rssMiB(pid), unit: 'MiB', goal: { max: 160 } });

  // Signatures: the per-command cost on both sides.
  const n = 2000;
  let t0 = performance.now();
  const sigs: string[] = [];
  for (let i = 0; i < n; i++) sigs.push(await signer.sign(`message ${i}`));
  rows.push({ name: 'SSHSIG ed25519 sign', value: n / ((performance.now() - t0) / 1000), unit: 'ops/s' });
  t0 = performance.now();
  for (let i = 0; i < n; i++) if (!verifySignature(signer.publicKey, `message ${i}`, sigs[i]!)) throw new Error('verify failed');
  rows.push({ name: 'SSHSIG ed25519 verify', value: n / ((performance.now() - t0) / 1000), unit: 'ops/s' });
} finally {
  await h.cleanup();
}

const width = Math.max(...rows.map((r) => r.name.length));
console.log(`${'measure'.padEnd(width)}  ${'value'.padStart(10)}  unit    goal`);
for (const r of rows) {
  const goal = r.goal ? `≤ ${r.goal.max} ${r.unit} ${r.value <= r.goal.max ? 'met' : 'MISSED'}` : '';
  console.log(`${r.name.padEnd(width)}  ${r.value.toFixed(1).padStart(10)}  ${r.unit.padEnd(6)}  ${goal}`);
}
const missed = rows.filter((r) => r.goal && r.value > r.goal.max);
console.log(JSON.stringify({ bench: 'snapback', node: process.version, rows, missed: missed.map((r) => r.name) }));
process.exit(missed.length ? 1 : 0);
