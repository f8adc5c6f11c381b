// Observability (DESIGN §9): the Prometheus metrics, scraped from a real agent during a trial, after
// a confirm, after a revert at the deadline and after a kill -9 restart, and checked against the
// history; the read-only listener; the textfile; `status --json` on both sides; the journal filter.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { connect, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseAgentConfig } from '../shared/config.ts';
import type { HistoryEntry } from '../shared/model.ts';
import type { HostStatus } from '../shared/protocol.ts';
import { Tally, exposition, listenMetrics } from '../agent/metrics.ts';
import { createLogger } from '../agent/log.ts';
import { haveNix } from './helpers/nix.ts';
import { ROOT, ScratchHost, cleanupsAfterAll } from './helpers/host.ts';
import { histogramOf, httpGet, parseMetrics, scrape, valueOf, type Family } from './helpers/prometheus.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);
const cleanups = cleanupsAfterAll();

const AGENT = { who: 'agent', channel: 'agent' } as const;
const DEADLINE = { who: 'agent', channel: 'deadline' } as const;
const OP = { who: 'SHA256:abc (alice@laptop)', channel: 'controller' } as const;

function entry(at: string, id: string, from: HistoryEntry['from'], to: HistoryEntry['to'], event: string, extra: Partial<HistoryEntry> = {}): HistoryEntry {
  return { at, id, from, to, event, by: AGENT, target: '/nix/store/x', previous: '/nix/store/p', ...extra };
}

const STATUS: HostStatus = { hostname: 'web1', version: '0.1.0 "dev"\\x', bootId: 'b', currentSystem: '/nix/store/p', phase: 'idle' };

