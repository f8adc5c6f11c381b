// What both command-line programs share: usage errors, number arguments, --help/--version, and
// how an error becomes output and an exit status.

import { EXIT } from './errors.ts';
import { SnapbackError } from './errors.ts';
import { VERSION } from './version.ts';

export class UsageError extends Error {}

/** A whole number 1..max from the command line; `what` names the option in the error. */
export function positiveInt(s: string, what: string, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^\d+$/.test(s) || Number(s) <= 0) throw new UsageError(`${what} must be a positive whole number, not "${s}"`);
  if (Number(s) > max) throw new UsageError(`${what} must be at most ${max}, not ${s}`);
  return Number(s);
}

type Parsed = { values: { help?: boolean | undefined; version?: boolean | undefined }; positionals: string[] };

/** Runs the parser; answers --version, --help and a missing command itself (returning the exit status). */
export function parseCommandLine<T extends Parsed>(program: string, usage: string, parse: () => T): T | number {
  let parsed: T;
  try {
    parsed = parse();
  } catch (err) {
    process.stderr.write(`${program}: ${(err as Error).message}\n\n${usage}\n`);
    return EXIT.usage;
  }
  if (parsed.values.version) {
    process.stdout.write(`${VERSION}\n`);
    return EXIT.ok;
  }
  if (parsed.values.help || parsed.positionals.length === 0) {
    process[parsed.values.help ? 'stdout' : 'stderr'].write(`${usage}\n`);
    return parsed.values.help ? EXIT.ok : EXIT.usage;
  }
  return parsed;
}

/** Usage errors print the usage (exit 2); coded errors print their message or JSON (their exit). */
export function reportError(program: string, usage: string, err: unknown, json: boolean): number {
  if (err instanceof UsageError) {
    process.stderr.write(`${program}: ${err.message}\n\n${usage}\n`);
    return EXIT.usage;
  }
  if (err instanceof SnapbackError) {
    if (json) process.stdout.write(JSON.stringify({ ok: false, type: 'error', code: err.code, message: err.message }) + '\n');
    else process.stderr.write(`${program}: ${err.message}\n`);
    return err.exitCode;
  }
  throw err;
}
