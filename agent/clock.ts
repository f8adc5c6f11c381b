// Time as the lifecycle sees it: a monotonic clock shared by every process of one boot, and the
// boot id that says whether "the same boot" still holds.

import { readFileSync } from 'node:fs';
import type { Now } from './lifecycle.ts';

/**
 * `process.hrtime` reads CLOCK_MONOTONIC on Linux: system-wide, unaffected by NTP or `date -s`,
 * and the same for a restarted agent within one boot, so a persisted deadline keeps its meaning.
 */
export function now(): Now {
  return { mono: Number(process.hrtime.bigint() / 1_000_000n), wall: new Date().toISOString() };
}

export function readBootId(file: string): string {
  return readFileSync(file, 'utf8').trim();
}
