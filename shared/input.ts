// Reading what operators write (agent configuration, fleet file, key files): every failure becomes
// one `config-invalid` error that names the file and, for schema problems, every key at fault.

import { readFileSync } from 'node:fs';
import type { z } from 'zod';
import { SnapbackError, describeIssues } from './errors.ts';

/** The file's text; `what` names it in the error (`the fleet file`, `the SSH key`). */
export function readInput(path: string, what: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw new SnapbackError('config-invalid', `cannot read ${what} ${path}: ${(err as Error).message}`);
  }
}

/** Parses JSON and validates it against `schema`, listing every problem by its key. */
export function parseInput<S extends z.ZodType>(schema: S, text: string, source: string): z.infer<S> {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new SnapbackError('config-invalid', `${source} is not valid JSON: ${(err as Error).message}`);
  }
  return validateInput(schema, raw, source);
}

export function validateInput<S extends z.ZodType>(schema: S, raw: unknown, source: string): z.infer<S> {
  const result = schema.safeParse(raw);
  if (!result.success) {
    const lines = describeIssues(result.error);
    throw new SnapbackError('config-invalid', `${source} is invalid:\n  ${lines.join('\n  ')}`, { problems: lines });
  }
  return result.data;
}
