// Adversarial review of the closure-push rewrite and the footprint work: each test here failed on
// the code it was written against (branch review). Real agents, real Nix, real processes.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { temporaryBytes } from '../agent/push.ts';
import { describe, it } from 'node:test';
import { ScratchHost, AGENT_BIN, ROOT, cleanupsAfterAll, haveOwnStore } from './helpers/host.ts';
import { haveNix } from './helpers/nix.ts';
import { RawClient } from './helpers/raw.ts';
import { Relay } from './helpers/relay.ts';

const skip = haveNix();
const cleanups = cleanupsAfterAll();

async function wireHost(name: string, start: Parameters<ScratchHost['start']>[0] = {}, extra: Record<string, unknown> = {}): Promise<{ h: ScratchHost; port: number }> {
  const h = new ScratchHost(name).enableWire(extra).install();
  cleanups.push(() => h.cleanup());
  await h.start(start);
  return { h, port: await h.port() };
}

/** Children of `pid` whose command line contains `needle`. */
function childrenOf(pid: number, needle: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid !== pid) continue;
      if (readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0').join(' ').includes(needle)) out.push(Number(d));
    } catch {}
  }
  return out;
}

describe('review: lazy loading', { skip }, () => {
  it('one EMFILE while the WebSocket layer loads is survived: a later connection is served', async () => {
    // The first open of a file that ws's CommonJS index requires fails once with EMFILE (as when
    // descriptors run out for a moment); every later open succeeds.
    const file = join(ROOT, 'node_modules', 'ws', 'lib', 'buffer-util.js');
    const { h, port } = await wireHost('rv-emfile', {
      wrap: ['strace', '-f', '-qq', '-o', '/dev/null', '-P', file, '-e', 'trace=openat', '-e', 'inject=openat:error=EMFILE:when=1'],
    });
    const op = join(h.dir, 'op');
    // strace 6.1 leaves its tracee running when it is killed: the agent is ended by its PID.
    const tracer = h.agent!.pid!;
    const agentPid = childrenOf(tracer, 'snapback-agent')[0];
    cleanups.push(() => agentPid && process.kill(agentPid, 'SIGKILL'));
    const first = new RawClient(port);
    cleanups.push(() => first.ws.terminate());
    await Promise.race([first.closed, sleep(10_000)]);
    await h.waitLog((l) => l.msg === 'cannot load the protocol for a connection');
    // The agent says "the next connection tries again": it must.
    await sleep(200);
    const second = new RawClient(port);
    cleanups.push(() => second.ws.terminate());
    const welcome = await Promise.race([second.authenticate(op), second.closed.then(() => undefined)]);
    second.close();
    assert.equal(welcome?.type, 'welcome', `the agent never served a connection again after one EMFILE: ${JSON.stringify(h.logs().filter((l) => l.level >= 40).map((l) => [l.msg, l.err]))}`);
  });
});

describe('review: lazy execa', { skip }, () => {
  it('health checks do not depend on loading execa (whose failed load Node would keep): with its loading made to fail, a confirm runs its checks', async () => {
    // execa is ESM; cross-spawn, which it imports, is CommonJS, and Node keeps a CommonJS file's
    // failed load for the life of the process. The agent runs its checks without execa, so the
    // failure injected there never matters.
    const file = join(ROOT, 'node_modules', 'cross-spawn', 'lib', 'parse.js');
    const h = new ScratchHost('rv-execa', { health: { failedUnits: 'ignore', checks: [{ name: 'ok', command: ['true'] }] } }).install();
    cleanups.push(() => h.cleanup());
    await h.start({ wrap: ['strace', '-f', '-qq', '-o', '/dev/null', '-P', file, '-e', 'trace=openat', '-e', 'inject=openat:error=EMFILE:when=1'] });
    const agentPid = childrenOf(h.agent!.pid!, 'snapback-agent')[0];
    cleanups.push(() => agentPid && process.kill(agentPid, 'SIGKILL'));
    const x = h.toplevel('rv-execa-x');
    const a = await h.cli(['activate', x, '--timeout', '60']);
    assert.equal(a.code, 0, a.stdout + a.stderr);
    const c = await h.cli(['confirm']);
    assert.equal(c.code, 0, `the confirm's health checks could not run: ${c.stdout}${c.stderr}`);
  });
});

