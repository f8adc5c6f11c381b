// Controller errors that say what to do: an unauthorized key (the line to add and where), the public
// half given as the identity, something else or the wrong scheme on the agent's port, fleet-file typos.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { haveNix } from './helpers/nix.ts';
import { ScratchHost, cleanupsAfterAll } from './helpers/host.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

async function wireHost(extra: Record<string, unknown> = {}): Promise<ScratchHost> {
  const h = new ScratchHost('errors').enableWire(extra).install();
  cleanups.push(() => h.cleanup());
  await h.start();
  return h;
}

/** A TLS agent: a self-signed certificate, and its SHA-256 pin. */
function tls(h: ScratchHost): { cert: string; key: string; fp: string } {
  const cert = join(h.dir, 'cert.pem');
  const key = join(h.dir, 'key.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2', '-subj', '/CN=web1', '-keyout', key, '-out', cert], { stdio: 'ignore' });
  const fp = execFileSync('openssl', ['x509', '-in', cert, '-noout', '-fingerprint', '-sha256'], { encoding: 'utf8' }).trim().split('=')[1]!;
  return { cert, key, fp };
}

describe('controller errors say what to do', { skip }, () => {
  it('a key the agent does not know: the exact authorized_keys line, and where it goes (exit 3)', async () => {
    const h = await wireHost();
    const stranger = h.operatorKey('stranger');
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') } }, { identity: { sshKey: stranger } });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 3, r.stdout);
    const msg: string = r.result.hosts[0].message;
    assert.match(msg, /is not authorized on this host/);
    assert.ok(msg.includes(`services.snapback.authorizedKeys = [ "${h.publicKey('stranger')}" ]`), msg);
    assert.ok(msg.includes(`"authorizedKeys": [ ${JSON.stringify(h.publicKey('stranger'))} ] in /etc/snapback/agent.json`), msg);
    assert.deepEqual(h.switchCalls(), []);
    // status says the same
    const st = await h.snapback(['status', '--fleet', fleet], { json: false });
    assert.ok(st.stdout.includes(h.publicKey('stranger')), st.stdout);
  });

  it('identity.sshKey naming the .pub file: the public half, point at the private key (exit 2)', async () => {
    const h = await wireHost();
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') } }, { identity: { sshKey: join(h.dir, 'op.pub') } });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet], { json: false });
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.equal(r.stderr, `snapback: identity.sshKey ${join(h.dir, 'op.pub')} is the public half of a key pair: point it at the private key (${join(h.dir, 'op')}); the host lists the public key in authorizedKeys\n`);
    assert.deepEqual(h.switchCalls(), []);
  });

  it('an HTTP server on the port, not an agent: said plainly (exit 3)', async () => {
    const h = await wireHost();
    const server = createServer((_req, res) => res.writeHead(200).end('hello'));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    cleanups.push(() => new Promise((r) => server.close(r)));
    const port = (server.address() as { port: number }).port;
    const fleet = await h.fleet({ url: `ws://127.0.0.1:${port}`, target: { storePath: h.toplevel('x') } });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 3, r.stdout);
    assert.match(r.result.hosts[0].message, /something that is not a Snapback agent answers there \(an HTTP server: it answered the WebSocket upgrade with status 200\); check the host and port in the url/);
  });

  it('ws:// to an agent with TLS, and wss:// to one without: which scheme to use (exit 3)', async () => {
    const t = new ScratchHost('errors-tls').enableWire().install();
    cleanups.push(() => t.cleanup());
    const { cert, key, fp } = tls(t);
    t.writeConfig({ listen: { host: '127.0.0.1', port: 0, tls: { cert, key } } });
    await t.start();
    const tport = await t.port();
    const plain = await t.snapback(['deploy', 'web1', '--fleet', await t.fleet({ url: `ws://127.0.0.1:${tport}`, target: { storePath: t.toplevel('x') } })]);
    assert.equal(plain.code, 3, plain.stdout);
    assert.match(plain.result.hosts[0].message, new RegExp(`the server there speaks TLS \\(an agent with listen.tls\\): use wss://127.0.0.1:${tport}`));

    const h = await wireHost();
    const port = await h.port();
    const secure = await h.snapback(['deploy', 'web1', '--fleet', await h.fleet({ url: `wss://127.0.0.1:${port}`, tlsFingerprint: fp, target: { storePath: h.toplevel('x') } })]);
    assert.equal(secure.code, 3, secure.stdout);
    assert.match(secure.result.hosts[0].message, new RegExp(`the server there does not speak TLS: if it is the agent without listen.tls, use ws://127.0.0.1:${port}`));
    assert.deepEqual(h.switchCalls(), []);
    assert.deepEqual(t.switchCalls(), []);
  });

  it('fleet-file typos: the nearest key, the target forms, what a host key line is (exit 2)', async () => {
    const h = await wireHost();
    const file = join(h.dir, 'typos.json');
    writeFileSync(
      file,
      JSON.stringify({
        identiy: {},
        defaults: { confirmTimeoutSecs: 30 },
        hosts: {
          web1: { url: 'ws://127.0.0.1:7731', confirmTimeotSec: 30, target: { storepath: '/nix/store/x' }, probes: [{ tcp: '127.0.0.1:22', timeout: 3 }] },
          web2: { url: 'ws://127.0.0.1:7731', hostKey: 'AAAAC3NzaC1lZDI1NTE5AAAAIG', target: '/nix/store/0000000000000000000000000000000a-x' },
        },
      }),
    );
    const r = await h.snapback(['deploy', '--all', '--fleet', file], { json: false });
    assert.equal(r.code, 2);
    const want = [
      '(top level): unknown key "identiy" (did you mean identity?)',
      'defaults: unknown key "confirmTimeoutSecs" (did you mean confirmTimeoutSec?)',
      'hosts.web1: unknown key "confirmTimeotSec" (did you mean confirmTimeoutSec?)',
      'hosts.web1.probes.0: unknown key "timeout" (did you mean timeoutSec?)',
      'hosts.web1.target: must be one of { "storePath": "/nix/store/…" }, { "flake": "REF#HOST" } or { "generation": N } (did you mean storePath?)',
      'hosts.web2.target: must be one of { "storePath": "/nix/store/…" }, { "flake": "REF#HOST" } or { "generation": N } (a string is not enough: for a store path write { "storePath": "/nix/store/0000000000000000000000000000000a-x" })',
      'hosts.web2.hostKey: not an OpenSSH public key line: "AAAAC3NzaC1lZDI1NTE5AAAAIG"; a host key line looks like "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… root@web1": get it with "ssh-keyscan -t ed25519 HOST" and leave out the host name it begins with',
    ];
    for (const w of want) assert.ok(r.stderr.includes(w), `missing: ${w}\nin: ${r.stderr}`);
  });

  it('history --json of a host with no history: one result line with no entries', async () => {
    const h = await wireHost();
    const fleet = await h.fleet({});
    const r = await h.snapback(['history', 'web1', '--fleet', fleet]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.result, { type: 'result', exit: 0, ok: true, host: 'web1', entries: [] });
    const text = await h.snapback(['history', 'web1', '--fleet', fleet], { json: false });
    assert.equal(text.stdout, 'web1: no history yet\n');
  });
});

