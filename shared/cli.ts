// What the two command-line programs share: usage errors, number arguments, `help [COMMAND]`,
// --help/--version, suggestions for typos, and how an error becomes output and an exit status.

import { EXIT } from './errors.ts';
import { SnapbackError } from './errors.ts';
import { errorResult, resultLine } from './output.ts';
import { VERSION } from './version.ts';

export class UsageError extends Error {}

/** A whole number 1..max from the command line; `what` names the option in the error. */
export function positiveInt(s: string, what: string, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^\d+$/.test(s) || Number(s) <= 0) throw new UsageError(`${what} must be a positive whole number, not "${s}"`);
  if (Number(s) > max) throw new UsageError(`${what} must be at most ${max}, not ${s}`);
  return Number(s);
}

/** What a program says about itself: the whole usage, each command's own, every option's name. */
export interface Help {
  usage: string;
  /** command → its own help: the usage line and the options that command reads */
  commands: Record<string, string>;
  /** option names without dashes, for "did you mean" */
  options: readonly string[];
  /** `--json` is among the arguments: seen before parsing, as an argument the parser refuses still gets a JSON answer */
  json?: boolean;
}

type Parsed = { values: { help?: boolean | undefined; version?: boolean | undefined; json?: boolean | undefined }; positionals: string[] };

/** Whether `--json` is among the arguments (before `--`). */
export function wantsJson(argv: readonly string[]): boolean {
  const end = argv.indexOf('--');
  return (end < 0 ? argv : argv.slice(0, end)).includes('--json');
}

/** A usage error: with `--json` the result line (`bad-request`, exit 2), else `text` on stderr. */
function usageError(json: boolean, message: string, text: string): number {
  if (json) process.stdout.write(resultLine(EXIT.usage, errorResult('bad-request', message)));
  else process.stderr.write(text);
  return EXIT.usage;
}

/** What a person reads on stdout (help, the version): with `--json`, inside the result line. */
function answer(json: boolean, key: 'help' | 'version', text: string): number {
  process.stdout.write(json ? resultLine(EXIT.ok, { ok: true, [key]: text }) : `${text}\n`);
  return EXIT.ok;
}

/**
 * Runs the parser; answers --version, --help, `help [COMMAND]`, a missing or unknown command and an
 * unknown option itself (returning the exit status) — all before any configuration file is read.
 */
export function parseCommandLine<T extends Parsed>(program: string, help: Help, parse: () => T): T | number {
  let parsed: T;
  try {
    parsed = parse();
  } catch (err) {
    const json = help.json ?? false;
    const unknown = /^Unknown option '(-{1,2})([^']*)'/.exec((err as Error).message);
    if (unknown) {
      const near = closest(unknown[2]!, help.options);
      const message = `unknown option ${unknown[1]}${unknown[2]}${near ? ` (did you mean --${near}?)` : ''}`;
      return usageError(json, message, `${program}: ${message}; see: ${program} help\n`);
    }
    return usageError(json, (err as Error).message, `${program}: ${(err as Error).message}\n\n${help.usage}\n`);
  }
  const json = parsed.values.json ?? help.json ?? false;
  if (parsed.values.version) return answer(json, 'version', VERSION);
  const [command, topic] = parsed.positionals;
  if (command === undefined) {
    if (parsed.values.help) return answer(json, 'help', help.usage);
    return usageError(json, `no command given; see: ${program} help`, `${help.usage}\n`);
  }
  if (command === 'help' || parsed.values.help) {
    const about = command === 'help' ? topic : command;
    if (about === undefined) return answer(json, 'help', help.usage);
    if (!Object.hasOwn(help.commands, about)) return unknownCommand(program, help, about, json);
    return answer(json, 'help', help.commands[about]!);
  }
  if (!Object.hasOwn(help.commands, command)) return unknownCommand(program, help, command, json);
  return parsed;
}

function unknownCommand(program: string, help: Help, command: string, json: boolean): number {
  const near = closest(command, Object.keys(help.commands));
  const message = `unknown command "${command}"${near ? ` (did you mean ${near}?)` : ''}`;
  return usageError(json, message, `${program}: ${message}; see: ${program} help\n`);
}

/** The candidate nearest to `word` (edit distance, case ignored), if it is near enough to be a typo. */
export function closest(word: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  const w = word.toLowerCase();
  const all = [...candidates];
  // A cut-short word ("hist", "--conf") means the one candidate it begins.
  const begun = w.length >= 3 ? all.filter((c) => c.toLowerCase().startsWith(w)) : [];
  if (begun.length === 1) return begun[0];
  for (const c of all) {
    const d = editDistance(w, c.toLowerCase());
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  // A third of the word may be wrong (at least 2 letters): "tiemout" → timeout, "xyz" → nothing.
  return best !== undefined && bestDistance <= Math.max(2, Math.floor(w.length / 3)) && bestDistance < w.length ? best : undefined;
}

/** Levenshtein distance, with a swap of two neighbours counted as one edit. */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, d[i - 2]![j - 2]! + 1);
      d[i]![j] = v;
    }
  }
  return d[a.length]![b.length]!;
}

/**
 * Usage errors print the usage (exit 2); coded errors print their message (their exit). With
 * `--json` both are the result line, and so is an error nobody expected (`internal`, exit 4), its
 * stack on stderr.
 */
export function reportError(program: string, usage: string, err: unknown, json: boolean): number {
  if (err instanceof UsageError) return usageError(json, err.message, `${program}: ${err.message}\n\n${usage}\n`);
  if (err instanceof SnapbackError) {
    // A summary in the message; a command's whole output (Nix's trace) only where scripts read.
    const output = typeof err.details?.output === 'string' ? { output: err.details.output } : {};
    if (json) process.stdout.write(resultLine(err.exitCode, errorResult(err.code, err.message, output)));
    else process.stderr.write(`${program}: ${err.message}\n`);
    return err.exitCode;
  }
  if (!json) throw err;
  process.stderr.write(`${program}: ${(err as Error)?.stack ?? String(err)}\n`);
  process.stdout.write(resultLine(EXIT.unknown, errorResult('internal', (err as Error)?.message ?? String(err))));
  return EXIT.unknown;
}
