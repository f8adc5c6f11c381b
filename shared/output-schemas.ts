// The one shape of `--json` (shared/output.ts, DESIGN §6) as schemas: the tests hold every
// command's output to these.

import { z } from 'zod';
import { ERROR_CODES, type ErrorCode } from './errors.ts';
import { historyEntrySchema, outcomeSchema, phaseSchema } from './model.ts';
import { hostStatusSchema } from './protocol.ts';

const exit = z.number().int().min(0).max(4);
const errorCode = z.enum(Object.keys(ERROR_CODES) as [ErrorCode, ...ErrorCode[]]);

/** A result line with `shape` besides `type` and `exit`; nothing else. */
function result<T extends z.ZodRawShape>(shape: T) {
  return z.strictObject({ type: z.literal('result'), exit, ...shape });
}

/** Any command's error: usage errors (`bad-request`, exit 2), an unreachable agent (exit 3), refusals. */
export const errorResultSchema = result({
  ok: z.literal(false),
  code: errorCode,
  message: z.string(),
  /** a command's whole output (Nix's trace) where the message has only its summary */
  output: z.string().optional(),
  host: z.string().optional(),
  id: z.string().optional(),
  outcome: outcomeSchema.optional(),
});

/** `help [COMMAND] --json`, `COMMAND --help --json`: the text a person would read. */
export const helpResultSchema = result({ ok: z.literal(true), help: z.string() });
export const versionResultSchema = result({ ok: z.literal(true), version: z.string() });

// ---- controller ---------------------------------------------------------------------------------

const host = z.string();
const id = z.string();

/**
 * The controller's deploy events, mirroring `DeployEvent` (controller/deploy.ts; a type test keeps
 * the two together). Objects stay open: a field added to an event is not a break.
 */
export const deployEventSchema = z.discriminatedUnion('event', [
  z.object({ event: z.literal('queued'), host, why: z.string() }),
  z.object({ event: z.literal('connecting'), host }),
  z.object({ event: z.literal('connected'), host, as: z.string() }),
  z.object({ event: z.literal('phase'), host, id, phase: z.string(), toplevel: z.string().optional(), kernel: z.array(z.string()).optional() }),
  z.object({ event: z.literal('rebooting'), host, id, toplevel: z.string(), loader: z.string(), entry: z.string() }),
  z.object({ event: z.literal('line'), host, id, line: z.string() }),
  z.object({ event: z.literal('trial'), host, id, secondsLeft: z.number(), deadline: z.string() }),
  z.object({ event: z.literal('reconnecting'), host, attempt: z.number().int(), error: z.string() }),
  z.object({ event: z.literal('reconnected'), host }),
  z.object({ event: z.literal('probing'), host, id, names: z.array(z.string()) }),
  z.object({ event: z.literal('probe-attempt'), host, name: z.string(), attempt: z.number().int(), error: z.string() }),
  z.object({ event: z.literal('probe'), host, name: z.string(), ok: z.boolean(), detail: z.string().optional() }),
  z.object({ event: z.literal('confirming'), host, id }),
  z.object({ event: z.literal('rolling-back'), host, id, why: z.string() }),
  z.object({ event: z.literal('waiting'), host, id, seconds: z.number(), why: z.string() }),
  z.object({ event: z.literal('building'), host, installable: z.string() }),
  z.object({
    event: z.literal('push'),
    host,
    paths: z.number(),
    totalPaths: z.number(),
    bytes: z.number(),
    totalBytes: z.number(),
    bytesPerSec: z.number().optional(),
    secondsLeft: z.number().optional(),
    done: z.boolean().optional(),
  }),
  z.object({ event: z.literal('done'), host, result: z.lazy(() => hostResultSchema) }),
  z.object({
    event: z.literal('interrupted'),
    host,
    round: z.union([z.literal(1), z.literal(2)]),
    exiting: z.boolean(),
    state: z.enum(['trial', 'activating', 'untouched']),
    id: id.optional(),
    secondsLeft: z.number().optional(),
    deadline: z.string().optional(),
    confirm: z.string(),
    rollback: z.string(),
  }),
]);
export const deployEventLineSchema = z.intersection(z.object({ type: z.literal('event') }), deployEventSchema);

