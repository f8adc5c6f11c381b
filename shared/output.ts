// The one shape of `--json` (DESIGN §6), for both programs: JSON Lines, zero or more
// `{"type":"event",…}`, then exactly one `{"type":"result","exit":N,…}` — errors and empty answers too.

// Writing it needs no schema (the shape as schemas, which the tests hold every command's output to,
// is shared/output-schemas.ts): a console command loads none.

import type { ErrorCode } from './errors.ts';
import { safeJson } from './terminal.ts';

// ---- writing ------------------------------------------------------------------------------------

/** One event line: `kind` goes in `event` (the line's `type` is always "event"). */
export function eventLine(kind: string, body: Record<string, unknown>): string {
  const { type: _type, event: _event, ...rest } = body;
  return safeJson({ type: 'event', event: kind, ...rest }) + '\n';
}

/** The result line, the last one: `exit` is the status the process exits with. */
export function resultLine(exit: number, body: Record<string, unknown>): string {
  const { type: _type, exit: _exit, ...rest } = body;
  return safeJson({ type: 'result', exit, ...rest }) + '\n';
}

/** The result of a refusal or an error: `ok: false`, a stable `code`, the message (and Nix's whole `output`). */
export function errorResult(code: ErrorCode, message: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { ok: false, code, message, ...extra };
}
