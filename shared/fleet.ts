// The controller's fleet file (`snapback.json`, DESIGN §6) as one zod schema, and its loader; and
// the fleet made in memory for hosts named on the command line when there is no fleet file.

import { homedir } from 'node:os';
import { z } from 'zod';
import { isIP } from 'node:net';
import { UsageError, closest } from './cli.ts';
import { SnapbackError, describeIssues } from './errors.ts';
import { readInput } from './input.ts';
import { secondsSchema, targetSchema, type Target } from './model.ts';
import { parsePublicKeyLine } from './ssh.ts';

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
  hostKey: z
    .string()
    .superRefine((line, ctx) => {
      try {
        parsePublicKeyLine(line);
      } catch (err) {
        ctx.addIssue({ code: 'custom', message: `${(err as Error).message}; ${HOST_KEY_HINT}` });
      }
    })
    .optional(),
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

const HOST_KEY_HINT =
  'a host key line looks like "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… root@web1": get it with "ssh-keyscan -t ed25519 HOST" and leave out the host name it begins with';

const defaultsSchema = z.strictObject({
        confirmTimeoutSec: timeoutSec.optional(),
        probes: z.array(probeSchema).optional(),
        probeTimeoutSec: timeoutSec.default(60),
        parallel: z.number().int().positive().default(10),
        /** after a deadline passed unconfirmed: how long to keep asking the host for its outcome */
        outcomeGraceSec: timeoutSec.default(120),
        buildOn: z.enum(['local', 'host']).default('local'),
        substituteOnHost: z.boolean().default(false),
      });

export const fleetSchema = z
  .strictObject({
    identity: z.strictObject({ sshKey: z.string().min(1).optional() }).optional(),
    defaults: defaultsSchema.prefault({}),
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
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new SnapbackError('config-invalid', `${source} is not valid JSON: ${(err as Error).message}`);
  }
  const result = fleetSchema.safeParse(raw);
  if (result.success) return result.data;
  const lines = result.error.issues.flatMap((issue) => describeFleetIssue(issue, raw));
  throw new SnapbackError('config-invalid', `${source} is invalid:\n  ${lines.join('\n  ')}`, { problems: lines });
}

const TARGET_FORMS = '{ "storePath": "/nix/store/…" }, { "flake": "REF#HOST" } or { "generation": N }';
const PROBE_KEYS = ['tcp', 'http', 'command', 'expectStatus', 'name', 'timeoutSec'];

/** The valid keys of the object at `path` of a fleet file, for "did you mean". */
function keysAt(path: PropertyKey[]): string[] {
  const [a, , c, d] = path;
  if (path.length === 0) return Object.keys(fleetSchema.shape);
  if (a === 'defaults' && path.length === 1) return Object.keys(defaultsSchema.shape);
  if (a === 'identity' && path.length === 1) return ['sshKey'];
  if (a === 'hosts' && path.length === 2) return Object.keys(fleetHostSchema.shape);
  if (a === 'hosts' && c === 'probes' && typeof d === 'number') return PROBE_KEYS;
  if (a === 'defaults' && path[1] === 'probes' && path.length === 3) return PROBE_KEYS;
  return [];
}

/** Like describeIssues, and a typo names the nearest valid key; a wrong target lists the forms. */
function describeFleetIssue(issue: z.core.$ZodIssue, raw: unknown): string[] {
  const where = issue.path.length ? issue.path.map(String).join('.') : '(top level)';
  if (issue.code === 'unrecognized_keys') {
    const valid = keysAt(issue.path);
    return issue.keys.map((k) => {
      const near = closest(k, valid);
      return `${where}: unknown key "${k}"${near ? ` (did you mean ${near}?)` : ''}`;
    });
  }
  if (issue.code === 'invalid_union' && issue.path.at(-1) === 'target') {
    const given = at(raw, issue.path);
    const keys = given && typeof given === 'object' ? Object.keys(given) : [];
    const near = keys.length === 1 ? closest(keys[0]!, ['storePath', 'flake', 'generation']) : undefined;
    const got = typeof given === 'string' ? ` (a string is not enough: for a store path write { "storePath": ${JSON.stringify(given)} })` : near ? ` (did you mean ${near}?)` : '';
    return [`${where}: must be one of ${TARGET_FORMS}${got}`];
  }
  return describeIssues(new z.ZodError([issue]));
}

