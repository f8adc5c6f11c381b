// hooks.onOutcome (DESIGN §9) on a real agent: each hook gets the outcome in its environment and the
// history record on stdin once the record is on disk; a hook that fails is logged; one that hangs
// is killed at its timeout with everything it started, and never delays the next deployment's revert.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { haveNix } from './helpers/nix.ts';
import { ScratchHost, cleanupsAfterAll, waitFor, type LogLine } from './helpers/host.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);
const cleanups = cleanupsAfterAll();

/** The hang hook's timeout: long enough that the next deployment's revert comes while it hangs. */
const HANG_SEC = 6;

function alive(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
    return true;
  } catch {
    return false;
  }
}

function env(file: string): Record<string, string> {
  return Object.fromEntries(
    readFileSync(file, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  );
}

describe('outcome hooks', { skip }, () => {
  it('get the outcome in SNAPBACK_* and the record on stdin; a failing hook is logged; a hanging one is killed and delays no revert', async () => {
    const h = new ScratchHost('hooks').install();
    const out = join(h.dir, 'hooks');
    mkdirSync(out);
    const historyFile = join(h.stateDir, 'history.jsonl');
    cleanups.push(() => h.cleanup());
    // Whatever a hook left running is this test's to end, by its process group (before the above).
    cleanups.push(() => {
      for (const f of readdirSync(out).filter((f) => f.endsWith('.pgid'))) {
        try {
          process.kill(-Number(readFileSync(join(out, f), 'utf8')), 'SIGKILL');
        } catch {}
      }
    });
    h.writeConfig({
      hooks: {
        onOutcome: [
          {
            name: 'record',
            // argv form; it also checks that the outcome was in the history before it ran
            command: [
              '/bin/sh',
              '-c',
              'env | grep ^SNAPBACK_ > "$0/env-$SNAPBACK_DEPLOYMENT"; cat > "$0/stdin-$SNAPBACK_DEPLOYMENT"; grep -q "\\"id\\":\\"$SNAPBACK_DEPLOYMENT\\".*\\"outcome\\"" "$1" && touch "$0/durable-$SNAPBACK_DEPLOYMENT"',
              out,
              historyFile,
            ],
          },
          { name: 'fails', command: 'echo "no route to the mail server" >&2; exit 3' },
          // /bin/sh string form; it starts a background job and then hangs
          { name: 'hang', command: `echo $$ > ${out}/hang-$SNAPBACK_DEPLOYMENT.pgid; sleep 300 & sleep 300`, timeoutSec: HANG_SEC },
        ],
      },
    });
    await h.start();
    const hookLog = (name: string, id: string) => (l: LogLine) => l.hook === name && l.deployment === id;

    // A: rolled back from the console; its hooks start, the "hang" one hangs.
    const x = h.toplevel('x');
    const a = await h.cli(['activate', x, '--timeout', '60']);
    assert.equal(a.code, 0, a.stderr);
    assert.equal((await h.cli(['rollback'])).code, 0);
    const pgidFile = join(out, `hang-${a.out.id}.pgid`);
    await waitFor(() => existsSync(pgidFile) && readFileSync(pgidFile, 'utf8').trim() !== '');
    const pgid = Number(readFileSync(pgidFile, 'utf8'));

    // B: reverts at its deadline while A's hook still hangs, on time.
    const y = h.toplevel('y');
    const b = await h.cli(['activate', y, '--timeout', '1']);
    assert.equal(b.code, 0, b.stderr);
    await h.waitOutcome(b.out.id);
    const mine = h.history().filter((e) => e.id === b.out.id);
    const late = (Date.parse(mine.at(-1).at) - Date.parse(mine.findLast((e) => e.deadline).deadline)) / 1000;
    assert.deepEqual(mine.at(-1).outcome, { outcome: 'reverted', reason: 'timeout' });
    assert.ok(late >= 0 && late < 1, `reverted ${late}s after its deadline`);
    assert.ok(alive(pgid), "A's hanging hook was still running when B reverted");
    assert.equal(h.running(), h.gen1);

    // A's hanging hook: killed at its timeout, with the job it started in the background.
    const killed = await h.waitLog((l) => hookLog('hang', a.out.id)(l) && /did not finish within 6s and was killed/.test(l.msg), 20_000);
    assert.equal(killed.level, 40);
    assert.ok((killed.ms as number) >= HANG_SEC * 1000 && (killed.ms as number) < HANG_SEC * 1000 + 3000, `killed after ${killed.ms} ms`);
    await waitFor(() => !alive(pgid), 5000);

    // The failing hook: logged with its exit and its last words; nothing else changed.
    const failed = await h.waitLog(hookLog('fails', a.out.id));
    assert.equal(failed.level, 40);
    assert.match(failed.msg, /^hook "fails" exited 3: no route to the mail server$/);
    assert.equal((await h.waitLog(hookLog('record', a.out.id))).msg, 'hook "record" ran');

    // What the hooks were given.
    const entryA = h.history().find((e) => e.id === a.out.id && e.outcome);
    assert.deepEqual(JSON.parse(readFileSync(join(out, `stdin-${a.out.id}`), 'utf8')), entryA, 'the history record on stdin');
    assert.ok(existsSync(join(out, `durable-${a.out.id}`)), 'the outcome was in history.jsonl before the hook ran');
    const envA = env(join(out, `env-${a.out.id}`));
    assert.deepEqual(
      { ...envA, SNAPBACK_BY: envA.SNAPBACK_BY?.replace(/^console:.*/, 'console') },
      {
        SNAPBACK_OUTCOME: 'reverted',
        SNAPBACK_REASON: 'requested',
        SNAPBACK_DEPLOYMENT: a.out.id,
        SNAPBACK_TARGET: x,
        SNAPBACK_PREVIOUS: h.gen1,
        SNAPBACK_BY: 'console',
        SNAPBACK_CHANNEL: 'console',
        SNAPBACK_MESSAGE: `deployment ${a.out.id} reverted: requested`,
      },
    );
    await h.waitLog(hookLog('record', b.out.id));
    const envB = env(join(out, `env-${b.out.id}`));
    assert.deepEqual([envB.SNAPBACK_OUTCOME, envB.SNAPBACK_REASON, envB.SNAPBACK_BY, envB.SNAPBACK_CHANNEL, envB.SNAPBACK_TARGET], ['reverted', 'timeout', 'agent', 'deadline', y]);

    // C: stuck (somebody else's system runs at revert time): the hooks run for it too.
    const z = h.toplevel('z');
    const c = await h.cli(['activate', z, '--timeout', '60']);
    assert.equal(c.code, 0, c.stderr);
    rmSync(h.current);
    symlinkSync(h.toplevel('theirs'), h.current);
    await h.cli(['rollback']);
    await h.waitLog(hookLog('record', c.out.id));
    const envC = env(join(out, `env-${c.out.id}`));
    assert.equal(envC.SNAPBACK_OUTCOME, 'stuck');
    assert.match(envC.SNAPBACK_REASON ?? '', /^conflict: the running system is \/nix\/store\/\S+-theirs/);

    // Every hanging hook ends at its timeout; none outlives it.
    for (const id of [b.out.id, c.out.id]) await h.waitLog((l) => hookLog('hang', id)(l) && /was killed/.test(l.msg), 20_000);

    // D: the agent is dead; the fallback timer's `revert --id` reverts from the state directory and
    // runs the hooks itself, waiting for them (each up to its timeout) before it exits.
    rmSync(h.current);
    symlinkSync(h.gen1, h.current);
    const d = await h.cli(['activate', h.toplevel('w'), '--timeout', '60']);
    assert.equal(d.code, 0, d.stderr);
    await h.kill9();
    const r = await h.cli(['revert', '--id', d.out.id]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.out.outcome, { outcome: 'reverted', reason: 'fallback-timer' });
    const envD = env(join(out, `env-${d.out.id}`));
    assert.deepEqual([envD.SNAPBACK_OUTCOME, envD.SNAPBACK_REASON, envD.SNAPBACK_BY, envD.SNAPBACK_CHANNEL], ['reverted', 'fallback-timer', 'fallback-timer', 'fallback-timer']);
    const said = r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as LogLine);
    assert.ok(said.some((l) => l.hook === 'hang' && /did not finish within 6s and was killed/.test(l.msg)), 'it waited for its hooks');
    const pgidD = Number(readFileSync(join(out, `hang-${d.out.id}.pgid`), 'utf8'));
    await waitFor(() => !alive(pgidD), 5000);
  });
});
