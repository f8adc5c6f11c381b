// `hooks.onOutcome` (DESIGN §9): commands the agent runs after a deployment's outcome is on disk,
// each in its own process group with the outcome in its environment and the history record on stdin.
// They run beside the agent, never in the lifecycle's path: a hook can fail or hang, never delay or change a revert.

import { spawn } from 'node:child_process';
import type { AgentConfig } from '../shared/config.ts';
import { describeOutcome, type HistoryEntry } from '../shared/model.ts';
import type { Agent } from './agent.ts';
import type { Logger } from './log.ts';

type Hook = AgentConfig['hooks']['onOutcome'][number];

/** The last bytes of a hook's output kept for the log. */
const KEEP_OUTPUT = 2048;

/** The variables a hook gets besides the agent's own environment. */
export function hookEnvironment(entry: HistoryEntry): Record<string, string> {
  const o = entry.outcome!;
  const reason = o.outcome === 'reverted' ? o.reason : o.outcome === 'failed' ? o.code : o.outcome === 'stuck' ? o.reason : '';
  return {
    SNAPBACK_OUTCOME: o.outcome,
    SNAPBACK_REASON: reason,
    SNAPBACK_DEPLOYMENT: entry.id,
    SNAPBACK_TARGET: entry.toplevel ?? entry.target ?? '',
    SNAPBACK_PREVIOUS: entry.previous ?? '',
    SNAPBACK_BY: entry.by.who,
    SNAPBACK_CHANNEL: entry.by.channel,
    SNAPBACK_MESSAGE: `deployment ${entry.id} ${describeOutcome(o)}`,
  };
}

/**
 * The agent's environment without what is not the hook's: variables of its own (SNAPBACK_*) and
 * systemd's notification socket and watchdog (NotifyAccess=all would let a hook speak for the agent).
 */
function inherited(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('SNAPBACK_') && k !== 'NOTIFY_SOCKET' && !k.startsWith('WATCHDOG_')));
}

export class OutcomeHooks {
  private readonly hooks: Hook[];
  private readonly log: Logger;
  private readonly running = new Set<Promise<void>>();

  constructor(hooks: Hook[], log: Logger) {
    this.hooks = hooks;
    this.log = log;
  }

  /** Runs the hooks for every outcome the agent records from now on (attach before `agent.start()`). */
  static attach(agent: Agent, hooks: Hook[], log: Logger): OutcomeHooks {
    const h = new OutcomeHooks(hooks, log);
    if (hooks.length) {
      agent.observe((o) => {
        if (o.type === 'recorded' && o.entry.outcome) h.runAll(o.entry);
      });
    }
    return h;
  }

  /** Starts every hook for `entry`, after the current turn of the event loop; returns at once. */
  runAll(entry: HistoryEntry): void {
    const done = new Promise<void>((resolve) => setImmediate(resolve)).then(() => Promise.all(this.hooks.map((hook) => this.run(hook, entry)))).then(() => undefined);
    this.running.add(done);
    void done.finally(() => this.running.delete(done));
  }

  /** Resolves when every hook started so far has ended (each within its timeout). */
  async settled(): Promise<void> {
    while (this.running.size) await Promise.allSettled([...this.running]);
  }

  private run(hook: Hook, entry: HistoryEntry): Promise<void> {
    const name = hook.name ?? (Array.isArray(hook.command) ? hook.command.join(' ') : hook.command);
    const [file, args] = Array.isArray(hook.command) ? [hook.command[0]!, hook.command.slice(1)] : ['/bin/sh', ['-c', hook.command]];
    const fields = { hook: name, deployment: entry.id, outcome: entry.outcome!.outcome };
    return new Promise<void>((resolve) => {
      let output = '';
      let timedOut = false;
      const started = Date.now();
      // Its own process group: at the timeout the whole group goes, a `sh -c` and what it started.
      const child = spawn(file, args, { cwd: '/', detached: true, stdio: ['pipe', 'pipe', 'pipe'], env: { ...inherited(), ...hookEnvironment(entry) } });
      const keep = (chunk: Buffer) => {
        output = (output + chunk.toString('utf8')).slice(-KEEP_OUTPUT);
      };
      child.stdout!.on('data', keep);
      child.stderr!.on('data', keep);
      // A hook that does not read its stdin, or is gone already: not an error.
      child.stdin!.on('error', () => {});
      child.stdin!.end(`${JSON.stringify(entry)}\n`);
      const timer = setTimeout(() => {
        timedOut = true;
        try {
          process.kill(-child.pid!, 'SIGKILL');
        } catch {}
      }, hook.timeoutSec * 1000);
      let ended = false;
      const end = (report: () => void) => {
        if (ended) return;
        ended = true;
        clearTimeout(timer);
        report();
        resolve();
      };
      child.once('error', (err) => end(() => this.log.warn({ ...fields, err: err.message }, `hook "${name}" could not start: ${err.message}`)));
      child.once('exit', (code, signal) => {
        // What the hook left running in its group ends with it; its output is read to the end,
        // unless something that left the group holds the pipes open.
        try {
          process.kill(-child.pid!, 'SIGKILL');
        } catch {}
        const report = () => {
          const ms = Date.now() - started;
          const last = output.trim().split('\n').slice(-1)[0] ?? '';
          if (timedOut) this.log.warn({ ...fields, ms }, `hook "${name}" did not finish within ${hook.timeoutSec}s and was killed`);
          else if (code === 0) this.log.info({ ...fields, ms }, `hook "${name}" ran`);
          else this.log.warn({ ...fields, ms, exit: code ?? signal }, `hook "${name}" exited ${code ?? signal}${last ? `: ${last}` : ''}`);
        };
        child.once('close', () => end(report));
        setTimeout(() => end(report), 1000).unref();
      });
    });
  }
}
