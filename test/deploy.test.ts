// `snapback deploy` and the other controller commands, end to end on loopback: the real controller
// CLI, a real agent process, real Nix, keys from ssh-keygen, a real ssh-agent.

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { haveNix, writeFlake } from './helpers/nix.ts';
import { ScratchHost, cleanupsAfterAll } from './helpers/host.ts';
import { Proxy } from './helpers/proxy.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

async function wireHost(extra: Record<string, unknown> = {}): Promise<ScratchHost> {
  const h = new ScratchHost('deploy').enableWire(extra).install();
  cleanups.push(() => h.cleanup());
  await h.start();
  return h;
}

/** An HTTP "service" on loopback that answers 200 while `file` exists, else 503. */
async function service(file: string): Promise<string> {
  const server = createServer((_req, res) => res.writeHead(existsSync(file) ? 200 : 503).end());
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  cleanups.push(() => new Promise((r) => server.close(r)));
  return `http://127.0.0.1:${(server.address() as { port: number }).port}/health`;
}

describe('snapback deploy', { skip }, () => {
  it('happy path: activate, fresh connection, probes, confirm — exit 0, and the history names the key', async () => {
    const h = await wireHost();
    const x = h.toplevel('x');
    const up = join(h.dir, 'up');
    writeFileSync(up, '');
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30, probes: [{ tcp: `127.0.0.1:${await h.port()}` }, { http: await service(up) }, { command: ['true'] }] });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(r.result.exit, 0);
    assert.equal(r.result.hosts[0].status, 'confirmed');
    const kinds = r.events.map((e) => e.event);
    for (const k of ['connected', 'trial', 'reconnected', 'probe', 'confirming', 'done']) assert.ok(kinds.includes(k), `event ${k} in ${kinds}`);
    assert.ok(kinds.indexOf('reconnected') > kinds.indexOf('trial'), 'the confirm travels a connection opened after the trial started');
    assert.deepEqual(h.generations(), [1, 2]);
    assert.equal(h.bootDefault(), x);
    const committed = h.history().at(-1);
    assert.equal(committed.by.channel, 'controller');
    assert.match(committed.by.who, /^SHA256:\S+ \(op@test\)$/);
  });

  it('--dry-run: the host builds and runs dry-activate only; its output reaches the operator', async () => {
    const h = await wireHost();
    const x = h.toplevel('x');
    const fleet = await h.fleet({ target: { storePath: x } });
    const r = await h.snapback(['deploy', 'web1', '--dry-run', '--fleet', fleet]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(r.result.hosts[0].status, 'dry-run');
    assert.ok(r.events.some((e) => e.event === 'line' && /would restart the following units/.test(e.line)));
    assert.deepEqual(h.switchCalls(), [[x, 'dry-activate']]);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.history(), []);
  });

  it('a failed probe rolls back, names the probe, exit 1', async () => {
    const h = await wireHost();
    const x = h.toplevel('x');
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30, probes: [{ name: 'vpn', command: 'exit 3', timeoutSec: 2 }] });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 1);
    const host = r.result.hosts[0];
    assert.equal(host.status, 'reverted');
    assert.deepEqual(host.outcome, { outcome: 'reverted', reason: 'requested' });
    assert.match(host.message, /probe vpn failed: exited 3/);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
    const text = await h.snapback(['deploy', 'web1', '--fleet', fleet], { json: false });
    assert.match(text.stdout, /web1: probe vpn: FAILED/);
    assert.match(text.stdout, /web1: reverted: requested — probe vpn failed/);
  });

  it('the controller killed after activation: the host reverts at the deadline', async () => {
    const h = await wireHost();
    const x = h.toplevel('x');
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 3, probes: [{ command: 'sleep 600' }] });
    let child: import('node:child_process').ChildProcess | undefined;
    const run = h.snapback(['deploy', 'web1', '--fleet', fleet], { onSpawn: (c) => (child = c) });
    const trial = await h.waitLog((l) => l.msg.startsWith('trial of'));
    child!.kill('SIGKILL');
    await run;
    const end = await h.waitLog((l) => /reverted: timeout/.test(l.msg));
    assert.ok(end);
    assert.ok(trial);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
  });

  it('no fresh connection inside the window: waits past the deadline, then reports the revert (exit 1)', async () => {
    const h = await wireHost();
    const proxy = await new Proxy(await h.port()).listen();
    cleanups.push(() => proxy.close());
    // Like a bad firewall: the established connection lives on, every new one is dropped.
    const x = h.toplevel('x');
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${proxy.port}`, target: { storePath: x }, confirmTimeoutSec: 3 });
    const run = h.snapback(['deploy', 'web1', '--fleet', fleet]);
    await h.waitLog((l) => l.msg.startsWith('trial of'));
    proxy.mode = 'refuse';
    await h.waitLog((l) => /reverted: timeout/.test(l.msg));
    proxy.mode = 'pass';
    const r = await run;
    assert.equal(r.code, 1, r.stdout);
    assert.equal(r.result.hosts[0].status, 'reverted');
    assert.deepEqual(r.result.hosts[0].outcome, { outcome: 'reverted', reason: 'timeout' });
    assert.ok(r.events.some((e) => e.event === 'waiting'));
  });

  it('when the host never answers again, the outcome is unknown (exit 4)', async () => {
    const h = await wireHost();
    const proxy = await new Proxy(await h.port()).listen();
    cleanups.push(() => proxy.close());
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${proxy.port}`, target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 2 }, { defaults: { outcomeGraceSec: 2 } });
    const run = h.snapback(['deploy', 'web1', '--fleet', fleet]);
    await h.waitLog((l) => l.msg.startsWith('trial of'));
    proxy.mode = 'blackhole';
    const r = await run;
    assert.equal(r.code, 4, r.stdout);
    assert.equal(r.result.hosts[0].status, 'unknown');
  });

  it('an unknown controller key is refused before anything changes (exit 3)', async () => {
    const h = await wireHost();
    const stranger = h.operatorKey('stranger');
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') } }, { identity: { sshKey: stranger } });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 3, r.stdout);
    assert.match(r.result.hosts[0].message, /not authorized/);
    assert.equal(h.switchCalls().length, 0);
    assert.deepEqual(h.history(), []);
  });

  it('a wrong host key stops the controller before activate (exit 3)', async () => {
    const h = await wireHost();
    h.operatorKey('impostor');
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, hostKey: h.publicKey('impostor') });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 3, r.stdout);
    assert.match(r.result.hosts[0].message, /does not match the expected host key/);
    assert.equal(h.switchCalls().length, 0);
    assert.deepEqual(h.history(), []);
  });

  it('finds the host key in ~/.ssh/known_hosts (hashed entries too) when the fleet file has none', async () => {
    const h = await wireHost();
    const home = join(h.dir, 'home');
    execFileSync('mkdir', ['-p', join(home, '.ssh')]);
    const kh = join(home, '.ssh', 'known_hosts');
    writeFileSync(kh, `127.0.0.1 ${h.hostPublicKey}\n`);
    execFileSync('ssh-keygen', ['-H', '-f', kh], { stdio: 'ignore' });
    assert.match(readFileSync(kh, 'utf8'), /^\|1\|/);
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, hostKey: undefined, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet], { env: { HOME: home } });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const none = await h.snapback(['deploy', 'web1', '--fleet', fleet], { env: { HOME: join(h.dir, 'nohome') } });
    assert.equal(none.code, 2);
    assert.match(none.result.message, /no hostKey in the fleet file/);
  });

  it('signs through ssh-agent without an identity; an encrypted key needs the agent', async (t) => {
    const h = await wireHost();
    const locked = h.operatorKey('locked', 'correct horse');
    h.writeConfig({ authorizedKeys: [h.publicKey('locked')] });
    await h.stop();
    await h.start();
    const sock = join(h.dir, 'agent.sock');
    const agent = spawn('ssh-agent', ['-D', '-a', sock], { stdio: 'ignore' });
    t.after(() => agent.kill());
    await new Promise<void>((resolve) => {
      const tick = () => (existsSync(sock) ? resolve() : setTimeout(tick, 20));
      tick();
    });
    // Encrypted key, no agent: a clear error, exit 2, nothing changed.
    const withKey = await h.fleet({ target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 30 }, { identity: { sshKey: locked } });
    const noAgent = await h.snapback(['deploy', 'web1', '--fleet', withKey]);
    assert.equal(noAgent.code, 2);
    assert.match(noAgent.result.message, /encrypted.*ssh-add/);
    // Load it into ssh-agent (SSH_ASKPASS answers the passphrase).
    const askpass = join(h.dir, 'askpass.sh');
    writeFileSync(askpass, "#!/bin/sh\necho 'correct horse'\n", { mode: 0o700 });
    execFileSync('ssh-add', [locked], { env: { ...process.env, SSH_AUTH_SOCK: sock, SSH_ASKPASS: askpass, SSH_ASKPASS_REQUIRE: 'force', DISPLAY: ':0' }, stdio: 'ignore' });
    const viaFile = await h.snapback(['deploy', 'web1', '--fleet', withKey], { env: { SSH_AUTH_SOCK: sock } });
    assert.equal(viaFile.code, 0, viaFile.stdout);
    // No identity at all: every key in ssh-agent is tried.
    const noIdentity = await h.fleet({ target: { storePath: h.toplevel('y') }, confirmTimeoutSec: 30 }, { identity: undefined });
    const viaAgent = await h.snapback(['deploy', 'web1', '--fleet', noIdentity], { env: { SSH_AUTH_SOCK: sock } });
    assert.equal(viaAgent.code, 0, viaAgent.stdout);
    assert.deepEqual(h.generations(), [1, 2, 3]);
  });

  it('wss:// with a pinned self-signed certificate; a wrong pin stops before anything changes', async () => {
    const h = new ScratchHost('tls').enableWire().install();
    cleanups.push(() => h.cleanup());
    const cert = join(h.dir, 'cert.pem');
    const key = join(h.dir, 'key.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2', '-subj', '/CN=web1', '-keyout', key, '-out', cert], { stdio: 'ignore' });
    const fp = execFileSync('openssl', ['x509', '-in', cert, '-noout', '-fingerprint', '-sha256'], { encoding: 'utf8' }).trim().split('=')[1]!;
    h.writeConfig({ listen: { host: '127.0.0.1', port: 0, tls: { cert, key } } });
    await h.start();
    const port = await h.port();
    const x = h.toplevel('x');
    const wrong = await h.fleet({ url: `wss://127.0.0.1:${port}`, tlsFingerprint: 'AB'.repeat(32), target: { storePath: x } });
    const bad = await h.snapback(['deploy', 'web1', '--fleet', wrong]);
    assert.equal(bad.code, 3, bad.stdout);
    assert.match(bad.result.hosts[0].message, /tlsFingerprint/);
    assert.equal(h.switchCalls().length, 0);
    const good = await h.fleet({ url: `wss://127.0.0.1:${port}`, tlsFingerprint: fp, target: { storePath: x }, confirmTimeoutSec: 30 });
    const ok = await h.snapback(['deploy', 'web1', '--fleet', good]);
    assert.equal(ok.code, 0, ok.stdout);
  });

  it('--flake REF is built here by default; --build-on host lets the host build a reference it can resolve', async () => {
    const h = await wireHost();
    const ref = writeFlake(join(h.dir, 'flake'), 'web1', h.calls, h.current);
    const fleet = await h.fleet({ confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet, '--flake', ref]);
    assert.equal(r.code, 0, r.stdout);
    assert.ok(r.events.some((e) => e.event === 'building' && e.installable === `${ref}#nixosConfigurations.web1.config.system.build.toplevel`));
    assert.match(h.running(), /nixos-system-web1-flake$/);

    // The host's own flake registry names the flake: a reference the host resolves, not this machine.
    const registry = join(h.dir, 'registry.json');
    writeFileSync(registry, JSON.stringify({ version: 2, flakes: [{ from: { type: 'indirect', id: 'snapback-infra' }, to: { type: 'path', path: join(h.dir, 'flake') } }] }));
    await h.kill9();
    await h.start({ env: { NIX_CONFIG: `${process.env.NIX_CONFIG ?? ''}\nflake-registry = ${registry}\n` } });
    const hosted = await h.snapback(['deploy', 'web1', '--fleet', await h.fleet({ confirmTimeoutSec: 30 }), '--flake', 'snapback-infra', '--build-on', 'host']);
    assert.equal(hosted.code, 0, hosted.stdout + hosted.stderr);
    assert.ok(!hosted.events.some((e) => e.event === 'building'), 'nothing built here');
    assert.ok(!hosted.events.some((e) => e.event === 'push'), 'nothing pushed');
    assert.ok(h.history().some((e) => e.target === 'flake snapback-infra#web1'), 'the host was asked to build the flake');
  });

  it('--flake REF without a fleet file: the fleet comes from the flake\'s snapback output', async () => {
    const h = await wireHost();
    const dir = join(h.dir, 'infra');
    const ref = writeFlake(dir, 'web1', h.calls, h.current);
    writeFileSync(join(dir, 'fleet.json'), readFileSync(await h.fleet({ confirmTimeoutSec: 30 }), 'utf8'));
    writeFileSync(
      join(dir, 'flake.nix'),
      `{
  outputs = { self }: {
    nixosConfigurations.web1.config.system.build.toplevel = import ./toplevel.nix;
    snapback = builtins.fromJSON (builtins.readFile ./fleet.json);
  };
}
`,
    );
    const elsewhere = join(h.dir, 'elsewhere');
    execFileSync('mkdir', ['-p', elsewhere]);
    const r = await h.snapback(['deploy', 'web1', '--flake', ref], { cwd: elsewhere });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(h.running(), /nixos-system-web1-flake$/);
    const none = await h.snapback(['status'], { cwd: elsewhere });
    assert.equal(none.code, 2, 'without --flake, a missing snapback.json is a usage error');
  });

  it('status, confirm, rollback and history from the controller; console and controller share the history', async () => {
    const h = await wireHost();
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') } });
    const idle = await h.snapback(['status', '--fleet', fleet]);
    assert.equal(idle.code, 0);
    assert.equal(idle.result.hosts[0].status.phase, 'idle');
    const none = await h.snapback(['confirm', 'web1', '--fleet', fleet]);
    assert.equal(none.code, 1);
    assert.equal(none.result.code, 'no-trial');

    await h.cli(['activate', h.toplevel('y'), '--timeout', '60']);
    const st = await h.snapback(['status', 'web1', '--fleet', fleet], { json: false });
    assert.match(st.stdout, /web1: trial of \S+, reverting in (\d+m)?\d+s/);
    const c = await h.snapback(['confirm', 'web1', '--fleet', fleet]);
    assert.equal(c.code, 0, c.stdout);
    assert.deepEqual(c.result.outcome, { outcome: 'confirmed' });

    await h.cli(['activate', h.toplevel('z'), '--timeout', '60']);
    const rb = await h.snapback(['rollback', 'web1', '--fleet', fleet]);
    assert.equal(rb.code, 0, rb.stdout);
    assert.equal(rb.result.outcome.reason, 'requested');

    const hist = await h.snapback(['history', 'web1', '--fleet', fleet]);
    assert.equal(hist.result.type, 'result');
    assert.equal(hist.result.exit, 0);
    const entries = hist.result.entries;
    assert.ok(entries.some((e: any) => e.by.channel === 'console' && e.event === 'activate'));
    assert.ok(entries.some((e: any) => e.by.channel === 'controller' && e.event === 'committed'));
    assert.ok(entries.some((e: any) => e.by.channel === 'controller' && e.event === 'rollback'));
  });

  it('usage and fleet errors exit 2 with the field named', async () => {
    const h = await wireHost();
    const fleet = join(h.dir, 'bad.json');
    writeFileSync(fleet, JSON.stringify({ hosts: { web1: { url: 'http://x', probes: [{ tcp: 'nope' }], extra: 1 } } }));
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet], { json: false });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /hosts\.web1\.url: must be ws:\/\//);
    assert.match(r.stderr, /unknown key "extra"/);
    const good = await h.fleet({});
    const noTarget = await h.snapback(['deploy', 'web1', '--fleet', good], { json: false });
    assert.equal(noTarget.code, 2);
    assert.match(noTarget.stderr, /hosts\.web1\.target is missing/);
    const unknown = await h.snapback(['deploy', 'web9', '--fleet', good], { json: false });
    assert.equal(unknown.code, 2);
  });

  it('names every object has are no hosts: refused on the command line and as dependencies (exit 2)', async () => {
    const h = await wireHost();
    const good = await h.fleet({ target: { storePath: h.toplevel('x') } });
    for (const args of [['deploy', 'constructor'], ['status', 'toString'], ['confirm', 'constructor'], ['rollback', '__proto__'], ['history', 'hasOwnProperty']]) {
      const r = await h.snapback([...args, '--fleet', good], { json: false });
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stdout}${r.stderr}`);
      assert.match(r.stderr, new RegExp(`unknown host "${args[1]}" \\(the fleet file has: web1\\)`));
    }
    const fleet = JSON.parse(readFileSync(good, 'utf8'));
    fleet.hosts.web1.dependsOn = ['constructor'];
    writeFileSync(good, JSON.stringify(fleet));
    const dep = await h.snapback(['deploy', 'web1', '--fleet', good], { json: false });
    assert.equal(dep.code, 2);
    assert.match(dep.stderr, /hosts\.web1\.dependsOn: unknown host "constructor"/);
    assert.equal(h.switchCalls().length, 0);
  });

  it('a --timeout past MAX_SECONDS and a --flake beginning with "-" are usage errors (exit 2)', async () => {
    const h = await wireHost();
    const good = await h.fleet({ target: { storePath: h.toplevel('x') } });
    const long = await h.snapback(['deploy', 'web1', '--fleet', good, '--timeout', '3000000'], { json: false });
    assert.equal(long.code, 2);
    assert.match(long.stderr, /--timeout must be at most 604800/);
    // Without a fleet file the controller asks Nix for REF#snapback: `-I` there would be an option.
    const empty = mkdtempSync(join(tmpdir(), 'snapback-noflake-'));
    cleanups.push(() => rmSync(empty, { recursive: true, force: true }));
    const flake = await h.snapback(['deploy', 'web1', '--flake=-I'], { json: false, cwd: empty });
    assert.equal(flake.code, 2);
    assert.match(flake.stderr, /--flake must be a flake reference .* not "-I"/);
    assert.equal(h.switchCalls().length, 0);
  });
});
