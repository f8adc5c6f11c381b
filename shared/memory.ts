// Keeping both ends small during a closure push: hundreds of MiB pass through 64 KiB buffers, and
// V8 frees their memory only when its own heap asks for a collection, so RSS would grow by tens of
// MiB during a push and stay there. A collection every few MiB keeps it flat (a few ms each).

import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

/** Bytes between two collections during a push. */
export const COLLECT_EVERY = 8 * 1024 * 1024;

let collect: ((options?: { type: 'minor' | 'major' }) => void) | null | undefined;

/**
 * A young-generation collection now (the frames are young: a scavenge frees them, and costs far
 * less than a full collection), when this Node lets us have one; else nothing.
 */
export function collectGarbage(): void {
  if (collect === undefined) {
    try {
      setFlagsFromString('--expose-gc');
      collect = runInNewContext('gc') as typeof collect;
    } catch {
      collect = null;
    }
  }
  collect?.({ type: 'minor' });
}
