// The words both sides share: targets, actors, outcomes, phases, history entries.
// Schemas are the single source of truth; the types are inferred from them.

import { z } from 'zod';

export const storePathSchema = z
  .string()
  .regex(/^\/nix\/store\/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+$/, 'must be a /nix/store path');

/** Flake references are passed to `nix build` as one argument, never through a shell. */
export const flakeRefSchema = z
  .string()
  .min(3)
  .max(2048)
  .regex(/^[^\s#]+#[A-Za-z0-9_.'-]+$/, 'must look like REF#HOST (no spaces)');

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
] as const;
export const revertReasonSchema = z.enum(revertReasons);
export type RevertReason = z.infer<typeof revertReasonSchema>;

export const outcomeSchema = z.discriminatedUnion('outcome', [
  z.strictObject({ outcome: z.literal('confirmed') }),
  z.strictObject({ outcome: z.literal('reverted'), reason: revertReasonSchema, detail: z.string().optional() }),
  z.strictObject({ outcome: z.literal('failed'), code: z.string(), message: z.string() }),
  z.strictObject({ outcome: z.literal('stuck'), reason: z.string() }),
]);
export type Outcome = z.infer<typeof outcomeSchema>;

export function describeOutcome(o: Outcome): string {
  switch (o.outcome) {
    case 'confirmed':
      return 'confirmed';
    case 'reverted':
      return `reverted: ${o.reason}${o.detail ? ` (${o.detail})` : ''}`;
    case 'failed':
      return `failed: ${o.message}`;
    case 'stuck':
      return `stuck: ${o.reason}`;
  }
}

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
});
export type HistoryEntry = z.infer<typeof historyEntrySchema>;
