// from= compares a pattern that is an address as an address, as sshd's addr_match_list does: any
// spelling of an excluded address (`!0:0:0:0:0:0:0:1`, `!FD00::0005`) excludes it.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { authorize, fromMatches, parseAuthorizedKeys } from '../shared/authorized-keys.ts';
import { parsePublicKeyLine } from '../shared/ssh.ts';

const dir = mkdtempSync(join(tmpdir(), 'snapback-from-'));
execFileSync('ssh-keygen', ['-q', '-N', '', '-t', 'ed25519', '-C', 'alice@test', '-f', join(dir, 'alice')]);
const alice = readFileSync(join(dir, 'alice.pub'), 'utf8').trim();

describe('from= patterns that are addresses', () => {
  it('an excluded IPv6 address written in another valid form is still excluded (as sshd does)', () => {
    assert.equal(fromMatches(['*', '!0:0:0:0:0:0:0:1'], '::1'), false, '!0:0:0:0:0:0:0:1 is ::1');
    assert.equal(fromMatches(['fd00::/8', '!fd00:0::5'], 'fd00::5'), false, '!fd00:0::5 is fd00::5');
    assert.equal(fromMatches(['fd00::/8', '!fd00::0005'], 'fd00::5'), false, '!fd00::0005 is fd00::5');
  });

  it('so the key is refused from the address its line excludes', () => {
    const warnings: string[] = [];
    const entries = parseAuthorizedKeys([`from="fd00::/8,!fd00:0:0:0::5" ${alice}`], (m) => warnings.push(m));
    assert.equal(entries.length, 1, warnings.join('\n'));
    const verdict = authorize(entries, parsePublicKeyLine(alice), 'fd00::5', Date.now());
    assert.equal(verdict.ok, false, 'fd00::5 is excluded by !fd00:0:0:0::5');
  });

  it('(same root cause, fails closed) a positive plain address in another form matches as in sshd', () => {
    assert.equal(fromMatches(['0:0:0:0:0:0:0:1'], '::1'), true);
  });
});
