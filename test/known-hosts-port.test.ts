// known_hosts is looked up under both `host` and `[host]:port` (the agent's port is not ssh's); a line
// that excludes either name (`*,![web1.lan]:7731 KEY`) vouches for neither, as `ssh-keygen -F` agrees.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { knownHosts } from '../shared/known-hosts.ts';

const dir = mkdtempSync(join(tmpdir(), 'snapback-kh-'));
execFileSync('ssh-keygen', ['-q', '-N', '', '-t', 'ed25519', '-f', join(dir, 'k')]);
const key = readFileSync(join(dir, 'k.pub'), 'utf8').trim().split(' ').slice(0, 2).join(' ');

describe('known_hosts negation of the [host]:port name', () => {
  it('a line that negates [web1.lan]:7731 does not vouch for web1.lan on port 7731', () => {
    const text = `*,![web1.lan]:7731 ${key}\n`;
    const kh = join(dir, 'known_hosts');
    writeFileSync(kh, text);
    let ssh = '';
    try {
      ssh = execFileSync('ssh-keygen', ['-F', '[web1.lan]:7731', '-f', kh], { encoding: 'utf8' });
    } catch {}
    assert.equal(ssh.trim(), '', 'ssh-keygen -F finds no key for [web1.lan]:7731');
    assert.equal(knownHosts(text, 'web1.lan', 7731).keys.length, 0);
  });
});
