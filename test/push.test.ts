// Deploying what the operator built: `snapback deploy --flake .` builds on this machine and pushes
// the closure over the agent's authenticated connection into the host's OWN store (a separate
// /nix in a mount namespace, test/helpers/host.ts ownStore). Real Nix on both sides.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ScratchHost, haveOwnStore, runController, cleanupsAfterAll } from './helpers/host.ts';
import { haveNix, nix, nixStore, writeFlake } from './helpers/nix.ts';
import { Relay } from './helpers/relay.ts';

const skip = haveNix() ?? haveOwnStore();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

async function ownHost(name: string, opts: { sizeMiB?: number; config?: Record<string, unknown> } = {}): Promise<ScratchHost> {
  const h = new ScratchHost(name).ownStore(opts.sizeMiB ? { sizeMiB: opts.sizeMiB } : {}).enableWire(opts.config ?? {}).install();
  cleanups.push(() => h.cleanup());
  await h.start();
  return h;
}

function relay(port: number, hooks: ConstructorParameters<typeof Relay>[1]): Promise<Relay> {
  const r = new Relay(port, hooks);
  cleanups.push(() => r.close());
  return r.listen();
}

const pushed = (events: any[]) => events.filter((e) => e.event === 'push').at(-1);
const closure = (p: string) => nixStore(['--query', '--requisites', p]).split('\n').filter(Boolean);

describe('closure push into the host\'s own store', { skip }, () => {
  it('--flake with a local path: built here, the closure pushed, activated and confirmed; a second deploy sends nothing', async () => {
    const h = await ownHost('push-flake');
    const ref = writeFlake(join(h.dir, 'flake'), 'web1', h.calls, h.current, { closure: { paths: 3, sizeKiB: 256 } });
    const fleet = await h.fleet({ confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet, '--flake', ref]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const toplevel = r.events.find((e) => e.event === 'phase' && e.toplevel)?.toplevel as string;
    assert.match(toplevel, /nixos-system-web1-flake$/);
    assert.ok(r.events.some((e) => e.event === 'building'), 'built on this machine');
    const done = pushed(r.events);
    assert.equal(done.done, true);
    assert.equal(done.totalPaths, 4, 'the toplevel and its three dependencies');
    assert.equal(done.paths, 4);
    assert.ok(done.bytes >= 3 * 256 * 1024);
    for (const p of closure(toplevel)) assert.ok(h.hostHas(p), `${p} is in the host's store`);
    assert.equal(h.running(), toplevel);
    assert.deepEqual(h.generations(), [1, 2]);

    const again = await h.snapback(['deploy', 'web1', '--fleet', fleet, '--flake', ref]);
    assert.equal(again.code, 0, again.stdout + again.stderr);
    assert.equal(pushed(again.events).totalPaths, 0, 'a second deploy of the same system sends nothing');
  });

  it('a ./result symlink is resolved and pushed; paths the host already has are not sent', async () => {
    const h = await ownHost('push-result');
    const x = h.toplevel('x', { closure: { paths: 2, sizeKiB: 64 } });
    const result = join(h.dir, 'result');
    symlinkSync(x, result);
    const fleet = await h.fleet({ confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', result, '--fleet', fleet]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(pushed(r.events).totalPaths, 3);
    assert.equal(h.running(), x);
    // The same dependencies under a new toplevel: only the toplevel travels.
    const y = h.toplevel('y', { closure: { paths: 2, sizeKiB: 64, seed: 'x' } });
    const r2 = await h.snapback(['deploy', 'web1', y, '--fleet', fleet]);
    assert.equal(r2.code, 0, r2.stdout + r2.stderr);
    assert.equal(pushed(r2.events).totalPaths, 1);
    assert.equal(h.running(), y);
  });

  it('one byte changed in flight: the push is refused naming the path, and the host store gains nothing', async () => {
    const h = await ownHost('push-tamper');
    const x = h.toplevel('x', { closure: { paths: 3, sizeKiB: 128 } });
    const before = h.hostPaths();
    let flipped = false;
    const mitm = await relay(await h.port(), {
      fromControllerBinary: (data) => {
        // Somewhere in the second path's NAR (each is a little over 128 KiB).
        if (!flipped && mitm.binaryBytes > 200 * 1024) {
          flipped = true;
          const copy = Buffer.from(data);
          copy[copy.length >> 1]! ^= 0xff;
          return copy;
        }
        return data;
      },
    });
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${mitm.port}`, target: { storePath: x }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.ok(flipped);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.match(r.result.hosts[0].message, /bad-nar.*\/nix\/store\/\S+ does not match its signed hash/);
    await h.waitLog((l) => l.msg === 'refusing a pushed closure');
    // The abort deletes what the push had imported; give it the moment it takes.
    for (let i = 0; i < 100 && h.hostPaths().length !== before.length; i++) await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(h.hostPaths(), before, 'nothing of the push stays in the host store');
    assert.deepEqual(h.switchCalls(), []);
    assert.equal(h.running(), h.gen1);
  });

  it('a connection cut mid-transfer: what arrived whole stays, and the retry sends only the rest', async () => {
    const h = await ownHost('push-cut');
    const x = h.toplevel('x', { closure: { paths: 4, sizeKiB: 256 } });
    let cut = false;
    const flaky = await relay(await h.port(), {
      fromControllerBinary: (data, c) => {
        if (!cut && flaky.binaryBytes > 700 * 1024) {
          cut = true;
          c.cut();
          return undefined;
        }
        return data;
      },
    });
    const viaFlaky = await h.fleet({ url: `ws://127.0.0.1:${flaky.port}`, target: { storePath: x }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', viaFlaky]);
    assert.ok(cut);
    assert.equal(r.code, 3, r.stdout + r.stderr);
    assert.deepEqual(h.switchCalls(), [], 'nothing was activated');
    await h.waitLog((l) => /^kept \d+ paths of an interrupted push|ending an interrupted push/.test(l.msg));
    const kept = closure(x).filter((p) => h.hostHas(p));
    assert.ok(kept.length >= 1 && kept.length < 5, `${kept.length} paths arrived whole before the cut`);

    const direct = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 });
    const again = await h.snapback(['deploy', 'web1', '--fleet', direct]);
    assert.equal(again.code, 0, again.stdout + again.stderr);
    assert.equal(pushed(again.events).totalPaths, 5 - kept.length, 'only the rest is sent');
    assert.equal(h.running(), x);
  });

  it('a store too small for the closure: refused before one byte is sent', async () => {
    const h = await ownHost('push-small', { sizeMiB: 8 });
    const x = h.toplevel('big', { closure: { paths: 3, sizeKiB: 4096 } });
    const counter = await relay(await h.port(), {});
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${counter.port}`, target: { storePath: x }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.match(r.result.hosts[0].message, /no-space.*about 15\.0 MiB in the store \(12\.0 MiB of NARs, 1\.25×\).*free/);
    assert.equal(counter.binaryBytes, 0, 'nothing was sent');
    assert.ok(!h.hostHas(x));
  });

  it('--substitute-on-host: the host fetches from its signed cache what it can; only the rest is pushed', async () => {
    const sk = join(process.env.TMPDIR ?? '/tmp', `snapback-push-sk-${process.pid}`);
    const pkFile = `${sk}.pub`;
    nixStore(['--generate-binary-cache-key', 'snapback-push-1', sk, pkFile]);
    cleanups.push(() => execFileSync('rm', ['-f', sk, pkFile]));
    const pk = readFileSync(pkFile, 'utf8').trim();
    const cacheDir = join(process.env.TMPDIR ?? '/tmp', `snapback-push-cache-${process.pid}`);
    cleanups.push(() => execFileSync('rm', ['-rf', cacheDir]));
    const h = await ownHost('push-subst', { config: { nix: { substituters: [`file://${cacheDir}`], trustedPublicKeys: [pk] } } });
    const x = h.toplevel('x', { closure: { paths: 3, sizeKiB: 64 } });
    // The cache has the dependencies, not the toplevel (a system built only here).
    const deps = closure(x).filter((p) => p !== x);
    nix(['copy', '--to', `file://${cacheDir}?secret-key=${sk}`, ...deps]);
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet, '--substitute-on-host']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const done = pushed(r.events);
    assert.equal(done.totalPaths, 4, 'the host lacked four paths');
    assert.ok(done.bytes < 64 * 1024, `only the toplevel's NAR was sent (${done.bytes} bytes)`);
    for (const p of closure(x)) assert.ok(h.hostHas(p));
    assert.equal(h.running(), x);
  });

  it('a failing probe after a push still rolls back to the previous system', async () => {
    const h = await ownHost('push-probe');
    const x = h.toplevel('x', { closure: { paths: 1, sizeKiB: 16 } });
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30, probes: [{ command: ['false'], name: 'never', timeoutSec: 1 }] });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.equal(r.result.hosts[0].status, 'reverted');
    assert.equal(pushed(r.events).totalPaths, 2);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
  });
});

