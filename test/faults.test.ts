// The agent under its own failures (DESIGN §2, promises 13 and 17-20): killed at an exact instant,
// out of disk, out-raced by an operator's own switch or by garbage collection. Each test puts the
// agent in one window where it used to wedge or lie, on real Nix with real processes; the kills come
// from strace fault injection or from the agent's own crash points (agent/failpoint.ts).

import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, symlinkSync, unlinkSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it, type TestContext } from 'node:test';
import { StateDir } from '../agent/state-dir.ts';
import { haveNix } from './helpers/nix.ts';
import { ScratchHost, waitFor, AGENT_BIN } from './helpers/host.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const hosts: ScratchHost[] = [];
after(async () => {
  for (const h of hosts) await h.cleanup();
});

function newHost(config: Record<string, unknown> = {}): ScratchHost {
  const h = new ScratchHost('faults', config).install();
  hosts.push(h);
  return h;
}

/** A small tmpfs at `dir` (the test's own mount, removed when the test ends), or a loud skip. */
function smallDisk(t: TestContext, dir: string, size = '1m'): boolean {
  mkdirSync(dir, { recursive: true });
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', dir], { stdio: 'pipe' });
  } catch (err) {
    t.skip(`SKIPPED: cannot mount a tmpfs to fill (${(err as Error).message.split('\n')[0]})`);
    return false;
  }
  t.after(() => execFileSync('umount', ['-l', dir]));
  return true;
}

/** Fills the file system of `dir` to the last byte; returns the function that frees it again. */
function fillUp(dir: string): () => void {
  const path = join(dir, 'filler');
  const fd = openSync(path, 'a');
  for (const size of [64 * 1024, 4096, 1]) {
    const chunk = Buffer.alloc(size, 0x78);
    try {
      for (;;) writeSync(fd, chunk);
    } catch {}
  }
  closeSync(fd);
  return () => unlinkSync(path);
}

function stateOnDisk(h: ScratchHost): { phase: string; last?: { outcome: { outcome: string; reason?: string } } } {
  return JSON.parse(readFileSync(join(h.stateDir, 'state.json'), 'utf8')).state;
}

function runDir(h: ScratchHost, kind: string, id: string): string {
  return join(h.stateDir, 'runs', `${kind}-${id}`);
}

/** Kills a detached switch run (the simulated power loss takes it too). */
function killRun(h: ScratchHost, kind: string, id: string): void {
  const pid = parseInt(readFileSync(join(runDir(h, kind, id), 'pid'), 'utf8').trim(), 10);
  if (pid > 0) process.kill(-pid, 'SIGKILL');
}

/** A confirmed trial whose `boot` was running when the agent and the switch died (power loss mid-commit). */
async function commitInterruptedMidBoot(): Promise<{ h: ScratchHost; a: { out: { id: string } } }> {
  const h = newHost();
  await h.start();
  const x = h.toplevel('x', { boot: 'exec sleep 600' });
  const a = await h.cli(['activate', x, '--timeout', '60']);
  const confirm = h.cli(['confirm']);
  await waitFor(() => h.switchCalls().some(([, m]) => m === 'boot'));
  killRun(h, 'boot', a.out.id);
  await h.kill9();
  await confirm;
  return { h, a };
}

