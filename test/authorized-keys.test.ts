// authorized_keys lines as sshd reads them: the options field (quoted values with commas, blanks and
// \"), which options are honoured, ignored or refused, and the from= / expiry-time= decision; then a
// real agent applying them to connections.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { authorize, parseAuthorizedKeys, type AuthorizedKey } from '../shared/authorized-keys.ts';
import { parsePublicKeyLine } from '../shared/ssh.ts';
import { haveNix } from './helpers/nix.ts';
import { ScratchHost } from './helpers/host.ts';
import { RawClient } from './helpers/raw.ts';

const dir = mkdtempSync(join(tmpdir(), 'snapback-authkeys-'));
const keyLine = (name: string) => {
  const path = join(dir, name);
  execFileSync('ssh-keygen', ['-q', '-N', '', '-t', 'ed25519', '-C', `${name}@test`, '-f', path]);
  return readFileSync(`${path}.pub`, 'utf8').trim();
};
const alice = keyLine('alice');
const bob = keyLine('bob');
const aliceKey = parsePublicKeyLine(alice);

function parse(lines: string[]): { entries: AuthorizedKey[]; warnings: string[] } {
  const warnings: string[] = [];
  return { entries: parseAuthorizedKeys(lines, (m) => warnings.push(m)), warnings };
}

/** One line with `options`, then whether alice may act from `peer` now. */
function allowed(options: string, peer: string, nowMs = Date.now()): boolean {
  const { entries, warnings } = parse([`${options} ${alice}`]);
  assert.equal(entries.length, 1, warnings.join('\n'));
  return authorize(entries, aliceKey, peer, nowMs).ok;
}

describe('authorized_keys lines', () => {
  it('reads plain lines, skips blanks and comments, numbers lines from 1', () => {
    const { entries, warnings } = parse(['# operators', '', alice, `  ${bob}  `]);
    assert.deepEqual(warnings, []);
    assert.deepEqual(
      entries.map((e) => [e.line, e.key.comment]),
      [
        [3, 'alice@test'],
        [4, 'bob@test'],
      ],
    );
    assert.equal(entries[0]!.from, undefined);
    assert.equal(entries[0]!.expiresAt, undefined);
  });

  it('reads quoted option values with commas, blanks and \\" — the key is found after the options field', () => {
    const bobData = bob.split(' ')[1];
    const { entries, warnings } = parse([
      `environment="MSG=a, \\"b c\\" ssh-ed25519 ${bobData}",from="127.0.0.1,10.0.0.0/8",no-pty ${alice}`,
      `No-X11-Forwarding,PERMITOPEN="host:22, other:80" ${bob}`,
    ]);
    assert.deepEqual(warnings, []);
    assert.equal(entries.length, 2);
    assert.equal(entries[0]!.key.comment, 'alice@test', 'not the key quoted inside environment=');
    assert.ok(entries[0]!.key.blob.equals(aliceKey.blob));
    assert.deepEqual(entries[0]!.from, ['127.0.0.1', '10.0.0.0/8']);
    assert.equal(entries[1]!.key.comment, 'bob@test');
  });

  it('refuses command=, restrict, principals=, cert-authority and unknown options, naming the line and the option', () => {
    const cases: [string, RegExp][] = [
      ['command="echo a, \\"b\\""', /line 1: .*option command /],
      ['restrict', /line 1: .*option restrict /],
      ['no-pty,restrict,pty', /line 1: .*option restrict /],
      ['principals="alice,bob"', /line 1: .*option principals /],
      ['cert-authority', /line 1: .*option cert-authority /],
      ['Command="true"', /option command /],
      ['frobnicate', /line 1: .*unknown option frobnicate/],
      ['no-pty="yes"', /option no-pty takes no value/],
      ['environment', /option environment needs a value/],
      ['from=10.0.0.1', /must be in double quotes/],
      ['from="10.0.0.1', /no closing double quote/],
      ['from="10.0.0.1",from="10.0.0.2"', /from appears twice/],
      ['from="10.0.0.1/8"', /"10.0.0.1\/8" is not a network/],
      ['from="10.0.0.0/33"', /not a network/],
      ['from=""', /empty pattern/],
      ['no-pty,,no-pty', /cannot read an option/],
      ['no-pty junk', /no key after the options/],
      ['expiry-time="2025"', /expiry-time="2025" is not YYYYMMDD/],
      ['expiry-time="20250230"', /not a valid date/],
    ];
    for (const [options, pattern] of cases) {
      const { entries, warnings } = parse([`${options} ${alice}`]);
      assert.equal(entries.length, 0, `${options} must not authorize`);
      assert.equal(warnings.length, 1, options);
      assert.match(warnings[0]!, pattern, options);
    }
    // and the other lines still count
    const { entries } = parse([`command="true" ${alice}`, bob]);
    assert.deepEqual(
      entries.map((e) => e.line),
      [2],
    );
  });

  it('accepts the options that only limit SSH features Snapback does not have', () => {
    const options =
      'pty,no-pty,port-forwarding,no-port-forwarding,agent-forwarding,no-agent-forwarding,x11-forwarding,no-X11-forwarding,user-rc,no-user-rc,' +
      'touch-required,no-touch-required,verify-required,environment="A=1",permitopen="localhost:80",permitlisten="8080",tunnel="0"';
    assert.ok(allowed(options, '192.0.2.1'));
  });

  it('refuses other key types with the line number', () => {
    const { entries, warnings } = parse([alice, 'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 rsa@test']);
    assert.equal(entries.length, 1);
    assert.match(warnings[0]!, /line 2: skipped: .*ssh-rsa/);
  });
});

