// An on-path attacker who swaps the host key in the challenge of the reconnect, after the activation:
// the host is in a trial, so that is never "nothing changed, exit 3". The controller says it loudly,
// tries again, and reports what the host itself says.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ScratchHost, cleanupsAfterAll } from './helpers/host.ts';
import { haveNix } from './helpers/nix.ts';
import { Relay } from './helpers/relay.ts';

const skip = haveNix();
const cleanups = cleanupsAfterAll();

describe('a host key swapped on the reconnect', { skip }, () => {
  it('a forged challenge on the reconnect never turns a running trial into exit 3 "before any change"', async () => {
    const h = new ScratchHost('rv-hk').enableWire().install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const port = await h.port();
    const other = (h.operatorKey('not-the-host'), h.publicKey('not-the-host')).split(' ').slice(0, 2).join(' ');
    let challenges = 0;
    const mitm = new Relay(port, {
      // Only the second connection (the first fresh one after activation) is tampered with.
      fromAgent: (m) => (m.type === 'challenge' && ++challenges === 2 ? { ...m, hostKey: other } : m),
    });
    cleanups.push(() => mitm.close());
    await mitm.listen();
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${mitm.port}`, target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 15 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.ok(challenges >= 2, 'the reconnect happened');
    // The host was activated: whatever the attacker did, the run must not claim "nothing changed".
    assert.notEqual(r.code, 3, `exit 3 claims nothing changed, but the host ran a trial:\n${r.stdout}${r.stderr}`);
    assert.ok(r.result?.hosts?.[0], `a per-host result is reported:\n${r.stdout}${r.stderr}`);
    // The next attempt reached the real host, which confirmed; the swap was reported on the way.
    assert.equal(r.result.hosts[0].status, 'confirmed', JSON.stringify(r.result));
    assert.ok(r.events.some((e) => e.event === 'reconnecting' && /someone in the middle\?/.test(e.error)), 'the swap is said out loud');
    assert.deepEqual(h.generations(), [1, 2]);
  });
});
