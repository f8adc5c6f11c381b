// One local user holding idle sockets from many loopback addresses (all of 127.0.0.0/8 is local) fills
// listen.maxPending; the oldest connection of the source holding the most then makes room for a
// newcomer holding fewer, so an operator still deploys.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { connect } from 'node:net';
import { ScratchHost, waitFor, cleanupsAfterAll } from './helpers/host.ts';
import { haveNix } from './helpers/nix.ts';

const skip = haveNix();
const cleanups = cleanupsAfterAll();

describe('one local user against maxPending', { skip }, () => {
  it('idle sockets from 127.0.0.10..17 do not keep a controller on 127.0.0.1 from deploying', async () => {
    const h = new ScratchHost('rv-lo').enableWire().install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const port = await h.port();
    let flooding = true;
    const open = new Set<{ destroy(): void }>();
    const hold = (localAddress: string): void => {
      if (!flooding) return;
      const s = connect({ port, host: '127.0.0.1', localAddress });
      open.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        open.delete(s);
        setTimeout(() => hold(localAddress), 5);
      });
    };
    cleanups.push(() => {
      flooding = false;
      for (const s of open) s.destroy();
    });
    for (let a = 10; a < 18; a++) for (let i = 0; i < 8; i++) hold(`127.0.0.${a}`);
    await waitFor(() => open.size === 64 && [...open].every((s) => !(s as any).connecting));
    await new Promise((r) => setTimeout(r, 300));

    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    await h.waitLog((l) => /listen\.maxPending\)/.test(l.msg)).catch(() => {});
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.deepEqual(h.generations(), [1, 2]);
  });
});
