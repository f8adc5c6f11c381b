// The controller's fleet file (`snapback.json`, DESIGN §6) as one zod schema, and its loader.

import { homedir } from 'node:os';
import { z } from 'zod';
import { parseInput, readInput } from './input.ts';
import { secondsSchema, targetSchema } from './model.ts';

const timeoutSec = secondsSchema;

const hostPort = z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):\d{1,5}$/, 'must be HOST:PORT');

export const probeSchema = z.union([
  z.strictObject({ tcp: hostPort, name: z.string().optional(), timeoutSec: timeoutSec.optional() }),
  z.strictObject({
    http: z.url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' }),
    expectStatus: z.number().int().min(100).max(599).default(200),
    name: z.string().optional(),
    timeoutSec: timeoutSec.optional(),
  }),
  z.strictObject({
    command: z.union([z.array(z.string()).min(1), z.string().min(1)]),
    name: z.string().optional(),
    timeoutSec: timeoutSec.optional(),
  }),
]);
export type Probe = z.infer<typeof probeSchema>;

/**
 * Host names index plain objects: the names every object already has (`constructor`, `toString`,
 * `__proto__`…) would be found where no host is, or vanish from the parsed file.
 */
const reservedNames = new Set([...Object.getOwnPropertyNames(Object.prototype), '__proto__']);
const hostNameSchema = z
  .string()
  .regex(/^[A-Za-z0-9_.-]+$/, 'host names use letters, digits, "_", "." and "-"')
  .refine((n) => !reservedNames.has(n), { error: (i) => `"${String(i.input)}" cannot be a host name (every JavaScript object has it)` });

export const fleetHostSchema = z.strictObject({
  url: z.string().regex(/^wss?:\/\/[^\s/]+\/?$/, 'must be ws://HOST[:PORT] or wss://HOST[:PORT]'),
  /** the host's SSH host key line (`ssh-ed25519 AAAA…`); else ~/.ssh/known_hosts is consulted */
  hostKey: z.string().optional(),
  /** SHA-256 of the agent's TLS certificate (hex, colons optional), for wss:// with a self-signed cert */
  tlsFingerprint: z
    .string()
    .regex(/^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$/, 'must be a SHA-256 fingerprint (64 hex digits, colons optional)')
    .optional(),
  target: targetSchema.optional(),
  tags: z.array(z.string().min(1)).default([]),
  dependsOn: z.array(z.string().min(1)).default([]),
  probes: z.array(probeSchema).optional(),
  confirmTimeoutSec: timeoutSec.optional(),
  /** where a flake target is built: here, then pushed ("local", the default), or on the host */
  buildOn: z.enum(['local', 'host']).optional(),
  /** before pushing, the host fetches what its own caches have */
  substituteOnHost: z.boolean().optional(),
});
export type FleetHost = z.infer<typeof fleetHostSchema>;

export const fleetSchema = z
  .strictObject({
    identity: z.strictObject({ sshKey: z.string().min(1).optional() }).optional(),
    defaults: z
      .strictObject({
        confirmTimeoutSec: timeoutSec.optional(),
        probes: z.array(probeSchema).optional(),
        probeTimeoutSec: timeoutSec.default(60),
        parallel: z.number().int().positive().default(10),
        /** after a deadline passed unconfirmed: how long to keep asking the host for its outcome */
        outcomeGraceSec: timeoutSec.default(120),
        buildOn: z.enum(['local', 'host']).default('local'),
        substituteOnHost: z.boolean().default(false),
      })
      .prefault({}),
    // A record never sees the key `__proto__` (it would drop the host silently): refuse it here.
    hosts: z.preprocess((hosts, ctx) => {
      if (hosts && typeof hosts === 'object' && Object.hasOwn(hosts, '__proto__')) {
        ctx.issues.push({ code: 'custom', path: ['__proto__'], input: hosts, message: '"__proto__" cannot be a host name (every JavaScript object has it)' });
      }
      return hosts;
    }, z.record(hostNameSchema, fleetHostSchema)),
  })
  .superRefine((f, ctx) => {
    for (const [name, h] of Object.entries(f.hosts)) {
      for (const dep of h.dependsOn) {
        if (!isHost(f, dep)) ctx.addIssue({ code: 'custom', path: ['hosts', name, 'dependsOn'], message: `unknown host "${dep}"` });
      }
    }
  });
export type Fleet = z.infer<typeof fleetSchema>;

/** Whether `name` is a host of the fleet (its own entry, never one every object has). */
export function isHost(fleet: Pick<Fleet, 'hosts'>, name: string): boolean {
  return Object.hasOwn(fleet.hosts, name);
}

export function expandHome(path: string): string {
  return path === '~' || path.startsWith('~/') ? homedir() + path.slice(1) : path;
}

export function loadFleet(path: string): Fleet {
  return parseFleet(readInput(path, 'the fleet file'), path);
}

/** Validates fleet JSON from a file or from `nix eval --json REF#snapback`. */
export function parseFleet(text: string, source: string): Fleet {
  return parseInput(fleetSchema, text, source);
}