/** A flake whose toplevel fails to evaluate: Nix prints an `error:` line, then the trace. */
function brokenFlake(dir: string, host: string): string {
  execFileSync('mkdir', ['-p', dir]);
  writeFileSync(
    join(dir, 'flake.nix'),
    `{
  outputs = { self }: {
    nixosConfigurations.${host}.config.system.build.toplevel =
      let broken = x: x.services.missing.enable; in
      broken { services = { }; };
  };
}
`,
  );
  return `path:${dir}`;
}

describe('multi-line Nix errors: the error line in summaries, the whole text kept', { skip }, () => {
  it('the agent building a flake (the console): the outcome says the error line; the history keeps the trace', async () => {
    const h = await wireHost();
    const ref = brokenFlake(join(h.dir, 'broken'), 'web1');
    const a = await h.cli(['activate', '--flake', `${ref}#web1`, '--timeout', '60']);
    assert.equal(a.code, 1, a.stdout + a.stderr);
    assert.equal(a.out.outcome.code, 'build-failed');
    assert.match(a.out.outcome.message, /^nix failed for the target: error: attribute 'missing' missing$/);
    const failed = h.history().at(-1);
    assert.equal(failed.event, 'prepare-failed');
    assert.equal(failed.outcome.message, a.out.outcome.message);
    assert.match(failed.detail, /error: attribute 'missing' missing/);
    assert.ok(failed.detail.split('\n').length > 1, `the whole output is in the history: ${failed.detail}`);
    const text = await h.cli(['activate', '--flake', `${ref}#web1`, '--timeout', '60'], { json: false });
    assert.match(text.stdout, /^deployment \S+: failed: nix failed for the target: error: attribute 'missing' missing\n$/);
  });

  it('the controller building here: the error line in the message, the whole output in --json', async () => {
    const h = await wireHost();
    const ref = brokenFlake(join(h.dir, 'broken'), 'web1');
    const fleet = await h.fleet({});
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet, '--flake', ref]);
    assert.equal(r.result.code, 'build-failed', r.stdout + r.stderr);
    assert.match(r.result.message, /: error: attribute 'missing' missing$/);
    assert.ok(r.result.output.split('\n').length > 1, r.result.output);
    const text = await h.snapback(['deploy', 'web1', '--fleet', fleet, '--flake', ref], { json: false });
    assert.match(text.stderr, /^snapback: building here failed \(nix build \S+\): error: attribute 'missing' missing\n$/);
    assert.deepEqual(h.switchCalls(), []);
  });
});
