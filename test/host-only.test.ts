// One host without a fleet file: `snapback deploy HOST [TOPLEVEL] [--flake REF#NAME]` with the URL
// from the host name (or --url), the host key from ~/.ssh/known_hosts (or --host-key), the identity
// from ssh-agent or ~/.ssh/id_ed25519, and a TCP connect to the agent's port as the default probe.

import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { haveNix, writeFlake } from './helpers/nix.ts';
import { ScratchHost, cleanupsAfterAll } from './helpers/host.ts';
import { UsageError } from '../shared/cli.ts';
import { hostOnlyFleet, parseProbe } from '../shared/fleet.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

/**
 * A scratch host, a HOME whose ~/.ssh has the operator's key as id_ed25519 and (unless `knownHosts`
 * is false) `[127.0.0.1]:PORT` in known_hosts, and an empty working directory: no snapback.json.
 */
async function setup(opts: { knownHosts?: boolean; key?: boolean } = {}) {
  const h = new ScratchHost('hostonly').enableWire().install();
  cleanups.push(() => h.cleanup());
  await h.start();
  const port = await h.port();
  const home = mkdtempSync(join(h.dir, 'home-'));
  mkdirSync(join(home, '.ssh'), { mode: 0o700 });
  if (opts.key !== false) copyFileSync(join(h.dir, 'op'), join(home, '.ssh', 'id_ed25519'));
  if (opts.knownHosts !== false) writeFileSync(join(home, '.ssh', 'known_hosts'), `[127.0.0.1]:${port} ${h.hostPublicKey}\n`);
  const cwd = mkdtempSync(join(h.dir, 'work-'));
  const url = `ws://127.0.0.1:${port}`;
  const run = (args: string[], o: { json?: boolean } = {}) => h.snapback(args, { cwd, env: { HOME: home }, ...o });
  return { h, port, home, cwd, url, run };
}

