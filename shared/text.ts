// How a host's state reads to a human: the console's `status`, the controller's `status`, and the
// unit's STATUS= line all use these, so they say the same thing the same way.

import { describeOutcome } from './words.ts';
import type { HostStatus } from './protocol.ts';

export function duration(seconds: number): string {
  const m = Math.floor(seconds / 60);
  const h = Math.floor(m / 60);
  if (h) return `${h}h${m % 60}m${seconds % 60}s`;
  return m ? `${m}m${seconds % 60}s` : `${seconds}s`;
}

/** What a target's kernel side means (DESIGN §11): which parts need a reboot, or none. */
export function kernelNote(parts: readonly string[]): string {
  return parts.length
    ? `${parts.join(', ')} differ${parts.length === 1 ? 's' : ''} from the booted system: a reboot is needed to run them (--reboot: a trial boot)`
    : 'userland only: no reboot needed';
}

/** Several lines; the first is the summary (`trial of …, reverting in 1m57s (…)`). */
export function describeStatus(s: HostStatus): string {
  const lines: string[] = [];
  const d = s.deployment;
  if (s.phase === 'trial' && d) {
    const left = d.secondsLeft !== undefined ? `reverting in ${duration(d.secondsLeft)}` : 'deadline unknown (new boot)';
    const what = d.reboot ? 'trial boot' : 'trial';
    lines.push(`${what} of ${d.toplevel}, ${left} (deployment ${d.id}; confirm with: snapback-agent confirm)`);
    if (d.unhealthy) lines.push(`  unhealthy: ${d.unhealthy}`);
    lines.push(`  revert target: ${d.previous}${d.reboot ? ' (the boot default: a revert reboots into it)' : ''}`);
    if (d.kernel && !d.reboot) lines.push(`  kernel: ${kernelNote(d.kernel)}`);
  } else if (d?.reboot && s.phase === 'activating') {
    const how = d.reboot.stage === 'rebooting' ? `rebooting into it once (${d.reboot.loader} entry ${d.reboot.entry ?? '?'})` : `preparing its boot entry (${d.reboot.loader})`;
    lines.push(`trial boot of ${d.toplevel}: ${how}; the boot default stays ${d.previous} (deployment ${d.id})`);
  } else if (d) {
    lines.push(`${s.phase}: deployment ${d.id} of ${d.toplevel ?? d.target}`);
  } else {
    lines.push(`idle, running ${s.currentSystem ?? 'an unknown system'}`);
  }
  if (s.last) lines.push(`last: deployment ${s.last.id} ${describeOutcome(s.last.outcome)} at ${s.last.finishedAt} (by ${s.last.by.who})`);
  if (s.bootPending) lines.push(`the boot default's ${s.bootPending.join(', ')} ${s.bootPending.length === 1 ? 'differs' : 'differ'} from the booted system: the next boot runs them`);
  if (s.offline) lines.push('(the agent is not running; read from the state directory)');
  return lines.join('\n');
}