describe('from="pattern-list"', () => {
  it('matches addresses, wildcards and CIDR blocks, IPv4 and IPv6', () => {
    assert.ok(allowed('from="127.0.0.2"', '127.0.0.2'));
    assert.ok(!allowed('from="127.0.0.2"', '127.0.0.1'));
    assert.ok(allowed('from="10.0.0.1,192.168.1.*"', '192.168.1.77'));
    assert.ok(!allowed('from="10.0.0.1,192.168.1.*"', '192.168.2.77'));
    assert.ok(allowed('from="10.0.0.?"', '10.0.0.7'));
    assert.ok(!allowed('from="10.0.0.?"', '10.0.0.17'));
    assert.ok(allowed('from="10.0.0.0/8"', '10.200.3.4'));
    assert.ok(!allowed('from="10.0.0.0/8"', '11.0.0.1'));
    assert.ok(allowed('from="0.0.0.0/0"', '203.0.113.9'));
    assert.ok(allowed('from="fd00::/8"', 'fd12:3456::1'));
    assert.ok(!allowed('from="fd00::/8"', 'fe80::1'));
    assert.ok(allowed('from="2001:db8::/32"', '2001:db8:0:0:1::2'));
    assert.ok(allowed('from="::1"', '::1'));
    assert.ok(!allowed('from="10.0.0.0/8"', '::1'), 'an IPv4 block never matches an IPv6 peer');
    assert.ok(allowed('from="*"', '198.51.100.1'));
  });

  it('a negated pattern refuses even when another pattern matches; negations alone match nothing', () => {
    assert.ok(!allowed('from="10.0.0.0/8,!10.0.0.5"', '10.0.0.5'));
    assert.ok(allowed('from="10.0.0.0/8,!10.0.0.5"', '10.0.0.6'));
    assert.ok(!allowed('from="!10.1.0.0/16,10.*"', '10.1.2.3'));
    assert.ok(!allowed('from="!10.0.0.5"', '10.0.0.6'));
  });

  it('compares an IPv4-mapped IPv6 peer as its IPv4 address', () => {
    assert.ok(allowed('from="127.0.0.2"', '::ffff:127.0.0.2'));
    assert.ok(allowed('from="127.0.0.0/8"', '::ffff:127.0.0.2'));
    assert.ok(allowed('from="127.0.0.*"', '::FFFF:127.0.0.2'));
    assert.ok(!allowed('from="127.0.0.2"', '::ffff:127.0.0.3'));
    assert.ok(!allowed('from="!127.0.0.2,*"', '::ffff:127.0.0.2'));
  });

  it('host names are not resolved: a warning at load, and they never match', () => {
    const { entries, warnings } = parse([`from="*.example.com,10.0.0.1,localhost" ${alice}`]);
    assert.equal(entries.length, 1);
    assert.equal(warnings.length, 1);
    assert.match(warnings[0]!, /line 1: from= pattern "\*\.example\.com", "localhost" is a host name; the agent does not resolve names/);
    assert.ok(!authorize(entries, aliceKey, '127.0.0.1', Date.now()).ok);
    assert.ok(authorize(entries, aliceKey, '10.0.0.1', Date.now()).ok);
  });

  it('says why, and which line, when it refuses', () => {
    const { entries } = parse([`from="10.0.0.0/8" ${alice}`]);
    const r = authorize(entries, aliceKey, '192.0.2.1', Date.now());
    assert.deepEqual(r, { ok: false, reason: 'from', message: 'authorizedKeys line 1: 192.0.2.1 does not match from="10.0.0.0/8"' });
    const stranger = authorize(entries, parsePublicKeyLine(bob), '10.0.0.1', Date.now());
    assert.equal(stranger.ok || stranger.reason, 'unknown-key');
  });
});

