// The live view in a real terminal (tmux, 160×40): what the operator sees of a confirmed deploy, a
// failed activation, a dry run, a failing probe, a host printing escape sequences, and Ctrl-C
// during a trial. Real controller, real agent, real Nix.

import assert from 'node:assert/strict';
import { existsSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { haveNix } from './helpers/nix.ts';
import { CONTROLLER_BIN, ScratchHost, cleanupsAfterAll } from './helpers/host.ts';
import { Terminal, haveTmux } from './helpers/tmux.ts';

const skip = haveNix() ?? haveTmux();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

async function wireHost(): Promise<ScratchHost> {
  const h = new ScratchHost('live').enableWire().install();
  cleanups.push(() => h.cleanup());
  await h.start();
  return h;
}

/** `snapback ARGS` in a fresh 160×40 terminal. */
function terminal(args: string[], opts: { before?: string } = {}): Terminal {
  const t = new Terminal([process.execPath, CONTROLLER_BIN, ...args], { columns: 160, rows: 40, env: { SSH_AUTH_SOCK: '' }, ...opts });
  cleanups.push(() => t.close());
  return t;
}

/** An HTTP "service" on loopback that answers 200 while `file` exists, else 503. */
async function service(file: string): Promise<string> {
  const server = createServer((_req, res) => res.writeHead(existsSync(file) ? 200 : 503).end());
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  cleanups.push(() => new Promise((r) => server.close(r)));
  return `http://127.0.0.1:${(server.address() as { port: number }).port}/health`;
}

describe('the live view in a terminal', { skip }, () => {
  it('a confirmed deploy: the host line ends "confirmed", exit 0', async () => {
    const h = await wireHost();
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 30, probes: [{ tcp: `127.0.0.1:${await h.port()}` }] });
    const t = terminal(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(await t.waitExit(), 0, t.screen());
    assert.match(t.screen(), /^web1 +confirmed$/m);
    assert.doesNotMatch(t.screen(), /reverts in/);
  });

  it('a failed activation (switch exits 2): the switch\'s error lines stay on screen', async () => {
    const h = await wireHost();
    const bad = h.toplevel('bad', { beforeLink: 'echo "error: demo.service: failed to start (code 17)"; echo "see: journalctl -u demo.service"; exit 2' });
    const fleet = await h.fleet({ target: { storePath: bad }, confirmTimeoutSec: 30 });
    const t = terminal(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(await t.waitExit(), 1, t.screen());
    const s = t.screen();
    assert.match(s, /^web1 +reverted: activation-failed.*$/m);
    assert.match(s, /the host's last output:\n(.*\n)*? +\| error: demo\.service: failed to start \(code 17\)\n +\| see: journalctl -u demo\.service/);
    assert.equal(h.running(), h.gen1);
  });

  it('a dry run: the would-restart list stays on screen', async () => {
    const h = await wireHost();
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') } });
    const t = terminal(['deploy', 'web1', '--dry-run', '--fleet', fleet]);
    assert.equal(await t.waitExit(), 0, t.screen());
    assert.match(t.screen(), /^web1 +dry-activate of \S+ exited 0; nothing was changed\n +\| would restart the following units: demo\.service$/m);
  });

  it('a failing probe: named while it runs, with its last error; then in the report', async () => {
    const h = await wireHost();
    const down = await service(join(h.dir, 'never'));
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 60, probes: [{ name: 'health', http: down, expectStatus: 200, timeoutSec: 6 }] });
    const t = terminal(['deploy', 'web1', '--fleet', fleet]);
    await t.waitFor(/^ +… health: http:\S+ answered 503, expected 200$/m);
    assert.equal(await t.waitExit(), 1, t.screen());
    const s = t.screen();
    assert.match(s, /^web1 +reverted: requested — probe health failed: http:\S+ answered 503, expected 200/m);
    assert.doesNotMatch(s, /… health/, 'a finished probe leaves the running list');
    assert.equal(h.running(), h.gen1);
  });

  it('a host that prints escape sequences cannot clear the screen, move the cursor, retitle or set the clipboard', async () => {
    const h = await wireHost();
    // Clear the screen, home the cursor and forge a line; OSC 52 (clipboard), OSC 2 (title), 8-bit CSI, CR, BEL.
    const evil = h.toplevel('evil', {
      beforeLink: String.raw`printf '\033[2J\033[Hweb1      confirmed FORGED\n'; printf '\033]52;c;cm0gLXJmIH4=\007\033]2;pwned\033\\\r\007\302\2331;1HX\n'`,
    });
    const fleet = await h.fleet({ target: { storePath: evil }, confirmTimeoutSec: 30, probes: [{ tcp: `127.0.0.1:${await h.port()}` }] });
    const t = terminal(['deploy', 'web1', '--fleet', fleet], { before: 'echo MARKER-BEFORE-THE-DEPLOY; sleep 0.3' });
    t.option('set-clipboard', 'on', true);
    const title = t.format('#{pane_title}');
    assert.equal(await t.waitExit(), 0, t.screen());
    const s = t.screen();
    assert.match(s, /^MARKER-BEFORE-THE-DEPLOY$/m, `the screen was cleared:\n${s}`);
    assert.equal(t.buffers(), '', 'OSC 52 reached the terminal: a paste buffer was set');
    assert.equal(t.format('#{pane_title}'), title, 'the host retitled the terminal');
    assert.match(s, /^web1 +confirmed$/m);
    // Plain output (piped) and JSON: no raw control character either.
    const plain = await h.snapback(['deploy', 'web1', '--fleet', fleet], { json: false });
    assert.match(plain.stdout, /confirmed FORGED/);
    assert.doesNotMatch(plain.stdout, /[\x00-\x09\x0b-\x1f\x7f-\x9f]/);
    const json = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.doesNotMatch(json.stdout, /[\x00-\x09\x0b-\x1f\x7f-\x9f]/);
    assert.ok(json.events.some((e) => e.event === 'line' && e.line.includes('\x1b]52;')), 'JSON keeps the text, escaped');
  });

  it('Ctrl-C during a trial: which host, when it reverts, the commands; the trial runs on; a second Ctrl-C exits', async () => {
    const h = await wireHost();
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 120, probes: [{ name: 'slow', command: 'sleep 600' }] });
    const t = terminal(['deploy', 'web1', '--fleet', fleet]);
    await t.waitFor(/… slow: running/);
    t.keys('C-c');
    const s = await t.waitFor(/Ctrl-C again to leave now/);
    assert.match(s, /Interrupted \(Ctrl-C\)\. From now on this run confirms, rolls back and starts nothing/);
    const escaped = fleet.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
    assert.match(s, new RegExp(`web1 +in a trial \\(deployment \\S+\\): reverts on its own at \\d\\d:\\d\\d:\\d\\d, in \\dm\\d+s, unless confirmed — keep it: snapback confirm web1 --fleet ${escaped} +undo it now: snapback rollback web1 --fleet ${escaped}`));
    assert.match(s, /^web1 +\[reverts in \dm\d+s\] in a trial, left to you/m);
    // Nothing was confirmed or rolled back: the trial runs on, and the controller with it.
    const st = await h.cli(['status']);
    assert.equal(st.out.phase, 'trial', JSON.stringify(st.out));
    assert.equal(t.exitStatus(), undefined, 'the first Ctrl-C does not exit while a trial runs');
    t.keys('C-c');
    assert.equal(await t.waitExit(10_000), 130);
    assert.match(t.screen(), /Ctrl-C again: leaving now\. Nothing was confirmed or rolled back; these hosts keep their trials:\n +web1 +in a trial/);
    const after = await h.cli(['status']);
    assert.equal(after.out.phase, 'trial', 'the host keeps its trial after the controller left');
    assert.deepEqual(h.generations(), [1]);
  });
});
