// `npm run demo`: a scratch host on loopback (agent with its own profile, state directory and keys),
// one deployment that passes its probe and is confirmed, one that breaks the service and reverts.
// The NixOS parts that cannot run here (switch-to-configuration, bootloader) are the toplevels' own
// small scripts, as in the tests; Nix, the agent, the controller and the protocol are the real ones.

import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';

function haveNix(): boolean {
  return spawnSync('nix-store', ['--version'], { stdio: 'ignore' }).status === 0;
}

if (!haveNix()) {
  process.stderr.write(`The demo needs Nix (nix-store, nix-build) on this machine.
  Debian/Ubuntu:  sudo apt-get install nix-bin
  elsewhere:      see https://nixos.org/download (single-user install is enough)
then run "npm run demo" again.
`);
  process.exit(2);
}
if (process.getuid?.() === 0) {
  process.env.NIX_CONFIG ??= 'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes\n';
}

const { ScratchHost, CONTROLLER_BIN, haveOwnStore } = await import('../test/helpers/host.ts');
const { writeFlake } = await import('../test/helpers/nix.ts');

const bold = (s: string) => (process.stdout.isTTY ? `\x1b[1m${s}\x1b[0m` : s);
const dim = (s: string) => (process.stdout.isTTY ? `\x1b[2m${s}\x1b[0m` : s);
const say = (s: string) => process.stdout.write(`\n${bold(s)}\n`);

// As root, the host gets a Nix store of its own (a mount namespace), so the push is real.
const ownStore = haveOwnStore() === undefined;
const host = new ScratchHost('demo');
if (ownStore) host.ownStore();
host.enableWire();
const up = join(host.dir, 'service-up');
let exitCode = 0;
try {
  say('1. A scratch host: a system profile with generation 1 running, an agent on 127.0.0.1.');
  host.install();
  writeFileSync(up, '');
  // The "web service" of the host: healthy while the running generation says so.
  const service = createServer((_req, res) => res.writeHead(existsSync(up) ? 200 : 503).end(existsSync(up) ? 'ok\n' : 'down\n'));
  await new Promise<void>((r) => service.listen(0, '127.0.0.1', () => r()));
  const health = `http://127.0.0.1:${(service.address() as { port: number }).port}/health`;
  await host.start();
  const port = await host.port();
  console.log(dim(`   state directory ${host.stateDir}\n   agent on ws://127.0.0.1:${port}, host key ${host.hostPublicKey.slice(0, 40)}…`));

  say(`2. Your flake, on this machine: web1's system, built here with real Nix${ownStore ? ' (the host has its own, separate store)' : ''}.`);
  const flake = join(host.dir, 'infra');
  const version = (afterLink: string) => writeFlake(flake, 'web1', host.calls, host.current, { afterLink, closure: { paths: 3, sizeKiB: 512 } });
  console.log(dim(`   ${flake}/flake.nix: nixosConfigurations.web1.config.system.build.toplevel`));

  const deploy = async () => {
    const fleet = await host.fleet({ confirmTimeoutSec: 20, probes: [{ http: health, timeoutSec: 4 }] });
    console.log(dim(`   $ snapback deploy web1 --flake ${flake} --fleet ${fleet}`));
    // Not spawnSync: the demo's own event loop serves the health endpoint meanwhile.
    const child = spawn(process.execPath, [CONTROLLER_BIN, 'deploy', 'web1', '--flake', flake, '--fleet', fleet], { stdio: 'inherit', env: { ...process.env, SSH_AUTH_SOCK: '' } });
    return new Promise<number>((resolve) => child.on('exit', (code) => resolve(code ?? 1)));
  };

  say('3. Deploy it: build here → push the closure → activate → fresh connection → probe → confirm.');
  version(`touch ${up}`);
  const first = await deploy();
  const good = host.running();
  console.log(dim(`   exit ${first}; boot default is now ${host.bootDefault() === good && good !== host.gen1 ? 'the new system' : 'unchanged'}`));

  say('4. Change the flake so the service goes down, deploy again: the probe fails, the host reverts.');
  version(`rm -f ${up}  # a firewall change that takes the service down`);
  const second = await deploy();
  console.log(dim(`   exit ${second}; running ${host.running() === good ? 'the confirmed system again' : host.running()}; service ${existsSync(up) ? 'up' : 'down'}`));

  say('5. What the console on the host says.');
  const run = (args: string[]) => console.log(execFileSync(process.execPath, [join(import.meta.dirname, '..', 'bin', 'snapback-agent.js'), ...args, '--config', host.configPath], { encoding: 'utf8' }).trimEnd());
  run(['status']);
  run(['history']);
  exitCode = first === 0 && second === 1 ? 0 : 1;
  say(exitCode === 0 ? 'Demo finished: one confirmed, one reverted.' : 'Demo finished with an unexpected result.');
  service.close();
} finally {
  await host.cleanup();
  rmSync(host.dir, { recursive: true, force: true });
}
process.exit(exitCode);
