// The harness for a host with a Nix store of its own (ScratchHost.ownStore): the operator (this test
// process) and the host no longer share /nix, as for closure push. Real Nix, real mount namespaces;
// these tests check the harness itself, so the closure-push tests can trust it.

import assert from 'node:assert/strict';
import { existsSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { after, describe, it } from 'node:test';
import { nix, nixStore } from './helpers/nix.ts';
import { ScratchHost, haveOwnStore } from './helpers/host.ts';

const skip = haveOwnStore();
if (skip) console.warn(`SKIPPED: ${skip}`);

const hosts: ScratchHost[] = [];
after(async () => {
  for (const h of hosts) await h.cleanup();
});

function ownHost(opts: { sizeMiB?: number } = {}, config: Record<string, unknown> = {}): ScratchHost {
  const h = new ScratchHost('own', config).ownStore(opts);
  hosts.push(h);
  return h;
}

/** Valid in the operator's store (the real one this process sees). */
function operatorHas(path: string): boolean {
  try {
    nixStore(['--check-validity', path]);
    return true;
  } catch {
    return false;
  }
}

describe('a host with its own Nix store', { skip }, () => {
  it('is separate from the operator store, both ways', () => {
    const h = ownHost();
    assert.deepEqual(h.hostPaths(), [], 'a new host store is empty');
    const onHost = h.hostToplevel('on-host');
    const onOperator = h.toplevel('on-operator');
    assert.ok(h.hostHas(onHost));
    assert.ok(!operatorHas(onHost), 'a host build must not land in the operator store');
    assert.ok(!existsSync(onHost), 'nor be visible at its path from outside the host');
    assert.ok(operatorHas(onOperator));
    assert.ok(!h.hostHas(onOperator), 'an operator build must not be valid on the host');
    assert.deepEqual(h.hostPaths(), [onHost]);
    assert.ok(h.hostPaths({ drvs: true }).some((p) => p.endsWith('-nixos-system-on-host.drv')));
    // The same expression gives the same path in either store; each store has its own copy.
    const same = h.hostToplevel('on-operator');
    assert.equal(same, onOperator);
    assert.ok(h.hostHas(onOperator));
  });

  it('installs, runs the agent and activates + confirms entirely in the host store', async () => {
    const h = ownHost().install();
    assert.ok(h.hostHas(h.gen1));
    assert.ok(!operatorHas(h.gen1), 'gen1 is built in the host store');
    assert.deepEqual(h.generations(), [1]);
    assert.equal(h.running(), h.gen1);
    assert.equal(h.bootDefault(), h.gen1);

    // A wrapper (as faults.test.ts uses strace) still runs inside the host's namespace.
    await h.start({ wrap: ['env', 'SNAPBACK_WRAPPED=1'] });
    const agentPid = h.agent!.pid!;
    assert.equal(readlinkSync(`/proc/${agentPid}/ns/mnt`), readlinkSync(`/proc/${h.holderPid}/ns/mnt`), 'the agent runs in the host namespace');
    assert.notEqual(readlinkSync(`/proc/${agentPid}/ns/mnt`), readlinkSync('/proc/self/ns/mnt'));
    assert.match(readFileSync(`/proc/${agentPid}/environ`, 'utf8'), /SNAPBACK_WRAPPED=1/);

    const x = h.hostToplevel('x');
    const a = await h.cli(['activate', x, '--timeout', '30']);
    assert.equal(a.code, 0, a.stderr || JSON.stringify(a.out));
    assert.equal(a.out.toplevel, x);
    assert.equal(h.running(), x);
    assert.deepEqual(h.generations(), [1]);
    const c = await h.cli(['confirm']);
    assert.equal(c.code, 0, c.stderr);
    assert.deepEqual(c.out.outcome, { outcome: 'confirmed' });
    assert.deepEqual(h.generations(), [1, 2]);
    assert.equal(h.bootDefault(), x);
    assert.deepEqual(h.switchCalls(), [
      [x, 'test'],
      [x, 'boot'],
    ]);
    assert.ok(!operatorHas(x));

    await h.reboot();
    assert.equal(h.running(), x, 'reboot resolves the profile inside the host');
  });

  it('an activation of a path only the operator has fails on the host: nothing is shared', async () => {
    const h = ownHost().install();
    await h.start();
    const x = h.toplevel('operator-only');
    const a = await h.cli(['activate', x, '--timeout', '30']);
    assert.equal(a.code, 1, JSON.stringify(a.out));
    assert.equal(a.out.outcome.outcome, 'failed');
    assert.equal(a.out.outcome.code, 'fetch-failed');
    assert.equal(h.running(), h.gen1);
    assert.ok(!h.hostHas(x));
  });

  it('a small store (tmpfs, sizeMiB) reports its small free space, and a big closure does not fit', () => {
    const h = ownHost({ sizeMiB: 8 });
    const free = h.hostStoreFree();
    assert.ok(free > 4 * 2 ** 20 && free <= 8 * 2 ** 20, `free: ${free}`);
    h.hostToplevel('small', { closure: { paths: 2, sizeKiB: 256 } });
    assert.ok(h.hostStoreFree() < free - 512 * 1024, 'the closure uses the small store');
    assert.throws(() => h.hostToplevel('big', { closure: { paths: 3, sizeKiB: 4096, seed: 'big' } }), /No space left on device/);
  });

  it('the agent realises a store path from a signed file:// cache into the host store', async () => {
    const h = ownHost().install();
    const cache = join(h.dir, 'cache');
    const sk = join(h.dir, 'sk');
    nixStore(['--generate-binary-cache-key', 'snapback-test-1', sk, join(h.dir, 'pk')]);
    const pk = readFileSync(join(h.dir, 'pk'), 'utf8').trim();
    const x = h.toplevel('cached', { closure: { paths: 2, sizeKiB: 16 } });
    const closure = nixStore(['-qR', x]).split('\n').sort();
    nix(['copy', '--to', `file://${cache}?secret-key=${sk}`, x]);
    for (const p of closure) assert.ok(!h.hostHas(p));

    h.writeConfig({ nix: { substituters: [`file://${cache}`], trustedPublicKeys: [pk] } });
    await h.start();
    const a = await h.cli(['activate', x, '--timeout', '60']);
    assert.equal(a.code, 0, JSON.stringify(a.out));
    assert.equal(h.running(), x);
    for (const p of closure) assert.ok(h.hostHas(p), `${p} is valid in the host store`);
    const root = join(h.stateDir, 'gcroots', a.out.id);
    assert.ok(h.hostExists(root), 'the trial is held by a GC root, resolved in the host store');
    assert.deepEqual(h.hostRun('nix-store', ['-qR', x]).split('\n').sort(), closure);
    assert.equal((await h.cli(['confirm'])).code, 0);
    assert.equal(h.bootDefault(), x);
  });

  it('closure toplevels: N+1 paths of incompressible bytes, the same for a seed in any store', () => {
    const h = ownHost();
    const a = h.toplevel('c', { closure: { paths: 3, sizeKiB: 64, seed: 'a' } });
    const deps = nixStore(['-qR', a]).split('\n').filter((p) => p !== a);
    assert.equal(deps.length, 3);
    assert.deepEqual(readFileSync(join(a, 'share', 'closure'), 'utf8').trim().split('\n').sort(), deps.sort());
    for (const d of deps) {
      assert.equal(statSync(d).size, 64 * 1024);
      assert.ok(gzipSync(readFileSync(d)).length > 64 * 1024, 'incompressible');
    }
    assert.notDeepEqual(readFileSync(deps[0]!), readFileSync(deps[1]!));

    const b = h.toplevel('c', { closure: { paths: 3, sizeKiB: 64, seed: 'b' } });
    const depsB = nixStore(['-qR', b]).split('\n').filter((p) => p !== b);
    assert.equal(depsB.filter((p) => deps.includes(p)).length, 0, 'another seed, other paths');

    // Deterministic: the host builds the same paths with the same contents.
    const onHost = h.hostToplevel('c', { closure: { paths: 3, sizeKiB: 64, seed: 'a' } });
    assert.equal(onHost, a);
    for (const d of deps) assert.equal(h.hostRun('nix-store', ['-q', '--hash', d]), nixStore(['-q', '--hash', d]));
    assert.equal(h.hostRun('nix-store', ['-qR', a]).split('\n').length, 4);
  });

  it('without ownStore the host* helpers act on the real store', () => {
    const h = new ScratchHost('plain');
    hosts.push(h);
    assert.equal(h.holderPid, undefined);
    const x = h.hostToplevel('x');
    assert.ok(operatorHas(x) && h.hostHas(x));
    assert.ok(h.hostStoreFree() > 0);
  });

  for (const opts of [{}, { sizeMiB: 8 }]) {
    it(`cleanup ends the holder by PID and removes the dir (${JSON.stringify(opts)})`, async () => {
      const h = ownHost(opts).install();
      await h.start();
      const pid = h.holderPid!;
      const agentPid = h.agent!.pid!;
      assert.ok(existsSync(`/proc/${pid}`));
      await h.cleanup();
      assert.ok(!existsSync(`/proc/${pid}`), 'the holder is gone');
      assert.ok(!existsSync(`/proc/${agentPid}`), 'the agent is gone');
      assert.ok(!existsSync(h.dir));
      assert.equal(h.holderPid, undefined);
    });
  }
});
