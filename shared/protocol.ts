// The wire protocol `snapback.v1` (DESIGN §4): every message as one zod schema, and the exact bytes
// that get signed. Both the agent and the controller import from here; nothing re-declares a type.
//
// Handshake:  agent → challenge {nonce Na, hostKey H, kex Xa}
//             controller → hello {nonce Nc, key K, kex Xc, sig over transcript("client", …)}
//             agent → welcome {host facts, hostSig over transcript("host", …), confirm?}
// Both transcripts cover Na, Nc, K, H, Xa and Xc: the operator signs only for the host key it
// expected (checked before signing), so a fleet host that relays another host's challenge gets a
// signature that host refuses. Xa and Xc are ephemeral X25519 keys; the MAC key derived from them
// (shared/channel.ts) authenticates every agent message from `welcome` on, each with the next counter.
// Every state-changing command carries `seq` (strictly increasing per connection) and a signature
// over (Na, Nc, seq, the command without `sig`): a recorded message is useless on another
// connection, and any change to it breaks the signature.

import { z } from 'zod';
import { outcomeSchema, phaseSchema, targetSchema, historyEntrySchema, actorSchema, secondsSchema, cappedSecondsSchema, storePathSchema } from './model.ts';

export const SUBPROTOCOL = 'snapback.v1';
export const MAX_PAYLOAD = 256 * 1024;
export const DEFAULT_PORT = 7731;

const nonce = z.string().regex(/^[A-Za-z0-9_-]{32,128}$/, 'must be 32..128 base64url characters');
const signature = z.string().min(1).max(2048);
const id = z.string().min(1).max(128);
const seq = z.number().int().positive();
/** an ephemeral X25519 public key: 32 bytes, base64url */
const kex = z.string().regex(/^[A-Za-z0-9_-]{43}$/, 'must be an X25519 public key (43 base64url characters)');

// ---- controller → agent -------------------------------------------------------------------------

export const helloSchema = z.strictObject({
  type: z.literal('hello'),
  nonce,
  /** the operator's OpenSSH public key line */
  key: z.string().min(1).max(16 * 1024),
  kex,
  sig: signature,
});

export const statusRequestSchema = z.strictObject({ type: z.literal('status') });
export const historyRequestSchema = z.strictObject({ type: z.literal('history'), id: id.optional(), limit: z.number().int().positive().max(10_000).optional() });

export const activateSchema = z.strictObject({
  type: z.literal('activate'),
  seq,
  target: targetSchema,
  timeoutSec: secondsSchema.optional(),
  /** build or fetch, then only `switch-to-configuration dry-activate`: nothing changes */
  dryRun: z.boolean().optional(),
  /** a trial boot (DESIGN §11): boot the target once instead of `switch-to-configuration test` */
  reboot: z.boolean().optional(),
  sig: signature,
});
export const confirmSchema = z.strictObject({ type: z.literal('confirm'), seq, id, token: z.string().min(1).max(256), sig: signature });
export const rollbackSchema = z.strictObject({ type: z.literal('rollback'), seq, id: id.optional(), sig: signature });
export const extendSchema = z.strictObject({ type: z.literal('extend'), seq, id: id.optional(), seconds: cappedSecondsSchema, sig: signature });

// ---- closure push (controller → agent) ------------------------------------------------------------
// `missing` asks which paths of a closure the host lacks. `push` sends a signed manifest of the
// paths to send; the agent answers `push-ready` with those it still needs (after substituting from
// its own caches when asked), then the NARs of exactly those follow, in manifest order, as binary
// frames: path after path, each `narSize` bytes, each checked against its signed `narHash` before
// Nix sees it. The agent acknowledges what it has written (`push-ack`), and the controller keeps
// at most `window` bytes unacknowledged. `push-done` ends it; an `error` ends it too.

/** Paths per `missing` and entries per `push`: a manifest stays far below MAX_PAYLOAD. */
export const MAX_PUSH_PATHS = 400;
/** Chunks of the NAR stream (binary frames): larger frames, fewer of them to receive and hash. */
export const PUSH_CHUNK = 1024 * 1024;
/** The largest binary frame the agent takes (a push chunk); every other frame stays within MAX_PAYLOAD. */
export const MAX_BINARY_PAYLOAD = PUSH_CHUNK;

export const narHashSchema = z.string().regex(/^sha256-[A-Za-z0-9+/]{43}=$/, 'must be an SRI SHA-256 hash (sha256-…)');
export const manifestEntrySchema = z.strictObject({
  path: storePathSchema,
  narHash: narHashSchema,
  narSize: z.number().int().positive().max(Number.MAX_SAFE_INTEGER),
  references: z.array(storePathSchema).max(10_000),
  deriver: storePathSchema.optional(),
});
export type ManifestEntry = z.infer<typeof manifestEntrySchema>;

