// The NixOS module as NixOS would evaluate it: the flake's nixosModules.default with nixpkgs' own
// lib and declarations of the NixOS options it sets (test/fixtures/module-eval.nix), then what it
// produces — the unit, the assertions, and the agent configuration, which the agent must accept.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { parseAgentConfig } from '../shared/config.ts';
import { haveNix } from './helpers/nix.ts';
import { ROOT } from './helpers/host.ts';

/** nixpkgs' lib/, vendored (vendor/README.md): full nixpkgs cannot be fetched here. */
const NIXPKGS_LIB = process.env.SNAPBACK_NIXPKGS_LIB ?? join(ROOT, 'vendor', 'nixpkgs-lib', 'lib');
const FIXTURE = join(ROOT, 'test', 'fixtures', 'module-eval.nix');

function skipReason(): string | undefined {
  const noNix = haveNix();
  if (noNix) return noNix;
  if (!existsSync(join(NIXPKGS_LIB, 'default.nix'))) {
    return `nixpkgs' lib/ is not at ${NIXPKGS_LIB} (set SNAPBACK_NIXPKGS_LIB to a nixpkgs lib/ directory): skipping the evaluation of the NixOS module`;
  }
  return undefined;
}
const skip = skipReason();
if (skip) console.error(`module.test.ts: ${skip}`);

/** A Nix string literal. */
const nixStr = (s: string) => JSON.stringify(s).replaceAll('${', '\\${');

/** `--read-write-mode`: write to the store like a real evaluation does (toFile, paths in strings). */
function args(attr: string, configuration: string): string[] {
  const e = `(import ${FIXTURE} { nixpkgsLib = /. + ${nixStr(NIXPKGS_LIB)}; configuration = ${configuration}; }).${attr}`;
  return ['--eval', '--strict', '--json', '--read-write-mode', '--expr', e];
}

