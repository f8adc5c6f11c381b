// nix-store --export failing on the operator's side half-way (a path collected meanwhile): the
// deploy ends with a clear error instead of waiting for bytes that never come. A `nix-store` shim in
// the controller's PATH cuts the export stream short and fails, naming the path.

import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { describe, it } from 'node:test';
import { ScratchHost, haveOwnStore, cleanupsAfterAll } from './helpers/host.ts';
import { haveNix } from './helpers/nix.ts';

const skip = haveNix() ?? haveOwnStore();
const cleanups = cleanupsAfterAll();

describe('nix-store --export failing on the operator side', { skip }, () => {
  it('the deploy ends with a clear error instead of hanging', async () => {
    const h = new ScratchHost('rv-dump').ownStore().enableWire().install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const x = h.toplevel('x', { closure: { paths: 3, sizeKiB: 64, seed: `rv-dump-${process.pid}` } });
    const shim = join(h.dir, 'shim');
    mkdirSync(shim);
    // The export stops inside the second dependency, as if that path had been garbage-collected here.
    writeFileSync(
      join(shim, 'nix-store'),
      `#!/bin/sh\ncase "$*" in *--export*) /usr/bin/nix-store "$@" | head -c 100000; echo "error: path '$(echo "$*" | tr ' ' '\\n' | grep closure-dep-1)' is not valid (simulated GC)" >&2; exit 1;; esac\nexec /usr/bin/nix-store "$@"\n`,
    );
    chmodSync(join(shim, 'nix-store'), 0o755);
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 });
    let child: ChildProcess | undefined;
    const run = h.snapback(['deploy', 'web1', '--fleet', fleet], { env: { PATH: `${shim}:${process.env.PATH}` }, onSpawn: (c) => (child = c) });
    const timedOut = Symbol('timeout');
    const r = await Promise.race([run, new Promise<typeof timedOut>((res) => setTimeout(() => res(timedOut), 30_000).unref())]);
    if (r === timedOut) {
      child?.kill('SIGKILL');
      await run;
      assert.fail('snapback deploy was still waiting 30 s after nix-store --export failed (the agent waits for bytes that never come)');
    }
    assert.notEqual(r.code, 0, r.stdout + r.stderr);
    assert.match(r.result.hosts[0].message, /nix-store --export on this machine failed .*closure-dep-1/);
    assert.deepEqual(h.switchCalls(), []);
  });
});

describe('nix-store --export killed by a signal on the operator side', { skip }, () => {
  for (const when of ['half-way', 'after its whole stream'] as const) {
    it(`${when}: the deploy fails saying it was killed, and by which signal`, async () => {
      const h = new ScratchHost(`rv-dump-sig-${when.length}`).ownStore().enableWire().install();
      cleanups.push(() => h.cleanup());
      await h.start();
      const x = h.toplevel('x', { closure: { paths: 3, sizeKiB: 64, seed: `rv-dump-sig-${when.length}-${process.pid}` } });
      const shim = join(h.dir, 'shim');
      mkdirSync(shim);
      const cut = when === 'half-way' ? ' | head -c 100000' : '';
      writeFileSync(join(shim, 'nix-store'), `#!/bin/sh\ncase "$*" in *--export*) /usr/bin/nix-store "$@"${cut}; kill -9 $$;; esac\nexec /usr/bin/nix-store "$@"\n`);
      chmodSync(join(shim, 'nix-store'), 0o755);
      const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 });
      const r = await h.snapback(['deploy', 'web1', '--fleet', fleet], { env: { PATH: `${shim}:${process.env.PATH}` } });
      assert.notEqual(r.code, 0, r.stdout + r.stderr);
      assert.match(r.result.hosts[0].message, /nix-store --export on this machine was killed \(SIGKILL\)/, r.result.hosts[0].message);
      assert.deepEqual(h.switchCalls(), []);
    });
  }
});
