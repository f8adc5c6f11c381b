// How the controller reports: one plain line per event and host (on a terminal too, for now), or
// `--json`: one JSON object per event and a final `result` object.

import type { DeployEvent, HostResult } from './deploy.ts';

export type Mode = 'json' | 'text';

export interface Renderer {
  event(e: DeployEvent): void;
  result(results: HostResult[], exit: number): void;
}

export function renderer(mode: Mode, out: NodeJS.WritableStream = process.stdout): Renderer {
  if (mode === 'json') {
    return {
      event: ({ type, ...rest }) => out.write(JSON.stringify({ type: 'event', event: type, ...rest }) + '\n'),
      result: (hosts, exit) => out.write(JSON.stringify({ type: 'result', exit, hosts }) + '\n'),
    };
  }
  return {
    event(e) {
      const line = describe(e);
      if (line !== undefined) out.write(`${e.host}: ${line}\n`);
    },
    result(hosts, exit) {
      if (hosts.length > 1) {
        out.write('\n');
        for (const h of hosts) out.write(`  ${h.host.padEnd(16)} ${h.status.padEnd(12)} ${h.message}\n`);
      }
      out.write(exit === 0 ? '' : `exit ${exit}\n`);
    },
  };
}

function describe(e: DeployEvent): string | undefined {
  switch (e.type) {
    case 'connected':
      return `authenticated as ${e.as}`;
    case 'phase':
      return e.phase === 'activating' ? `activating ${e.toplevel ?? ''} (deployment ${e.id})` : e.phase === 'trial' ? undefined : e.phase;
    case 'line':
      return `  | ${e.line}`;
    case 'trial':
      return `trial running; the host reverts by itself in ${e.secondsLeft}s unless confirmed`;
    case 'reconnecting':
      return `reconnecting (attempt ${e.attempt}): ${e.error}`;
    case 'reconnected':
      return 'reachable over a fresh connection';
    case 'probe':
      return `probe ${e.name}: ${e.ok ? 'ok' : `FAILED (${e.detail})`}`;
    case 'confirming':
      return 'probes passed; confirming';
    case 'rolling-back':
      return `rolling back: ${e.why}`;
    case 'waiting':
      return `waiting ${e.seconds}s for the deadline: ${e.why}`;
    case 'done':
      if (e.result.status === 'confirmed') return 'confirmed';
      if (e.result.status === 'dry-run') return e.result.message;
      return e.result.outcome ? e.result.message : `${e.result.status}: ${e.result.message}`;
  }
}
