// The words both sides share: targets, actors, outcomes, phases, history entries.
// Schemas are the single source of truth; the types are inferred from them.

import { z } from 'zod';
import { MAX_SECONDS } from './words.ts';

export { MAX_SECONDS, describeOutcome } from './words.ts';

export const storePathSchema = z
  .string()
  .regex(/^\/nix\/store\/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+$/, 'must be a /nix/store path');

/**
 * Flake references are passed to `nix build` as one argument, never through a shell, and after
 * `--`; a leading `-` is refused all the same, so no Nix version or command can read one as an option.
 */
export const flakeRefSchema = z
  .string()
  .min(3)
  .max(2048)
  .regex(/^[^-]/, 'must not begin with "-" (Nix would read it as an option)')
  .regex(/^[^\s#]+#[A-Za-z0-9_.'-]+$/, 'must look like REF#HOST (no spaces)');


/** The longest delay Node's setTimeout honours; it fires a longer one at once. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

const tooLong = { message: `must be at most ${MAX_SECONDS} seconds (7 days)` };

/** A whole number of seconds, 1..MAX_SECONDS; the error names the limit. */
export const secondsSchema = z.number().int().positive().max(MAX_SECONDS, tooLong);

/** Seconds bounded only by the cap: the agent answers a value below its own range with `timeout-out-of-range`. */
export const cappedSecondsSchema = z.number().int().max(MAX_SECONDS, tooLong);

export const targetSchema = z.union([
  z.strictObject({ storePath: storePathSchema }),
  z.strictObject({ flake: flakeRefSchema }),
  z.strictObject({ generation: z.number().int().positive() }),
]);
export type Target = z.infer<typeof targetSchema>;

export function describeTarget(t: Target): string {
  if ('storePath' in t) return t.storePath;
  if ('flake' in t) return `flake ${t.flake}`;
  return `generation ${t.generation}`;
}

export const phases = ['idle', 'preparing', 'activating', 'trial', 'committing', 'reverting'] as const;
export const phaseSchema = z.enum(phases);
export type Phase = z.infer<typeof phaseSchema>;

/** Who caused a transition and through which channel. */
export const actorSchema = z.strictObject({
  /** an SSH key fingerprint, `console` (optionally `console:USER`), or `agent` */
  who: z.string(),
  channel: z.enum(['console', 'controller', 'deadline', 'fallback-timer', 'agent']),
});
export type Actor = z.infer<typeof actorSchema>;

export const revertReasons = [
  'timeout',
  'requested',
  'activation-failed',
  'health-failed',
  'commit-failed',
  'reboot',
  'fallback-timer',
  /** a trial boot whose new system never came up: the bootloader fell back to the default */
  'boot-failed',
] as const;
export const revertReasonSchema = z.enum(revertReasons);
export type RevertReason = z.infer<typeof revertReasonSchema>;

export const outcomeSchema = z.discriminatedUnion('outcome', [
  /** `kernelNotYetBooted`: committed, but its kernel side differs from the booted system (DESIGN §11) */
  z.strictObject({ outcome: z.literal('confirmed'), kernelNotYetBooted: z.literal(true).optional() }),
  z.strictObject({ outcome: z.literal('reverted'), reason: revertReasonSchema, detail: z.string().optional() }),
  z.strictObject({ outcome: z.literal('failed'), code: z.string(), message: z.string() }),
  z.strictObject({ outcome: z.literal('stuck'), reason: z.string() }),
]);
export type Outcome = z.infer<typeof outcomeSchema>;

/** One line of `history.jsonl`: a transition, who caused it, and the outcome when it ended one. */
export const historyEntrySchema = z.object({
  at: z.string(),
  id: z.string(),
  from: phaseSchema,
  to: phaseSchema,
  event: z.string(),
  by: actorSchema,
  target: z.string().optional(),
  toplevel: z.string().optional(),
  previous: z.string().optional(),
  outcome: outcomeSchema.optional(),
  detail: z.string().optional(),
  /** the trial's deadline (ISO 8601), on the entries that set it: the trial's start and every extend */
  deadline: z.string().optional(),
  /** the boot the transition happened in (trial boots: the history shows both boots) */
  bootId: z.string().optional(),
});
export type HistoryEntry = z.infer<typeof historyEntrySchema>;
