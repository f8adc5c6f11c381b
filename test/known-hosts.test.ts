// known_hosts as ssh reads it — plain, [host]:port and hashed names, wildcards, negation, @revoked and
// @cert-authority — checked against `ssh-keygen -F`; then the controller refusing a revoked host key.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { Session } from '../controller/session.ts';
import { knownHosts } from '../shared/known-hosts.ts';
import { keyFileSigner, parsePublicKeyLine } from '../shared/ssh.ts';
import { haveNix } from './helpers/nix.ts';
import { ScratchHost } from './helpers/host.ts';

const dir = mkdtempSync(join(tmpdir(), 'snapback-known-hosts-'));
/** A fresh key as `ssh-ed25519 AAAA…` (no comment, as known_hosts holds it). */
const key = (name: string) => {
  execFileSync('ssh-keygen', ['-q', '-N', '', '-t', 'ed25519', '-f', join(dir, name)]);
  return readFileSync(join(dir, `${name}.pub`), 'utf8').trim().split(' ').slice(0, 2).join(' ');
};
const fp = (line: string) => parsePublicKeyLine(line).fingerprint;

describe('known_hosts', () => {
  it('plain, [host]:port and hashed entries', () => {
    const line = key('plain');
    const kh = join(dir, 'known_hosts');
    writeFileSync(kh, `web1.lan,10.0.0.1 ${line}\n[web2.lan]:7731 ${line}\nweb3.lan ${line}\n`);
    execFileSync('ssh-keygen', ['-H', '-f', kh], { stdio: 'ignore' });
    const text = readFileSync(kh, 'utf8');
    assert.ok(!text.includes('web3.lan'), 'hashed');
    assert.equal(knownHosts(text, 'web3.lan').keys.length, 1);
    assert.equal(knownHosts(text, '10.0.0.1').keys.length, 1);
    assert.equal(knownHosts(text, 'web2.lan', 7731).keys.length, 1);
    assert.equal(knownHosts(text, 'web2.lan').keys.length, 0);
    assert.equal(knownHosts(text, 'other').keys.length, 0);
  });

  it('wildcards, !negation and markers apply to the same lines as for ssh-keygen -F', () => {
    // one key per line, so a key says which line applied
    const lines = [
      `*.lan,!bad.lan ${key('l1')}`,
      `web?.lan ${key('l2')}`,
      `@revoked *.lan ${key('l3')}`,
      `@cert-authority *.lan ${key('l4')}`,
      `10.0.0.*,!10.0.0.9 ${key('l5')}`,
      `@revoked * ${key('l6')}`,
      `!*.lan,* ${key('l7')}`,
      `WEB1.LAN ${key('l8')}`,
    ];
    const text = `# a comment\n\n${lines.join('\n')}\n`;
    const kh = join(dir, 'patterns');
    writeFileSync(kh, text);
    for (const host of ['web1.lan', 'web12.lan', 'bad.lan', '10.0.0.1', '10.0.0.9', 'elsewhere']) {
      const found = knownHosts(text, host);
      const ours = [...found.keys.map((k) => `${k.fingerprint}`), ...found.revoked.map((k) => `${k.fingerprint} REVOKED`)].sort();
      let out = '';
      try {
        out = execFileSync('ssh-keygen', ['-F', host, '-f', kh], { encoding: 'utf8' });
      } catch {}
      const theirs = [...out.matchAll(/^# Host \S+ found: line (\d+) ?(\S*)$/gm)]
        .map(([, n, mark]) => ({ line: lines[Number(n) - 3]!, mark }))
        // ssh-keygen lists CA lines too; they are not host keys (the point of the test below)
        .filter((x) => x.mark !== 'CA')
        .map((x) => `${fp(x.line.replace(/^@\S+ /, '').split(' ').slice(1).join(' '))}${x.mark ? ` ${x.mark}` : ''}`)
        .sort();
      assert.deepEqual(ours, theirs, host);
    }
  });

  it('@cert-authority lines are not host keys; @revoked keys are listed apart, * included', () => {
    const ca = key('ca');
    const host = key('host');
    const text = `@cert-authority web1.lan ${ca}\nweb1.lan ${host}\n@revoked * ${host}\n@bogus web1.lan ${ca}\n`;
    const found = knownHosts(text, 'web1.lan');
    assert.deepEqual(
      found.keys.map((k) => k.fingerprint),
      [fp(host)],
    );
    assert.deepEqual(
      found.revoked.map((k) => k.fingerprint),
      [fp(host)],
    );
  });
});

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

describe('the controller and known_hosts', { skip }, () => {
  const hosts: ScratchHost[] = [];
  after(async () => {
    for (const h of hosts) await h.cleanup();
  });
  async function wireHost(): Promise<ScratchHost> {
    const h = new ScratchHost('known-hosts').enableWire().install();
    hosts.push(h);
    await h.start();
    return h;
  }
  const bare = (line: string) => line.split(' ').slice(0, 2).join(' ');

  it('a host key marked @revoked stops snapback deploy before anything changes (exit 3), even beside a valid entry or the fleet hostKey', async () => {
    const h = await wireHost();
    const home = join(h.dir, 'home');
    mkdirSync(join(home, '.ssh'), { recursive: true });
    writeFileSync(join(home, '.ssh', 'known_hosts'), `127.0.0.1 ${bare(h.hostPublicKey)}\n@revoked * ${bare(h.hostPublicKey)}\n`);
    for (const hostKey of [undefined, h.hostPublicKey]) {
      const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, hostKey, confirmTimeoutSec: 30 });
      const r = await h.snapback(['deploy', 'web1', '--fleet', fleet], { env: { HOME: home } });
      assert.equal(r.code, 3, r.stdout + r.stderr);
      assert.match(r.result.hosts[0].message, /revoked/);
      assert.ok(r.result.hosts[0].message.includes(fp(h.hostPublicKey)), r.result.hosts[0].message);
    }
    assert.equal(h.switchCalls().length, 0);
    assert.deepEqual(h.history(), []);
  });

  it("a @cert-authority line's key is not accepted as the host key", async () => {
    const h = await wireHost();
    const other = join(h.dir, 'known_hosts');
    writeFileSync(other, `@cert-authority 127.0.0.1 ${bare(h.hostPublicKey)}\n127.0.0.1 ${key('someone-else')}\n`);
    const signer = keyFileSigner(join(h.dir, 'op'));
    const web1 = { url: `ws://127.0.0.1:${await h.port()}`, tags: [], dependsOn: [] };
    await assert.rejects(Session.open('web1', web1, [signer], { knownHostsFile: other }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'unauthorized');
      assert.match(err.message, /does not match the expected host key/);
      return true;
    });
    writeFileSync(other, `@cert-authority 127.0.0.1 ${bare(h.hostPublicKey)}\n`);
    await assert.rejects(Session.open('web1', web1, [signer], { knownHostsFile: other }), /no hostKey in the fleet file and no ssh-ed25519 key for 127\.0\.0\.1/);
  });
});
