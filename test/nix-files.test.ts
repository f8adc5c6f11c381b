// What can be checked of the Nix side without nixpkgs: every .nix file parses, the agent accepts the
// configuration the NixOS module writes for its example, and the plain unit file carries the same
// service settings as the module.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, it } from 'node:test';
import { parseAgentConfig } from '../shared/config.ts';
import { haveNix } from './helpers/nix.ts';
import { ROOT } from './helpers/host.ts';

const skip = haveNix();

function nixFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    if (e.name === 'node_modules' || e.name.startsWith('.')) return [];
    const p = join(dir, e.name);
    return e.isDirectory() ? nixFiles(p) : e.name.endsWith('.nix') ? [p] : [];
  });
}

describe('Nix files', { skip }, () => {
  it('every .nix file parses', () => {
    const files = nixFiles(ROOT);
    assert.ok(files.length >= 5, files.join(' '));
    for (const f of files) {
      assert.doesNotThrow(() => execFileSync('nix-instantiate', ['--parse', f], { stdio: 'pipe' }), relative(ROOT, f));
    }
  });

  it('the agent accepts what the module writes for its example', () => {
    const dir = join(ROOT, 'nixos-module');
    // The module adds the declared listen.* defaults to whatever the user wrote.
    const expr = `import ${dir}/settings.nix { settings = import ${dir}/example.nix // { listen = { host = "::"; port = 7731; }; }; authorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop" ]; }`;
    const json = JSON.parse(execFileSync('nix-instantiate', ['--eval', '--strict', '--json', '-E', expr], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }));
    const config = parseAgentConfig(json, 'the module example');
    assert.equal(config.system.runner, 'systemd');
    assert.equal(config.authorizedKeys.length, 1);
    assert.equal(config.confirm.defaultTimeoutSec, 120);
  });
});

describe('unit file and module', () => {
  it('the plain unit file has the settings the module writes', () => {
    const unit = readFileSync(join(ROOT, 'systemd', 'snapback-agent.service'), 'utf8');
    const module = readFileSync(join(ROOT, 'nixos-module', 'default.nix'), 'utf8');
    const pairs: [string, RegExp][] = [
      ['Type=notify', /Type = "notify";/],
      ['NotifyAccess=all', /NotifyAccess = "all";/],
      ['Restart=always', /Restart = "always";/],
      ['WatchdogSec=30s', /WatchdogSec = "30s";/],
      ['WatchdogSignal=SIGKILL', /WatchdogSignal = "SIGKILL";/],
      ['StateDirectory=snapback', /StateDirectory = "snapback";/],
      ['RuntimeDirectory=snapback', /RuntimeDirectory = "snapback";/],
      ['CacheDirectory=snapback', /CacheDirectory = "snapback";/],
      ['Environment=XDG_CACHE_HOME=%C/snapback', /environment\.XDG_CACHE_HOME = "%C\/snapback";/],
      ['X-StopOnRemoval=false', /X-StopOnRemoval = false;/],
      ['X-StopIfChanged=false', /stopIfChanged = false;/],
      ['ProtectSystem=full', /ProtectSystem = "full";/],
      ['ReadWritePaths=-/nix/var/nix -/nix/store', /ReadWritePaths = \[ "-\/nix\/var\/nix" "-\/nix\/store" \];/],
    ];
    for (const [line, nix] of pairs) {
      assert.ok(unit.split('\n').includes(line), `unit file: ${line}`);
      assert.match(module, nix, `module: ${line}`);
    }
  });
});