/** One host's end of a deploy (`HostResult` in controller/deploy.ts). */
export const hostResultSchema = z.object({
  host,
  status: z.enum(['confirmed', 'reverted', 'failed', 'unreachable', 'unknown', 'dry-run', 'held']),
  id: id.optional(),
  outcome: outcomeSchema.optional(),
  /** a held trial (`--hold`): its deadline, the seconds left then, and the commands that decide it */
  deadline: z.string().optional(),
  secondsLeft: z.number().optional(),
  commands: z.strictObject({ confirm: z.string(), extend: z.string(), rollback: z.string() }).optional(),
  failedProbes: z.array(z.object({ name: z.string(), ok: z.boolean(), attempts: z.number(), detail: z.string().optional() })).optional(),
  /** the host's refusal code, when it refused */
  code: z.string().optional(),
  message: z.string(),
});

export const controllerResults = {
  deploy: result({ hosts: z.array(hostResultSchema) }),
  status: result({
    hosts: z.array(
      z.union([
        z.strictObject({ host, ok: z.literal(true), status: hostStatusSchema }),
        z.strictObject({ host, ok: z.literal(false), code: errorCode, error: z.string() }),
      ]),
    ),
  }),
  /** `confirm HOST`, `rollback HOST`: the outcome (a refusal is an error result with `host`) */
  act: result({ ok: z.literal(true), host, id, outcome: outcomeSchema, message: z.string() }),
  history: result({ ok: z.literal(true), host, entries: z.array(historyEntrySchema) }),
  /** `extend HOST SECONDS`: the trial's new deadline */
  extend: result({ ok: z.literal(true), host, id, deadline: z.string(), secondsLeft: z.number(), message: z.string() }),
};

// ---- console (snapback-agent) -------------------------------------------------------------------

/** What the agent says while a console request runs (`activate`, `confirm`, …). */
export const consoleEventSchema = z.discriminatedUnion('event', [
  z.strictObject({
    type: z.literal('event'),
    event: z.literal('phase'),
    id,
    phase: phaseSchema,
    deadline: z.string().optional(),
    toplevel: z.string().optional(),
    kernel: z.array(z.string()).optional(),
    reboot: z.strictObject({ loader: z.string(), entry: z.string() }).optional(),
  }),
  z.strictObject({ type: z.literal('event'), event: z.literal('line'), id, line: z.string() }),
  z.strictObject({ type: z.literal('event'), event: z.literal('outcome'), id, outcome: outcomeSchema }),
  z.strictObject({ type: z.literal('event'), event: z.literal('confirm-refused'), id, problems: z.array(z.string()), code: errorCode.optional() }),
]);

/** `activate`, `try`, `confirm`, `rollback`, `extend`, `revert`: the agent's answer. */
const answer = result({
  ok: z.literal(true),
  id: id.optional(),
  outcome: outcomeSchema.optional(),
  deadline: z.string().optional(),
  toplevel: z.string().optional(),
  dryRun: z.strictObject({ exit: z.number().int().nullable() }).optional(),
  kernel: z.array(z.string()).optional(),
  rebooting: z.strictObject({ loader: z.string(), entry: z.string() }).optional(),
});

export const consoleResults = {
  status: result({ ok: z.literal(true), ...hostStatusSchema.shape }),
  answer,
  history: result({ ok: z.literal(true), entries: z.array(historyEntrySchema) }),
  'check-config': result({ ok: z.literal(true), config: z.record(z.string(), z.unknown()) }),
};

/** Any line either program prints with `--json`. */
export const lineSchema = z.union([
  deployEventLineSchema,
  consoleEventSchema,
  errorResultSchema,
  helpResultSchema,
  versionResultSchema,
  ...Object.values(controllerResults),
  ...Object.values(consoleResults),
]);
