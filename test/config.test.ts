// The agent configuration (DESIGN §8): defaults, every key, and one clear message per problem.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { agentConfigSchema, parseAgentConfig } from '../shared/config.ts';
import { SnapbackError } from '../shared/errors.ts';
import { MAX_SECONDS } from '../shared/model.ts';
import { VERSION } from '../shared/version.ts';
import { AGENT_BIN, ROOT } from './helpers/host.ts';

describe('agent configuration', () => {
  it('fills every key of DESIGN §8 with a default', () => {
    const c = parseAgentConfig({});
    assert.deepEqual(c.listen, { host: '::', port: 7731, handshakeTimeoutSec: 10, maxPendingPerAddress: 8, maxPending: 64, maxConnections: 256 });
    assert.equal(c.stateDir, '/var/lib/snapback');
    assert.equal(c.controlSocket, '/run/snapback/control.sock');
    assert.equal(c.hostKey, '/etc/ssh/ssh_host_ed25519_key');
    assert.deepEqual(c.authorizedKeys, []);
    assert.equal(c.system.profile, '/nix/var/nix/profiles/system');
    assert.equal(c.system.currentSystem, '/run/current-system');
    assert.deepEqual(c.nix, { substituters: [], trustedPublicKeys: [] });
    assert.deepEqual(c.confirm, { defaultTimeoutSec: 300, minTimeoutSec: 30, maxTimeoutSec: 3600, activationTimeoutSec: 600 });
    assert.deepEqual(c.health, { failedUnits: 'block', checks: [] });
  });

  it('accepts a complete file', () => {
    const c = agentConfigSchema.parse({
      listen: { host: '0.0.0.0', port: 7000, tls: { cert: '/etc/snapback/cert.pem', key: '/etc/snapback/key.pem' } },
      stateDir: '/var/lib/snapback',
      controlSocket: '/run/snapback/control.sock',
      hostKey: '/etc/ssh/ssh_host_ed25519_key',
      authorizedKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE3x alice@laptop'],
      system: { profile: '/nix/var/nix/profiles/system', currentSystem: '/run/current-system', runner: 'systemd' },
      nix: { substituters: ['https://cache.example'], trustedPublicKeys: ['cache.example-1:AAAA+/=='] },
      confirm: { defaultTimeoutSec: 120, minTimeoutSec: 10, maxTimeoutSec: 900, activationTimeoutSec: 300 },
      health: { failedUnits: 'ignore', checks: [{ name: 'dns', command: ['host', 'example.org'], timeoutSec: 5 }, { command: 'true' }] },
    });
    assert.equal(c.system.runner, 'systemd');
    assert.equal(c.health.checks[1]?.timeoutSec, 30);
  });

  it('names every problem by its key', () => {
    try {
      parseAgentConfig({ lisen: {}, listen: { port: 70000 }, confirm: { minTimeoutSec: 50, maxTimeoutSec: 10 }, health: { failedUnits: 'sometimes' }, system: { profile: 'relative/path' } }, 'agent.json');
      assert.fail('should have thrown');
    } catch (err) {
      assert.ok(err instanceof SnapbackError);
      assert.equal(err.code, 'config-invalid');
      const problems = err.details?.problems as string[];
      const text = problems.join('\n');
      assert.match(text, /\(top level\): unknown key "lisen"/);
      assert.match(text, /listen\.port: /);
      assert.match(text, /health\.failedUnits: /);
      assert.match(text, /system\.profile: must be an absolute path/);
      assert.ok(problems.length >= 4, text);
    }
  });

  it('cross-checks the timeout bounds', () => {
    assert.throws(() => parseAgentConfig({ confirm: { minTimeoutSec: 60, maxTimeoutSec: 30, defaultTimeoutSec: 40 } }), /confirm\.minTimeoutSec: must not exceed/);
    assert.throws(() => parseAgentConfig({ confirm: { defaultTimeoutSec: 5 } }), /confirm\.defaultTimeoutSec: must lie within/);
  });

  it('caps every seconds key at MAX_SECONDS, so no timer of the agent can overflow', () => {
    const huge = 3_000_000; // 34 days: Node would fire such a timer at once
    try {
      parseAgentConfig({
        confirm: { defaultTimeoutSec: huge, minTimeoutSec: huge, maxTimeoutSec: huge, activationTimeoutSec: huge },
        health: { checks: [{ command: 'true', timeoutSec: huge }] },
      });
      assert.fail('should have thrown');
    } catch (err) {
      assert.ok(err instanceof SnapbackError);
      const text = (err.details?.problems as string[]).join('\n');
      for (const key of ['confirm.defaultTimeoutSec', 'confirm.minTimeoutSec', 'confirm.maxTimeoutSec', 'confirm.activationTimeoutSec', 'health.checks.0.timeoutSec']) {
        assert.ok(text.includes(`${key}: must be at most ${MAX_SECONDS} seconds (7 days)`), `${key} in:\n${text}`);
      }
    }
    const edge = parseAgentConfig({ confirm: { maxTimeoutSec: MAX_SECONDS, activationTimeoutSec: MAX_SECONDS } });
    assert.equal(edge.confirm.maxTimeoutSec, MAX_SECONDS);
    assert.ok(MAX_SECONDS * 3 * 1000 <= 2 ** 31 - 1, 'three capped values add up to a delay Node still honours');
  });

  it('the daemon does not start with a bad file, and says why (exit 2)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'snapback-config-'));
    const file = join(dir, 'agent.json');
    writeFileSync(file, JSON.stringify({ stateDir: join(dir, 'state'), confirm: { defaultTimeoutSec: 'soon' }, extra: true }));
    const r = spawnSync(process.execPath, [AGENT_BIN, 'serve', '--config', file], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /confirm\.defaultTimeoutSec: .*expected number/);
    assert.match(r.stderr, /unknown key "extra"/);
    writeFileSync(file, '{ not json');
    const r2 = spawnSync(process.execPath, [AGENT_BIN, 'check-config', '--config', file], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(r2.status, 2);
    assert.match(r2.stderr, /not valid JSON/);
  });

  it('reports the version of package.json', () => {
    assert.equal(VERSION, JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version);
  });

  it('an old Node says what to do instead of failing with a stack trace (exit 2)', (t) => {
    // The first node on PATH other than the project's own, if it is too old to run TypeScript.
    const dirs = (process.env.PATH ?? '').split(':').filter((d) => d && !d.startsWith(join(ROOT, 'node_modules')));
    const old = dirs
      .map((d) => join(d, 'node'))
      .find((n) => spawnSync(n, ['-e', 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a < 22 || (a === 22 && b < 18) ? 0 : 1)']).status === 0);
    if (!old) return t.skip('SKIPPED: no Node.js older than 22.18 on PATH to try');
    if (existsSync(join(ROOT, 'dist'))) return t.skip('SKIPPED: dist/ is built here, so the source path is not taken');
    for (const bin of [AGENT_BIN, join(ROOT, 'bin', 'snapback.js')]) {
      const r = spawnSync(old, [bin, '--version'], { encoding: 'utf8' }) as { status: number | null; stderr: string };
      assert.equal(r.status, 2, r.stderr);
      assert.match(r.stderr, /Node\.js 22\.18 or newer is needed to run from source/);
      assert.match(r.stderr, /node_modules\/\.bin\/node/);
      assert.match(r.stderr, /npm run build/);
      assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    }
  });
});
