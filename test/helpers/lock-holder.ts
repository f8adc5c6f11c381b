// A separate process that takes and releases a state directory's lock when told to, one command a
// line on stdin (`lock DIR`, `release`), answering `won`, `busy` or `error …` on stdout.

import { createInterface } from 'node:readline';
import { StateDir } from '../../agent/state-dir.ts';

const say = (s: string) => process.stdout.write(s + '\n');
let release: (() => void) | undefined;
for await (const line of createInterface({ input: process.stdin })) {
  const [cmd, arg] = line.split(' ');
  if (cmd === 'lock') {
    try {
      release = new StateDir(arg!).lock('boot-1');
      say('won');
    } catch (err) {
      say((err as { code?: string }).code === 'busy' ? 'busy' : `error ${(err as Error).message}`);
    }
  } else if (cmd === 'release') {
    release?.();
    release = undefined;
    say('released');
  }
}