describe('metrics counted from the history (pure)', () => {
  const history: HistoryEntry[] = [
    // a: activated in 2 s, confirmed, the commit took 1.5 s
    entry('2026-01-01T10:00:00.000Z', 'a', 'idle', 'preparing', 'activate', { by: OP }),
    entry('2026-01-01T10:00:10.000Z', 'a', 'preparing', 'activating', 'prepared'),
    entry('2026-01-01T10:00:12.000Z', 'a', 'activating', 'trial', 'activated', { deadline: '2026-01-01T10:05:12.000Z' }),
    entry('2026-01-01T10:01:00.000Z', 'a', 'trial', 'trial', 'confirm-refused', { by: OP }),
    entry('2026-01-01T10:02:00.000Z', 'a', 'trial', 'committing', 'confirm', { by: OP }),
    entry('2026-01-01T10:02:01.500Z', 'a', 'committing', 'idle', 'committed', { by: OP, outcome: { outcome: 'confirmed' } }),
    // b: extended, then reverted 0.75 s after the new deadline
    entry('2026-01-01T11:00:00.000Z', 'b', 'idle', 'preparing', 'activate'),
    entry('2026-01-01T11:00:01.000Z', 'b', 'preparing', 'activating', 'prepared'),
    entry('2026-01-01T11:00:04.000Z', 'b', 'activating', 'trial', 'activated', { deadline: '2026-01-01T11:01:04.000Z' }),
    entry('2026-01-01T11:00:30.000Z', 'b', 'trial', 'trial', 'extend', { deadline: '2026-01-01T11:02:00.000Z' }),
    entry('2026-01-01T11:02:00.000Z', 'b', 'trial', 'reverting', 'deadline', { by: DEADLINE }),
    entry('2026-01-01T11:02:00.750Z', 'b', 'reverting', 'idle', 'reverted', { by: DEADLINE, outcome: { outcome: 'reverted', reason: 'timeout' } }),
    // c: failed to build; d: stuck on a conflict; e: requested rollback (no lateness)
    entry('2026-01-01T12:00:00.000Z', 'c', 'preparing', 'idle', 'prepare-failed', { outcome: { outcome: 'failed', code: 'build-failed', message: 'no' } }),
    entry('2026-01-01T13:00:00.000Z', 'd', 'reverting', 'idle', 'revert-conflict', { outcome: { outcome: 'stuck', reason: 'conflict: the running system is /nix/store/q, …' } }),
    entry('2026-01-01T14:00:00.000Z', 'e', 'trial', 'reverting', 'rollback', { deadline: '2026-01-01T14:10:00.000Z' }),
    entry('2026-01-01T14:00:02.000Z', 'e', 'reverting', 'idle', 'reverted', { outcome: { outcome: 'reverted', reason: 'requested' } }),
  ];

  it('deployments by outcome and reason, outcome times, durations, lateness; every family well-formed', () => {
    const tally = new Tally(history);
    tally.observe({ type: 'confirm-refused', code: 'bad-token' });
    // The health gate's refusals are in the history: told again, they are not counted twice.
    tally.observe({ type: 'confirm-refused', code: 'health-failed' });
    tally.observe({ type: 'auth-failed', reason: 'unknown-key' });
    const m = parseMetrics(exposition(tally, STATUS, { total: 3, pending: 1 }));
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'confirmed' }), 1);
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'reverted', reason: 'timeout' }), 1);
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'reverted', reason: 'requested' }), 1);
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'reverted', reason: 'reboot' }), 0, 'known reasons start at zero');
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'failed', reason: 'build-failed' }), 1);
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'stuck', reason: 'conflict' }), 1, 'a stuck reason is a class, not free text');
    assert.equal(valueOf(m, 'snapback_last_outcome_timestamp_seconds', { outcome: 'reverted' }), Date.parse('2026-01-01T14:00:02.000Z') / 1000);
    assert.equal(valueOf(m, 'snapback_last_outcome_timestamp_seconds', { outcome: 'confirmed' }), Date.parse('2026-01-01T10:02:01.500Z') / 1000);
    const late = histogramOf(m, 'snapback_revert_lateness_seconds');
    assert.deepEqual([late.count, late.sum], [1, 0.75], 'from the extended deadline; a requested rollback is not late');
    assert.equal(late.buckets['0.5'], 0);
    assert.equal(late.buckets['1'], 1);
    assert.deepEqual([histogramOf(m, 'snapback_activation_duration_seconds').count, histogramOf(m, 'snapback_activation_duration_seconds').sum], [2, 5]);
    assert.deepEqual([histogramOf(m, 'snapback_commit_duration_seconds').count, histogramOf(m, 'snapback_commit_duration_seconds').sum], [1, 1.5]);
    assert.equal(valueOf(m, 'snapback_confirm_refusals_total', { code: 'health-failed' }), 1);
    assert.equal(valueOf(m, 'snapback_confirm_refusals_total', { code: 'bad-token' }), 1);
    assert.equal(valueOf(m, 'snapback_auth_failures_total', { reason: 'unknown-key' }), 1);
    assert.equal(valueOf(m, 'snapback_connections', { state: 'pending' }), 1);
    assert.equal(valueOf(m, 'snapback_connections', { state: 'authenticated' }), 2);
    assert.equal(valueOf(m, 'snapback_phase', { phase: 'idle' }), 1);
    assert.equal(valueOf(m, 'snapback_phase', { phase: 'trial' }), 0);
    assert.equal(m.get('snapback_trial_deadline_seconds')?.metrics.length, 0, 'no deadline outside a trial');
    // Label values are escaped: the parser reads back exactly what the status says.
    assert.deepEqual(m.get('snapback_info')?.metrics[0]?.labels, { version: '0.1.0 "dev"\\x', current_system: '/nix/store/p' });
    for (const [name, f] of m) assert.match(name, /^snapback_/, `${f.name} has the snapback_ prefix`);
  });

  it('the same facts for status --json', () => {
    const facts = new Tally(history).facts({ total: 1, pending: 0 });
    assert.deepEqual(facts.deployments.find((d) => d.outcome === 'reverted' && d.reason === 'timeout'), { outcome: 'reverted', reason: 'timeout', count: 1 });
    assert.deepEqual(facts.deployments.find((d) => d.outcome === 'confirmed'), { outcome: 'confirmed', count: 1 });
    assert.equal(facts.lastOutcomeAt.stuck, '2026-01-01T13:00:00.000Z');
    assert.deepEqual(facts.revertLateness, { count: 1, sumSeconds: 0.75 });
    assert.deepEqual(facts.connections, { pending: 0, authenticated: 1 });
  });
});

