// Words and limits that need no schema: shared by the schemas (shared/model.ts) and by the console,
// which loads no schema library for them.

import type { Outcome } from './model.ts';

/**
 * The longest time any configured or requested window, timeout or extension may last: 7 days.
 * Node fires a timer of more than 2^31-1 ms (24.8 days) at once, and some timers add two or three
 * of these values (switch limit + confirm window + grace); 7 days keeps every such sum inside, and
 * a trial left unconfirmed for longer than a week is no longer a trial.
 */
export const MAX_SECONDS = 7 * 24 * 3600;

export function describeOutcome(o: Outcome): string {
  switch (o.outcome) {
    case 'confirmed':
      return o.kernelNotYetBooted ? 'confirmed (kernel not yet booted)' : 'confirmed';
    case 'reverted':
      return `reverted: ${o.reason}${o.detail ? ` (${o.detail})` : ''}`;
    case 'failed':
      return `failed: ${o.message}`;
    case 'stuck':
      return `stuck: ${o.reason}`;
  }
}