export const missingRequestSchema = z.strictObject({ type: z.literal('missing'), paths: z.array(storePathSchema).max(MAX_PUSH_PATHS * 5) });
export const pushSchema = z.strictObject({
  type: z.literal('push'),
  seq,
  paths: z.array(manifestEntrySchema).min(1).max(MAX_PUSH_PATHS),
  /** one deploy's batches share it: a refusal undoes every batch of the transfer */
  transfer: z.string().regex(/^[A-Za-z0-9_-]{8,64}$/, 'must be 8..64 letters, digits, "_" or "-"'),
  /** NAR bytes of this batch and every later one: the free space is checked against all of it */
  remainingBytes: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
  /** fetch what the host's own caches have first; only the rest is sent */
  substitute: z.boolean().optional(),
  sig: signature,
});

export const clientMessageSchema = z.discriminatedUnion('type', [
  helloSchema,
  statusRequestSchema,
  historyRequestSchema,
  activateSchema,
  confirmSchema,
  rollbackSchema,
  extendSchema,
  missingRequestSchema,
  pushSchema,
]);
export type ClientMessage = z.infer<typeof clientMessageSchema>;
export type SignedCommand =
  | z.infer<typeof activateSchema>
  | z.infer<typeof confirmSchema>
  | z.infer<typeof rollbackSchema>
  | z.infer<typeof extendSchema>
  | z.infer<typeof pushSchema>;
/** A signed command before `seq` and `sig` are added. */
export type CommandBody = SignedCommand extends infer T ? (T extends SignedCommand ? Omit<T, 'sig' | 'seq'> : never) : never;
export const SIGNED_TYPES = new Set(['activate', 'confirm', 'rollback', 'extend', 'push']);

// ---- agent → controller -------------------------------------------------------------------------

export const challengeSchema = z.strictObject({
  type: z.literal('challenge'),
  nonce,
  agentVersion: z.string(),
  /** the agent's SSH host key line: the controller checks it before it signs anything */
  hostKey: z.string().min(1).max(1024),
  kex,
});

/** Every agent message after `hello` carries the next counter and a MAC under the session key. */
const sealed = { ctr: z.number().int().positive().optional(), mac: z.string().max(64).optional() };

const lastSchema = z.object({ id, target: z.string(), toplevel: z.string().optional(), outcome: outcomeSchema, finishedAt: z.string(), by: actorSchema });
/** the kernel-side parts (`kernel`, `initrd`, `kernel-modules`, `kernel-params`) that differ from the booted system */
const kernelParts = z.array(z.string()).max(8);

const durations = z.object({ count: z.number().int().nonnegative(), sumSeconds: z.number().nonnegative() });

/**
 * The facts the agent's Prometheus metrics expose (agent/metrics.ts), in `status`. Deployments,
 * outcome times, durations and health-gate refusals come from the history; the other refusals and
 * the authentication failures are counted since `since`, when the agent started.
 */
export const hostMetricsSchema = z.object({
  since: z.string(),
  deployments: z.array(z.object({ outcome: z.string(), reason: z.string().optional(), count: z.number().int().nonnegative() })),
  lastOutcomeAt: z.record(z.string(), z.string()),
  revertLateness: durations,
  activationDuration: durations,
  commitDuration: durations,
  confirmRefusals: z.record(z.string(), z.number().int().nonnegative()),
  authFailures: z.record(z.string(), z.number().int().nonnegative()),
  /** absent when the agent does not listen for controllers */
  connections: z.object({ pending: z.number().int().nonnegative(), authenticated: z.number().int().nonnegative() }).optional(),
});
export type HostMetrics = z.infer<typeof hostMetricsSchema>;

export const hostStatusSchema = z.object({
  hostname: z.string(),
  version: z.string(),
  bootId: z.string(),
  currentSystem: z.string().nullable(),
  phase: phaseSchema,
  deployment: z
    .object({
      id,
      target: z.string(),
      toplevel: z.string().optional(),
      previous: z.string(),
      requestedBy: actorSchema,
      deadline: z.string().optional(),
      secondsLeft: z.number().optional(),
      unhealthy: z.string().optional(),
      kernel: kernelParts.optional(),
      /** a trial boot: arming its entry, or rebooting into it */
      reboot: z.object({ loader: z.string(), stage: z.string(), entry: z.string().optional() }).optional(),
    })
    .optional(),
  last: lastSchema.optional(),
  /** the boot default's kernel side differs from the booted system's in these parts: the next boot changes them */
  bootPending: kernelParts.optional(),
  offline: z.boolean().optional(),
  metrics: hostMetricsSchema.optional(),
});

export const welcomeSchema = z.strictObject({
  ...sealed,
  type: z.literal('welcome'),
  hostname: z.string(),
  machineId: z.string(),
  bootId: z.string(),
  currentSystem: z.string().nullable(),
  agentVersion: z.string(),
  state: hostStatusSchema,
  /** the host key's signature over the handshake transcript (the key itself came in `challenge`) */
  hostSig: signature,
  /** how this controller was recognised (key fingerprint and comment) */
  you: z.string(),
  /** present only on connections accepted after the trial's activation finished (promise 5) */
  confirm: z.strictObject({ id, token: z.string() }).optional(),
});