describe('metrics configuration', () => {
  it('off unless asked; the listener defaults to 127.0.0.1:7732; unknown keys are named', () => {
    assert.deepEqual(parseAgentConfig({}).metrics, {});
    assert.deepEqual(parseAgentConfig({ metrics: { listen: {} } }).metrics.listen, { host: '127.0.0.1', port: 7732 });
    assert.deepEqual(parseAgentConfig({}).hooks, { onOutcome: [] });
    assert.equal(parseAgentConfig({ hooks: { onOutcome: [{ command: 'true' }] } }).hooks.onOutcome[0]?.timeoutSec, 30);
    assert.throws(() => parseAgentConfig({ metrics: { listen: { prot: 1 } } }), /metrics\.listen: unknown key "prot"/);
    assert.throws(() => parseAgentConfig({ metrics: { textFile: '/x.prom' } }), /metrics: unknown key "textFile"/);
    assert.throws(() => parseAgentConfig({ metrics: { textfile: '/var/lib/x.txt' } }), /metrics\.textfile: must end in \.prom/);
    assert.throws(() => parseAgentConfig({ hooks: { onOutcome: [{ comand: 'true' }] } }), /hooks\.onOutcome\.0: unknown key "comand"/);
    assert.throws(() => parseAgentConfig({ hooks: { onOutcom: [] } }), /hooks: unknown key "onOutcom"/);
    assert.throws(() => parseAgentConfig({ hooks: { onOutcome: [{ command: [] }] } }), /hooks\.onOutcome\.0\.command/);
  });
});

describe('the metrics listener refuses everything but GET /metrics', () => {
  let port = 0;
  let renders = 0;
  let close: () => Promise<void>;
  before(async () => {
    const server = await listenMetrics('127.0.0.1', 0, () => (renders++, '# HELP x_total x\n# TYPE x_total counter\nx_total 1\n'), createLogger('error', 2));
    port = (server.address() as AddressInfo).port;
    close = () => new Promise((r) => server.close(() => r()));
  });
  after(() => close());

  /** Sends raw bytes; resolves with what came back when the server closed the connection. */
  function raw(bytes: string, opts: { end?: boolean } = {}): Promise<{ reply: string; ms: number }> {
    return new Promise((resolve, reject) => {
      const started = Date.now();
      let reply = '';
      const s = connect(port, '127.0.0.1', () => {
        s.write(bytes);
        if (opts.end) s.end();
      });
      s.setEncoding('utf8');
      s.on('data', (c: string) => (reply += c));
      s.on('error', () => {});
      s.on('close', () => resolve({ reply, ms: Date.now() - started }));
      setTimeout(() => reject(new Error(`the listener kept the connection open for 15 s; got: ${reply}`)), 15_000).unref();
    });
  }
  const status = (reply: string) => Number(/^HTTP\/1\.[01] (\d{3})/.exec(reply)?.[1] ?? 0);

  it('answers GET /metrics in the text format, and closes the connection', async () => {
    const r = await httpGet(port);
    assert.equal(r.status, 200);
    assert.equal(r.type, 'text/plain; version=0.0.4; charset=utf-8');
    const { reply } = await raw('GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n');
    assert.equal(status(reply), 200);
    assert.match(reply, /\r\nconnection: close\r\n/i);
  });

  it('other methods: 405; other paths and any query: 404; a body: 400 — and nothing is rendered for them', async () => {
    const before = renders;
    for (const method of ['POST', 'PUT', 'DELETE', 'PATCH', 'HEAD', 'OPTIONS', 'TRACE']) {
      const { reply } = await raw(`${method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n`);
      assert.equal(status(reply), 405, `${method}: ${reply}`);
      assert.match(reply, /\r\nallow: GET\r\n/i);
    }
    for (const path of ['/', '/metrics/', '/metrics?x=1', '/metrics?', '//metrics', '/Metrics', '/metrics%00', '/../metrics', 'http://127.0.0.1/metrics', '*']) {
      const { reply } = await raw(`GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`);
      assert.ok([400, 404].includes(status(reply)), `${path}: ${reply}`);
    }
    assert.equal(status((await raw('GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc')).reply), 400);
    assert.equal(status((await raw('GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n')).reply), 400);
    assert.equal(renders, before, 'refused requests never reach the metrics');
  });

  it('garbage, an oversized header and a client too slow to finish its request are cut off', async () => {
    const before = renders;
    assert.notEqual(status((await raw('HELLO\r\n\r\n')).reply), 200);
    assert.notEqual(status((await raw(`GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(8192)}\r\n\r\n`)).reply), 200);
    // Headers never finished: the listener closes it after its header timeout (5 s), checked every second.
    const slow = await raw('GET /metrics HTTP/1.1\r\nHost: x\r\n');
    assert.notEqual(status(slow.reply), 200);
    assert.ok(slow.ms >= 4000 && slow.ms < 12_000, `closed after ${slow.ms} ms`);
    assert.equal(renders, before);
  });
});

