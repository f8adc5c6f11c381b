// The controller's output: live lines on a terminal, plain lines otherwise, JSON for scripts.

import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { describe, it } from 'node:test';
import { renderer } from '../controller/render.ts';
import type { HostResult } from '../controller/deploy.ts';

function sink(): { stream: Writable; text: () => string } {
  let buf = '';
  const stream = new Writable({
    write(chunk, _enc, cb) {
      buf += chunk;
      cb();
    },
  });
  return { stream, text: () => buf };
}

const confirmed: HostResult = { host: 'web1', status: 'confirmed', id: 'd1', outcome: { outcome: 'confirmed' }, message: 'confirmed' };
const reverted: HostResult = { host: 'db1', status: 'reverted', id: 'd2', outcome: { outcome: 'reverted', reason: 'requested' }, message: 'reverted: requested — probe vpn failed: exited 1' };

describe('controller output', () => {
  it('live: one line per host, redrawn in place, with the countdown', () => {
    const { stream, text } = sink();
    const r = renderer('live', stream);
    r.event({ type: 'connected', host: 'web1', as: 'SHA256:x (op)' });
    r.event({ type: 'connected', host: 'db1', as: 'SHA256:x (op)' });
    r.event({ type: 'trial', host: 'web1', id: 'd1', secondsLeft: 90, deadline: '' });
    assert.match(text(), /web1 +\[reverts in 1m30s\] trial running/);
    r.event({ type: 'probe', host: 'db1', name: 'vpn', ok: false, detail: 'exited 1' });
    r.event({ type: 'done', host: 'web1', result: confirmed });
    r.event({ type: 'done', host: 'db1', result: reverted });
    r.result([confirmed, reverted], 1);
    const frames = text().split('\x1b[2F');
    const last = frames.at(-1)!;
    assert.match(last, /web1 +confirmed\n/);
    assert.match(last, /db1 +reverted: requested — probe vpn failed/);
    assert.doesNotMatch(last, /reverts in/, 'no countdown once a host is done');
    assert.match(text(), /exit 1\n$/);
  });

  it('text: plain lines prefixed with the host', () => {
    const { stream, text } = sink();
    const r = renderer('text', stream);
    r.event({ type: 'probe', host: 'web1', name: 'tcp web1:22', ok: true });
    r.event({ type: 'done', host: 'web1', result: confirmed });
    r.result([confirmed], 0);
    assert.equal(text(), 'web1: probe tcp web1:22: ok\nweb1: confirmed\n');
  });

  it('json: one object per event and a result', () => {
    const { stream, text } = sink();
    const r = renderer('json', stream);
    r.event({ type: 'reconnected', host: 'web1' });
    r.result([confirmed], 0);
    const lines = text().trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(lines[0], { type: 'event', event: 'reconnected', host: 'web1' });
    assert.equal(lines[1].type, 'result');
    assert.equal(lines[1].exit, 0);
  });
});
