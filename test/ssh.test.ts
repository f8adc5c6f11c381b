// SSH identities: OpenSSH key lines and files, fingerprints, and SSHSIG signatures that `ssh-keygen -Y
// verify` accepts — checked against the real OpenSSH tools.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { SIG_NAMESPACE, armorSignature, keyFileSigner, parsePublicKeyLine, readKeyFile, verifySignature } from '../shared/ssh.ts';
import { canonicalJson } from '../shared/protocol.ts';

const dir = mkdtempSync(join(tmpdir(), 'snapback-ssh-'));
const key = (name: string, ...extra: string[]) => {
  const path = join(dir, name);
  execFileSync('ssh-keygen', ['-q', '-N', '', '-C', `${name}@test`, '-f', path, ...extra]);
  return path;
};

describe('ssh identities', () => {
  const k = key('alice', '-t', 'ed25519');

  it('parses key lines (with authorized_keys options) and fingerprints like ssh-keygen -l', () => {
    const line = readFileSync(`${k}.pub`, 'utf8');
    const pk = parsePublicKeyLine(`from="10.0.0.0/8",no-pty ${line}`);
    assert.equal(pk.comment, 'alice@test');
    const expected = execFileSync('ssh-keygen', ['-lf', `${k}.pub`], { encoding: 'utf8' }).split(' ')[1];
    assert.equal(pk.fingerprint, expected);
    assert.equal(readKeyFile(k).publicKey.fingerprint, expected);
  });

  it('signs in the SSHSIG format that ssh-keygen -Y verify accepts, and detects any change', async () => {
    const signer = keyFileSigner(k);
    const msg = canonicalJson({ b: 1, a: [2, { d: 3, c: 4 }] });
    assert.equal(msg, '{"a":[2,{"c":4,"d":3}],"b":1}');
    const sig = await signer.sign(msg);
    assert.ok(verifySignature(signer.publicKey, msg, sig));
    assert.ok(!verifySignature(signer.publicKey, msg + ' ', sig));
    writeFileSync(join(dir, 'sig'), armorSignature(signer.publicKey, sig));
    writeFileSync(join(dir, 'msg'), msg);
    writeFileSync(join(dir, 'allowed'), `alice ${readFileSync(`${k}.pub`, 'utf8')}`);
    const out = execFileSync('sh', ['-c', `ssh-keygen -Y verify -f allowed -I alice -n ${SIG_NAMESPACE} -s sig < msg`], { cwd: dir, encoding: 'utf8' });
    assert.match(out, /Good "snapback.v1@snapback" signature/);
  });

  it('refuses other key types with a clear message, and knows an encrypted file', () => {
    const rsa = key('rsa', '-t', 'rsa', '-b', '2048');
    assert.throws(() => parsePublicKeyLine(readFileSync(`${rsa}.pub`, 'utf8')), /only ssh-ed25519/);
    const locked = join(dir, 'locked');
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', 'secret', '-f', locked]);
    const file = readKeyFile(locked);
    assert.equal(file.privateKey, undefined);
    assert.throws(() => keyFileSigner(locked, file), /encrypted.*ssh-add/);
  });
});
