// A closure of more than MAX_PUSH_PATHS (400) paths goes as several `push` batches of one transfer:
// a refusal in a later batch undoes the earlier batches too, roots and paths.

import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ScratchHost, haveOwnStore, cleanupsAfterAll } from './helpers/host.ts';
import { haveNix } from './helpers/nix.ts';
import { Relay } from './helpers/relay.ts';
import { manyPathsToplevel } from './helpers/closures.ts';

const skip = haveNix() ?? haveOwnStore();
const cleanups = cleanupsAfterAll();

describe('a push of several batches', { skip }, () => {
  it('a byte flipped in the second batch leaves nothing of the push in the host store', async () => {
    const h = new ScratchHost('rv-batches').ownStore().enableWire().install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const x = manyPathsToplevel(h, 'batches', 420);
    const before = h.hostPaths();
    let dones = 0;
    let flipped = false;
    const mitm = new Relay(await h.port(), {
      fromAgent: (m) => {
        if (m.type === 'push-done') dones++;
        return m;
      },
      fromControllerBinary: (data) => {
        if (dones >= 1 && !flipped) {
          flipped = true;
          const copy = Buffer.from(data);
          copy[copy.length >> 1]! ^= 0xff;
          return copy;
        }
        return data;
      },
    });
    cleanups.push(() => mitm.close());
    await mitm.listen();
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${mitm.port}`, target: { storePath: x }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.ok(flipped, 'the second batch was tampered with: ' + r.stdout + r.stderr);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.match(r.result.hosts[0].message, /bad-nar/);
    await h.waitLog((l) => l.msg === 'refusing a pushed closure');
    for (let i = 0; i < 50 && h.hostPaths().length !== before.length; i++) await new Promise((res) => setTimeout(res, 100));
    const roots = readdirSync(join(h.stateDir, 'gcroots')).filter((f) => f.startsWith('push-'));
    const left = h.hostPaths().filter((p) => !before.includes(p));
    assert.deepEqual({ roots: roots.length, left: left.length }, { roots: 0, left: 0 }, `${left.length} paths of the refused push stay in the host store, held by ${roots.length} push-* roots`);
  });
});