/** deployments_total as the history has it: `outcome` or `outcome/reason` → count. */
function countsFromHistory(entries: HistoryEntry[]): Map<string, number> {
  const counts = new Map<string, number>();
  for (const e of entries) {
    if (!e.outcome) continue;
    const key = e.outcome.outcome === 'reverted' ? `reverted/${e.outcome.reason}` : e.outcome.outcome;
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return counts;
}

function countsFromMetrics(m: Map<string, Family>): Map<string, number> {
  const counts = new Map<string, number>();
  for (const s of m.get('snapback_deployments_total')!.metrics) {
    const v = Number(s.value);
    if (v === 0) continue;
    const { outcome, reason } = s.labels as { outcome: string; reason?: string };
    counts.set(reason ? `${outcome}/${reason}` : outcome, v);
  }
  return counts;
}

const seconds = (iso: string) => Date.parse(iso) / 1000;

describe('metrics of a real agent', { skip }, () => {
  it('during a trial, after a confirm, after a revert at the deadline and after a kill -9 restart: what the history says', async () => {
    const h = new ScratchHost('metrics').enableWire().install();
    cleanups.push(() => h.cleanup());
    const textfile = join(h.dir, 'textfile', 'snapback.prom');
    spawnSync('mkdir', ['-p', join(h.dir, 'textfile')]);
    h.writeConfig({ metrics: { listen: { host: '127.0.0.1', port: 0 }, textfile } });
    await h.start();
    const port = (await h.waitLog((l) => typeof l.metricsPort === 'number')).metricsPort as number;
    const textfileMetrics = () => parseMetrics(readFileSync(textfile, 'utf8'));

    let m = await scrape(port);
    assert.equal(valueOf(m, 'snapback_phase', { phase: 'idle' }), 1);
    assert.deepEqual(countsFromMetrics(m), new Map());
    assert.deepEqual(m.get('snapback_info')?.metrics[0]?.labels, { version: JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version, current_system: h.gen1 });
    assert.equal(valueOf(m, 'snapback_connections', { state: 'authenticated' }), 0);
    assert.equal(valueOf(m, 'snapback_phase', { phase: 'idle' }), valueOf(textfileMetrics(), 'snapback_phase', { phase: 'idle' }));

    // During a trial: the phase, the countdown and the deadline.
    const x = h.toplevel('x');
    const a = await h.cli(['activate', x, '--timeout', '60']);
    assert.equal(a.code, 0, a.stderr);
    m = await scrape(port);
    assert.equal(valueOf(m, 'snapback_phase', { phase: 'trial' }), 1);
    assert.equal(valueOf(m, 'snapback_phase', { phase: 'idle' }), 0);
    const left = valueOf(m, 'snapback_trial_deadline_seconds')!;
    assert.ok(left > 50 && left <= 60, `${left}s left`);
    assert.equal(valueOf(m, 'snapback_trial_deadline_timestamp_seconds'), seconds(a.out.deadline));
    assert.equal(m.get('snapback_info')?.metrics[0]?.labels?.current_system, x);
    assert.equal(histogramOf(m, 'snapback_activation_duration_seconds').count, 1);

    // After a confirm.
    assert.equal((await h.cli(['confirm'])).code, 0);
    m = await scrape(port);
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'confirmed' }), 1);
    assert.equal(valueOf(m, 'snapback_last_outcome_timestamp_seconds', { outcome: 'confirmed' }), seconds(h.history().at(-1).at));
    assert.equal(histogramOf(m, 'snapback_commit_duration_seconds').count, 1);
    assert.equal(valueOf(m, 'snapback_phase', { phase: 'idle' }), 1);
    assert.equal(m.get('snapback_trial_deadline_seconds')?.metrics.length, 0);

    // After a revert at the deadline: its lateness is the history's, deadline to revert done.
    const y = h.toplevel('y');
    const b = await h.cli(['activate', y, '--timeout', '2']);
    assert.equal(b.code, 0, b.stderr);
    await h.waitOutcome(b.out.id);
    m = await scrape(port);
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'reverted', reason: 'timeout' }), 1);
    const mine = h.history().filter((e) => e.id === b.out.id);
    const lateness = seconds(mine.at(-1).at) - seconds(mine.findLast((e) => e.deadline).deadline);
    const late = histogramOf(m, 'snapback_revert_lateness_seconds');
    assert.equal(late.count, 1);
    assert.ok(Math.abs(late.sum - lateness) < 0.002, `${late.sum} vs ${lateness}`);
    assert.ok(lateness >= 0 && lateness < 2, `reverted ${lateness}s after the deadline`);

    // A trial, then kill -9 and a new agent: the same counts, the same deadline, the trial resumed.
    const z = h.toplevel('z');
    const c = await h.cli(['activate', z, '--timeout', '120']);
    assert.equal(c.code, 0, c.stderr);
    const beforeKill = await scrape(port);
    await h.kill9();
    await h.start();
    const port2 = (await h.waitLog((l) => typeof l.metricsPort === 'number')).metricsPort as number;
    m = await scrape(port2);
    assert.equal(valueOf(m, 'snapback_phase', { phase: 'trial' }), 1);
    assert.equal(valueOf(m, 'snapback_trial_deadline_timestamp_seconds'), seconds(c.out.deadline), 'the original deadline');
    for (const name of ['snapback_deployments_total', 'snapback_last_outcome_timestamp_seconds', 'snapback_revert_lateness_seconds', 'snapback_activation_duration_seconds', 'snapback_commit_duration_seconds']) {
      assert.deepEqual(m.get(name), beforeKill.get(name), `${name} survives kill -9`);
    }
    assert.deepEqual(countsFromMetrics(m), countsFromHistory(h.history()));

    // An extend moves the deadline the metrics show, and the history entry carries it.
    const ext = await h.cli(['extend', '100']);
    assert.equal(ext.code, 0, ext.stderr);
    assert.equal(h.history().at(-1).deadline, ext.out.deadline);
    assert.equal(valueOf(await scrape(port2), 'snapback_trial_deadline_timestamp_seconds'), seconds(ext.out.deadline));

    assert.equal((await h.cli(['rollback'])).code, 0);
    m = await scrape(port2);
    assert.equal(valueOf(m, 'snapback_deployments_total', { outcome: 'reverted', reason: 'requested' }), 1);
    assert.deepEqual(countsFromMetrics(m), countsFromHistory(h.history()));
    assert.equal(histogramOf(m, 'snapback_revert_lateness_seconds').count, 1, 'a requested rollback is not late');
    assert.equal(histogramOf(m, 'snapback_activation_duration_seconds').count, 3);
    // A confirm with nothing to confirm: refused, and counted by its code.
    assert.equal((await h.cli(['confirm'])).code, 1);
    assert.equal(valueOf(await scrape(port2), 'snapback_confirm_refusals_total', { code: 'no-trial' }), 1);

    // The console's status --json and the controller's carry the same facts.
    const s = await h.cli(['status']);
    const facts = s.out.metrics;
    assert.deepEqual(new Map(facts.deployments.filter((d: any) => d.count > 0).map((d: any) => [d.reason ? `${d.outcome}/${d.reason}` : d.outcome, d.count])), countsFromHistory(h.history()));
    assert.equal(facts.lastOutcomeAt.reverted, h.history().at(-1).at);
    const fleet = await h.fleet();
    const st = await h.snapback(['status', '--fleet', fleet]);
    assert.equal(st.code, 0, st.stderr);
    const remote = st.result.hosts[0].status.metrics;
    assert.deepEqual(remote.deployments, facts.deployments);
    assert.deepEqual(remote.revertLateness, facts.revertLateness);
    assert.equal(remote.connections.authenticated, 1, 'the controller asking is connected');

    // A wrong key: counted as an authentication failure.
    const stranger = h.operatorKey('stranger');
    const fleet2 = join(h.dir, 'stranger.json');
    writeFileSync(fleet2, JSON.stringify({ ...JSON.parse(readFileSync(fleet, 'utf8')), identity: { sshKey: stranger } }));
    assert.equal((await h.snapback(['status', '--fleet', fleet2])).code, 3);
    m = await scrape(port2);
    assert.equal(valueOf(m, 'snapback_auth_failures_total', { reason: 'unknown-key' }), 1);

    // The textfile: the same counts, readable by node-exporter, no temporary file left beside it.
    await h.stop();
    const t = textfileMetrics();
    assert.deepEqual(countsFromMetrics(t), countsFromHistory(h.history()));
    assert.equal(statSync(textfile).mode & 0o777, 0o644);
    assert.deepEqual(readdirSync(join(h.dir, 'textfile')), ['snapback.prom']);
  });
});

