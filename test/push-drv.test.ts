// A closure with a .drv in it is pushed as it is: the manifest comes from Nix's database (a .drv is
// itself, not its outputs), and nothing is built on either side.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ScratchHost, haveOwnStore, cleanupsAfterAll } from './helpers/host.ts';
import { SYSTEM, haveNix, nixStore, switchScript } from './helpers/nix.ts';

const skip = haveNix() ?? haveOwnStore();
const cleanups = cleanupsAfterAll();

describe('a closure with a .drv in it', { skip }, () => {
  it('is pushed as it is: the .drv travels, nothing is built on either side', async () => {
    const h = new ScratchHost('rv-drv').ownStore().enableWire().install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const marker = join(h.dir, 'built');
    const tag = `${process.pid}-${Date.now()}`;
    writeFileSync(join(h.dir, 'drv.sh'), switchScript(h.calls, h.current, {}));
    const install =
      '/bin/mkdir -p $out/bin $out/share && printf "%s" "$script" > $out/bin/switch-to-configuration && /bin/chmod +x $out/bin/switch-to-configuration && echo $drvref > $out/share/drv';
    writeFileSync(
      join(h.dir, 'drv.nix'),
      `let dep = derivation {
    name = "rv-never-built-${tag}";
    system = "${SYSTEM}";
    builder = "/bin/sh";
    args = [ "-c" "echo built >> ${marker}; /bin/mkdir $out" ];
  };
in derivation {
  name = "nixos-system-drv";
  system = "${SYSTEM}";
  builder = "/bin/sh";
  args = [ "-c" ${JSON.stringify(install)} ];
  script = builtins.readFile ./drv.sh;
  drvref = "\${dep.drvPath}";
}
`,
    );
    const x = execFileSync('nix-build', [join(h.dir, 'drv.nix'), '--no-out-link'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
    const closure = nixStore(['--query', '--requisites', x]).split('\n').filter(Boolean);
    assert.ok(closure.some((p) => p.endsWith('.drv')), 'the closure holds a .drv');
    rmSync(marker, { force: true });
    const fleet = await h.fleet({ target: { storePath: x }, confirmTimeoutSec: 30 });
    const r = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    const built = existsSync(marker);
    assert.equal(r.code, 0, `${r.result?.hosts?.[0]?.message}${built ? ' (and the derivation was built on the operator\'s machine)' : ''}`);
    for (const p of closure) assert.ok(h.hostHas(p), `${p} is on the host`);
    assert.ok(!built, 'nothing was built');
  });
});
