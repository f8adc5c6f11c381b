// The state directory on its own: atomic state, history that survives a torn last line, the lock
// (raced and killed by real processes), and the pruning of old switch output.

import assert from 'node:assert/strict';
import { appendFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { describe, it, type TestContext } from 'node:test';
import { StateDir } from '../agent/state-dir.ts';

const HOLDER = join(import.meta.dirname, 'helpers', 'lock-holder.ts');

/** A separate process that locks on command; its command line names snapback-agent, as an agent's does. */
function holder(t: TestContext) {
  const child = spawn(process.execPath, [HOLDER, 'snapback-agent'], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.after(() => child.kill('SIGKILL'));
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  return {
    child,
    pid: child.pid!,
    async send(cmd: string): Promise<string> {
      child.stdin!.write(cmd + '\n');
      const next = await lines.next();
      if (next.done) throw new Error(`lock holder ${child.pid} exited`);
      return next.value as string;
    },
  };
}

async function deadPid(): Promise<number> {
  const child = spawn('true');
  await new Promise((r) => child.once('exit', r));
  return child.pid!;
}

/** A live process whose command line is `snapback-agent`. */
async function agentLookalike(t: TestContext): Promise<ChildProcess> {
  const child = spawn('bash', ['-c', 'exec -a snapback-agent sleep 60'], { stdio: 'ignore' });
  t.after(() => child.kill('SIGKILL'));
  while (!readFileSync(`/proc/${child.pid}/cmdline`, 'utf8').startsWith('snapback-agent')) await new Promise((r) => setImmediate(r));
  return child;
}

/** Starts an agent look-alike with exactly this pid (root: the kernel's next pid is settable); false if it cannot. */
async function takePid(t: TestContext, pid: number): Promise<boolean> {
  for (let attempt = 0; attempt < 10; attempt++) {
    try {
      writeFileSync('/proc/sys/kernel/ns_last_pid', String(pid - 1));
    } catch {
      return false;
    }
    const child = await agentLookalike(t);
    if (child.pid === pid) return true;
    child.kill('SIGKILL');
  }
  return false;
}

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

  it('lets exactly one of two processes take the lock when they race for it, round after round', async (t) => {
    const [a, b] = [holder(t), holder(t)];
    for (let round = 0; round < 100; round++) {
      const d = dir();
      // Half the rounds start from a lock file a crashed holder left behind.
      if (round % 2) writeFileSync(join(d.root, 'lock'), `${await deadPid()} boot-1\n`);
      const answers = await Promise.all([a.send(`lock ${d.root}`), b.send(`lock ${d.root}`)]);
      assert.deepEqual(answers.toSorted(), ['busy', 'won'], `round ${round}`);
      await Promise.all([a.send('release'), b.send('release')]);
    }
  });

  it('a lock file left by a dead holder, or naming a live process that looks like an agent, does not stop a new agent', async (t) => {
    const d = dir();
    const lock = join(d.root, 'lock');
    writeFileSync(lock, `${await deadPid()} boot-1\n`);
    d.lock('boot-1')();
    const lookalike = await agentLookalike(t);
    writeFileSync(lock, `${lookalike.pid} boot-1\n`);
    const release = d.lock('boot-1');
    assert.match(readFileSync(lock, 'utf8'), new RegExp(`^${process.pid} boot-1`), 'the file names the new holder');
    release();
  });

  it('a holder killed with kill -9 releases the lock at once, even if its pid is reused by an agent look-alike', async (t) => {
    const d = dir();
    const h = holder(t);
    assert.equal(await h.send(`lock ${d.root}`), 'won');
    assert.throws(() => d.lock('boot-1'), new RegExp(`another snapback-agent \\(pid ${h.pid}\\) is acting on`));
    const gone = new Promise((r) => h.child.once('exit', r));
    h.child.kill('SIGKILL');
    await gone;
    const reused = await takePid(t, h.pid);
    if (!reused) t.diagnostic(`SKIPPED: could not give pid ${h.pid} to another process; tested without reuse`);
    d.lock('boot-1')();
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
