// Prometheus metrics (DESIGN §9): what the history says happened, counted again from the history at
// every start so that a kill -9 loses nothing, plus the live phase, deadline and connections; served
// read-only on `metrics.listen` (GET /metrics and nothing else) and/or written to `metrics.textfile`.

import { chmodSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import type { Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { createRequire } from 'node:module';
import { basename, dirname, join } from 'node:path';
import type { AgentConfig } from '../shared/config.ts';
import { phases, revertReasons, type HistoryEntry, type Outcome } from '../shared/model.ts';
import type { HostMetrics } from '../shared/protocol.ts';
import type { Agent, Observation, Status } from './agent.ts';
import type { Logger } from './log.ts';

/** Reverts the deadline called for: their lateness is measured. */
const LATE_REASONS = new Set(['timeout', 'health-failed', 'fallback-timer']);
/** What a `stuck` outcome's free-text reason is counted as (a label must have few values). */
const STUCK_REASONS = ['conflict', 'revert-failed', 'profile-not-restored', 'commit-not-undone', 'other'] as const;

const BUCKETS = {
  revertLateness: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
  activationDuration: [1, 5, 10, 30, 60, 120, 300, 600, 1800],
  commitDuration: [0.5, 1, 5, 10, 30, 60, 120, 300, 600],
};

/** The textfile is rewritten this often, besides after every recorded transition (the countdown moves). */
const TEXTFILE_EVERY_MS = 10_000;

class Histogram {
  readonly bounds: number[];
  readonly counts: number[];
  count = 0;
  sum = 0;
  constructor(bounds: number[]) {
    this.bounds = bounds;
    this.counts = bounds.map(() => 0);
  }
  observe(v: number): void {
    this.count++;
    this.sum += v;
    this.bounds.forEach((b, i) => {
      if (v <= b) this.counts[i]!++;
    });
  }
}

/** The label a deployment's end is counted under: the revert reason, the failure's code, or a stuck class. */
export function reasonLabel(o: Outcome): string | undefined {
  switch (o.outcome) {
    case 'confirmed':
      return undefined;
    case 'reverted':
      return o.reason;
    case 'failed':
      return /^[a-z0-9-]{1,40}$/.test(o.code) ? o.code : 'other';
    case 'stuck': {
      const r = o.reason;
      if (r.startsWith('conflict')) return 'conflict';
      if (r.startsWith('revert failed')) return 'revert-failed';
      if (r.startsWith('reverted, but the profile')) return 'profile-not-restored';
      if (r.startsWith('the interrupted commit')) return 'commit-not-undone';
      return 'other';
    }
  }
}

/**
 * The counts, fed with history entries in order (the whole history at start, then each entry once
 * it is on disk) and with the refusals that leave no entry (counted since this process started).
 */
export class Tally {
  readonly since = new Date();
  /** `outcome` or `outcome/reason` → count */
  readonly deployments = new Map<string, number>();
  readonly lastOutcomeAt = new Map<string, number>();
  readonly revertLateness = new Histogram(BUCKETS.revertLateness);
  readonly activationDuration = new Histogram(BUCKETS.activationDuration);
  readonly commitDuration = new Histogram(BUCKETS.commitDuration);
  readonly confirmRefusals = new Map<string, number>();
  readonly authFailures = new Map<string, number>();
  /** per running deployment: when it entered `activating` and `committing`, and its deadline */
  private readonly open = new Map<string, { activating?: number; committing?: number; deadline?: number }>();

  constructor(history: HistoryEntry[] = []) {
    // Zero from the start: an alert on increase() sees the first revert of a new host.
    this.deployments.set('confirmed', 0);
    for (const r of revertReasons) this.deployments.set(`reverted/${r}`, 0);
    for (const r of STUCK_REASONS) this.deployments.set(`stuck/${r}`, 0);
    this.confirmRefusals.set('health-failed', 0);
    for (const e of history) this.record(e);
  }

  observe(o: Observation): void {
    if (o.type === 'recorded') return this.record(o.entry);
    // Refusals of the health gate are in the history, counted by record().
    if (o.type === 'confirm-refused' && o.code !== 'health-failed') bump(this.confirmRefusals, o.code);
    if (o.type === 'auth-failed') bump(this.authFailures, o.reason);
  }

  private record(e: HistoryEntry): void {
    const at = Date.parse(e.at) / 1000;
    if (!Number.isFinite(at)) return;
    const mine = this.open.get(e.id) ?? {};
    this.open.set(e.id, mine);
    if (e.deadline) mine.deadline = Date.parse(e.deadline) / 1000;
    // A stretch that ended in a reboot or an interrupted commit measures the downtime, not the work.
    if (e.from === 'activating' && mine.activating !== undefined && e.to !== 'idle') this.activationDuration.observe(Math.max(0, at - mine.activating));
    if (e.from === 'committing' && mine.committing !== undefined && e.event !== 'commit-abandoned') this.commitDuration.observe(Math.max(0, at - mine.committing));
    if (e.to === 'activating' && e.from !== 'activating') mine.activating = at;
    if (e.to === 'committing' && e.from !== 'committing') mine.committing = at;
    if (e.event === 'confirm-refused') bump(this.confirmRefusals, 'health-failed');
    if (!e.outcome) return;
    const reason = reasonLabel(e.outcome);
    bump(this.deployments, reason === undefined ? e.outcome.outcome : `${e.outcome.outcome}/${reason}`);
    this.lastOutcomeAt.set(e.outcome.outcome, at);
    if (e.outcome.outcome === 'reverted' && LATE_REASONS.has(e.outcome.reason) && mine.deadline !== undefined && Number.isFinite(mine.deadline)) {
      // Wall-clock times: a clock stepped back during the trial would make it negative; it is not early.
      this.revertLateness.observe(Math.max(0, at - mine.deadline));
    }
    this.open.delete(e.id);
  }

  /** The same facts for `status --json`. */
  facts(connections?: { total: number; pending: number }): HostMetrics {
    return {
      since: this.since.toISOString(),
      deployments: [...this.deployments].map(([key, count]) => {
        const [outcome, reason] = key.split('/') as [string, string | undefined];
        return { outcome, ...(reason !== undefined ? { reason } : {}), count };
      }),
      lastOutcomeAt: Object.fromEntries([...this.lastOutcomeAt].map(([o, t]) => [o, new Date(t * 1000).toISOString()])),
      revertLateness: summary(this.revertLateness),
      activationDuration: summary(this.activationDuration),
      commitDuration: summary(this.commitDuration),
      confirmRefusals: Object.fromEntries(this.confirmRefusals),
      authFailures: Object.fromEntries(this.authFailures),
      ...(connections ? { connections: { pending: connections.pending, authenticated: connections.total - connections.pending } } : {}),
    };
  }
}

function bump(m: Map<string, number>, key: string): void {
  m.set(key, (m.get(key) ?? 0) + 1);
}

function summary(h: Histogram): { count: number; sumSeconds: number } {
  return { count: h.count, sumSeconds: round(h.sum) };
}

function round(v: number): number {
  return Math.round(v * 1000) / 1000;
}

// ---- the text exposition format ----------------------------------------------------------------

type Labels = Record<string, string>;

function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function sample(name: string, labels: Labels, value: number): string {
  const l = Object.entries(labels);
  const text = value === Infinity ? '+Inf' : value === -Infinity ? '-Inf' : String(round(value));
  return `${name}${l.length ? `{${l.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',')}}` : ''} ${text}\n`;
}

function family(name: string, type: 'counter' | 'gauge' | 'histogram', help: string, samples: string[]): string {
  return `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${samples.join('')}`;
}

function histogram(name: string, help: string, h: Histogram): string {
  const samples = h.bounds.map((b, i) => sample(`${name}_bucket`, { le: String(b) }, h.counts[i]!));
  samples.push(sample(`${name}_bucket`, { le: '+Inf' }, h.count), sample(`${name}_sum`, {}, h.sum), sample(`${name}_count`, {}, h.count));
  return family(name, 'histogram', help, samples);
}

/** Every metric, in the Prometheus text format 0.0.4. */
export function exposition(tally: Tally, status: Status, connections: { total: number; pending: number } | undefined): string {
  const out: string[] = [];
  out.push(
    family(
      'snapback_deployments_total',
      'counter',
      'Deployments that ended, by outcome and reason (the revert reason, the failure code, or the kind of stuck); counted from the history.',
      [...tally.deployments].map(([key, n]) => {
        const [outcome, reason] = key.split('/') as [string, string | undefined];
        return sample('snapback_deployments_total', { outcome, ...(reason !== undefined ? { reason } : {}) }, n);
      }),
    ),
  );
  out.push(family('snapback_phase', 'gauge', 'The agent\'s phase: 1 for the current one, 0 for the others.', phases.map((p) => sample('snapback_phase', { phase: p }, p === status.phase ? 1 : 0))));
  const d = status.phase === 'trial' ? status.deployment : undefined;
  out.push(family('snapback_trial_deadline_seconds', 'gauge', 'Seconds until the running trial reverts unless confirmed; absent outside a trial.', d?.secondsLeft !== undefined ? [sample('snapback_trial_deadline_seconds', {}, d.secondsLeft)] : []));
  out.push(
    family(
      'snapback_trial_deadline_timestamp_seconds',
      'gauge',
      'When the running trial reverts unless confirmed (Unix time); absent outside a trial.',
      d?.deadline ? [sample('snapback_trial_deadline_timestamp_seconds', {}, Date.parse(d.deadline) / 1000)] : [],
    ),
  );
  out.push(
    family(
      'snapback_last_outcome_timestamp_seconds',
      'gauge',
      'When a deployment last ended with each outcome (Unix time).',
      [...tally.lastOutcomeAt].map(([o, t]) => sample('snapback_last_outcome_timestamp_seconds', { outcome: o }, t)),
    ),
  );
  out.push(histogram('snapback_revert_lateness_seconds', 'From the deadline to the end of the revert it called for (timeout, health-failed, fallback-timer).', tally.revertLateness));
  out.push(histogram('snapback_activation_duration_seconds', 'How long switch-to-configuration test of a new system took.', tally.activationDuration));
  out.push(histogram('snapback_commit_duration_seconds', 'How long a commit took: the profile and switch-to-configuration boot.', tally.commitDuration));
  out.push(
    family(
      'snapback_confirm_refusals_total',
      'counter',
      'Confirms refused, by error code; health-failed is counted from the history, the others since the agent started.',
      [...tally.confirmRefusals].map(([code, n]) => sample('snapback_confirm_refusals_total', { code }, n)),
    ),
  );
  out.push(family('snapback_auth_failures_total', 'counter', 'Controllers refused during or after authentication, by reason, since the agent started.', [...tally.authFailures].map(([reason, n]) => sample('snapback_auth_failures_total', { reason }, n))));
  out.push(
    family(
      'snapback_connections',
      'gauge',
      'Controller connections now, by state; absent when the agent does not listen for controllers.',
      connections ? [sample('snapback_connections', { state: 'pending' }, connections.pending), sample('snapback_connections', { state: 'authenticated' }, connections.total - connections.pending)] : [],
    ),
  );
  out.push(family('snapback_info', 'gauge', 'The agent\'s version and the running system.', [sample('snapback_info', { version: status.version, current_system: status.currentSystem ?? '' }, 1)]));
  out.push(family('snapback_agent_start_time_seconds', 'gauge', 'When this agent process started (Unix time): the counters "since the agent started" count from here.', [sample('snapback_agent_start_time_seconds', {}, tally.since.getTime() / 1000)]));
  return out.join('');
}

// ---- where the metrics go ----------------------------------------------------------------------

/**
 * Counts for an agent: fed before `agent.start()` so that outcomes recorded while starting (a
 * reboot, a recovered outcome) are counted once, from the history.
 */
export class Metrics {
  readonly tally: Tally;
  /** controller connections (the WireServer), when the agent listens */
  connections: (() => { total: number; pending: number }) | undefined;
  private server: Server | undefined;
  private textfileTimer: NodeJS.Timeout | undefined;
  private textfilePending = false;
  private textfileError: string | undefined;
  private readonly agent: Agent;
  private readonly config: AgentConfig['metrics'];
  private readonly log: Logger;

  constructor(agent: Agent, config: AgentConfig['metrics'], log: Logger) {
    this.agent = agent;
    this.config = config;
    this.log = log;
    let history: HistoryEntry[] = [];
    try {
      history = agent.history();
    } catch (err) {
      log.error({ err: (err as Error).message }, 'cannot read the history: the metrics count from zero');
    }
    this.tally = new Tally(history);
    agent.observe((o) => {
      this.tally.observe(o);
      // After a transition at once; refusals (a flood of them, maybe) wait for the next periodic write.
      if (this.config.textfile && o.type === 'recorded') this.writeTextfileSoon();
    });
    agent.facts = () => this.tally.facts(this.connections?.());
  }

  render(): string {
    return exposition(this.tally, this.agent.status(), this.connections?.());
  }

  /** Starts what `metrics` configures; a listener that cannot bind is logged and the agent goes on. */
  async start(): Promise<void> {
    if (this.config.textfile) {
      this.writeTextfile();
      this.textfileTimer = setInterval(() => this.writeTextfile(), TEXTFILE_EVERY_MS);
      this.textfileTimer.unref();
    }
    const listen = this.config.listen;
    if (!listen) return;
    try {
      this.server = await listenMetrics(listen.host, listen.port, () => this.render(), this.log);
      const { address, port } = this.server.address() as AddressInfo;
      this.log.info({ metricsAddress: address, metricsPort: port }, `serving metrics on ${address}:${port} (GET /metrics)`);
    } catch (err) {
      this.log.error({ err: (err as Error).message, host: listen.host, port: listen.port }, 'cannot listen for metrics scrapes; the agent goes on without them');
    }
  }

  address(): AddressInfo | undefined {
    return this.server?.address() as AddressInfo | undefined;
  }

  async close(): Promise<void> {
    if (this.textfileTimer) clearInterval(this.textfileTimer);
    if (this.config.textfile) this.writeTextfile();
    const server = this.server;
    if (!server) return;
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
  }

  /** After the step that recorded it has finished: no disk write inside the lifecycle's turn. */
  private writeTextfileSoon(): void {
    if (this.textfilePending) return;
    this.textfilePending = true;
    setImmediate(() => {
      this.textfilePending = false;
      this.writeTextfile();
    });
  }

  /** Replaces the file at once (a temporary file beside it, renamed): node-exporter never reads half. */
  writeTextfile(): void {
    const path = this.config.textfile;
    if (!path) return;
    const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
    try {
      writeFileSync(tmp, this.render());
      // node-exporter runs as another user.
      chmodSync(tmp, 0o644);
      renameSync(tmp, path);
      if (this.textfileError) this.log.info({ textfile: path }, 'the metrics textfile is written again');
      this.textfileError = undefined;
    } catch (err) {
      rmSync(tmp, { force: true });
      const message = (err as Error).message;
      if (message !== this.textfileError) this.log.error({ textfile: path, err: message }, 'cannot write the metrics textfile');
      this.textfileError = message;
    }
  }
}

/** Header bytes, time to send them, and connections a scraper may hold: far beyond a scrape, far below harm. */
const LIMITS = { maxHeaderSize: 4096, headersTimeoutMs: 5000, requestTimeoutMs: 10_000, maxConnections: 16 };

/**
 * The read-only listener: `GET /metrics` is answered, everything else refused — other methods
 * (405), other paths and any query (404), a request with a body (400) — and a client that is slow
 * to send its headers is cut off. Nothing it receives reaches the agent.
 */
export async function listenMetrics(host: string, port: number, render: () => string, log: Logger): Promise<Server> {
  // Loaded only where the listener is configured; through require, which does not load Node's fetch
  // as import() does (agent/server.ts).
  const { createServer } = createRequire(import.meta.url)('node:http') as typeof import('node:http');
  const server = createServer(
    { maxHeaderSize: LIMITS.maxHeaderSize, headersTimeout: LIMITS.headersTimeoutMs, requestTimeout: LIMITS.requestTimeoutMs, connectionsCheckingInterval: 1000, keepAlive: false },
    (req, res) => {
      res.shouldKeepAlive = false;
      const refuse = (status: number, text: string, headers: Record<string, string> = {}) => {
        res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', connection: 'close', ...headers }).end(`${text}\n`);
      };
      if (req.method !== 'GET') return refuse(405, 'only GET /metrics', { allow: 'GET' });
      if (req.url !== '/metrics') return refuse(404, 'only GET /metrics');
      if ((req.headers['content-length'] ?? '0') !== '0' || req.headers['transfer-encoding'] !== undefined) return refuse(400, 'GET /metrics takes no body');
      let body: string;
      try {
        body = render();
      } catch (err) {
        log.error({ err: (err as Error).stack }, 'rendering the metrics failed');
        return refuse(500, 'internal error');
      }
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8', connection: 'close' }).end(body);
    },
  );
  server.maxConnections = LIMITS.maxConnections;
  server.on('clientError', (_err, socket: Socket) => socket.destroy());
  // A connection past its request is of no more use: no keep-alive, no idle sockets.
  server.on('connection', (socket: Socket) => socket.setTimeout(LIMITS.requestTimeoutMs, () => socket.destroy()));
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      server.on('error', (err) => log.error({ err: err.message }, 'the metrics listener failed'));
      resolve(server);
    });
  });
}
