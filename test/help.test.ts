// Help and usage of both programs, run where there is no configuration at all: `help`, `help CMD`,
// `CMD --help`, and the typos that name the nearest valid command or option.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { closest } from '../shared/cli.ts';
import { AGENT_BIN, CONTROLLER_BIN } from './helpers/host.ts';

// No snapback.json here, and an agent configuration that does not exist.
const empty = mkdtempSync(join(tmpdir(), 'snapback-help-'));
after(() => rmSync(empty, { recursive: true, force: true }));
const env = { ...process.env, SNAPBACK_CONFIG: join(empty, 'no-such-agent.json') };

function run(bin: string, args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [bin, ...args], { cwd: empty, env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}
const snapback = (...args: string[]) => run(CONTROLLER_BIN, args);
const agent = (...args: string[]) => run(AGENT_BIN, args);

describe('help without a configuration file', () => {
  it('snapback help lists every command', () => {
    const r = snapback('help');
    assert.equal(r.code, 0, r.stderr);
    for (const c of ['deploy', 'status', 'confirm', 'rollback', 'history', 'help']) assert.match(r.stdout, new RegExp(`^  ${c}`, 'm'));
  });

  it('snapback help deploy and snapback deploy --help show deploy\'s own options, and only them', () => {
    for (const r of [snapback('help', 'deploy'), snapback('deploy', '--help'), snapback('deploy', '-h')]) {
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^usage: snapback deploy /);
      for (const o of ['--all', '--tag T', '--flake REF', '--build-on', '--timeout S', '--parallel N', '--atomic', '--dry-run', '--fleet FILE']) assert.ok(r.stdout.includes(o), `${o} in deploy's help`);
      assert.doesNotMatch(r.stdout, /--limit/);
    }
    const h = snapback('history', '--help');
    assert.match(h.stdout, /^usage: snapback history HOST \[--limit N\]/);
    assert.doesNotMatch(h.stdout, /--atomic/);
  });

  it('snapback-agent help, help try and try --help', () => {
    const all = agent('help');
    assert.equal(all.code, 0, all.stderr);
    for (const c of ['serve', 'try', 'activate', 'status', 'confirm', 'rollback', 'extend', 'history', 'revert', 'check-config']) assert.match(all.stdout, new RegExp(`^  ${c}`, 'm'));
    for (const r of [agent('help', 'try'), agent('try', '--help')]) {
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^usage: snapback-agent try TARGET \[--timeout S\]/);
      assert.match(r.stdout, /keep this configuration\? \[y\/N\]/);
      assert.match(r.stdout, /--generation N/);
      assert.doesNotMatch(r.stdout, /--dry-run/);
    }
    assert.match(agent('activate', '--help').stdout, /--dry-run/);
  });

  it('no command: the usage on stderr, exit 2', () => {
    const r = snapback();
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^snapback \S+ — /);
  });
});

describe('typos name the nearest valid word', () => {
  it('an unknown option names the closest one (exit 2)', () => {
    const r = snapback('deploy', 'web1', '--tiemout', '30');
    assert.equal(r.code, 2);
    assert.equal(r.stderr, 'snapback: unknown option --tiemout (did you mean --timeout?); see: snapback help\n');
    assert.match(snapback('deploy', '--dryrun').stderr, /unknown option --dryrun \(did you mean --dry-run\?\)/);
    assert.match(agent('activate', '--generaton', '3').stderr, /unknown option --generaton \(did you mean --generation\?\)/);
    const far = snapback('deploy', '--zzzzzz');
    assert.equal(far.code, 2);
    assert.equal(far.stderr, 'snapback: unknown option --zzzzzz; see: snapback help\n');
  });

  it('an unknown command names the closest one (exit 2), also in help', () => {
    const r = snapback('deplyo', 'web1');
    assert.equal(r.code, 2);
    assert.equal(r.stderr, 'snapback: unknown command "deplyo" (did you mean deploy?); see: snapback help\n');
    assert.match(agent('hist').stderr, /unknown command "hist" \(did you mean history\?\)/);
    const h = snapback('help', 'rolback');
    assert.equal(h.code, 2);
    assert.match(h.stderr, /unknown command "rolback" \(did you mean rollback\?\)/);
  });

  it('closest(): swaps, cut-short words, and nothing for what is far', () => {
    assert.equal(closest('confirmTimeotSec', ['confirmTimeoutSec', 'probes']), 'confirmTimeoutSec');
    assert.equal(closest('tagz', ['tags', 'target']), 'tags');
    assert.equal(closest('taregt', ['tags', 'target']), 'target');
    assert.equal(closest('stat', ['status', 'confirm']), 'status');
    assert.equal(closest('xyz', ['url', 'tags']), undefined);
  });
});
