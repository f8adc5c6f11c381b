// The agent's configuration file (DESIGN §8) as one zod schema, and the loader that turns
// every problem in a file into one line naming the key. Unknown keys are errors, not ignored.

import { z } from 'zod';
import { parseInput, readInput, validateInput } from './input.ts';
import { DEFAULT_CONTROL_SOCKET } from './console-config.ts';
import { secondsSchema } from './model.ts';
import { DEFAULT_PORT } from './protocol.ts';

const absolutePath = z.string().startsWith('/', { message: 'must be an absolute path' });
const seconds = secondsSchema;

export const healthCheckSchema = z.strictObject({
  name: z.string().min(1).optional(),
  /** argv (run directly) or a string (run with /bin/sh -c) */
  command: z.union([z.array(z.string()).min(1), z.string().min(1)]),
  timeoutSec: seconds.default(30),
});

/** A command the agent runs after every outcome (agent/hooks.ts): shaped like a health check. */
export const hookSchema = z.strictObject({
  name: z.string().min(1).optional(),
  /** argv (run directly) or a string (run with /bin/sh -c) */
  command: z.union([z.array(z.string()).min(1), z.string().min(1)]),
  timeoutSec: seconds.default(30),
});

export const DEFAULT_METRICS_PORT = 7732;

export const agentConfigSchema = z
  .strictObject({
    listen: z
      .strictObject({
        host: z.string().min(1).default('::'),
        port: z.number().int().min(0).max(65535).default(DEFAULT_PORT),
        tls: z.strictObject({ cert: absolutePath, key: absolutePath }).optional(),
        /** connections at all, authenticated or not */
        maxConnections: z.number().int().positive().max(65_536).default(256),
        /** connections that have not authenticated yet: in total, and per source address (IPv6: per /64) */
        maxPending: z.number().int().positive().max(65_536).default(64),
        maxPendingPerAddress: z.number().int().positive().max(65_536).default(8),
        /** from the TCP accept to a verified `hello`; then the socket is destroyed */
        handshakeTimeoutSec: z.number().int().positive().max(300).default(10),
      })
      .prefault({}),
    stateDir: absolutePath.default('/var/lib/snapback'),
    controlSocket: absolutePath.default(DEFAULT_CONTROL_SOCKET),
    hostKey: absolutePath.default('/etc/ssh/ssh_host_ed25519_key'),
    /** OpenSSH authorized_keys lines allowed to deploy */
    authorizedKeys: z.array(z.string().min(1)).default([]),
    system: z
      .strictObject({
        profile: absolutePath.default('/nix/var/nix/profiles/system'),
        currentSystem: absolutePath.default('/run/current-system'),
        /** default: "systemd" when /run/systemd/system exists, else "direct" */
        runner: z.enum(['systemd', 'direct']).optional(),
        switchLock: absolutePath.default('/run/nixos/switch-to-configuration.lock'),
        /** where the boot id is read; a test points it at a file to simulate a reboot */
        bootIdFile: absolutePath.default('/proc/sys/kernel/random/boot_id'),
        /** the system the running kernel booted: a target's kernel side is compared with it */
        bootedSystem: absolutePath.default('/run/booted-system'),
        /** for trial boots (--reboot); detected when absent */
        bootloader: z.enum(['systemd-boot', 'grub', 'none']).optional(),
        /** where NixOS's GRUB menu is read to name a generation's entry */
        grubConfig: absolutePath.default('/boot/grub/grub.cfg'),
        /** how a trial boot reboots the host */
        rebootCommand: z.array(z.string().min(1)).min(1).default(['systemctl', 'reboot']),
      })
      .prefault({}),
    nix: z
      .strictObject({
        substituters: z.array(z.string().min(1)).default([]),
        trustedPublicKeys: z.array(z.string().regex(/^[^:\s]+:[A-Za-z0-9+/=]+$/, 'must be NAME:BASE64')).default([]),
      })
      .prefault({}),
    confirm: z
      .strictObject({
        defaultTimeoutSec: seconds.default(300),
        minTimeoutSec: seconds.default(30),
        maxTimeoutSec: seconds.default(3600),
        activationTimeoutSec: seconds.default(600),
      })
      .prefault({}),
    health: z
      .strictObject({
        failedUnits: z.enum(['block', 'ignore']).default('block'),
        checks: z.array(healthCheckSchema).default([]),
      })
      .prefault({}),
    /** Prometheus metrics (agent/metrics.ts): off unless `listen` or `textfile` is set */
    metrics: z
      .strictObject({
        /** a read-only HTTP listener answering only GET /metrics */
        listen: z
          .strictObject({
            host: z.string().min(1).default('127.0.0.1'),
            port: z.number().int().min(0).max(65535).default(DEFAULT_METRICS_PORT),
          })
          .optional(),
        /** a file for node-exporter's textfile collector, replaced atomically */
        textfile: absolutePath.endsWith('.prom', { message: 'must end in .prom (node-exporter reads only those)' }).optional(),
      })
      .prefault({}),
    hooks: z.strictObject({ onOutcome: z.array(hookSchema).default([]) }).prefault({}),
    log: z.strictObject({ level: z.enum(['debug', 'info', 'warn', 'error']).default('info') }).prefault({}),
  })
  .superRefine((c, ctx) => {
    const { minTimeoutSec, maxTimeoutSec, defaultTimeoutSec } = c.confirm;
    if (minTimeoutSec > maxTimeoutSec) {
      ctx.addIssue({ code: 'custom', path: ['confirm', 'minTimeoutSec'], message: 'must not exceed confirm.maxTimeoutSec' });
    }
    if (defaultTimeoutSec < minTimeoutSec || defaultTimeoutSec > maxTimeoutSec) {
      ctx.addIssue({
        code: 'custom',
        path: ['confirm', 'defaultTimeoutSec'],
        message: `must lie within confirm.minTimeoutSec..maxTimeoutSec (${minTimeoutSec}..${maxTimeoutSec})`,
      });
    }
  });

export type AgentConfig = z.infer<typeof agentConfigSchema>;

export { DEFAULT_CONFIG_PATH } from './console-config.ts';

/** Parses a config object; throws `config-invalid` listing every problem. */
export function parseAgentConfig(raw: unknown, source = 'configuration'): AgentConfig {
  return validateInput(agentConfigSchema, raw, source);
}

export function loadAgentConfig(path: string): AgentConfig {
  return parseInput(agentConfigSchema, readInput(path, 'the configuration'), path);
}
