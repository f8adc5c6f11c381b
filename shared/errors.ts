// Stable error codes shared by the wire protocol, the console socket, the CLIs and the README,
// and the process exit codes they map to. A code never changes meaning once released.

import type { z } from 'zod';

export const EXIT = {
  ok: 0,
  /** some host (or this host) reverted, failed, or the request was refused */
  failed: 1,
  /** usage or configuration error */
  usage: 2,
  /** could not reach or authenticate before changing anything */
  unreachable: 3,
  /** outcome unknown */
  unknown: 4,
} as const;
export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/** code → [exit status, retryable, one-line meaning for the README and `--help`] */
export const ERROR_CODES = {
  'bad-request': [EXIT.usage, false, 'the message or command is malformed; the text names the field'],
  'config-invalid': [EXIT.usage, false, 'the configuration file has unknown keys or bad values'],
  'timeout-out-of-range': [EXIT.usage, false, 'a timeout is outside confirm.minTimeoutSec..maxTimeoutSec'],
  busy: [EXIT.failed, true, 'another deployment is running; the text carries its id'],
  'switch-locked': [EXIT.failed, true, 'someone holds /run/nixos/switch-to-configuration.lock'],
  'not-ready': [EXIT.failed, true, 'the deployment is still preparing or activating; retry'],
  'no-trial': [EXIT.failed, false, 'there is no trial to confirm, roll back or extend'],
  'unknown-deployment': [EXIT.failed, false, 'the deployment id is not the running one'],
  'deployment-finished': [EXIT.failed, false, 'the deployment already ended with another outcome'],
  'bad-token': [EXIT.failed, false, 'the confirm token is missing or wrong (use a fresh connection)'],
  'health-failed': [EXIT.failed, false, "the host's own health checks failed; confirm refused"],
  'bad-target': [EXIT.failed, false, 'the target is not a NixOS toplevel or does not exist'],
  'fetch-failed': [EXIT.failed, false, 'realising the store path failed (substituters, signatures)'],
  'build-failed': [EXIT.failed, false, 'building the flake failed'],
  'no-current-system': [EXIT.failed, false, 'the running system cannot be read, so there is nothing to revert to'],
  'state-unwritable': [EXIT.failed, false, 'the state directory cannot be written; nothing was changed'],
  'state-corrupt': [EXIT.usage, false, 'a state file cannot be read; the agent touches nothing until fixed'],
  'bad-nar': [EXIT.failed, false, 'a pushed NAR does not match its signed hash or size; nothing of it was imported'],
  'no-space': [EXIT.failed, false, "the pushed closure would not fit in the host's store; nothing was sent"],
  'push-failed': [EXIT.failed, true, 'importing pushed paths into the host store failed'],
  'no-trial-boot': [EXIT.failed, false, 'a trial boot (--reboot) is not possible here: no supported bootloader, or the running system is not the boot default'],
  unauthorized: [EXIT.unreachable, false, 'the key is not authorized or a signature is wrong'],
  unreachable: [EXIT.unreachable, true, 'the agent cannot be reached'],
  'rate-limited': [EXIT.failed, true, 'too many messages on this connection'],
  internal: [EXIT.unknown, false, 'an unexpected error inside the agent'],
} as const satisfies Record<string, readonly [ExitCode, boolean, string]>;

export type ErrorCode = keyof typeof ERROR_CODES;

/** An error that carries a stable code across process and wire boundaries. */
export class SnapbackError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;
  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'SnapbackError';
    this.code = code;
    this.details = details;
  }
  get exitCode(): ExitCode {
    return ERROR_CODES[this.code][0];
  }
}

/** Whether a request refused with `code` may succeed if simply sent again later. */
export function retryable(code: string): boolean {
  return isErrorCode(code) ? ERROR_CODES[code][1] : false;
}

export function exitCodeFor(code: string): ExitCode {
  return isErrorCode(code) ? ERROR_CODES[code][0] : EXIT.unknown;
}

/** Codes arrive from the wire: `constructor` or `toString` is no code of ours. */
function isErrorCode(code: string): code is ErrorCode {
  return Object.hasOwn(ERROR_CODES, code);
}

/** One line per problem: `confirm.maxTimeoutSec: expected number, received string`. */
export function describeIssues(error: z.ZodError): string[] {
  return error.issues.map((issue) => {
    const where = issue.path.length ? issue.path.map(String).join('.') : '(top level)';
    if (issue.code === 'unrecognized_keys') {
      return `${where}: unknown key${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `"${k}"`).join(', ')}`;
    }
    // A bad key of a record (a host name): say what is wrong with it, not only that it is.
    if (issue.code === 'invalid_key') return `${where}: ${issue.issues.map((i) => i.message).join('; ')}`;
    return `${where}: ${issue.message}`;
  });
}

