// How a host's state reads to a human: the console's `status`, the controller's `status`, and the
// unit's STATUS= line all use these, so they say the same thing the same way.

import { describeOutcome } from './model.ts';
import type { HostStatus } from './protocol.ts';

export function duration(seconds: number): string {
  const m = Math.floor(seconds / 60);
  const h = Math.floor(m / 60);
  if (h) return `${h}h${m % 60}m${seconds % 60}s`;
  return m ? `${m}m${seconds % 60}s` : `${seconds}s`;
}

/** Several lines; the first is the summary (`trial of …, reverting in 1m57s (…)`). */
export function describeStatus(s: HostStatus): string {
  const lines: string[] = [];
  const d = s.deployment;
  if (s.phase === 'trial' && d) {
    const left = d.secondsLeft !== undefined ? `reverting in ${duration(d.secondsLeft)}` : 'deadline unknown (new boot)';
    lines.push(`trial of ${d.toplevel}, ${left} (deployment ${d.id}; confirm with: snapback-agent confirm)`);
    if (d.unhealthy) lines.push(`  unhealthy: ${d.unhealthy}`);
    lines.push(`  revert target: ${d.previous}`);
  } else if (d) {
    lines.push(`${s.phase}: deployment ${d.id} of ${d.toplevel ?? d.target}`);
  } else {
    lines.push(`idle, running ${s.currentSystem ?? 'an unknown system'}`);
  }
  if (s.last) lines.push(`last: deployment ${s.last.id} ${describeOutcome(s.last.outcome)} at ${s.last.finishedAt} (by ${s.last.by.who})`);
  if (s.offline) lines.push('(the agent is not running; read from the state directory)');
  return lines.join('\n');
}
