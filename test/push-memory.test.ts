// A pushed path enters the host's store streamed: Nix 2.8's `nix-store --import` would hold a whole
// NAR in memory (a large path on a small host is an OOM kill), so the agent has Nix substitute it
// from the push's own file:// cache instead. Every Nix process the agent starts during the push
// runs under /usr/bin/time (a `nix-store` shim in its PATH), and none may take ~the NAR's size.

import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ScratchHost, haveOwnStore, cleanupsAfterAll } from './helpers/host.ts';
import { haveNix } from './helpers/nix.ts';

const skip = haveNix() ?? haveOwnStore() ?? (existsSync('/usr/bin/time') ? undefined : 'no /usr/bin/time');
const cleanups = cleanupsAfterAll();

describe('memory of the import on the host', { skip }, () => {
  it('importing a 96 MiB path does not take ~96 MiB of the host\'s memory', async () => {
    const h = new ScratchHost('push-mem').ownStore().enableWire().install();
    cleanups.push(() => h.cleanup());
    const shim = join(h.dir, 'shim');
    mkdirSync(shim);
    const rss = join(h.dir, 'import-rss');
    writeFileSync(
      join(shim, 'nix-store'),
      `#!/bin/sh\nexec /usr/bin/time -f %M -a -o ${rss} /usr/bin/nix-store "$@"\n`,
    );
    chmodSync(join(shim, 'nix-store'), 0o755);
    await h.start({ env: { PATH: `${shim}:${process.env.PATH}` } });
    const x = h.toplevel('x', { closure: { paths: 1, sizeKiB: 96 * 1024, seed: `push-mem-${process.pid}` } });
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const peakKiB = Math.max(...readFileSync(rss, 'utf8').split('\n').filter((l) => /^\d+$/.test(l)).map(Number));
    assert.ok(peakKiB < 48 * 1024, `a nix-store of the push peaked at ${(peakKiB / 1024).toFixed(0)} MiB RSS for one 96 MiB path`);
  });
});