describe('a store path nobody has', { skip }, () => {
  it('neither here nor on the host: the refusal says to build it here or give the host a cache', async () => {
    const h = await ownHost('push-nowhere');
    const x = h.toplevel('gone', { closure: { paths: 1, sizeKiB: 16, seed: `gone-${process.pid}` } });
    nixStore(['--delete', x]);
    const r = await h.snapback(['deploy', 'web1', '--fleet', await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 })]);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.ok(!r.events.some((e) => e.event === 'push'), 'nothing to push from here');
    assert.match(r.result.hosts[0].message, /could not realise.*build it here .* and deploy again to push it, or give the host a cache that has it \(nix\.substituters/);
    assert.deepEqual(h.switchCalls(), []);
  });
});

describe('where the system is built', () => {
  it('--build-on host with a path only this machine has is refused before anything happens (exit 2)', async () => {
    const r = await runController(['deploy', 'web1', '--flake', '.', '--build-on', 'host', '--fleet', writeMinimalFleet()]);
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.match(r.result?.message ?? r.stdout + r.stderr, /the flake "\." is a relative path on this machine, which the host cannot resolve; build it here and push it \(--build-on local/);
  });
});

function writeMinimalFleet(): string {
  const dir = execFileSync('mktemp', ['-d'], { encoding: 'utf8' }).trim();
  cleanups.push(() => execFileSync('rm', ['-rf', dir]));
  const key = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl host';
  const file = join(dir, 'snapback.json');
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'op')]);
  execFileSync('sh', ['-c', `cat > ${file}`], { input: JSON.stringify({ identity: { sshKey: join(dir, 'op') }, hosts: { web1: { url: 'ws://127.0.0.1:9', hostKey: key } } }) });
  return file;
}
