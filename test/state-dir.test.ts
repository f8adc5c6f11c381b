// The state directory on its own: atomic state, history that survives a torn last line, the lock,
// and the pruning of old switch output.

import assert from 'node:assert/strict';
import { appendFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { describe, it } from 'node:test';
import { StateDir } from '../agent/state-dir.ts';

function dir(): StateDir {
  const d = new StateDir(mkdtempSync(join(tmpdir(), 'snapback-state-')));
  d.ensure();
  return d;
}

describe('state directory', () => {
  it('saves and loads the state; a missing file is a fresh agent', () => {
    const d = dir();
    assert.deepEqual(d.load(), { phase: 'idle' });
    d.save({ phase: 'idle', last: { id: 'd1', target: { generation: 3 }, outcome: { outcome: 'confirmed' }, by: { who: 'console', channel: 'console' }, finishedAt: 'now' } });
    assert.equal(d.load().last?.id, 'd1');
    assert.deepEqual(readdirSync(d.root).filter((f) => f.endsWith('.tmp')), [], 'no temp file left behind');
  });

  it('skips a torn last history line instead of failing', () => {
    const d = dir();
    d.appendHistory({ at: 'a', id: 'd1', from: 'idle', to: 'preparing', event: 'activate', by: { who: 'console', channel: 'console' } });
    appendFileSync(d.historyFile, '{"at":"b","id":"d1","fr');
    assert.equal(d.readHistory().length, 1);
  });

  it('lets one agent process hold the lock; a lock from another boot or a dead process is stale', async (t) => {
    const d = dir();
    // A live process that looks like an agent (its command line names snapback-agent).
    const holder = spawn('bash', ['-c', 'exec -a snapback-agent sleep 60'], { stdio: 'ignore' });
    t.after(() => holder.kill('SIGKILL'));
    while (!readFileSync(`/proc/${holder.pid}/cmdline`, 'utf8').startsWith('snapback-agent')) await new Promise((r) => setImmediate(r));
    writeFileSync(join(d.root, 'lock'), `${holder.pid} boot-1\n`);
    assert.throws(() => d.lock('boot-1'), /another snapback-agent \(pid \d+\) is acting on/);
    assert.doesNotThrow(() => d.lock('boot-2')(), 'a holder from another boot does not block');
    writeFileSync(join(d.root, 'lock'), `999999 boot-1\n`);
    const release = d.lock('boot-1');
    assert.match(readFileSync(join(d.root, 'lock'), 'utf8'), new RegExp(`^${process.pid} boot-1`), 'a dead holder is replaced');
    release();
  });

  it('keeps the output of the newest switch runs only', () => {
    const d = dir();
    for (let i = 0; i < 8; i++) {
      const run = join(d.runsDir, `activate-${i}`);
      mkdirSync(run);
      writeFileSync(join(run, 'output.log'), 'x');
      utimesSync(run, 1000 + i, 1000 + i);
    }
    d.pruneRuns(3);
    assert.deepEqual(readdirSync(d.runsDir).sort(), ['activate-5', 'activate-6', 'activate-7']);
  });
});
