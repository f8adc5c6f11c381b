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
    if (e.name === 'node_modules' || e.name === 'vendor' || e.name.startsWith('.')) return [];
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
  it('the plain unit file has the settings the module writes, in the sections NixOS reads them from', () => {
    const unit = sections(readFileSync(join(ROOT, 'systemd', 'snapback-agent.service'), 'utf8'));
    const module = readFileSync(join(ROOT, 'nixos-module', 'default.nix'), 'utf8');
    // switch-to-configuration reads X-StopOnRemoval in [Unit] and X-StopIfChanged in [Service]
    // (nixpkgs switch-to-configuration-ng; systemd-lib.nix renders stopIfChanged into [Service]).
    const pairs: [string, string, RegExp][] = [
      ['Unit', 'X-StopOnRemoval=false', /X-StopOnRemoval = false;/],
      ['Unit', 'StartLimitIntervalSec=0', /StartLimitIntervalSec = 0;/],
      ['Service', 'X-StopIfChanged=false', /stopIfChanged = false;/],
      ['Service', 'Type=notify', /Type = "notify";/],
      ['Service', 'NotifyAccess=all', /NotifyAccess = "all";/],
      ['Service', 'Restart=always', /Restart = "always";/],
      ['Service', 'WatchdogSec=30s', /WatchdogSec = "30s";/],
      ['Service', 'WatchdogSignal=SIGKILL', /WatchdogSignal = "SIGKILL";/],
      ['Service', 'StateDirectory=snapback', /StateDirectory = "snapback";/],
      ['Service', 'RuntimeDirectory=snapback', /RuntimeDirectory = "snapback";/],
      ['Service', 'CacheDirectory=snapback', /CacheDirectory = "snapback";/],
      ['Service', 'Environment=NIX_REMOTE=daemon', /NIX_REMOTE = "daemon";/],
      ['Service', 'Environment=XDG_CACHE_HOME=%C/snapback', /XDG_CACHE_HOME = "%C\/snapback";/],
      ['Service', 'Environment=NODE_ENV=production', /NODE_ENV = "production";/],
      ['Service', 'ProtectSystem=full', /ProtectSystem = "full";/],
    ];
    for (const [section, line, nix] of pairs) {
      assert.ok(unit[section]?.includes(line), `unit file [${section}]: ${line}`);
      assert.match(module, nix, `module: ${line}`);
    }
    // ProtectSystem=full leaves /nix writable: ReadWritePaths= there did nothing.
    assert.ok(!Object.values(unit).flat().some((l) => l.startsWith('ReadWritePaths=')), 'unit file: ReadWritePaths=');
    assert.doesNotMatch(module, /ReadWritePaths/, 'module: ReadWritePaths');
  });
});

/** The lines of each section of a unit file, comments left out. */
function sections(text: string): Record<string, string[]> {
  const out: Record<string, string[]> = {};
  let current: string[] = [];
  for (const line of text.split('\n')) {
    const header = /^\[(.+)\]$/.exec(line);
    if (header) current = out[header[1]!] ??= [];
    else if (line && !line.startsWith('#')) current.push(line);
  }
  return out;
}