describe('a metrics port that cannot be bound', { skip }, () => {
  it('is logged, and the agent serves on without it', async () => {
    const busy = await listenMetrics('127.0.0.1', 0, () => '', createLogger('error', 2));
    cleanups.push(() => new Promise<void>((r) => busy.close(() => r())));
    const h = new ScratchHost('metrics-busy').install();
    cleanups.push(() => h.cleanup());
    h.writeConfig({ metrics: { listen: { host: '127.0.0.1', port: (busy.address() as AddressInfo).port } } });
    await h.start();
    const refused = await h.waitLog((l) => l.msg === 'cannot listen for metrics scrapes; the agent goes on without them');
    assert.equal(refused.level, 50);
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '30']);
    assert.equal(a.code, 0, a.stderr);
    assert.equal((await h.cli(['confirm'])).code, 0);
  });
});

/** The filters the README gives for the journal's JSON lines (`journalctl -u snapback-agent -o cat | jq …`). */
const BY_DEPLOYMENT = 'select(.deployment == $id)';
const REVERTS = 'select(.outcome == "reverted")';

describe('the journal: log lines carry the deployment, its phase and its outcome', { skip }, () => {
  const jq = spawnSync('jq', ['--version']).status === 0;
  if (!jq) console.warn('SKIPPED: jq is not installed (apt-get install jq): the README\'s journal filters are not checked');

  it("the README's jq filters pick a deployment's lines, and its outcome", { skip: !jq }, async () => {
    const h = new ScratchHost('journal').install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '1']);
    assert.equal(a.code, 0, a.stderr);
    await h.waitOutcome(a.out.id);
    // What journald keeps of the agent's stdout, line by line (`-o cat` prints just that).
    const journal = join(h.dir, 'journal.jsonl');
    writeFileSync(journal, h.logs().map((l) => JSON.stringify(l)).join('\n') + '\n');
    const run = (args: string[]) => {
      const r = spawnSync('jq', ['-c', ...args, journal], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
      return r.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l));
    };
    const lines = run(['--arg', 'id', a.out.id, BY_DEPLOYMENT]);
    assert.ok(lines.every((l) => l.deployment === a.out.id));
    const phases = lines.map((l) => l.phase);
    for (const p of ['preparing', 'trial', 'reverting', 'idle']) assert.ok(phases.includes(p), `a ${p} line: ${phases.join(' ')}`);
    const end = lines.at(-1);
    assert.deepEqual([end.outcome, end.reason, end.level], ['reverted', 'timeout', 40]);
    assert.deepEqual(run([REVERTS]).map((l) => l.deployment), [a.out.id]);

    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    assert.ok(readme.includes(`jq -c --arg id 20260101-120000-ab12 '${BY_DEPLOYMENT}'`), 'the README shows the deployment filter');
    assert.ok(readme.includes(`jq -c '${REVERTS}'`), 'the README shows the outcome filter');
  });
});