describe('one host without a fleet file', { skip }, () => {
  it('deploy HOST ./result: key from known_hosts, identity ~/.ssh/id_ed25519, the agent port probed; status HOST too', async () => {
    const { h, cwd, url, run } = await setup();
    const x = h.toplevel('x');
    symlinkSync(x, join(cwd, 'result'));
    const r = await run(['deploy', '127.0.0.1', './result', '--url', url, '--timeout', '30']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(r.result.hosts[0].host, '127.0.0.1');
    assert.equal(r.result.hosts[0].status, 'confirmed');
    assert.deepEqual(r.events.find((e) => e.event === 'probing').names, ['agent']);
    assert.ok(r.events.some((e) => e.event === 'probe' && e.name === 'agent' && e.ok));
    assert.ok(r.events.some((e) => e.event === 'push'), 'the toplevel was pushed');
    assert.equal(h.bootDefault(), x);
    assert.match(h.history().at(-1).by.who, /\(op@test\)$/);
    const st = await run(['status', '127.0.0.1', '--url', url]);
    assert.equal(st.code, 0, st.stdout + st.stderr);
    assert.equal(st.result.hosts[0].status.phase, 'idle');
  });

  it('--flake REF#NAME names the configuration; --probe adds probes (JSON or short), and a failing one rolls back', async () => {
    const { h, port, cwd, url, run } = await setup();
    const ref = writeFlake(join(cwd, 'infra'), 'web1', h.calls, h.current);
    const r = await run(['deploy', '127.0.0.1', '--flake', `${ref}#web1`, '--url', url, '--timeout', '30', '--probe', `{"tcp":"127.0.0.1:${port}","name":"again"}`, '--probe', `tcp:127.0.0.1:${port}`]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.ok(r.events.some((e) => e.event === 'building' && e.installable === `${ref}#nixosConfigurations.web1.config.system.build.toplevel`));
    assert.deepEqual(r.events.find((e) => e.event === 'probing').names, ['agent', 'again', `tcp 127.0.0.1:${port}`]);
    assert.match(h.running(), /nixos-system-web1-flake$/);

    const bad = await run(['deploy', '127.0.0.1', '--flake', `${ref}#web1`, '--url', url, '--timeout', '30', '--probe', '{"name":"vpn","command":"exit 3","timeoutSec":2}']);
    assert.equal(bad.code, 1, bad.stdout + bad.stderr);
    assert.equal(bad.result.hosts[0].status, 'reverted');
    assert.match(bad.result.hosts[0].message, /probe vpn failed/);
    const typo = await run(['deploy', '127.0.0.1', '--flake', `${ref}#web1`, '--url', url, '--probe', 'web1.lan:22'], { json: false });
    assert.equal(typo.code, 2);
    assert.match(typo.stderr, /--probe #1: "web1.lan:22" is not a probe; give .*tcp:HOST:PORT/);
  });

  it('--flake REF without #NAME: the flake has no snapback output, so the configuration is the host name up to its first dot', async () => {
    const { h, cwd, url, run } = await setup();
    const ref = writeFlake(join(cwd, 'infra'), 'web1', h.calls, h.current);
    const r = await run(['deploy', 'web1.lan', '--flake', ref, '--url', url, '--timeout', '30']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.ok(r.events.some((e) => e.event === 'building' && e.installable === `${ref}#nixosConfigurations.web1.config.system.build.toplevel`));
    assert.match(h.running(), /nixos-system-web1-flake$/);
    // Without --url, ws://web1.lan:7731, whose key known_hosts does not have: evaluated, then refused by name.
    const far = await run(['status', 'web1.lan', '--flake', ref], { json: false });
    assert.equal(far.code, 2, far.stdout + far.stderr);
    assert.match(far.stderr, /no ssh-ed25519 key for web1\.lan or \[web1\.lan\]:7731/);
  });

  it('no known_hosts entry: a clear error naming ssh-keyscan, nothing changed; --host-key works without known_hosts', async () => {
    const { h, cwd, url, run } = await setup({ knownHosts: false });
    const x = h.toplevel('x');
    symlinkSync(x, join(cwd, 'result'));
    const none = await run(['deploy', '127.0.0.1', './result', '--url', url], { json: false });
    assert.equal(none.code, 2, none.stdout + none.stderr);
    assert.match(none.stderr, /known_hosts has no ssh-ed25519 key for 127\.0\.0\.1 or \[127\.0\.0\.1\]:\d+/);
    assert.match(none.stderr, /ssh-keyscan -t ed25519 127\.0\.0\.1/);
    assert.match(none.stderr, /--host-key/);
    assert.equal(h.switchCalls().length, 0);

    const r = await run(['deploy', '127.0.0.1', './result', '--url', url, '--host-key', h.hostPublicKey, '--timeout', '30']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(h.bootDefault(), x);
    h.operatorKey('impostor');
    const wrong = await run(['deploy', '127.0.0.1', './result', '--url', url, '--host-key', h.publicKey('impostor')]);
    assert.equal(wrong.code, 3, wrong.stdout + wrong.stderr);
    assert.match(wrong.result.hosts[0].message, /does not match the expected host key/);
  });

  it('--hold without a fleet file prints commands that find the host again (--url, --host-key)', async () => {
    const { h, cwd, url, run } = await setup({ knownHosts: false });
    symlinkSync(h.toplevel('x'), join(cwd, 'result'));
    const r = await run(['deploy', '127.0.0.1', './result', '--hold', '--url', url, '--host-key', h.hostPublicKey, '--timeout', '60']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const held = r.result.hosts[0];
    assert.equal(held.status, 'held');
    assert.equal(held.commands.confirm, `snapback confirm 127.0.0.1 --url ${url} --host-key '${h.hostPublicKey}'`);
    const c = await run(['confirm', '127.0.0.1', '--url', url, '--host-key', h.hostPublicKey]);
    assert.equal(c.code, 0, c.stdout + c.stderr);
    assert.deepEqual(c.result.outcome, { outcome: 'confirmed' });
  });

  it('no identity (no ssh-agent, no ~/.ssh/id_ed25519), host-only options beside a fleet file, a name without a host: exit 2', async () => {
    const { h, cwd, url, run } = await setup({ key: false });
    symlinkSync(h.toplevel('x'), join(cwd, 'result'));
    const noKey = await run(['deploy', '127.0.0.1', './result', '--url', url], { json: false });
    assert.equal(noKey.code, 2, noKey.stdout + noKey.stderr);
    assert.match(noKey.stderr, /no identity: no ssh-agent is running .*, and there is no \S+\/\.ssh\/id_ed25519/);
    const nothing = await run(['status'], { json: false });
    assert.equal(nothing.code, 2);
    assert.match(nothing.stderr, /no fleet file here/);
    writeFileSync(join(cwd, 'snapback.json'), JSON.stringify({ hosts: {} }));
    const beside = await run(['status', '127.0.0.1', '--url', url], { json: false });
    assert.equal(beside.code, 2);
    assert.match(beside.stderr, /--url: for a host without a fleet file; snapback\.json is the fleet file here/);
    assert.equal(h.switchCalls().length, 0);
  });
});

describe('hostOnlyFleet and parseProbe (the fleet made from the command line)', () => {
  it('ws://HOST:7731, the agent port probed, every fleet default; REF names HOST up to its first dot, REF#NAME as given', () => {
    const f = hostOnlyFleet(['web1.lan'], { flake: '.' });
    assert.deepEqual(f.hosts['web1.lan'], { url: 'ws://web1.lan:7731', target: { flake: '.#web1' }, probes: [{ name: 'agent', tcp: 'web1.lan:7731' }], tags: [], dependsOn: [] });
    assert.equal(f.defaults.probeTimeoutSec, 60);
    assert.equal(f.identity, undefined);
    assert.deepEqual(hostOnlyFleet(['web1.lan'], { flake: 'github:me/infra#www' }).hosts['web1.lan']!.target, { flake: 'github:me/infra#www' });
    const wss = hostOnlyFleet(['10.0.0.5'], { url: 'wss://10.0.0.5', hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x' }).hosts['10.0.0.5']!;
    assert.deepEqual(wss.probes, [{ name: 'agent', tcp: '10.0.0.5:443' }]);
    assert.equal(wss.target, undefined);
  });

  it('refuses what names no host or no configuration, with the option named', () => {
    assert.throws(() => hostOnlyFleet(['10.0.0.5'], { flake: '.' }), (e: Error) => e instanceof UsageError && /address, which names no configuration: give --flake \.#NAME/.test(e.message));
    assert.throws(() => hostOnlyFleet(['a', 'b'], { url: 'ws://a:1' }), /--url and --host-key describe one host, not 2/);
    assert.throws(() => hostOnlyFleet(['web1.lan:7732']), /is not a host name/);
    assert.throws(() => hostOnlyFleet(['web1'], { url: 'http://web1' }), /--url must be ws:\/\/HOST/);
    assert.throws(() => hostOnlyFleet(['web1'], { hostKey: 'web1 ssh-ed25519 AAAA' }), /--host-key: .*ssh-keyscan -t ed25519 HOST/);
  });

  it('--probe: the fleet file syntax as JSON, or tcp:, http(s)://, command:', () => {
    assert.deepEqual(parseProbe('{"tcp":"web1.lan:22","timeoutSec":5}'), { tcp: 'web1.lan:22', timeoutSec: 5 });
    assert.deepEqual(parseProbe('tcp:web1.lan:22'), { tcp: 'web1.lan:22' });
    assert.deepEqual(parseProbe('https://web1.lan/health'), { http: 'https://web1.lan/health', expectStatus: 200 });
    assert.deepEqual(parseProbe('command:ssh home true'), { command: 'ssh home true' });
    assert.throws(() => parseProbe('{"tcp":"nope"}'), /--probe: .*must be HOST:PORT/);
    assert.throws(() => parseProbe('{"tcp":'), /--probe: not valid JSON/);
    assert.throws(() => parseProbe('ping web1'), /"ping web1" is not a probe/);
  });
});