describe('the agent never wedges and never lies', { skip }, () => {
  it('killed right after spawning the switch: the restarted agent finds that switch and waits for it, and starts no revert beside it', async () => {
    const h = newHost();
    const release = join(h.dir, 'release');
    const x = h.toplevel('x', { beforeLink: `while [ ! -e ${release} ]; do sleep 0.05; done` });
    await h.start({ failpoints: ['spawned:activate'] });
    const activation = h.cli(['activate', x, '--timeout', '60']);
    await h.exited();
    await activation;
    // The switch was spawned just before the agent died; it starts on its own time.
    await waitFor(() => h.switchCalls().length > 0, 10_000);
    assert.deepEqual(h.switchCalls(), [[x, 'test']], 'the switch runs on without the agent');
    await h.start();
    writeFileSync(release, '');
    await h.waitLog((l) => l.msg.startsWith('trial of'));
    assert.equal((await h.cli(['status'])).out.phase, 'trial');
    assert.equal(h.running(), x);
    assert.deepEqual(h.switchCalls(), [[x, 'test']], 'no revert ran beside the switch');
  });

  it('a full state directory: confirm and extend are refused with state-unwritable and nothing moves; with room again, confirm commits', async (t) => {
    const h = newHost();
    if (!smallDisk(t, h.stateDir)) return;
    await h.start();
    const x = h.toplevel('x');
    const a = await h.cli(['activate', x, '--timeout', '120']);
    assert.equal(a.code, 0, a.stderr);
    const free = fillUp(h.stateDir);
    const c = await h.cli(['confirm']);
    assert.equal(c.code, 1);
    assert.equal(c.out.code, 'state-unwritable', JSON.stringify(c.out));
    const e = await h.cli(['extend', '300']);
    assert.equal(e.out.code, 'state-unwritable', JSON.stringify(e.out));
    assert.deepEqual(h.switchCalls(), [[x, 'test']], 'no boot ran');
    assert.deepEqual(h.generations(), [1], 'the profile is untouched');
    assert.equal(h.bootDefault(), h.gen1);
    assert.equal((await h.cli(['status'])).out.phase, 'trial');
    free();
    const c2 = await h.cli(['confirm']);
    assert.equal(c2.code, 0, JSON.stringify(c2.out));
    assert.deepEqual(h.generations(), [1, 2]);
    assert.equal(stateOnDisk(h).last?.outcome.outcome, 'confirmed');
  });

  it('a full state directory at the deadline: the revert still runs on time; the outcome is saved once the disk takes it', async (t) => {
    const h = newHost();
    if (!smallDisk(t, h.stateDir)) return;
    await h.start();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '2']);
    assert.equal(a.code, 0, a.stderr);
    const free = fillUp(h.stateDir);
    await waitFor(() => h.running() === h.gen1, 10_000);
    const late = Date.now() - Date.parse(a.out.deadline);
    assert.ok(late < 1500, `reverted ${late} ms after the deadline`);
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /reverted: timeout/);
    assert.notEqual(stateOnDisk(h).phase, 'idle', 'the disk was full: the outcome could not be saved yet');
    free();
    await waitFor(() => stateOnDisk(h).phase === 'idle', 10_000);
    assert.deepEqual(stateOnDisk(h).last?.outcome, { outcome: 'reverted', reason: 'timeout' });
    await waitFor(() => h.history().some((x) => x.id === a.out.id && x.outcome?.outcome === 'reverted'), 10_000);
    assert.deepEqual(h.history().filter((x) => x.id === a.out.id).map((x) => x.to), ['preparing', 'activating', 'trial', 'reverting', 'idle']);
  });

  it('an interrupted commit whose old generation was collected meanwhile: the profile is restored by path, the outcome recorded', { timeout: 60_000 }, async () => {
    const { h, a } = await commitInterruptedMidBoot();
    // nix-collect-garbage -d while nobody watched: generation 1 is an old generation now.
    execFileSync('nix-env', ['-p', h.profile, '--delete-generations', '1'], { stdio: 'ignore' });
    // The bootloader never learned about X: the machine comes back on the previous system.
    await h.reboot();
    rmSync(h.current);
    symlinkSync(h.gen1, h.current);
    await h.start();
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /reverted: reboot/);
    assert.equal(h.bootDefault(), h.gen1);
    assert.ok(!h.generations().includes(2), 'the generation the commit created is gone');
    assert.deepEqual(h.switchCalls().at(-1), [h.gen1, 'boot'], 'the boot default is made to match the restored profile');
    assert.equal((await h.cli(['activate', h.toplevel('y'), '--timeout', '60'])).code, 0, 'not wedged: the next deployment runs');
  });

  it('a revert that throws is retried, then ends stuck with its cause instead of wedging in reverting', { timeout: 60_000 }, async () => {
    const h = newHost();
    await h.start();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    const revertDir = runDir(h, 'revert', a.out.id);
    rmSync(revertDir, { recursive: true, force: true });
    writeFileSync(revertDir, 'not a directory');
    const r = await h.cli(['rollback']);
    assert.equal(r.code, 1);
    assert.equal(r.out.outcome.outcome, 'stuck');
    assert.match(r.out.outcome.reason, /revert failed: .*EEXIST/);
    assert.equal(h.history().at(-1).outcome.outcome, 'stuck');
    assert.equal((await h.cli(['status'])).out.phase, 'idle');
  });

  it("a revert waits for an operator's own switch holding NixOS's switch lock, then leaves that system alone", async (t) => {
    const h = newHost();
    const lock = join(h.dir, 'stc.lock');
    const release = join(h.dir, 'release');
    await h.start();
    const other = h.toplevel('other');
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '2']);
    // `nixos-rebuild test` of another system, holding the lock as switch-to-configuration does.
    const operator = spawn('flock', [lock, 'sh', '-c', `while [ ! -e ${release} ]; do sleep 0.05; done; ln -sfn ${other} ${h.current}`], { stdio: 'ignore' });
    t.after(() => operator.kill('SIGKILL'));
    await waitFor(() => existsSync(lock));
    await h.waitLog((l) => l.msg.includes('holds the switch lock'));
    writeFileSync(release, '');
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /stuck: conflict/);
    assert.equal(h.running(), other, "the operator's system is left alone");
    assert.ok(!h.switchCalls().some(([p]) => p === h.gen1), 'the previous system was not switched to over it');
  });

  it('a commit is compare-and-swap: with somebody else’s system running, confirm commits nothing', async () => {
    const h = newHost();
    await h.start();
    const other = h.toplevel('other');
    const x = h.toplevel('x');
    await h.cli(['activate', x, '--timeout', '60']);
    rmSync(h.current);
    symlinkSync(other, h.current);
    const c = await h.cli(['confirm']);
    assert.equal(c.code, 1);
    assert.equal(c.out.outcome.outcome, 'stuck');
    assert.match(c.out.outcome.reason, /conflict/);
    assert.deepEqual(h.generations(), [1]);
    assert.equal(h.bootDefault(), h.gen1);
    assert.ok(!h.switchCalls().some(([, m]) => m === 'boot'));
    assert.equal(h.running(), other);
  });

  it('the revert target is held by a GC root for the life of the deployment', async () => {
    const h = newHost();
    // The running system was only `test`-activated: no generation roots it.
    const adhoc = h.toplevel('adhoc');
    rmSync(h.current);
    symlinkSync(adhoc, h.current);
    await h.start();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    assert.equal(a.code, 0, a.stderr);
    const gc = spawnSync('nix-store', ['--delete', adhoc], { encoding: 'utf8' });
    assert.notEqual(gc.status, 0, 'garbage collection must not delete the revert target');
    assert.match(gc.stderr, /still alive/);
    const r = await h.cli(['rollback']);
    assert.deepEqual(r.out.outcome, { outcome: 'reverted', reason: 'requested' });
    assert.equal(h.running(), adhoc);
    const gone = spawnSync('nix-store', ['--delete', adhoc], { encoding: 'utf8' });
    assert.equal(gone.status, 0, `the root is released with the deployment: ${gone.stderr}`);
  });

  it('a failed commit deletes only a generation it created, never one it pointed the profile at', async () => {
    const h = newHost();
    const g2 = h.toplevel('g2', { boot: 'exit 1' });
    execFileSync('nix-env', ['-p', h.profile, '--set', g2], { stdio: 'ignore' });
    execFileSync('nix-env', ['-p', h.profile, '--switch-generation', '1'], { stdio: 'ignore' });
    await h.start();
    const a = await h.cli(['activate', '--generation', '2', '--timeout', '60']);
    assert.equal(a.code, 0, a.stderr);
    const c = await h.cli(['confirm']);
    assert.deepEqual(c.out.outcome, { outcome: 'reverted', reason: 'commit-failed' });
    assert.deepEqual(h.generations(), [1, 2], 'generation 2 existed before the commit');
    assert.equal(h.bootDefault(), h.gen1);
    assert.equal(h.running(), h.gen1);
  });

  it('a revert that finished while the agent was down is read, not run again (a failed activation, so the revert is forced)', async () => {
    const h = new ScratchHost('faults');
    hosts.push(h);
    const slow = join(h.dir, 'slow-revert');
    const release = join(h.dir, 'release');
    h.install({ beforeLink: `if [ -e ${slow} ]; then while [ ! -e ${release} ]; do sleep 0.05; done; fi` });
    await h.start();
    writeFileSync(slow, '');
    const activation = h.cli(['activate', h.toplevel('x', { afterLink: 'exit 2' }), '--timeout', '60']);
    await waitFor(() => h.switchCalls().some(([p]) => p === h.gen1));
    await h.kill9();
    await activation;
    const id = h.history().at(-1).id as string;
    writeFileSync(release, '');
    await waitFor(() => readFileSync(join(runDir(h, 'revert', id), 'status'), 'utf8').includes('end'));
    assert.equal(h.running(), h.gen1);
    await h.start();
    const end = await h.waitOutcome(id);
    assert.match(end.msg, /reverted: activation-failed/);
    assert.equal(h.switchCalls().filter(([p]) => p === h.gen1).length, 1, 'the revert ran once');
  });

  it('killed between saving the outcome and appending it to the history (strace): the next start appends it', async (t) => {
    if (spawnSync('strace', ['-V']).status !== 0) return t.skip('SKIPPED: strace is not installed (apt-get install strace)');
    const h = newHost();
    await h.start();
    const a = await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    await h.stop();
    const history = join(h.stateDir, 'history.jsonl');
    // Opens of the history from here: 1 when the metrics count it at start, 2 for `reverting`, 3 for
    // the outcome. Kill at the third.
    await h.start({ wrap: ['strace', '-f', '-qq', '-o', '/dev/null', '-P', history, '-e', 'trace=openat', '-e', 'inject=openat:signal=SIGKILL:when=3'] });
    const r = await h.cli(['rollback']);
    await h.exited();
    assert.notEqual(r.code, 0, 'the agent died before answering');
    assert.equal(stateOnDisk(h).phase, 'idle', 'the outcome is in state.json');
    assert.ok(!h.history().some((x) => x.outcome), 'and not yet in the history');
    await h.start();
    const recovered = h.history().find((x) => x.id === a.out.id && x.outcome);
    assert.ok(recovered, 'the outcome is appended at start');
    assert.deepEqual(recovered.outcome, { outcome: 'reverted', reason: 'requested' });
    assert.equal(recovered.event, 'recovered');
  });

  it('an interrupted commit the operator overtook (their own generation and system): their generation, profile and system are left alone', async () => {
    const { h, a } = await commitInterruptedMidBoot();
    // While no agent runs, the operator does `nixos-rebuild switch` of their own system.
    const y = h.toplevel('y');
    execFileSync('nix-env', ['-p', h.profile, '--set', y], { stdio: 'ignore' });
    rmSync(h.current);
    symlinkSync(y, h.current);
    await h.start();
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /stuck: conflict/);
    assert.equal(h.bootDefault(), y, "the operator's profile stands");
    assert.ok(h.generations().includes(3), "the operator's generation stands");
    assert.equal(h.running(), y);
    assert.ok(!h.switchCalls().some(([p, m]) => p === h.gen1 && m === 'boot'), 'no restored boot default over theirs');
  });

  it('a revert that hangs is stopped after confirm.activationTimeoutSec and ends stuck: the agent takes the next deployment', { timeout: 60_000 }, async () => {
    const h = new ScratchHost('faults', { confirm: { defaultTimeoutSec: 30, minTimeoutSec: 1, maxTimeoutSec: 600, activationTimeoutSec: 2 } });
    hosts.push(h);
    const hang = join(h.dir, 'hang');
    h.install({ beforeLink: `if [ -e ${hang} ]; then exec sleep 600; fi` });
    await h.start();
    await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    writeFileSync(hang, '');
    const r = await h.cli(['rollback']);
    assert.equal(r.out.outcome.outcome, 'stuck');
    assert.match(r.out.outcome.reason, /did not finish within confirm\.activationTimeoutSec/);
    unlinkSync(hang);
    assert.equal((await h.cli(['activate', h.toplevel('y'), '--timeout', '60'])).code, 0, 'not wedged');
  });

  it('an unreadable history keeps neither the daemon nor the revert from starting', async () => {
    const h = newHost();
    await h.start();
    await h.cli(['activate', h.toplevel('x'), '--timeout', '60']);
    await h.cli(['rollback']);
    const a = await h.cli(['activate', h.toplevel('y'), '--timeout', '2']);
    await h.kill9();
    const history = join(h.stateDir, 'history.jsonl');
    rmSync(history);
    mkdirSync(history);
    await h.start();
    const end = await h.waitOutcome(a.out.id);
    assert.match(end.msg, /reverted: timeout/);
    assert.equal(h.running(), h.gen1);
  });

  it('a disk that fills up during the switch: the trial, which cannot be saved, is reverted at once', async (t) => {
    const h = newHost();
    if (!smallDisk(t, h.stateDir)) return;
    await h.start();
    const x = h.toplevel('x', { afterLink: `cat /dev/zero > ${join(h.stateDir, 'filler')} 2>/dev/null; exit 0` });
    const a = await h.cli(['activate', x, '--timeout', '60']);
    assert.equal(a.code, 1);
    assert.equal(a.out.outcome.reason, 'activation-failed');
    assert.equal(h.running(), h.gen1);
    unlinkSync(join(h.stateDir, 'filler'));
    await waitFor(() => h.history().some((e) => e.event === 'activation-failed'), 10_000);
    assert.match(h.history().find((e) => e.event === 'activation-failed').detail, /the trial could not be saved/);
  });

  it('a history line torn by a short write on a full disk never swallows the next entry', (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'snapback-torn-'));
    if (!smallDisk(t, dir, '64k')) return;
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const d = new StateDir(dir);
    const entry = (id: string, pad = 300) => ({ at: new Date().toISOString(), id, from: 'trial' as const, to: 'idle' as const, event: 'x', by: { who: 'agent', channel: 'agent' as const }, detail: 'y'.repeat(pad) });
    // The first line ends 50 bytes before the end of its page; then the disk fills up.
    const bare = JSON.stringify(entry('first', 0)).length + 1;
    d.appendHistory(entry('first', 4096 - 50 - bare));
    const free = fillUp(dir);
    assert.throws(() => d.appendHistory(entry('torn')), /ENOSPC/);
    free();
    d.appendHistory(entry('next'));
    assert.deepEqual(d.readHistory().map((e) => e.id), ['first', 'next']);
  });

  it('a state file whose records do not fit their phase is state-corrupt: exit 2, the field named, nothing touched', async () => {
    const h = newHost();
    const d = { id: 'd1', target: { storePath: h.gen1 }, requestedBy: { who: 'console', channel: 'console' }, createdAt: 'x', timeoutSec: 60, activationTimeoutSec: 60, bootId: 'b', previous: h.gen1 };
    const bad: [unknown, RegExp][] = [
      [{ phase: 'trial' }, /deployment/],
      [{ phase: 'trial', deployment: { ...d, toplevel: h.gen1 } }, /deployment\.trial/],
      [{ phase: 'committing', deployment: { ...d, toplevel: h.gen1, trial: { startedAt: 'x', startedMono: 1, deadlineMono: 'soon', deadlineWall: 'x', token: 't' } } }, /deadlineMono/],
    ];
    mkdirSync(h.stateDir, { recursive: true });
    for (const [state, field] of bad) {
      const text = JSON.stringify({ version: 1, state });
      writeFileSync(join(h.stateDir, 'state.json'), text);
      const serve = spawnSync(process.execPath, [AGENT_BIN, 'serve', '--config', h.configPath], { encoding: 'utf8', timeout: 15_000 });
      assert.equal(serve.status, 2, `serve must stop with exit 2: ${serve.stdout}${serve.stderr}`);
      assert.match(serve.stdout, /does not hold a valid state/);
      assert.match(serve.stdout, field);
      const status = await h.cli(['status']);
      assert.equal(status.code, 2, 'status reads the state directory and says it is corrupt');
      assert.equal(status.out.code, 'state-corrupt');
      assert.equal(readFileSync(join(h.stateDir, 'state.json'), 'utf8'), text, 'the file is left for the operator');
    }
    assert.equal(h.switchCalls().length, 0);
  });
});