/** One attribute of the fixture's result, with `configuration` (a NixOS module, Nix code) added. */
function evaluate<T>(attr: string, configuration = '{ }'): T {
  const out = execFileSync('nix-instantiate', args(attr, configuration), {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return JSON.parse(out) as T;
}

/** The error evaluating `attr` fails with. */
function evaluationError(attr: string, configuration = '{ }'): string {
  try {
    execFileSync('nix-instantiate', args(attr, configuration), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    return String((e as { stderr?: string }).stderr);
  }
  assert.fail(`evaluating ${attr} succeeded`);
}

interface Service {
  description: string;
  wantedBy: string[];
  wants: string[];
  after: string[];
  unitConfig: Record<string, unknown>;
  serviceConfig: Record<string, unknown>;
  environment: Record<string, string | null>;
  restartIfChanged: boolean;
  stopIfChanged: boolean;
  path: string[];
}

const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop';

describe("the flake's NixOS module, evaluated with nixpkgs' lib", { skip }, () => {
  it('runs the agent as a notify service with a watchdog, restarted always, in its own directories', () => {
    const s = evaluate<Service>('service');
    const pkg = evaluate<string>('package');
    assert.equal(s.serviceConfig.ExecStart, `${pkg}/bin/snapback-agent serve --config /etc/snapback/agent.json`);
    assert.equal(s.serviceConfig.Type, 'notify');
    assert.equal(s.serviceConfig.Restart, 'always');
    assert.equal(s.serviceConfig.WatchdogSec, '30s');
    assert.equal(s.serviceConfig.WatchdogSignal, 'SIGKILL');
    assert.equal(s.serviceConfig.StateDirectory, 'snapback');
    assert.equal(s.serviceConfig.RuntimeDirectory, 'snapback');
    assert.equal(s.serviceConfig.CacheDirectory, 'snapback');
    assert.equal(s.environment.XDG_CACHE_HOME, '%C/snapback');
    // A switch that changes the unit restarts it once, after activation; removal leaves it running.
    assert.equal(s.stopIfChanged, false);
    assert.equal(s.restartIfChanged, true);
    assert.equal(s.unitConfig['X-StopOnRemoval'], false);
    assert.equal(s.unitConfig.StartLimitIntervalSec, 0);
    assert.deepEqual(s.wantedBy, ['multi-user.target']);
    assert.deepEqual(evaluate('failedAssertions'), []);
    assert.deepEqual(evaluate('warnings'), []);
    assert.deepEqual(evaluate('allowedTCPPorts'), [7731], 'the example opens the port');
    assert.deepEqual(evaluate('allowedTCPPorts', '{ lib, ... }: { services.snapback.openFirewall = lib.mkForce false; }'), []);
    // The hardware watchdog (trial boots, DESIGN §11) is the operator's choice: off unless set.
    assert.equal(evaluate('watchdogRuntimeTime'), null);
    assert.equal(evaluate('watchdogRuntimeTime', '{ services.snapback.hardwareWatchdog = "30s"; }'), '30s');
  });

  it('writes to /etc/snapback/agent.json what the agent accepts, with root\'s SSH keys', () => {
    const file = evaluate<string>('agentJson', `{ users.users.root.openssh.authorizedKeys.keys = [ ${nixStr(KEY)} ]; }`);
    const config = parseAgentConfig(JSON.parse(readFileSync(file, 'utf8')), 'the module example');
    assert.equal(config.listen.host, '::');
    assert.equal(config.listen.port, 7731);
    assert.equal(config.system.runner, 'systemd');
    assert.equal(config.confirm.defaultTimeoutSec, 120);
    assert.equal(config.health.checks.length, 1);
    assert.deepEqual(config.authorizedKeys, [KEY]);
    assert.equal(config.stateDir, '/var/lib/snapback');
    assert.equal(config.controlSocket, '/run/snapback/control.sock');
  });

  it('metrics: off by default; metrics.enable, .port, .listenAddress and .openFirewall make the listener the agent accepts', () => {
    const plain = parseAgentConfig(JSON.parse(readFileSync(evaluate<string>('agentJson'), 'utf8')), 'the module example');
    assert.deepEqual(plain.metrics, {}, 'no listener and no textfile unless asked');
    assert.deepEqual(evaluate('tmpfilesRules'), []);

    const on = '{ services.snapback.metrics = { enable = true; port = 9732; listenAddress = "0.0.0.0"; openFirewall = true; }; }';
    const config = parseAgentConfig(JSON.parse(readFileSync(evaluate<string>('agentJson', on), 'utf8')), 'the module with metrics');
    assert.deepEqual(config.metrics, { listen: { host: '0.0.0.0', port: 9732 } });
    assert.deepEqual(evaluate('allowedTCPPorts', on), [7731, 9732]);
    assert.deepEqual(evaluate('warnings', on), []);

    // Loopback by default: opening the firewall for it would do nothing, and the module says so.
    const loop = '{ services.snapback.metrics = { enable = true; openFirewall = true; }; }';
    assert.deepEqual(parseAgentConfig(JSON.parse(readFileSync(evaluate<string>('agentJson', loop), 'utf8'))).metrics.listen, { host: '127.0.0.1', port: 7732 });
    const [warning] = evaluate<string[]>('warnings', loop);
    assert.match(warning ?? '', /metrics\.openFirewall opens port 7732, but the metrics listener is on 127\.0\.0\.1/);
    assert.deepEqual(evaluate('allowedTCPPorts', '{ services.snapback.metrics.enable = true; }'), [7731], 'metrics.openFirewall is off by default');
  });

  it("metrics: with node-exporter enabled, the textfile goes to the directory its textfile collector is given", () => {
    const withExporter = '{ services.prometheus.exporters.node.enable = true; }';
    const config = parseAgentConfig(JSON.parse(readFileSync(evaluate<string>('agentJson', withExporter), 'utf8')), 'the module with node-exporter');
    assert.deepEqual(config.metrics, { textfile: '/var/lib/prometheus-node-exporter-text-files/snapback.prom' });
    assert.deepEqual(evaluate('nodeExporterFlags', withExporter), ['--collector.textfile.directory=/var/lib/prometheus-node-exporter-text-files']);
    assert.deepEqual(evaluate('tmpfilesRules', withExporter), ['d /var/lib/prometheus-node-exporter-text-files 0755 root root -']);

    // A directory the exporter reads already: the file goes there, and no flag or directory is added.
    const own = '{ services.prometheus.exporters.node.enable = true; services.snapback.metrics.textfile.directory = "/var/lib/node-exporter"; }';
    assert.equal(parseAgentConfig(JSON.parse(readFileSync(evaluate<string>('agentJson', own), 'utf8'))).metrics.textfile, '/var/lib/node-exporter/snapback.prom');
    assert.deepEqual(evaluate('nodeExporterFlags', own), []);
    assert.deepEqual(evaluate('tmpfilesRules', own), []);
    // Without the exporter, no file unless asked.
    assert.deepEqual(evaluate('nodeExporterFlags'), []);
  });

  it('lets Nix build through the daemon, and says so in the environment the plain unit file has too', () => {
    const s = evaluate<Service>('service');
    // Builds then run in the daemon's sandbox, not inside the agent's hardened unit.
    assert.equal(s.environment.NIX_REMOTE, 'daemon');
    assert.equal(s.environment.NODE_ENV, 'production');
  });

  it("lists each package once in the service's PATH (NixOS adds coreutils, findutils, gnugrep, gnused, systemd)", () => {
    const s = evaluate<Service>('service');
    assert.deepEqual(s.path.filter((p, i) => s.path.indexOf(p) !== i), []);
    assert.ok(s.path.includes(evaluate<string>('nixPackage')), 'nix.package');
    assert.ok(s.path.includes(evaluate<string>('utilLinux')), 'util-linux');
  });

  it('sets nothing that does nothing: ProtectSystem=full leaves /nix writable', () => {
    // systemd.exec(5): "full" makes /usr, /boot, /efi and /etc read-only, nothing else.
    assert.equal(evaluate<Service>('service').serviceConfig.ReadWritePaths, undefined);
  });

  it('refuses a Nix path anywhere in settings: it would copy a private key into the world-readable store', () => {
    const dir = mkdtempSync(join(tmpdir(), 'snapback-module-'));
    try {
      const id = randomUUID();
      const key = join(dir, `key-${id}.pem`);
      const check = join(dir, `check-${id}.sh`);
      writeFileSync(key, '-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n');
      writeFileSync(check, '#!/bin/sh\nexit 0\n');
      const configuration = `{
        services.snapback.settings.listen.tls = { cert = "/var/lib/snapback/tls/cert.pem"; key = /. + ${nixStr(key)}; };
        services.snapback.settings.health.checks = [ { command = [ (/. + ${nixStr(check)}) ]; } ];
      }`;
      const failed = evaluate<string[]>('failedAssertions', configuration);
      assert.equal(failed.length, 1, failed.join('\n'));
      assert.match(failed[0]!, /services\.snapback\.settings\.listen\.tls\.key\b/);
      assert.match(failed[0]!, /services\.snapback\.settings\.health\.checks\[1\]\.command\[0\]/);
      assert.doesNotMatch(failed[0]!, /tls\.cert/);
      assert.match(failed[0]!, /world-readable/);
      // Even asked for directly, the file is refused rather than written.
      assert.match(evaluationError('agentJson', configuration), /services\.snapback\.settings\.listen\.tls\.key/);
      assert.deepEqual(readdirSync('/nix/store').filter((p) => p.includes(id)), []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("refuses a state directory or control socket outside the directories the unit creates", () => {
    const failed = (stateDir: string, controlSocket: string) =>
      evaluate<string[]>('failedAssertions', `{ services.snapback.settings = { stateDir = ${nixStr(stateDir)}; controlSocket = ${nixStr(controlSocket)}; }; }`);
    assert.deepEqual(failed('/var/lib/snapback/host-a', '/run/snapback/agent.sock'), []);
    // /run/snapback is emptied whenever the unit stops: a trial's record would not survive the
    // restart after the switch. /tmp is the unit's own (PrivateTmp): the console could not connect.
    const messages = failed('/run/snapback/state', '/tmp/snapback.sock');
    assert.equal(messages.length, 2, messages.join('\n'));
    assert.match(messages[0]!, /services\.snapback\.settings\.stateDir \("\/run\/snapback\/state"\).*\/var\/lib\/snapback/s);
    assert.match(messages[1]!, /services\.snapback\.settings\.controlSocket \("\/tmp\/snapback\.sock"\).*\/run\/snapback/s);
    assert.equal(failed('/var/lib/snapback/../elsewhere', '/run/snapback/control.sock').length, 1);
    assert.equal(failed('/var/lib/snapback', '/run/snapback').length, 1);
  });

  it("by default authorizes root's SSH keys: the keys, and the lines of the keyFiles", () => {
    const dir = mkdtempSync(join(tmpdir(), 'snapback-module-'));
    try {
      const bob = 'from="10.0.0.0/8" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkq1m3Fv5l0l2O1xXjN6yFv0m0Gm2r8eD8i6bq0Xl9K bob@desk';
      const carol = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA2yU1yq9m3y6Wq8Q5u0m6mN0Xr2lWq1Z8mF3aQ4k1bC carol@ci';
      const bobFile = join(dir, 'bob.pub');
      const carolFile = join(dir, 'carol.pub');
      // Blank lines and comments, as sshd reads authorized_keys.
      writeFileSync(bobFile, `# Bob, ops\n\n${bob}\n   \n`);
      writeFileSync(carolFile, `  # CI\r\n${carol}`);
      const file = evaluate<string>(
        'agentJson',
        `{ users.users.root.openssh.authorizedKeys = { keys = [ ${nixStr(KEY)} ]; keyFiles = [ (/. + ${nixStr(bobFile)}) ${nixStr(carolFile)} ]; }; }`,
      );
      const config = parseAgentConfig(JSON.parse(readFileSync(file, 'utf8')), 'the module with keyFiles');
      assert.deepEqual(config.authorizedKeys, [KEY, bob, carol]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("the flake's module has a name in error messages, and its formatter is nixpkgs' nixfmt", () => {
    const files = evaluate<string[]>('packageDefinedIn');
    assert.ok(files.some((f) => f.endsWith('/flake.nix#nixosModules.default')), files.join(' '));
    // Two definitions of the same priority: the error lists where each comes from.
    const conflict = '{ lib, pkgs, ... }: { services.snapback.package = lib.mkDefault pkgs.coreutils; }';
    assert.match(evaluationError('service', conflict), /In `[^`']*flake\.nix#nixosModules\.default'/);
    assert.equal(evaluate('formatter'), 'nixfmt');
  });

  it('the plain unit file says what the unit NixOS renders says, in the same sections', () => {
    const s = evaluate<Service>('service');
    const plain = parseUnit(readFileSync(join(ROOT, 'systemd', 'snapback-agent.service'), 'utf8'));
    const nixos = renderUnit(s);
    // ExecStart differs by design (the store path against /usr/local/bin); its arguments do not.
    const args = (argv: string[] | undefined) => argv?.slice(1);
    assert.deepEqual(args(plain.Service?.ExecStart), args(nixos.Service?.ExecStart));
    assert.match(nixos.Service?.ExecStart?.[0] ?? '', /^\/nix\/store\/[^/]+\/bin\/snapback-agent$/);
    delete plain.Service?.ExecStart;
    delete nixos.Service?.ExecStart;
    assert.deepEqual(plain, nixos);
  });
});

type Unit = Record<string, Record<string, string[]>>;

/** Sections, keys and values of a unit file; booleans as true/false, lists split on spaces. */
function parseUnit(text: string): Unit {
  const unit: Unit = {};
  let section: Record<string, string[]> | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = unit[header[1]!] ??= {};
      continue;
    }
    const eq = line.indexOf('=');
    assert.ok(section && eq > 0, `unit file line: ${line}`);
    add(section, line.slice(0, eq), line.slice(eq + 1));
  }
  return unit;
}

function add(section: Record<string, string[]>, key: string, value: unknown): void {
  const v = String(value).replace(/^"(.*)"$/, '$1');
  const normal = ({ yes: 'true', on: 'true', no: 'false', off: 'false' } as Record<string, string>)[v] ?? v;
  // Description is prose; everything else the agent's unit sets is a word or a list of words.
  (section[key] ??= []).push(...(key === 'Description' ? [normal] : normal.split(/\s+/)));
  // Environment= lines come in any order (NixOS sorts them by name).
  if (key === 'Environment') section[key]!.sort();
}

/** The unit text NixOS renders from a service (nixpkgs nixos/lib/systemd-lib.nix: unitConfig, serviceToUnit). */
function renderUnit(s: Service): Unit {
  const unit: Unit = { Unit: {}, Service: {}, Install: {} };
  const section = (name: string, attrs: Record<string, unknown>) => {
    for (const [k, v] of Object.entries(attrs)) for (const x of Array.isArray(v) ? v : [v]) add(unit[name]!, k, x);
  };
  section('Unit', {
    ...(s.description ? { Description: s.description } : {}),
    ...(s.wants.length ? { Wants: s.wants.join(' ') } : {}),
    ...(s.after.length ? { After: s.after.join(' ') } : {}),
    ...s.unitConfig,
  });
  section('Service', {
    Environment: Object.entries(s.environment).flatMap(([k, v]) => (v === null ? [] : [`${k}=${v}`])),
    ...(s.restartIfChanged ? {} : { 'X-RestartIfChanged': false }),
    ...(s.stopIfChanged ? {} : { 'X-StopIfChanged': false }),
    ...s.serviceConfig,
  });
  section('Install', s.wantedBy.length ? { WantedBy: s.wantedBy.join(' ') } : {});
  return unit;
}

describe("the README's NixOS recipe", () => {
  it('shows nixos-module/example-host.nix and example.nix unchanged (the files CI evaluates)', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    for (const f of ['example-host.nix', 'example.nix']) {
      const text = readFileSync(join(ROOT, 'nixos-module', f), 'utf8').trimEnd();
      // Inside a numbered step the block is indented by three spaces.
      const shown = text
        .split('\n')
        .map((l) => (l ? `   ${l}` : ''))
        .join('\n');
      assert.ok(readme.includes(`   \`\`\`nix\n${shown}\n   \`\`\``), `README.md shows nixos-module/${f} as it is`);
    }
  });
});

describe('the Nix package, evaluated with nixpkgs\' lib and stand-in packages', { skip }, () => {
  it('runs the two scripts CI runs, on sources that hold them, with the hash CI checks', () => {
    const e = `import ${join(ROOT, 'test', 'fixtures', 'package-eval.nix')} { nixpkgsLib = /. + ${nixStr(NIXPKGS_LIB)}; }`;
    const p = JSON.parse(execFileSync('nix-instantiate', ['--eval', '--strict', '--json', '--read-write-mode', '--expr', e], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }));
    assert.equal(p.version, JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version);
    // The dependency step: a fixed-output derivation of nix/npm-deps.sh on the lockfile, unfixed.
    assert.match(p.deps.buildPhase, /sh nix\/npm-deps\.sh \. \$out/);
    assert.deepEqual(p.deps.src.sort(), ['nix', 'package-lock.json', 'package.json']);
    assert.deepEqual(p.deps.srcNix, ['npm-deps.sh']);
    assert.equal(p.deps.outputHashMode, 'recursive');
    assert.equal(p.deps.dontFixup, true);
    const ci = readFileSync(join(ROOT, 'scripts', 'check-package.sh'), 'utf8');
    assert.match(ci, /nix\/npm-deps\.sh/);
    assert.match(p.deps.outputHash, /^sha256-[A-Za-z0-9+/]{43}=$/);
    // The build: nix/build.sh over the sources it needs, then wrappers that leave the unit's PATH first.
    assert.match(p.buildPhase, /sh nix\/build\.sh \. \S+\/node_modules \S+ tree/);
    for (const f of ['agent', 'bin', 'controller', 'shared', 'nix', 'package.json', 'package-lock.json', 'tsconfig.json', 'tsconfig.build.json']) assert.ok(p.src.includes(f), f);
    assert.deepEqual(p.srcNix, ['build.sh']);
    assert.match(p.installPhase, /--suffix PATH/);
    assert.doesNotMatch(p.installPhase, /--prefix PATH/);
  });
});
