// The health gate in front of every confirm (promise 11): failed systemd units, the exit-4 mark of
// the activation, and the operator's own check commands. Returns problems; empty means healthy.

import { run } from '../shared/exec.ts';
import type { AgentConfig } from '../shared/config.ts';

/**
 * `askSystemd`: the agent manages this machine's systemd (the systemd runner). A scratch host with
 * the direct runner is not the machine, so the machine's failed units are none of its business.
 */
export async function healthProblems(config: AgentConfig, unitsFailedAtActivation: boolean, askSystemd: boolean): Promise<string[]> {
  const problems: string[] = [];
  if (config.health.failedUnits === 'block') {
    if (unitsFailedAtActivation) problems.push('switch-to-configuration reported failed units (exit 4)');
    if (askSystemd) problems.push(...(await failedUnits()));
  }
  for (const check of config.health.checks) {
    const name = check.name ?? (Array.isArray(check.command) ? check.command.join(' ') : check.command);
    const [file, args] = Array.isArray(check.command) ? [check.command[0]!, check.command.slice(1)] : ['/bin/sh', ['-c', check.command]];
    const r = await run(file, args, { timeoutMs: check.timeoutSec * 1000 });
    if (r.timedOut) problems.push(`check "${name}" timed out after ${check.timeoutSec}s`);
    else if (r.exitCode !== 0) {
      const why = String(r.stderr || r.stdout).trim().split('\n').slice(-1)[0] ?? '';
      problems.push(`check "${name}" exited ${r.exitCode ?? r.signal}${why ? `: ${why}` : ''}`);
    }
  }
  return problems;
}

/** Units systemd reports as failed. */
async function failedUnits(): Promise<string[]> {
  const r = await run('systemctl', ['list-units', '--state=failed', '--plain', '--no-legend', '--no-pager']);
  if (r.exitCode !== 0) return [`systemctl list-units failed: ${String(r.stderr).trim()}`];
  const units = String(r.stdout)
    .split('\n')
    .map((l) => l.trim().split(/\s+/)[0])
    .filter((u): u is string => !!u);
  return units.length ? [`failed units: ${units.join(', ')}`] : [];
}