export const progressSchema = z.strictObject({
  ...sealed,
  type: z.literal('progress'),
  id,
  phase: phaseSchema.optional(),
  deadline: z.string().optional(),
  toplevel: z.string().optional(),
  line: z.string().optional(),
  problems: z.array(z.string()).optional(),
  kernel: kernelParts.optional(),
  reboot: z.strictObject({ loader: z.string(), entry: z.string() }).optional(),
});
export const outcomeMessageSchema = z.strictObject({ ...sealed, type: z.literal('outcome'), id, outcome: outcomeSchema, re: seq.optional() });
export const errorSchema = z.strictObject({
  ...sealed,
  type: z.literal('error'),
  code: z.string(),
  message: z.string(),
  retryable: z.boolean(),
  id: id.optional(),
  outcome: outcomeSchema.optional(),
  re: seq.optional(),
});
export const statusReplySchema = z.strictObject({ ...sealed, type: z.literal('status'), status: hostStatusSchema });
export const historyReplySchema = z.strictObject({ ...sealed, type: z.literal('history'), entries: z.array(historyEntrySchema) });
/** the answer to `extend`, and to `activate` once the trial runs */
export const trialSchema = z.strictObject({
  ...sealed,
  type: z.literal('trial'),
  id,
  deadline: z.string(),
  /** the window as the agent counts it, so the controller does not depend on clock agreement */
  secondsLeft: z.number().int().nonnegative(),
  toplevel: z.string().optional(),
  re: seq.optional(),
});

/** the answer to a dry-run `activate`: what `dry-activate` said is in the progress lines before it */
export const dryRunSchema = z.strictObject({
  ...sealed,
  type: z.literal('dry-run'),
  id,
  toplevel: z.string(),
  exit: z.number().int().nullable(),
  kernel: kernelParts.optional(),
  re: seq.optional(),
});

/** the answer to a trial boot's `activate`: the host reboots into the target once; reconnect when it is back */
export const rebootingSchema = z.strictObject({
  ...sealed,
  type: z.literal('rebooting'),
  id,
  toplevel: z.string(),
  loader: z.string(),
  entry: z.string(),
  kernel: kernelParts.optional(),
  re: seq.optional(),
});

export const missingReplySchema = z.strictObject({ ...sealed, type: z.literal('missing'), paths: z.array(z.string()) });
export const pushReadySchema = z.strictObject({
  ...sealed,
  type: z.literal('push-ready'),
  re: seq,
  /** the manifest's paths the host still lacks, in manifest order: their NARs follow */
  need: z.array(z.string()),
  /** bytes the controller may send ahead of `push-ack` */
  window: z.number().int().positive(),
});
export const pushAckSchema = z.strictObject({ ...sealed, type: z.literal('push-ack'), re: seq, bytes: z.number().int().nonnegative(), imported: z.number().int().nonnegative() });
export const pushDoneSchema = z.strictObject({ ...sealed, type: z.literal('push-done'), re: seq, imported: z.number().int().nonnegative(), bytes: z.number().int().nonnegative() });

export const serverMessageSchema = z.discriminatedUnion('type', [
  missingReplySchema,
  pushReadySchema,
  pushAckSchema,
  pushDoneSchema,
  dryRunSchema,
  rebootingSchema,
  challengeSchema,
  welcomeSchema,
  progressSchema,
  outcomeMessageSchema,
  errorSchema,
  statusReplySchema,
  historyReplySchema,
  trialSchema,
]);
export type ServerMessage = z.infer<typeof serverMessageSchema>;
export type Welcome = z.infer<typeof welcomeSchema>;
export type HostStatus = z.infer<typeof hostStatusSchema>;

// ---- what gets signed ---------------------------------------------------------------------------

/** JSON with object keys sorted at every level: the same bytes on both sides. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** What both sides know once `hello` is sent; the two signatures and the MAC key all cover it. */
export interface Handshake {
  agentNonce: string;
  controllerNonce: string;
  /** the operator's key line, as sent in `hello` */
  controllerKey: string;
  /** the host key line, as sent in `challenge` */
  hostKey: string;
  agentKex: string;
  controllerKex: string;
}

export function transcript(role: 'client' | 'host', h: Handshake): string {
  return canonicalJson([`${SUBPROTOCOL}/${role}`, h.agentNonce, h.controllerNonce, h.controllerKey, h.hostKey, h.agentKex, h.controllerKex]);
}

export function commandPayload(agentNonce: string, controllerNonce: string, command: Omit<SignedCommand, 'sig'> | SignedCommand): string {
  const { sig: _, ...rest } = command as SignedCommand;
  return canonicalJson([`${SUBPROTOCOL}/command`, agentNonce, controllerNonce, rest.seq, rest]);
}