describe('run() with a timeout (health checks)', () => {
  it('kills the command and what it started at the timeout, and says so', async () => {
    const { run } = await import('../shared/exec.ts');
    const n = 7000 + (process.pid % 1000); // sleeps nobody else runs
    const t0 = Date.now();
    const r = await run('/bin/sh', ['-c', `sleep ${n} & exec sleep ${n + 1}`], { timeoutMs: 300 });
    assert.ok(r.timedOut, JSON.stringify(r));
    assert.ok(Date.now() - t0 < 2000, `answered after ${Date.now() - t0} ms`);
    const left = spawnSync('pgrep', ['-f', `^sleep (${n}|${n + 1})$`], { encoding: 'utf8' }).stdout.trim();
    assert.equal(left, '', 'nothing of the command is left running');
  });
});

describe('review: run() out of descriptors', () => {
  it('resolves with the cause, and the process survives (no uncaught "spawn EMFILE")', () => {
    const script = `
      import { openSync } from 'node:fs';
      import { run } from ${JSON.stringify(join(ROOT, 'shared', 'exec.ts'))};
      const fds = [];
      try { for (;;) fds.push(openSync('/dev/null', 'r')); } catch {}
      const r = await Promise.race([run('true', []).then((r) => 'resolved ' + r.stderr.trim(), (e) => 'rejected ' + e.message), new Promise((r) => setTimeout(() => r('hung'), 2000))]);
      console.log(r);
      await new Promise((r) => setTimeout(r, 100));
      console.log('alive');
    `;
    const r = spawnSync('sh', ['-c', `ulimit -n 64; exec "$0" --input-type=module -e "$1"`, process.execPath, script], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(r.status, 0, `the process died: ${r.stdout}${r.stderr}`);
    assert.match(r.stdout, /^resolved .*EMFILE/m);
    assert.match(r.stdout, /^alive$/m);
  });
});

describe('review: footprint under systemd', { skip }, () => {
  it('an idle agent in a .service cgroup (as under systemd) does not load execa', { skip: process.getuid?.() !== 0 ? 'needs root' : false }, async () => {
    const cgroup = '/sys/fs/cgroup/pids/rv-review.service';
    try {
      mkdirSync(cgroup, { recursive: true });
    } catch (err) {
      return void console.warn(`SKIPPED: cannot make ${cgroup}: ${(err as Error).message}`);
    }
    const h = new ScratchHost('rv-unit').install();
    cleanups.push(() => h.cleanup());
    const trace = join(h.dir, 'opens.txt');
    await h.start({ wrap: ['sh', '-c', `echo $$ > ${cgroup}/cgroup.procs && exec "$@"`, 'sh', 'strace', '-f', '-qq', '-o', trace, '-e', 'trace=openat'] });
    const agentPid = childrenOf(h.agent!.pid!, 'snapback-agent')[0];
    cleanups.push(() => agentPid && process.kill(agentPid, 'SIGKILL'));
    assert.match(readFileSync(`/proc/${agentPid}/cgroup`, 'utf8'), /rv-review\.service/);
    await sleep(1500);
    const execa = readFileSync(trace, 'utf8').split('\n').filter((l) => l.includes('node_modules/execa/') && !l.includes('ENOENT'));
    assert.deepEqual(execa.slice(0, 3), [], 'an idle agent under systemd pays for execa at every start (unitText runs systemctl cat through it)');
  });
});

describe('review: push against a garbage collector', { skip: skip ?? haveOwnStore() }, () => {
  it('nix-store --gc in a loop on the host during the push and up to the confirm: the deploy confirms, the closure stays', async () => {
    const h = new ScratchHost('rv-gc').ownStore().enableWire().install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const x = h.toplevel('rv-gc-x', { closure: { paths: 40, sizeKiB: 64 } });
    const [c, ...a] = [...h.hostPrefix(), 'sh', '-c', `while :; do nix-store --gc >/dev/null 2>>${join(h.dir, 'gc.log')} && echo gc >> ${join(h.dir, 'gc.runs')}; done`] as unknown as [string, ...string[]];
    const gc = spawn(c, a, { stdio: 'ignore', detached: true });
    cleanups.push(() => {
      try {
        process.kill(-gc.pid!, 'SIGKILL');
      } catch {}
    });
    const fleet = await h.fleet({ confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', x, '--fleet', fleet]);
    process.kill(-gc.pid!, 'SIGKILL');
    const runs = existsSync(join(h.dir, 'gc.runs')) ? readFileSync(join(h.dir, 'gc.runs'), 'utf8').split('\n').filter(Boolean).length : 0;
    assert.ok(runs >= 3, `the collector ran ${runs} times: ${existsSync(join(h.dir, 'gc.log')) ? readFileSync(join(h.dir, 'gc.log'), 'utf8').slice(-500) : ''}`);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(h.running(), x);
    const closure = spawnSync('nix-store', ['--query', '--requisites', x], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
    for (const p of closure) assert.ok(h.hostHas(p), `${p} is in the host's store`);
  });
});

describe('review: push space accounting', { skip: skip ?? haveOwnStore() }, () => {
  it('the NARs waiting for Nix on the agent stay within what the space check reserves for them (temporaryBytes)', async () => {
    const h = new ScratchHost('rv-acc').ownStore().enableWire().install();
    cleanups.push(() => h.cleanup());
    // A slow Nix on the host: `nix-store --serve` reads its input at about 6 MiB/s, so that NARs
    // pile up unless the agent makes the controller wait for it.
    const shim = join(h.dir, 'slow-nix');
    mkdirSync(shim);
    writeFileSync(join(shim, 'throttle.py'), 'import sys, time\ni, o = sys.stdin.buffer, sys.stdout.buffer\nwhile True:\n    b = i.read1(65536)\n    if not b: break\n    o.write(b); o.flush(); time.sleep(0.01)\n');
    writeFileSync(join(shim, 'nix-store'), `#!/bin/sh\nif [ "$1" = --serve ]; then python3 ${join(shim, 'throttle.py')} | /usr/bin/nix-store "$@"; exit; fi\nexec /usr/bin/nix-store "$@"\n`);
    chmodSync(join(shim, 'nix-store'), 0o755);
    await h.start({ env: { PATH: `${shim}:${process.env.PATH}` } });
    const x = h.toplevel(`rv-acc-${Date.now()}`, { closure: { paths: 600, sizeKiB: 96 } });
    const fleet = await h.fleet({ confirmTimeoutSec: 30 });
    let peak = 0;
    const tmp = join(h.stateDir, 'push');
    const sampler = setInterval(() => {
      let bytes = 0;
      try {
        for (const d of readdirSync(tmp)) {
          for (const f of readdirSync(join(tmp, d))) {
            try {
              bytes += statSync(join(tmp, d, f)).size;
            } catch {}
          }
        }
      } catch {}
      peak = Math.max(peak, bytes);
    }, 5);
    const r = await h.snapback(['deploy', 'web1', x, '--fleet', fleet]);
    clearInterval(sampler);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    // agent/push.ts prepare() reserves temporaryBytes(need) for them (per batch of at most 400 paths;
    // 600 paths of 96 KiB are far more than the budget for NARs waiting for Nix).
    const reserved = temporaryBytes(Array.from({ length: 400 }, (_, i) => ({ path: `/nix/store/${i}`, narHash: '', narSize: 96 * 1024 + 1024, references: [] })));
    assert.ok(peak <= reserved, `${(peak / 1048576).toFixed(1)} MiB of NARs waited for Nix at once, the check reserves ${(reserved / 1048576).toFixed(1)} MiB: the controller was not held back while Nix lagged`);
  });
});

describe('review: push space check', { skip: skip ?? haveOwnStore() }, () => {
  it('a transfer admitted by the first batch\'s space check is not refused half-way (no-space at batch 2, batch 1 left rooted)', async () => {
    // 700 paths of 96 KiB: two batches. The first check counts NAR bytes (65.6 MiB + 4.1 + 16 <
    // 87.9 free); files take more room on disk than their NAR says, and the second check refuses.
    const h = new ScratchHost('rv-nospc').ownStore({ sizeMiB: 88 }).enableWire({ stateDir: '/nix/var/snapback' }).install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const before = h.hostStoreFree();
    const x = h.toplevel(`rv-nospc-${Date.now()}`, { closure: { paths: 700, sizeKiB: 96 } });
    const fleet = await h.fleet({ confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', x, '--fleet', fleet]);
    const lost = before - h.hostStoreFree();
    if (r.code === 0) return; // it fit after all
    assert.ok(lost < 4 * 1024 * 1024, `${r.result?.hosts?.[0]?.message}; yet ${(lost / 1048576).toFixed(1)} MiB of the refused transfer stay in the store, rooted (gcroots/push-*)`);
  });
});

describe('review: kill -9 during a push', { skip: skip ?? haveOwnStore() }, () => {
  for (const when of ['mid-NAR', 'at push-done'] as const) {
    it(`the agent killed ${when}, a garbage collection, a restart: the next deploy confirms and no temporary file or push root is left`, async () => {
      const h = new ScratchHost(`rv-k9-${when === 'mid-NAR' ? 'nar' : 'done'}`).ownStore().enableWire().install();
      cleanups.push(() => h.cleanup());
      await h.start();
      const x = h.toplevel(`rv-k9-${when.length}-${Date.now()}`, { closure: { paths: 6, sizeKiB: 512 } });
      let killed = false;
      const kill = () => {
        if (killed) return;
        killed = true;
        process.kill(h.agent!.pid!, 'SIGKILL');
      };
      const r0 = new Relay(await h.port(), {
        fromControllerBinary: (data) => {
          if (when === 'mid-NAR' && r0.binaryBytes > 1200 * 1024) kill();
          return data;
        },
        fromAgent: (m) => {
          if (when === 'at push-done' && m.type === 'push-done') kill();
          return m;
        },
      });
      cleanups.push(() => r0.close());
      await r0.listen();
      const viaRelay = await h.fleet({ url: `ws://127.0.0.1:${r0.port}`, target: { storePath: x }, confirmTimeoutSec: 30 });
      const r = await h.snapback(['deploy', 'web1', '--fleet', viaRelay]);
      assert.ok(killed);
      assert.notEqual(r.code, 0);
      await h.exited();
      h.hostRun('nix-store', ['--gc']);
      await h.start();
      assert.ok(!existsSync(join(h.stateDir, 'push')) || readdirSync(join(h.stateDir, 'push')).length === 0, 'temporary NARs are gone after the restart');
      const direct = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 });
      const again = await h.snapback(['deploy', 'web1', '--fleet', direct]);
      assert.equal(again.code, 0, again.stdout + again.stderr);
      assert.equal(h.running(), x);
      const roots = readdirSync(join(h.stateDir, 'gcroots')).filter((n) => n.startsWith('push-'));
      assert.deepEqual(roots, [], 'no push root outlives the confirmed deployment');
    });
  }
});

describe('review: push', { skip }, () => {
  it('a controller that disconnects while its push is being prepared leaves no nix-store --serve, thread or temporary directory behind', async () => {
    const { h, port } = await wireHost('rv-leak', {}, { nix: { substituters: ['http://127.0.0.1:9'], trustedPublicKeys: [] } });
    const op = join(h.dir, 'op');
    const pid = h.agent!.pid!;
    const c = new RawClient(port);
    cleanups.push(() => c.ws.terminate());
    assert.equal((await c.authenticate(op)).type, 'welcome');
    const path = `/nix/store/${'a'.repeat(32)}-rv-leak`;
    // substitute: the agent asks its caches first (a Nix process: some milliseconds), and the
    // controller is gone before it has an answer.
    c.send(await c.signed({ type: 'push', paths: [{ path, narHash: `sha256-${'A'.repeat(43)}=`, narSize: 4096, references: [] }], transfer: 'rvleak0001', remainingBytes: 4096, substitute: true } as never));
    c.ws.terminate();
    await h.waitLog((l) => /receiving 1 of 1 paths|left before its push began/.test(l.msg), 20_000);
    await sleep(1500);
    const serving = childrenOf(pid, '--serve');
    const tmp = join(h.stateDir, 'push');
    const left = existsSync(tmp) ? readdirSync(tmp) : [];
    assert.deepEqual({ serving, left }, { serving: [], left: [] }, 'a nix-store --serve (and its worker thread) for a push nobody will send, and its directory, are left for the life of the agent');
  });
});

describe('review: the daemon re-executed with its V8 flags', () => {
  const nodeExecs = (args: string[]) => {
    const trace = join(mkdtempSync(join(tmpdir(), 'rv-execve-')), 'trace');
    spawnSync('strace', ['-f', '-qq', '-o', trace, '-e', 'trace=execve', process.execPath, AGENT_BIN, ...args], { stdio: 'ignore', env: { ...process.env, SNAPBACK_V8: '' } });
    return readFileSync(trace, 'utf8').split('\n').filter((l) => /execve\(".*\/node",/.test(l) && !l.includes('ENOENT')).length;
  };
  it('only for the serve command, not when "serve" is the value of an option', () => {
    assert.equal(nodeExecs(['serve', '--config', '/nonexistent/agent.json']), 2, 'serve is re-executed once');
    assert.equal(nodeExecs(['status', '--config', 'serve']), 1, 'a console command whose --config is "serve" was re-executed as the daemon');
  });
});

describe('review: compile cache', { skip }, () => {
  it('a command run by root with a HOME that belongs to another user neither writes nor reads its compiled code there', { skip: process.getuid?.() !== 0 ? 'needs root' : false }, () => {
    const home = mkdtempSync(join(tmpdir(), 'rv-home-'));
    cleanups.push(() => rmSync(home, { recursive: true, force: true }));
    mkdirSync(join(home, '.cache'));
    chownSync(home, 65534, 65534);
    chownSync(join(home, '.cache'), 65534, 65534);
    // `sudo -E`, `su` without `-`, a service with the HOME of whoever started it: root, another's home.
    const env: NodeJS.ProcessEnv = { ...process.env, HOME: home };
    delete env.XDG_CACHE_HOME;
    delete env.NODE_DISABLE_COMPILE_CACHE;
    spawnSync(process.execPath, [AGENT_BIN, 'help'], { env, stdio: 'ignore' });
    const cache = join(home, '.cache', 'snapback');
    assert.ok(!existsSync(cache), `root's compiled code went into ${cache}, a directory another user controls (they can replace it with code root will run)`);
  });

  it('the daemon keeps none (Node would hold it in memory for its whole life); a console command does', async () => {
    const home = mkdtempSync(join(tmpdir(), 'rv-home-'));
    cleanups.push(() => rmSync(home, { recursive: true, force: true }));
    const h = new ScratchHost('rv-cache').install();
    cleanups.push(() => h.cleanup());
    const env = { HOME: home, XDG_CACHE_HOME: join(home, '.cache') };
    await h.start({ env });
    await h.stop();
    const cache = join(home, '.cache', 'snapback');
    assert.ok(!existsSync(cache), `the daemon wrote a compile cache into ${cache}`);
    // The same HOME, a console command: the cache is made (so the check above can fail).
    const r = spawnSync(process.execPath, [AGENT_BIN, 'help'], { env: { ...process.env, ...env }, stdio: 'ignore' });
    assert.equal(r.status, 0);
    assert.ok(existsSync(cache), `a console command made no compile cache in ${cache}`);
  });
});

describe('review: the previous system held while the target is obtained', { skip: skip ?? haveOwnStore() }, () => {
  it('a running system the store does not know (no GC root can hold it) refuses activation: no-current-system, nothing run, no root left', async () => {
    const h = new ScratchHost('rv-hold').ownStore().install();
    cleanups.push(() => h.cleanup());
    const x = h.hostToplevel('x');
    // A directory in the host's store that Nix never registered, and the running system points at it.
    const unknown = '/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-unknown';
    h.hostRun('mkdir', ['-p', `${unknown}/bin`]);
    h.hostRun('cp', ['-a', `${h.gen1}/bin/switch-to-configuration`, `${unknown}/bin/`]);
    rmSync(h.current);
    symlinkSync(unknown, h.current);
    await h.start();
    const a = await h.cli(['activate', x]);
    assert.equal(a.code, 1, JSON.stringify(a.out));
    assert.equal(a.out.outcome?.outcome, 'failed', JSON.stringify(a.out));
    assert.equal(a.out.outcome.code, 'no-current-system', JSON.stringify(a.out));
    assert.match(a.out.outcome.message, /cannot hold the previous system/);
    assert.equal(h.switchCalls().length, 0, 'a switch ran');
    assert.equal(h.hostRealpath(h.profile).trim(), h.gen1);
    const roots = readdirSync(join(h.config.stateDir as string, 'gcroots'));
    assert.deepEqual(roots, [], `GC roots left behind: ${roots.join(' ')}`);
  });
});

/**
 * A `nix-store` first in PATH that sleeps before each `--realise … --add-root ROOT` (HOLD_SLEEP for
 * the previous system's root, OBTAIN_SLEEP for the target's), then fails instead when HOLD_FAIL or
 * OBTAIN_FAIL is set, and logs when each starts and ends.
 */
function slowNixStore(dir: string): { env: Record<string, string>; log: string } {
  const bin = join(dir, 'slow-nix-store');
  mkdirSync(bin);
  const log = join(dir, 'slow-nix-store.log');
  writeFileSync(log, '');
  const real = spawnSync('sh', ['-c', 'command -v nix-store'], { encoding: 'utf8' }).stdout.trim();
  writeFileSync(
    join(bin, 'nix-store'),
    `#!/bin/sh
root=; prev=
for a; do [ "$prev" = --add-root ] && root=$a; prev=$a; done
[ -z "$root" ] && exec ${real} "$@"
case "$root" in *-previous) kind=hold; s=$HOLD_SLEEP; f=$HOLD_FAIL;; *) kind=obtain; s=$OBTAIN_SLEEP; f=$OBTAIN_FAIL;; esac
echo "start $kind" >> ${log}
sleep "\${s:-0}"
if [ -n "$f" ]; then echo "error: $kind failed (injected)" >&2; rc=1; else ${real} "$@"; rc=$?; fi
echo "end $kind $rc" >> ${log}
exit $rc
`,
  );
  chmodSync(join(bin, 'nix-store'), 0o755);
  return { env: { PATH: `${bin}:${process.env.PATH}` }, log };
}

describe('review: the previous system held while the target is obtained (a slow or failing nix-store)', { skip }, () => {
  it('the target fails while the hold still runs: the target\'s error, and the release waits for the hold (no root made after it)', async () => {
    const h = new ScratchHost('rv-hold-slow').install();
    cleanups.push(() => h.cleanup());
    const x = h.toplevel('x');
    const slow = slowNixStore(h.dir);
    await h.start({ env: { ...slow.env, HOLD_SLEEP: '2', OBTAIN_FAIL: '1' } });
    const a = await h.cli(['activate', x]);
    assert.equal(a.out.outcome?.outcome, 'failed', JSON.stringify(a.out));
    assert.equal(a.out.outcome.code, 'fetch-failed', JSON.stringify(a.out));
    assert.match(a.out.outcome.message, /obtain failed \(injected\)/);
    assert.match(readFileSync(slow.log, 'utf8'), /end hold 0/, 'the outcome came before the hold ended');
    await sleep(500);
    assert.deepEqual(readdirSync(join(h.stateDir, 'gcroots')), []);
    assert.equal(h.switchCalls().length, 0);
  });

  it('both fail: the target\'s error wins; the hold fails while the target is still obtained: no-current-system once it ends, nothing run, no root', async () => {
    const h = new ScratchHost('rv-hold-fail').install();
    cleanups.push(() => h.cleanup());
    const x = h.toplevel('x');
    const slow = slowNixStore(h.dir);
    await h.start({ env: { ...slow.env, HOLD_FAIL: '1', OBTAIN_SLEEP: '1', OBTAIN_FAIL: '1' } });
    const both = await h.cli(['activate', x]);
    assert.equal(both.out.outcome?.code, 'fetch-failed', JSON.stringify(both.out));
    await h.stop();
    writeFileSync(slow.log, '');
    await h.start({ env: { ...slow.env, HOLD_FAIL: '1', OBTAIN_SLEEP: '2' } });
    const a = await h.cli(['activate', x]);
    assert.equal(a.out.outcome?.code, 'no-current-system', JSON.stringify(a.out));
    assert.match(a.out.outcome.message, /cannot hold the previous system .*hold failed \(injected\)/);
    assert.match(readFileSync(slow.log, 'utf8'), /end obtain 0/);
    assert.deepEqual(readdirSync(join(h.stateDir, 'gcroots')), []);
    assert.equal(h.switchCalls().length, 0);
  });
});

describe('review: roots made by Nix processes that outlive a killed agent', { skip }, () => {
  it('kill -9 while the previous system is held and the target obtained: the roots the orphaned nix-store processes make later go at the next start, and at the next deployment\'s end', async () => {
    const h = new ScratchHost('rv-orphan').install();
    cleanups.push(() => h.cleanup());
    const x = h.toplevel('x');
    const slow = slowNixStore(h.dir);
    const gcroots = join(h.stateDir, 'gcroots');
    const killMidPrepare = async (): Promise<string> => {
      writeFileSync(slow.log, '');
      await h.start({ env: { ...slow.env, HOLD_SLEEP: '3', OBTAIN_SLEEP: '4' } });
      const a = h.cli(['activate', x]);
      await waitUntil(() => readFileSync(slow.log, 'utf8').split('\n').filter((l) => l.startsWith('start ')).length === 2, 10_000, 'both nix-store processes started');
      const id = JSON.parse(readFileSync(join(h.stateDir, 'state.json'), 'utf8')).state.deployment.id as string;
      await h.kill9();
      await a;
      // The next agent (no systemd here to end the killed one's processes) finds it interrupted and
      // releases its roots while the orphans are still at work.
      await h.start();
      await h.waitOutcome(id);
      await waitUntil(() => readFileSync(slow.log, 'utf8').split('\n').filter((l) => l.startsWith('end ')).length === 2, 10_000, 'both orphaned nix-store processes ended');
      assert.deepEqual(readdirSync(gcroots).sort(), [id, `${id}-previous`], 'the orphans made their roots after the release (the window this test is about)');
      return id;
    };

    await killMidPrepare();
    await h.stop();
    await h.start();
    assert.deepEqual(readdirSync(gcroots), [], 'roots of an ended deployment survive a restart');
    await h.stop();

    await killMidPrepare();
    const a = await h.cli(['activate', x, '--timeout', '60']);
    assert.equal(a.code, 0, a.stdout + a.stderr);
    const rb = await h.cli(['rollback']);
    assert.equal(rb.code, 0, rb.stdout + rb.stderr);
    assert.deepEqual(readdirSync(gcroots), [], 'roots of an earlier deployment survive the end of the next one');
  });
});

async function waitUntil(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting: ${what}`);
    await sleep(50);
  }
}