function at(raw: unknown, path: PropertyKey[]): unknown {
  let v = raw;
  for (const k of path) v = v && typeof v === 'object' ? (v as Record<PropertyKey, unknown>)[k] : undefined;
  return v;
}

/** The agent's port when a host is named without a fleet file (`ws://HOST:7731`). */
export const DEFAULT_PORT = 7731;

export interface HostOnlyOptions {
  /** `--url`: else ws://NAME:7731 */
  url?: string;
  /** `--host-key LINE`: else ~/.ssh/known_hosts */
  hostKey?: string;
  /** `--flake REF` or `REF#NAME`: without `#NAME`, the configuration is the host name up to its first dot */
  flake?: string;
  /** `--probe`, each in the fleet file's syntax or a short form (parseProbe): added to the default probe */
  probes?: string[];
}

/**
 * A fleet of the hosts named on the command line, when there is no fleet file: each at
 * `ws://NAME:7731`, its key from known_hosts, probed by a TCP connect to the agent's port over a
 * fresh connection; the rest is every default of a fleet file.
 */
export function hostOnlyFleet(names: string[], o: HostOnlyOptions = {}): Fleet {
  if ((o.url !== undefined || o.hostKey !== undefined) && names.length !== 1) {
    throw new UsageError(`--url and --host-key describe one host, not ${names.length}`);
  }
  const extra = (o.probes ?? []).map((p, i) => parseProbe(p, `--probe #${i + 1}`));
  const hosts: Record<string, FleetHost> = {};
  for (const name of names) {
    if (!hostNameSchema.safeParse(name).success) {
      throw new UsageError(`"${name}" is not a host name (letters, digits, "_", "." and "-"); without a fleet file, name the host and give --url ws://HOST:PORT for anything else`);
    }
    const url = o.url ?? `ws://${name}:${DEFAULT_PORT}`;
    const checked = fleetHostSchema.shape.url.safeParse(url);
    if (!checked.success) throw new UsageError(`--url must be ws://HOST[:PORT] or wss://HOST[:PORT], not "${url}"`);
    if (o.hostKey !== undefined) {
      try {
        parsePublicKeyLine(o.hostKey);
      } catch (err) {
        throw new UsageError(`--host-key: ${(err as Error).message}; ${HOST_KEY_HINT}`);
      }
    }
    const u = new URL(url);
    const port = u.port || (u.protocol === 'wss:' ? '443' : '80');
    hosts[name] = fleetHostSchema.parse({
      url,
      ...(o.hostKey !== undefined ? { hostKey: o.hostKey } : {}),
      ...(o.flake !== undefined ? { target: hostOnlyTarget(name, o.flake) } : {}),
      probes: [{ name: 'agent', tcp: `${u.hostname}:${port}` }, ...extra],
    });
  }
  return fleetSchema.parse({ hosts });
}

/** `REF#NAME` names the configuration, as with nixos-rebuild; `REF` alone means REF#<host up to its first dot>. */
function hostOnlyTarget(host: string, flake: string): Target {
  if (flake.includes('#')) return { flake };
  if (isIP(host)) throw new UsageError(`${host} is an address, which names no configuration: give --flake ${flake}#NAME`);
  return { flake: `${flake}#${host.split('.')[0]}` };
}

const PROBE_FORMS = `a fleet file probe as JSON ('{"tcp":"web1.lan:22"}', '{"http":"http://web1.lan/health","expectStatus":200}'), tcp:HOST:PORT, http://URL or https://URL (expects 200), or command:CMD (run with /bin/sh -c)`;

/** A `--probe` value: the fleet file's syntax as JSON, or `tcp:HOST:PORT`, `http(s)://URL`, `command:CMD`. */
export function parseProbe(text: string, what = '--probe'): Probe {
  let raw: unknown;
  if (text.trimStart().startsWith('{')) {
    try {
      raw = JSON.parse(text);
    } catch (err) {
      throw new UsageError(`${what}: not valid JSON: ${(err as Error).message}`);
    }
  } else if (text.startsWith('tcp:')) raw = { tcp: text.slice(4) };
  else if (/^https?:\/\//.test(text)) raw = { http: text };
  else if (text.startsWith('command:')) raw = { command: text.slice('command:'.length) };
  else throw new UsageError(`${what}: "${text}" is not a probe; give ${PROBE_FORMS}`);
  const r = probeSchema.safeParse(raw);
  if (!r.success) throw new UsageError(`${what}: ${describeIssues(r.error).join('; ')} (give ${PROBE_FORMS})`);
  return r.data;
}