describe('expiry-time', () => {
  it('is local time, or UTC with Z, and is checked when the key is used', () => {
    const { entries } = parse([`expiry-time="20300102" ${alice}`, `expiry-time="203001020304Z" ${bob}`, `expiry-time="20300102030405" ${alice}`]);
    assert.equal(entries[0]!.expiresAt, new Date(2030, 0, 2).getTime());
    assert.equal(entries[1]!.expiresAt, Date.UTC(2030, 0, 2, 3, 4));
    assert.equal(entries[2]!.expiresAt, new Date(2030, 0, 2, 3, 4, 5).getTime());
    assert.equal(parse([`expiry-time="20300102UTC" ${alice}`]).entries[0]!.expiresAt, Date.UTC(2030, 0, 2));
  });

  it('a key past its expiry-time is refused; before it, accepted', () => {
    const at = Date.UTC(2030, 0, 2, 3, 4);
    assert.ok(allowed('expiry-time="203001020304Z"', '10.0.0.1', at - 1000));
    assert.ok(!allowed('expiry-time="203001020304Z"', '10.0.0.1', at));
    const { entries } = parse([`expiry-time="20200101Z" ${alice}`]);
    assert.deepEqual(authorize(entries, aliceKey, '10.0.0.1', Date.now()), {
      ok: false,
      reason: 'expired',
      message: 'authorizedKeys line 1: the key expired at 2020-01-01T00:00:00.000Z (expiry-time)',
    });
  });
});

describe('a key on several lines', () => {
  it('is accepted when any of its lines allows it, refused with every reason otherwise', () => {
    const { entries } = parse([`expiry-time="20200101Z" ${alice}`, `from="10.0.0.0/8" ${alice}`, `command="true" ${alice}`]);
    assert.equal(entries.length, 2);
    const ok = authorize(entries, aliceKey, '10.1.1.1', Date.now());
    assert.ok(ok.ok && ok.entry.line === 2);
    const no = authorize(entries, aliceKey, '192.0.2.1', Date.now());
    assert.ok(!no.ok);
    assert.equal(no.reason, 'expired');
    assert.match(no.message, /line 1: the key expired.*; authorizedKeys line 2: 192\.0\.2\.1 does not match/);
  });
});

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

describe('the agent and authorizedKeys options', { skip }, () => {
  const hosts: ScratchHost[] = [];
  const clients: RawClient[] = [];
  after(async () => {
    for (const c of clients) c.ws.terminate();
    for (const h of hosts) await h.cleanup();
  });

  it('from= is honoured per source address, expiry-time at login; command= and cert-authority lines give no rights', async () => {
    const h = new ScratchHost('authkeys').enableWire().install();
    hosts.push(h);
    for (const name of ['near', 'forced', 'ca', 'expired', 'later']) h.operatorKey(name);
    h.writeConfig({
      authorizedKeys: [
        h.publicKey('op'),
        `from="127.0.0.2" ${h.publicKey('near')}`,
        `command="/run/current-system/sw/bin/true",no-pty ${h.publicKey('forced')}`,
        `cert-authority ${h.publicKey('ca')}`,
        `expiry-time="20200101" ${h.publicKey('expired')}`,
        `expiry-time="29991231",no-port-forwarding ${h.publicKey('later')}`,
      ],
    });
    await h.start();
    const port = await h.port();
    const login = async (name: string, localAddress?: string) => {
      const c = new RawClient(port, undefined, localAddress ? { localAddress } : {});
      clients.push(c);
      const m = await c.authenticate(join(h.dir, name));
      c.close();
      return m;
    };
    const refused = async (name: string, localAddress?: string) => {
      const m = await login(name, localAddress);
      assert.equal(m.type, 'error', `${name} must be refused`);
      assert.equal(m.code, 'unauthorized');
      // the client is not told which condition failed
      assert.equal(m.message, `key ${parsePublicKeyLine(h.publicKey(name)).fingerprint} is not authorized on this host`);
    };

    await refused('near');
    assert.equal((await login('near', '127.0.0.2')).type, 'welcome');
    await refused('forced');
    await refused('ca');
    await refused('expired');
    assert.equal((await login('later')).type, 'welcome');
    assert.equal((await login('op', '127.0.0.2')).type, 'welcome');

    const warned = (re: RegExp) => h.waitLog((l) => l.level === 40 && re.test(l.msg), 5000);
    await warned(/authorizedKeys line 3: skipped: option command /);
    await warned(/authorizedKeys line 4: skipped: option cert-authority /);
    await warned(/refusing a controller key: authorizedKeys line 2: 127\.0\.0\.1 does not match from="127\.0\.0\.2"/);
    await warned(/refusing a controller key: authorizedKeys line 5: the key expired at /);
    assert.equal(h.switchCalls().length, 0);
  });
});
