// The controller's output: live lines on a terminal, plain lines otherwise, JSON for scripts.

import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { describe, it } from 'node:test';
import { renderer } from '../controller/render.ts';
import type { DeployEvent, HostResult } from '../controller/deploy.ts';

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

  it('json: a host\'s control characters stay escaped (DEL, C1 and bidi too)', () => {
    const { stream, text } = sink();
    renderer('json', stream).event({ type: 'line', host: 'web1', id: 'd1', line: '\x1b]52;c;eA==\x07 \x9b2J \u202e' });
    assert.doesNotMatch(text(), /[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]/);
    assert.equal(JSON.parse(text()).line, '\x1b]52;c;eA==\x07 \x9b2J \u202e');
  });
});

/**
 * The screen a stream of live output leaves: the renderer's own cursor movements (ESC [ n F, ESC [ 2K,
 * ESC [ J) are carried out; any other control character fails the test (a host's, got through).
 */
function screen(out: string): string[] {
  const lines: string[] = [''];
  let row = 0;
  for (let i = 0; i < out.length; ) {
    const m = /^\x1b\[(\d*)([FKJ])/.exec(out.slice(i, i + 12));
    if (m) {
      if (m[2] === 'F') row = Math.max(0, row - Number(m[1] || 1));
      if (m[2] === 'K') lines[row] = '';
      // (the renderer moves and erases at the start of a line only)
      if (m[2] === 'J') (lines.length = row + 1), (lines[row] = '');
      lines[row] ??= '';
      i += m[0].length;
      continue;
    }
    const c = out[i]!;
    if (c === '\n') {
      row++;
      lines[row] ??= '';
    } else {
      assert.doesNotMatch(c, /[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]/, `a control character reached the terminal: ${JSON.stringify(out.slice(i - 20, i + 20))}`);
      lines[row] += c;
    }
    i++;
  }
  return lines.filter((l, i) => l !== '' || i < lines.length - 1);
}

function live(hosts: string[] = [], rows?: number) {
  const { stream, text } = sink();
  if (rows) Object.assign(stream, { rows, columns: 160 });
  const r = renderer('live', stream, { hosts });
  return { r, screen: () => screen(text()), raw: text, send: (...es: DeployEvent[]) => es.forEach((e) => r.event(e)) };
}

describe('the live view', () => {
  it('every selected host has its row from the first frame', () => {
    const v = live(['web1', 'db1', 'cache']);
    assert.deepEqual(v.screen(), ['web1      connecting…', 'db1       connecting…', 'cache     connecting…']);
    v.send({ type: 'queued', host: 'cache', why: 'waiting for db1 (dependsOn)' });
    assert.match(v.screen()[2]!, /cache +waiting for db1 \(dependsOn\)/);
  });

  it('a failed activation: the host\'s last output stays under its line', () => {
    const v = live(['web1']);
    v.send(
      { type: 'phase', host: 'web1', id: 'd1', phase: 'activating', toplevel: '/nix/store/x' },
      { type: 'line', host: 'web1', id: 'd1', line: 'stopping the following units: demo.service' },
      { type: 'line', host: 'web1', id: 'd1', line: 'error: unit demo.service failed to start' },
      { type: 'line', host: 'web1', id: 'd1', line: 'warning: the following units failed: demo.service' },
      { type: 'done', host: 'web1', result: { host: 'web1', status: 'reverted', id: 'd1', outcome: { outcome: 'reverted', reason: 'activation-failed', detail: 'switch-to-configuration exited 2' }, message: 'reverted: activation-failed (switch-to-configuration exited 2)' } },
    );
    const s = v.screen().join('\n');
    assert.match(s, /web1 +reverted: activation-failed \(switch-to-configuration exited 2\)\n/);
    assert.match(s, /the host's last output:\n +\| stopping the following units: demo.service\n +\| error: unit demo.service failed to start\n +\| warning: the following units failed: demo.service/);
  });

  it('a dry run: the would-start/stop/restart lists stay', () => {
    const v = live(['web1']);
    v.send(
      { type: 'line', host: 'web1', id: 'd1', line: 'would stop the following units: old.service' },
      { type: 'line', host: 'web1', id: 'd1', line: 'would restart the following units: nginx.service' },
      { type: 'done', host: 'web1', result: { host: 'web1', status: 'dry-run', id: 'd1', message: 'dry-activate of /nix/store/x exited 0; nothing was changed' } },
    );
    assert.deepEqual(v.screen(), [
      'web1      dry-activate of /nix/store/x exited 0; nothing was changed',
      '            | would stop the following units: old.service',
      '            | would restart the following units: nginx.service',
    ]);
  });

  it('a timeout: why stays (no fresh connection, the last error)', () => {
    const v = live(['web1']);
    v.send(
      { type: 'trial', host: 'web1', id: 'd1', secondsLeft: 3, deadline: '' },
      { type: 'reconnecting', host: 'web1', attempt: 4, error: 'connect ECONNREFUSED 127.0.0.1:7731' },
      { type: 'waiting', host: 'web1', id: 'd1', seconds: 2, why: 'no fresh connection got through inside the confirm window; the host will revert on its own' },
      { type: 'done', host: 'web1', result: { host: 'web1', status: 'reverted', id: 'd1', outcome: { outcome: 'reverted', reason: 'timeout' }, message: 'reverted: timeout' } },
    );
    const s = v.screen().join('\n');
    assert.match(s, /web1 +reverted: timeout\n +no fresh connection got through inside the confirm window/);
    assert.match(s, /last connection attempt: connect ECONNREFUSED/);
    assert.doesNotMatch(s, /reverts in/);
  });

  it('the health gate\'s refusal stays', () => {
    const v = live(['web1']);
    v.send(
      { type: 'confirming', host: 'web1', id: 'd1' },
      { type: 'line', host: 'web1', id: 'd1', line: 'health gate: failed units: demo.service' },
      { type: 'rolling-back', host: 'web1', id: 'd1', why: 'the health gate refused' },
      { type: 'done', host: 'web1', result: { host: 'web1', status: 'reverted', id: 'd1', outcome: { outcome: 'reverted', reason: 'requested' }, message: 'reverted: requested — the health gate refused' } },
    );
    assert.match(v.screen().join('\n'), /health gate: failed units: demo.service/);
  });

  it('while probes run: which are pending, with each one\'s last error', () => {
    const v = live(['web1']);
    v.send(
      { type: 'trial', host: 'web1', id: 'd1', secondsLeft: 90, deadline: '' },
      { type: 'probing', host: 'web1', id: 'd1', names: ['tcp web1:22', 'health', 'vpn'] },
      { type: 'probe', host: 'web1', name: 'tcp web1:22', ok: true },
      { type: 'probe-attempt', host: 'web1', name: 'health', attempt: 3, error: 'http://web1/health answered 503, expected 200' },
    );
    const s = v.screen();
    assert.match(s[0]!, /web1 +\[reverts in 1m30s\] probe tcp web1:22: ok; 2 more running/);
    assert.match(s[1]!, /… health: http:\/\/web1\/health answered 503, expected 200$/);
    assert.match(s[2]!, /… vpn: running$/);
    v.send({ type: 'probe', host: 'web1', name: 'health', ok: false, detail: 'http://web1/health answered 503, expected 200' });
    assert.equal(v.screen().length, 2, `a finished probe leaves the list: ${v.screen().join('\n')}`);
  });

  it('a host\'s control characters never reach the terminal (live and plain)', () => {
    const evil = 'ok\x1b[2F\x1b[2Kforged: confirmed\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\r\x9b1;1H\u202e';
    const v = live(['web1']);
    v.send({ type: 'line', host: 'web1', id: 'd1', line: evil });
    v.send({ type: 'done', host: 'web1', result: { host: 'web1', status: 'failed', message: `activate refused (x): ${evil}\nsecond line` } });
    const s = v.screen();
    assert.match(s.join('\n'), /okforged: confirmed/);
    assert.doesNotMatch(v.raw(), /\x1b\]|\x07|\r|\x9b|\u202e/);
    const { stream, text } = sink();
    const plain = renderer('text', stream);
    plain.event({ type: 'line', host: 'web1', id: 'd1', line: evil });
    plain.result([{ host: 'web1', status: 'failed', message: evil }, confirmed], 1);
    assert.doesNotMatch(text(), /[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]/);
  });

  it('Ctrl-C: which hosts are in a trial, when each reverts, the commands', () => {
    const v = live(['web1', 'db1']);
    const deadline = new Date(Date.now() + 80_000).toISOString();
    v.send(
      { type: 'trial', host: 'web1', id: 'd1', secondsLeft: 80, deadline },
      { type: 'interrupted', host: 'web1', round: 1, exiting: false, state: 'trial', id: 'd1', secondsLeft: 80, deadline, confirm: 'snapback confirm web1 --fleet f.json', rollback: 'snapback rollback web1 --fleet f.json' },
      { type: 'interrupted', host: 'db1', round: 1, exiting: false, state: 'activating', confirm: 'snapback confirm db1 --fleet f.json', rollback: 'snapback rollback db1 --fleet f.json' },
    );
    const s = v.screen().join('\n');
    assert.match(s, /Interrupted \(Ctrl-C\)\. From now on this run confirms, rolls back and starts nothing/);
    assert.match(s, /Ctrl-C again to leave now/);
    assert.match(s, /web1 +in a trial \(deployment d1\): reverts on its own at \d\d:\d\d:\d\d, in 1m20s, unless confirmed — keep it: snapback confirm web1 --fleet f\.json {3}undo it now: snapback rollback web1 --fleet f\.json/);
    assert.match(s, /db1 +activating: .*snapback confirm db1 --fleet f\.json/);
    assert.match(s, /web1 +\[reverts in 1m(19|20)s\] in a trial, left to you/);
  });

  it('a block taller than the terminal keeps to its height', () => {
    const hosts = Array.from({ length: 30 }, (_, i) => `h${i}`);
    const v = live(hosts, 12);
    const s = v.screen();
    assert.equal(s.length, 10);
    assert.match(s.at(-1)!, /… and 21 more hosts/);
  });
});
